"""The training loop: a frozen teacher supervises a student, step by step, on Accelerate.

Read ``train`` top to bottom: set-up, an evaluation before training, then one optimizer step per
iteration (the policy picks the sequences, the divergence is summed over response tokens and
normalised once by the global token count), evaluation and checkpoints once in a while, ``final/``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from distill.checkpoint import RunState, StopSignals, capture_rng, flatten_config, latest_checkpoint, rank_state, reapply_schedule, restore_rng, resume_point, save_checkpoint
from distill.config import ModelSpec, RunConfig, dump_config
from distill.data import BatchSampler, collate, load_examples, load_lm_corpus
from distill.evaluation import Evaluator
from distill.fused import plan_fused_head
from distill.generation import ResponseGenerator
from distill.hardware import resolve_precision
from distill.models import add_lora, check_stop_ids, freeze, load_model, load_tokenizer, merge_adapter, share_vocabulary, vocab_size
from distill.objective import Objective, group_counts, group_denominator, micro_batch_loss, token_cross_entropy
from distill.errors import ConfigError, RunStopped
from distill.outputs import RunFiles, prepare_output_dir, reopen_output_dir
from distill.policy import SamplingContext, as_groups
from distill.registry import Registry, default_registry
from distill.teacher_cache import TeacherCache, cached_micro_batch_loss, derives_from_teacher, policy_generates
from distill.vocabulary import TextBridge, check_data_ids, cross_tokenizer_error, mismatch, student_tokenizer_ref


@dataclass
class RunResult:
    """What a finished run reports (also in the output folder's files)."""

    output_dir: Path
    steps: int
    seconds: float
    before: dict[str, float]
    after: dict[str, float]
    sources: dict[str, int] = field(default_factory=dict)
    final_loss: float = math.nan
    skipped: int = 0
    """Steps skipped because the loss or the gradients were not finite (``train.skip_nonfinite``)."""
    main_process: bool = True
    """False in the other processes of a multi-process run (they print nothing)."""

    @property
    def student_share(self) -> float:
        """Share of steps trained on student-generated outputs (fresh or replayed)."""
        total = sum(self.sources.values())
        return (self.sources.get("student", 0) + self.sources.get("replay", 0)) / total if total else 0.0


Reporter = Callable[[str, dict[str, Any]], None]

CROSS_TOKENIZER_NOTE = ("teacher and student tokenizers differ: sequence-level KD; the teacher answers in its own chat template, "
                        "the student trains with token cross-entropy on that text in its own tokens (no logit-level term); "
                        "validation: CE and ROUGE-L against the teacher's answers, no KL")


def train(config: RunConfig, *, registry: Registry | None = None, report: Reporter | None = None, overwrite: bool = False, resume: bool = False) -> RunResult:
    """Run the distillation described by ``config``; ``report(kind, record)`` sees every event.

    ``resume``: continue the run in ``config.output_dir`` from its newest checkpoint (see
    ``distill.checkpoint``); the steps after it are the ones an uninterrupted run takes.
    """
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    report = report or (lambda kind, record: None)
    registry = registry or default_registry()
    # `auto` precision and dtypes become what this hardware computes fastest; config.yaml keeps the answer
    cfg, precision, precision_warning = resolve_precision(config)
    seed = cfg.train.seed
    # --- build everything that can fail on bad input before touching the output folder
    checkpoint = resume_point(cfg) if resume else None
    objective = Objective(cfg, registry)  # one term per source; the run's divergence for the others
    divergence = objective.default  # and for evaluation
    policy = registry.get_policy(cfg.policy.name, **cfg.policy.params)
    objective.check_sources(policy, cfg.policy.name)
    # with a teacher cache, dataset sequences need no teacher; a policy that never generates never loads it
    cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
    accelerator = _accelerator(cfg)
    if not accelerator.is_main_process:
        report = lambda kind, record: None  # one console: the main process's
    if precision_warning:
        report("warning", {"message": precision_warning})
    set_seed(seed)
    policy.reseed(seed)  # the same seed on every rank: every rank draws the same branch
    teacher = load_model(cfg.teacher, "teacher") if cache is None or policy_generates(policy) else None  # first: a wrong --teacher is named as such
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher)  # the teacher's
    # a prune:K student is cut from the teacher: loaded for that alone when the run needs no teacher
    student = _load_student(cfg.student, checkpoint, teacher if teacher is not None or not derives_from_teacher(cfg.student) else load_model(cfg.teacher, "teacher"))
    own = student_tokenizer_ref(cfg.student, cfg.student.tokenizer)
    student_tokenizer = load_tokenizer(own) if own else tokenizer
    # one vocabulary (logit-level), or text in between (sequence-level KD across tokenizers)
    difference = mismatch(tokenizer, student_tokenizer) if student_tokenizer is not tokenizer else None
    apart = difference is not None
    if apart and getattr(policy, "name", None) != "teacher":
        raise cross_tokenizer_error(difference, cfg.policy.name)
    heads = (vocab_size(teacher) if teacher is not None else len(tokenizer), vocab_size(student))
    n_logits = share_vocabulary(teacher, student, tokenizer, student_tokenizer, shared=not apart)
    if own is None and not str(cfg.student.ref or "").startswith("prune:") and heads[0] != heads[1]:
        report("warning", {"message": f"the student's folder has no tokenizer, so the teacher's is assumed; their heads differ "
                                      f"({heads[0]} and {heads[1]} rows): if the student was trained with another tokenizer, "
                                      "set student.tokenizer=DIR"})
    stop_warning = check_stop_ids(teacher, student, tokenizer, n_logits, student_tokenizer if apart else None)
    if stop_warning:
        report("warning", {"message": stop_warning})
    data_tokenizer = student_tokenizer if apart else tokenizer
    train_set, val_set, dropped = load_examples(cfg.data, data_tokenizer, seed)
    if not apart and len(student_tokenizer) != len(tokenizer):
        check_data_ids(train_set + val_set, n_logits, "student" if len(student_tokenizer) < len(tokenizer) else "teacher")
    if cache is not None:  # before anything is written: a cache of another teacher, tokenizer or data is refused
        if apart:
            raise ConfigError("--teacher-cache: holds log-probs over the teacher's tokens; a student with another tokenizer trains on generated text, drop the cache")
        cache.check_run(cfg, tokenizer, train_set + val_set, n_logits)
    lm_blocks = load_lm_corpus(cfg.data.lm_path, student_tokenizer, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens) if cfg.data.lm_path and cfg.train.lm_weight > 0 else None
    lengths = [(len(e.prompt_ids), len(e.response_ids)) for e in train_set] if cfg.data.group_by_length != "off" else None
    sampler = BatchSampler(len(train_set), cfg.train.batch_size, seed, accelerator.process_index, accelerator.num_processes, lengths, cfg.train.grad_accum,
                           grouping=cfg.data.group_by_length if lengths else "groups")
    evaluates_at = _eval_schedule(cfg.eval.every, len(train_set) // (cfg.train.batch_size * accelerator.num_processes), cfg.train.grad_accum)
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        rank_state(saved, accelerator)  # fails now if the number of processes changed
    if not accelerator.is_main_process:
        out = Path(cfg.output_dir)
    elif checkpoint:
        out = reopen_output_dir(cfg.output_dir, checkpoint.step)
    else:  # a new run, or a resumed one that never reached its first checkpoint: start over
        out = prepare_output_dir(cfg.output_dir, overwrite=overwrite or resume)
    files = RunFiles(out, accelerator.is_main_process)
    files.write_text("config.yaml", dump_config(cfg))
    accelerator.init_trackers(cfg.log.project, config=_tracker_config(cfg))  # main process only; none unless log.with

    trainable = [p for p in student.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = _adamw(trainable, cfg.train.lr, cfg.train.weight_decay)
    schedule = "constant_with_warmup" if cfg.train.schedule == "constant" else cfg.train.schedule
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    student.train()  # from_pretrained returns eval mode; dropout (GPT-2) belongs to training
    teacher = _prepare_teacher(accelerator, teacher) if teacher is not None else None
    unwrap = accelerator.unwrap_model
    synced = synced_generation(accelerator)
    inference_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision) if cfg.generation.inference_copy and not synced else None
    # generation has no backward to hold memory for: it answers a step's examples (all micro-batches) together
    generation_batch = cfg.train.batch_size * cfg.train.grad_accum
    generate = ResponseGenerator(data_tokenizer, cfg.generation, generation_batch, unwrap, synced, _full_params(accelerator), inference_dtype)
    # even: a policy may ask the processes for different numbers of responses (contrastive's kept ones)
    context = SamplingContext(lambda ex: generate(student, ex, even=True), lambda ex: generate(teacher, ex, even=True))
    progress = lambda phase, done, total: report("progress", {"phase": phase, "done": done, "total": total})  # long passes
    ends = {"teacher": set(generate.stop_ids(teacher)) if teacher is not None else set(), "student": set(generate.stop_ids(student))}
    if apart:  # the teacher answers in its own tokens; the student trains on that text in its own
        generate_teacher = ResponseGenerator(tokenizer, cfg.generation, generation_batch, unwrap, synced, _full_params(accelerator), inference_dtype)
        bridge = TextBridge(tokenizer, student_tokenizer, cfg.data, generate_teacher.stop_ids(teacher))
        context = SamplingContext(context.generate_student, lambda ex: bridge.generate_teacher(lambda prompts: generate_teacher(teacher, prompts), ex))
        ends["teacher"] = {student_tokenizer.eos_token_id}
        # validation: the teacher's greedy answers are the references (val CE and ROUGE-L against them)
        answers = generate_teacher(teacher, bridge.teacher_prompts(val_set), greedy=True, progress=functools.partial(progress, "teacher answers (validation)"))
        val_set = [bridge.to_student(e, a) for e, a in zip(val_set, answers)]
    ends["replay"] = ends["student"]
    # the heads fused into the loss where they allow it (train.fused_head), checked on one real example
    probe = collate(train_set[:1], data_tokenizer.pad_token_id).to(accelerator.device)
    fused, head_line = plan_fused_head(cfg.train.fused_head, student, None if apart else teacher, probe, unwrap, accelerator)
    evaluator = Evaluator(val_set, data_tokenizer, divergence, generate, cfg.eval.batch_size, cfg.eval.rouge_samples, accelerator, kl=registry.get_divergence("kl"),
                          rouge_before=cfg.eval.rouge_before, progress=progress, fused=fused, rouge_draws=cfg.eval.rouge_draws, seed=seed)
    evaluate = functools.partial(evaluator, with_teacher=not apart)
    if cache is not None:  # validation divergences from the cache too (coarse, like training's)
        evaluate = lambda student, _teacher, **options: evaluator(student, cache, with_teacher=True, **options)  # noqa: E731
    lm_rng = random.Random(seed + accelerator.process_index)
    rank_log = _rank_log(accelerator)
    report("start", {"train_examples": len(train_set), "val_examples": len(val_set), "dropped": dropped, "output_dir": str(out), "processes": accelerator.num_processes, "precision": precision,
                     "mode": CROSS_TOKENIZER_NOTE if apart else cache.note(loaded=teacher is not None) if cache is not None else None, "head": head_line})

    if saved is None:
        # --- evaluate before training: the "before" numbers and the adaptive policy's reference loss
        before = evaluate(student, teacher, rouge="before")
        policy.observe_eval(0, before["val_loss"])
        files.append("eval.jsonl", {"step": 0, **before})
        accelerator.log(_numbers("eval", before), step=0)
        report("eval", {"step": 0, **before})
        run = RunState(before=before, after=before)
    else:
        # --- or continue exactly where the checkpoint left off (last of all, the random generators)
        run = RunState.from_state_dict(saved["run"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        reapply_schedule(scheduler)
        sampler.load_state_dict(saved["sampler"])
        local = rank_state(saved, accelerator)
        policy.load_state_dict(local["policy"])
        lm_rng.setstate(local["lm_rng"])
        restore_rng(local["rng"])
        report("resume", {"step": run.step, "path": str(checkpoint.path)})

    def save(step: int) -> Path:
        shared = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(), "run": run.state_dict()}
        local = {"policy": policy.state_dict(), "lm_rng": lm_rng.getstate(), "rng": capture_rng()}
        path, size = save_checkpoint(files, accelerator, student, student_tokenizer, step, shared, local, cfg.checkpoint.keep)
        report("checkpoint", {"step": step, "path": str(path), "bytes": size})
        return path

    def micro_loss(batch, term, denominator: float, weight: float, source: str, examples: list):
        options = {"kd_weight": cfg.train.kd_weight * weight, "normalize": cfg.train.normalize}
        cached = cache.targets(examples, batch.response_mask.shape[1], accelerator.device) if cache is not None and not apart else None
        if cached is not None:  # the dataset's sequences: the teacher's top-K from the cache, no teacher forward
            return cached_micro_batch_loss(student, batch, cached, term.divergence, denominator, term.ce_weight, unwrap, **options)
        return micro_batch_loss(student, None if apart else _live(teacher, source), batch, term.divergence, denominator, term.ce_weight, unwrap,
                                fused=fused, **options)

    lm_loss = None if lm_blocks is None else lambda n: _lm_loss(student, lm_blocks, lm_rng, cfg.train.batch_size, accelerator) / n

    batches = iter(sampler)
    started = time.perf_counter()
    trained_seconds = 0.0  # optimizer steps only, for train.max_seconds
    with StopSignals() as stop:
        for step in range(run.step + 1, cfg.train.max_steps + 1):
            tick = time.perf_counter()
            # --- the policy picks this step's sequences (one draw, the same on every rank)
            examples = [train_set[i] for _ in range(cfg.train.grad_accum) for i in next(batches)]
            groups = as_groups(policy.sample(step, cfg.train.max_steps, examples, context), cfg.policy.name)  # {source: examples}
            source = "+".join(groups)
            examples_of = {s: [group[i: i + cfg.train.batch_size] for i in range(0, len(group), cfg.train.batch_size)] for s, group in groups.items()}
            micro = {s: [collate(part, data_tokenizer.pad_token_id).to(accelerator.device) for part in parts] for s, parts in examples_of.items()}
            # --- forward and backward; each group's term is normalised once, by its global token (or sequence) count
            counts = group_counts(micro, accelerator)
            step_loss, terms = _backward_groups(micro, counts, objective, step, cfg, accelerator, student, micro_loss, lm_loss, examples_of)
            # --- one optimizer step, never with a non-finite loss or gradient (that would ruin the weights)
            norm = accelerator.clip_grad_norm_(student.parameters(), cfg.train.max_grad_norm) if cfg.train.max_grad_norm > 0 else None
            finite = math.isfinite(step_loss) and (norm is None or math.isfinite(float(norm)))
            n_tokens = int(round(sum(tokens for tokens, _ in counts.values())))
            # with train.normalize: sequence every sequence weighs the same, so steps are weighed by their sequences
            units = n_tokens if cfg.train.normalize == "token" else sum(sequences for _, sequences in counts.values())
            weight = run.token_weight(units) if cfg.train.step_weight == "tokens" else 1.0
            if finite:
                if weight != 1.0:
                    _scale_gradients(optimizer, weight)
                optimizer.step()
            elif cfg.train.skip_nonfinite:
                run.skipped += 1
            else:
                raise _nonfinite_stop(step, step_loss, norm, out)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # --- log one line per optimizer step
            run.step, run.last_loss = step, step_loss if finite else run.last_loss
            for s in groups:
                run.sources[s] = run.sources.get(s, 0) + 1
            every_batch = [b for batches in micro.values() for b in batches]
            record = {"step": step, "loss": step_loss if finite else None, "source": source, "tokens": n_tokens, "padding": _padding(every_batch, accelerator),
                      "seconds": time.perf_counter() - tick, "lr": scheduler.get_last_lr()[0]}
            if len(groups) > 1 or cfg.objective.terms:
                record["terms"] = terms
                if objective.scheduled:
                    record["term_weights"] = {s: round(objective.term(s).weight(step, cfg.train.max_steps, objective.curriculum), 6) for s in groups}
            if norm is not None:
                record["grad_norm"] = round(float(norm), 4)  # before clipping
            if cfg.train.step_weight == "tokens":
                record["step_weight"] = round(weight, 4)
            generated = [(s, e) for s, group in groups.items() if s in ends for e in group]
            if generated:  # generated responses: the share that reached generation.max_new_tokens
                record["truncated"] = _share(sum(e.response_ids[-1] not in ends[s] for s, e in generated), len(generated), accelerator)
            record.update(policy.metrics())
            if not finite:
                record["skipped"] = True
            trained_seconds += record["seconds"]
            last = step == cfg.train.max_steps or _budget_spent(cfg.train.max_seconds, trained_seconds, accelerator)
            files.append("metrics.jsonl", record)
            accelerator.log(_numbers("train", record), step=step)
            rank_log({"step": step, "source": source, "tokens": sum(b.n_tokens for b in every_batch)})
            report("step", record)
            # --- evaluate once in a while (and at the end)
            if last or evaluates_at(step):
                run.after = evaluate(student, teacher, with_rouge=last)  # ROUGE: before and after
                policy.observe_eval(step, run.after["val_loss"])
                files.append("eval.jsonl", {"step": step, **run.after})
                accelerator.log(_numbers("eval", run.after), step=step)
                report("eval", {"step": step, **run.after})
            # --- checkpoint once in a while, at the end, and when asked to stop (Ctrl-C, SIGTERM)
            signum = stop.requested(accelerator)
            if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or signum:
                path = save(step)
            if signum:
                name = signal.Signals(signum).name
                raise RunStopped(f"{name} after step {step}; checkpoint saved to {path}; continue with: distill run --resume --output-dir {out}", 128 + signum)
            if last:  # max_steps, or the train.max_seconds budget is spent
                break

    # --- the final student, loadable with AutoModelForCausalLM.from_pretrained (with LoRA: the adapters, and merged/ on request)
    state = accelerator.get_state_dict(student)  # a collective call under FSDP / ZeRO-3

    def fill_final(folder: Path) -> None:
        unwrap(student).save_pretrained(folder, state_dict=state)
        student_tokenizer.save_pretrained(folder)
        if cfg.student.lora is not None and cfg.student.lora.save_merged:
            base_teacher = unwrap(teacher) if teacher is not None else load_model(cfg.teacher, "teacher") if derives_from_teacher(cfg.student) else None
            merged = merge_adapter(load_model(cfg.student, "student", teacher=base_teacher), folder, "student")
            merged.save_pretrained(folder / "merged")
            student_tokenizer.save_pretrained(folder / "merged")

    files.write_folder("final", fill_final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    result = RunResult(out, run.step, time.perf_counter() - started, run.before, run.after, run.sources, run.last_loss, run.skipped, accelerator.is_main_process)
    report("end", {"output_dir": str(out), "seconds": result.seconds, "skipped": run.skipped})
    return result


def _backward_groups(micro: dict[str, list], counts: dict[str, tuple[float, float]], objective: Objective, step: int, cfg: RunConfig, accelerator,
                     student, micro_loss, lm_loss, examples_of: dict[str, list]) -> tuple[float, dict[str, float]]:
    """Forward and backward of every micro-batch of every group of one optimizer step.

    ``micro_loss(batch, term, denominator, weight, source, examples)`` is one micro-batch's loss
    (``micro_batch_loss``; ``examples``: the micro-batch's, which ``examples_of[source]`` lists);
    ``lm_loss(n)`` the auxiliary LM loss share of one of ``n`` micro-batches (None: no LM loss). Returns the
    step's loss (weighted terms, cross-entropy, LM loss) and each group's unweighted term value
    (its divergence, or its cross-entropy without a teacher), both averaged over processes.
    """
    batches = [(s, batch, examples_of[s][j]) for s, group in micro.items() for j, batch in enumerate(group)]
    step_loss = torch.zeros((), device=accelerator.device)
    terms = torch.zeros(len(micro), dtype=torch.float64)
    index = {s: i for i, s in enumerate(micro)}
    for i, (s, batch, examples) in enumerate(batches):
        term = objective.term(s)
        denominator = group_denominator(counts[s], cfg.train.normalize, accelerator.num_processes)
        # each backward() adds to the gradients, so only the last micro-batch synchronises them
        with _accumulating(accelerator, student, last=i == len(batches) - 1):
            loss, parts = micro_loss(batch, term, denominator, term.weight(step, cfg.train.max_steps, objective.curriculum), s, examples)
            if lm_loss is not None:
                loss = loss + cfg.train.lm_weight * lm_loss(len(batches))
            accelerator.backward(loss)
        step_loss += loss.detach()
        terms[index[s]] += parts.get("divergence", parts.get("ce", 0.0))
    together = torch.cat([step_loss.reshape(1).double().cpu(), terms])
    if accelerator.num_processes > 1:  # one reduction: the same numbers on every rank
        together = accelerator.reduce(together.to(accelerator.device), reduction="mean").cpu()
    values = together.tolist()
    return values[0], {s: values[1 + index[s]] for s in micro}


def _eval_schedule(every: int | str, micro_per_epoch: int, grad_accum: int) -> Callable[[int], bool]:
    """Whether step ``step`` ends with an evaluation (besides the last): every ``every`` steps, or with
    ``every="epoch"`` at each step that finishes a pass over the training set (``micro_per_epoch``
    micro-batches per process; a step takes ``grad_accum``, so it may finish an epoch part-way)."""
    if every == "epoch":
        return lambda step: step * grad_accum // micro_per_epoch > (step - 1) * grad_accum // micro_per_epoch
    return lambda step: bool(every) and step % every == 0


def _live(teacher, source: str):
    """The loaded teacher, for sequences a cache does not hold."""
    if teacher is None:
        raise RuntimeError(f"a {source} step holds sequences the teacher cache lacks, and the policy said it never generates (generates = False)")
    return teacher


@torch.no_grad()
def _scale_gradients(optimizer, weight: float) -> None:
    """``train.step_weight: tokens``: after clipping, the step's gradient times its token weight (the
    optimizer's parameters: after ``prepare`` under FSDP these are its flat shards)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, weight)


def _padding(micro, accelerator) -> float:
    """Share of the positions computed in this step (all micro-batches, all processes) that are padding."""
    return round(1.0 - _share(sum(b.n_real for b in micro), sum(b.n_positions for b in micro), accelerator), 4)


def _share(part: float, whole: float, accelerator) -> float:
    """``part / whole`` summed over all processes, rounded to 4 places."""
    counts = torch.tensor([part, whole], dtype=torch.float64)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    part, whole = counts.tolist()
    return round(part / max(whole, 1.0), 4)


def _budget_spent(max_seconds: float, seconds: float, accelerator) -> bool:
    """Whether ``train.max_seconds`` (0 = no limit) is reached. Processes decide on the mean of their
    clocks, so that all of them take the same last step."""
    if max_seconds <= 0:
        return False
    if accelerator.num_processes > 1:
        seconds = float(accelerator.reduce(torch.tensor(seconds, device=accelerator.device), reduction="mean"))
    return seconds >= max_seconds


def _nonfinite_stop(step: int, loss: float, norm, out: Path) -> RunStopped:
    """The one-line stop at a non-finite step (exit code 3), naming the checkpoint to go back to."""
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {float(norm)}"
    last = latest_checkpoint(out)
    where = f"last good checkpoint: {last.path}" if last else "no checkpoint was written yet"
    return RunStopped(
        f"step {step}: {what}; stopped without updating the weights; {where}. Lower train.lr and start again, "
        f"or skip such steps: distill run --resume --output-dir {out} --set train.skip_nonfinite=true",
        3,
    )


# --- set-up on Accelerate: precision, trackers, the teacher, generation under sharding


def _accelerator(cfg: RunConfig):
    """An Accelerator with the student's autocast precision and the trackers of ``log.with``.

    User errors, one line each: ``accelerate launch --mixed_precision`` other than
    ``train.precision``, fp16 without a GPU (Accelerate would silently run float32), a tracker whose
    package is missing, a launch config this machine cannot run (FSDP without a GPU).
    """
    import accelerate.utils
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision, trackers = cfg.train.precision, cfg.log.with_
    mixed_precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", mixed_precision)  # set by `accelerate launch`
    if launched != mixed_precision:
        asked = {"no": "fp32"}.get(launched, launched)
        raise ConfigError(
            f"accelerate launch asks for mixed precision {launched} but train.precision is {precision}; distill's setting "
            f"decides: pass --set train.precision={asked}, or launch with --mixed_precision {mixed_precision}"
        )
    for name in trackers:
        installed = getattr(accelerate.utils, f"is_{name}_available", lambda: True)
        if not installed():
            raise ConfigError(f"log.with {name}: the {name} package is not installed; pip install {name}, or drop it from log.with")
    options = {"log_with": trackers, "project_dir": str(Path(cfg.output_dir) / "trackers")} if trackers else {}
    AcceleratorState._reset_state()  # another run in this process (tests, a notebook) may use another precision
    try:
        # step_scheduler_with_optimizer=False: the schedule counts optimizer steps; Accelerate would
        # otherwise step it once per process at each optimizer step (its data loaders scale with them)
        accelerator = Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False, **options)
    except ValueError as error:
        raise ConfigError(f"train.precision {precision}: {str(error).splitlines()[0]}") from None
    except RuntimeError as error:
        raise ConfigError(f"Accelerate cannot start with this launch config here: {str(error).splitlines()[0]}") from None
    if precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.precision fp16: needs a GPU (on CPU Accelerate ignores it and the run would be float32); use bf16 or fp32")
    if accelerator.distributed_type.name == "DEEPSPEED":  # it wants the micro-batch size; we prepare no data loader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    return accelerator


def synced_generation(accelerator) -> bool:
    """Whether generation needs ``synced_gpus``: the weights are sharded over processes (FSDP, or
    DeepSpeed ZeRO-3), so every forward is a collective that every rank must enter, until the
    longest sequence of any rank is done. DDP and ZeRO-1/2 keep whole weights on every rank."""
    if accelerator.num_processes < 2:
        return False
    kind = accelerator.distributed_type.name
    if kind == "FSDP":
        return True
    if kind == "DEEPSPEED":
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def _prepare_teacher(accelerator, teacher):
    """The frozen teacher for inference only: no gradients, no optimizer state, no DDP wrapper.

    Under FSDP it is sharded like the student (Accelerate's evaluation mode would neither shard it
    nor move it to the GPU); its forwards are then collectives, which every rank enters together.
    Elsewhere (DDP, DeepSpeed) every process holds a whole copy.
    """
    teacher.eval().requires_grad_(False)
    if accelerator.distributed_type.name != "FSDP":
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, teacher)
    return accelerator.prepare_model(teacher)


def _full_params(accelerator):
    """For generation under FSDP1: gather the root module's own parameters (embeddings, head); the
    wrapped layers inside gather theirs in their forward. ``None``: nothing to gather."""
    if accelerator.distributed_type.name != "FSDP" or getattr(accelerator, "is_fsdp2", False):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return lambda model: FSDP.summon_full_params(model, writeback=False, recurse=False) if isinstance(model, FSDP) else nullcontext()


@contextmanager
def _accumulating(accelerator, student, *, last: bool):
    """One micro-batch's backward: before the last one, gradients only add up locally (no DDP
    all-reduce, and no DeepSpeed optimizer step, which Accelerate's backward takes when
    ``sync_gradients``)."""
    accelerator.gradient_state._set_sync_gradients(last)  # what Accelerate's own accumulate() sets
    with nullcontext() if last else accelerator.no_sync(student):
        yield


def _adamw(parameters: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all weights) where torch has it for the weights' device: on CPU
    about 5x faster than the default per-tensor loop (measured on 135M-model shapes), the same math."""
    fused = bool(parameters) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _load_student(spec: ModelSpec, checkpoint, teacher):
    """The student to train; when resuming, its weights from the checkpoint (with LoRA: the base as
    configured and the adapters from the checkpoint)."""
    if spec.lora is None:
        student = load_model(checkpoint.student_ref(spec) if checkpoint else spec, "student", teacher=teacher)
        freeze(student, spec.freeze)
        return student
    return add_lora(load_model(spec, "student", teacher=teacher), spec.lora, checkpoint.student_dir if checkpoint else None)


def _tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` values that every tracker stores."""
    flat = flatten_config(cfg.model_dump(mode="json", by_alias=True))
    return {key: (", ".join(map(str, value)) if isinstance(value, list) else json.dumps(value) if isinstance(value, dict) else value) for key, value in flat.items()}


def _numbers(prefix: str, record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics or eval record, as tracker scalars ``prefix/name``."""
    return {f"{prefix}/{k}": v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _rank_log(accelerator) -> Callable[[dict[str, Any]], None]:
    """With ``DISTILL_RANK_LOG=DIR``, every process appends its own view of each step (source,
    local tokens) to ``DIR/rank-<i>.jsonl``: evidence that all ranks took the same branch."""
    folder = os.environ.get("DISTILL_RANK_LOG")
    if not folder:
        return lambda record: None
    path = Path(folder) / f"rank-{accelerator.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(record: dict[str, Any]) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    return write


def _lm_loss(student, blocks: list[list[int]], rng: random.Random, batch_size: int, accelerator) -> torch.Tensor:
    """Student cross-entropy on a batch of plain-text blocks (the auxiliary LM loss)."""
    ids = torch.tensor([blocks[rng.randrange(len(blocks))] for _ in range(batch_size)], device=accelerator.device)
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    mask = torch.ones(ids[:, 1:].shape, dtype=torch.bool, device=ids.device)
    return token_cross_entropy(logits, ids[:, 1:], mask)


__all__ = ["RunResult", "train"]
