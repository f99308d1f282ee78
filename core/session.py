"""A run's set-up: everything ``distill.engine.train`` needs, built and checked in one place.

``open_session`` loads the models, the tokenizers and the data, checks them against each other (and
against a teacher cache), and only then touches the output folder. The ``Session`` it returns holds
what the loop uses, and the few things it does with them: one micro-batch's loss, a checkpoint, the
state a checkpoint restores, the final folder.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distill.checkpoint import (
    RunState,
    capture_rng,
    flatten_config,
    rank_state,
    reapply_schedule,
    restore_rng,
    resume_point,
    save_checkpoint,
)
from distill.config import ModelSpec, RunConfig, dump_config
from distill.data import BatchSampler, collate, load_examples, load_lm_corpus
from distill.distributed import full_params, make_accelerator, prepare_teacher, rank_log, synced_generation
from distill.errors import ConfigError
from distill.evaluation import Evaluator
from distill.fused import plan_fused_head
from distill.generation import ResponseGenerator
from distill.hardware import resolve_precision
from distill.models import (
    add_lora,
    check_stop_ids,
    freeze,
    load_model,
    load_tokenizer,
    merge_adapter,
    share_vocabulary,
    vocab_size,
)
from distill.objective import Objective, micro_batch_loss, token_cross_entropy
from distill.outputs import RunFiles, prepare_output_dir, reopen_output_dir
from distill.policy import SamplingContext
from distill.registry import Registry
from distill.resolve import RunPlan
from distill.teacher_cache import (
    DamagedPart,
    TeacherCache,
    cached_micro_batch_loss,
    derives_from_teacher,
    policy_generates,
)
from distill.vocabulary import TextBridge, check_data_ids, cross_tokenizer_error, mismatch, student_tokenizer_ref

Reporter = Callable[[str, dict[str, Any]], None]

CROSS_TOKENIZER_NOTE = (
    "teacher and student tokenizers differ: sequence-level KD; the teacher answers in its own chat template, "
    "the student trains with token cross-entropy on that text in its own tokens (no logit-level term); "
    "validation: CE and ROUGE-L against the teacher's answers, no KL"
)


@dataclass(eq=False)
class Session:
    """One run's parts, ready to train: the student is prepared by Accelerate, the output folder open."""

    cfg: RunConfig
    """The resolved config (``auto`` precision and dtypes decided); ``config.yaml`` holds it."""
    accelerator: Any
    report: Reporter
    """The console's events; a no-op in every process but the main one."""
    objective: Objective
    policy: Any
    cache: TeacherCache | None
    teacher: Any
    """None when a teacher cache serves every sequence the policy can pick."""
    student: Any
    student_tokenizer: Any
    data_tokenizer: Any
    """The tokenizer the training sequences are in: the student's when the two tokenizers differ."""
    apart: bool
    """Teacher and student tokenizers differ: sequence-level KD, no logit-level term."""
    train_set: list
    sampler: BatchSampler
    evaluates_at: Callable[[int], bool]
    evaluate: Callable[..., dict[str, float]]
    """``evaluate(student, teacher, rouge=... | with_rouge=...)``: the validation numbers."""
    context: SamplingContext
    ends: dict[str, set[int]]
    """Stop ids per generated source: a response that ends on none of them hit the token cap."""
    fused: Any
    optimizer: Any
    scheduler: Any
    out: Path
    files: RunFiles
    saved: dict[str, Any] | None
    """The checkpoint's contents when resuming, else None."""
    checkpoint: Any
    lm_blocks: list[list[int]] | None
    lm_rng: random.Random
    rank_log: Callable[[dict[str, Any]], None]

    def cached_targets(self, batches: list[tuple[str, Any, list]], sources: list[str]) -> list[torch.Tensor | None]:
        """The teacher cache's answer for each ``(source, batch, examples)`` micro-batch of a step, or
        None where the live teacher answers. A group reads the cache only if it holds every micro-batch
        of that group on every process: one reduction a step, so that every process runs the same
        number of teacher forwards. A damaged part found by one process stops every process."""
        if self.cache is None or self.apart:
            return [None] * len(batches)
        found: list[torch.Tensor | None] = []
        damaged: DamagedPart | None = None
        for _, batch, examples in batches:
            try:
                found.append(self.cache.targets(examples, batch.response_mask.shape[1], self.accelerator.device))
            except DamagedPart as error:
                damaged = error
                found.append(None)
        misses = torch.zeros(len(sources) + 1, dtype=torch.float64)
        for (source, _, _), packed in zip(batches, found):
            misses[sources.index(source)] += packed is None
        misses[-1] = damaged is not None
        if self.accelerator.num_processes > 1:
            misses = self.accelerator.reduce(misses.to(self.accelerator.device), reduction="sum").cpu()
        if damaged is not None:
            raise damaged
        if misses[-1] > 0:
            raise ConfigError("another process found a damaged teacher cache part (its line names it); see there")
        return [
            packed if misses[sources.index(source)] == 0 else None for (source, _, _), packed in zip(batches, found)
        ]

    def micro_loss(self, batch, term, denominator: float, weight: float, source: str, cached: torch.Tensor | None):
        """One micro-batch's loss and its parts: from the cache's ``cached`` targets when given (no
        teacher forward, see ``cached_targets``), else against the live teacher (fused with the heads
        where they allow it)."""
        cfg = self.cfg
        options = {"kd_weight": cfg.train.kd_weight * weight, "normalize": cfg.train.normalize}
        unwrap = self.accelerator.unwrap_model
        if cached is not None:
            self.cache.check_temperature(f"objective.terms.{source}.temperature", term.divergence.temperature)
            return cached_micro_batch_loss(
                self.student, batch, cached, term.divergence, denominator, term.ce_weight, unwrap, **options
            )
        return micro_batch_loss(
            self.student,
            None if self.apart else _live(self.teacher, source),
            batch,
            term.divergence,
            denominator,
            term.ce_weight,
            unwrap,
            fused=self.fused,
            **options,
        )

    @property
    def lm_loss(self) -> Callable[[int], torch.Tensor] | None:
        """``lm_loss(n)``: the auxiliary LM loss share of one of ``n`` micro-batches (None: no LM loss)."""
        if self.lm_blocks is None:
            return None
        return lambda n: (
            _lm_loss(self.student, self.lm_blocks, self.lm_rng, self.cfg.train.batch_size, self.accelerator) / n
        )

    def save(self, step: int, run: RunState) -> Path:
        """A checkpoint after ``step``: weights, optimizer, schedule, sampler, the run's tallies and
        every process's policy state and random generators."""
        shared = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "run": run.state_dict(),
        }
        local = {"policy": self.policy.state_dict(), "lm_rng": self.lm_rng.getstate(), "rng": capture_rng()}
        path, size = save_checkpoint(
            self.files,
            self.accelerator,
            self.student,
            self.student_tokenizer,
            step,
            shared,
            local,
            self.cfg.checkpoint.keep,
        )
        self.report("checkpoint", {"step": step, "path": str(path), "bytes": size})
        return path

    def restore(self) -> RunState:
        """Continue exactly where the checkpoint left off (last of all, the random generators)."""
        saved = self.saved
        run = RunState.from_state_dict(saved["run"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        reapply_schedule(self.scheduler)
        self.sampler.load_state_dict(saved["sampler"])
        local = rank_state(saved, self.accelerator)
        self.policy.load_state_dict(local["policy"])
        self.lm_rng.setstate(local["lm_rng"])
        restore_rng(local["rng"])
        return run

    def write_final(self) -> None:
        """``final/``: the student, loadable with ``AutoModelForCausalLM.from_pretrained`` (with LoRA:
        the adapters, and ``merged/`` on request), and its tokenizer."""
        cfg, unwrap = self.cfg, self.accelerator.unwrap_model
        state = self.accelerator.get_state_dict(self.student)  # a collective call under FSDP / ZeRO-3

        def fill(folder: Path) -> None:
            unwrap(self.student).save_pretrained(folder, state_dict=state)
            self.student_tokenizer.save_pretrained(folder)
            if cfg.student.lora is not None and cfg.student.lora.save_merged:
                teacher = self.teacher
                base = (
                    unwrap(teacher)
                    if teacher is not None
                    else load_model(cfg.teacher, "teacher")
                    if derives_from_teacher(cfg.student)
                    else None
                )
                merged = merge_adapter(load_model(cfg.student, "student", teacher=base), folder, "student")
                merged.save_pretrained(folder / "merged")
                self.student_tokenizer.save_pretrained(folder / "merged")

        self.files.write_folder("final", fill)


def open_session(
    plan: RunPlan, *, registry: Registry, report: Reporter, overwrite: bool = False, resume: bool = False
) -> Session:
    """Build a run from ``plan`` (a config whose plugins are checked, ``distill.resolve.plan_run``):
    everything that can fail on bad input fails before the output folder is touched. Reports
    ``warning`` events and, last, the ``start`` event."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    # `auto` precision and dtypes become what this hardware computes fastest; config.yaml keeps the answer
    cfg, precision, precision_warning = resolve_precision(plan.config)
    seed = cfg.train.seed
    point = resume_point(cfg) if resume else None
    checkpoint = point.checkpoint if point else None
    objective = plan.objective  # one term per source; the run's divergence for the others
    policy = plan.make_policy()
    # with a teacher cache, dataset sequences need no teacher; a policy that never generates never loads it
    cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:
        report = lambda kind, record: None  # noqa: E731 (one console: the main process's)
    if precision_warning:
        report("warning", {"message": precision_warning})
    for notice in point.notices() if point else ():
        report("warning", {"message": notice})
    set_seed(seed)
    policy.reseed(seed)  # the same seed on every rank: every rank draws the same branch
    teacher, tokenizer, student, student_tokenizer, apart, n_logits = _load_models(
        cfg, checkpoint, policy, cache, report
    )
    data_tokenizer = student_tokenizer if apart else tokenizer
    train_set, val_set, dropped = load_examples(cfg.data, data_tokenizer, seed)
    if not apart and len(student_tokenizer) != len(tokenizer):
        check_data_ids(
            train_set + val_set, n_logits, "student" if len(student_tokenizer) < len(tokenizer) else "teacher"
        )
    if cache is not None:  # before anything is written: a cache of another teacher, tokenizer or data is refused
        if apart:
            raise ConfigError(
                "--teacher-cache: holds log-probs over the teacher's tokens; a student "
                "with another tokenizer trains on generated text, drop the cache"
            )
        cache.check_run(cfg, tokenizer, train_set + val_set, n_logits)
    lm_blocks = None
    if cfg.data.lm_path and cfg.train.lm_weight > 0:
        lm_blocks = load_lm_corpus(
            cfg.data.lm_path, student_tokenizer, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
        )
    lengths = (
        [(len(e.prompt_ids), len(e.response_ids)) for e in train_set] if cfg.data.group_by_length != "off" else None
    )
    sampler = BatchSampler(
        len(train_set),
        cfg.train.batch_size,
        seed,
        accelerator.process_index,
        accelerator.num_processes,
        lengths,
        cfg.train.grad_accum,
        grouping=cfg.data.group_by_length if lengths else "groups",
    )
    evaluates_at = eval_schedule(
        cfg.eval.every, len(train_set) // (cfg.train.batch_size * accelerator.num_processes), cfg.train.grad_accum
    )
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        rank_state(saved, accelerator)  # fails now if the number of processes changed

    # --- the output folder: new, or reopened at the checkpoint
    if not accelerator.is_main_process:
        out = Path(cfg.output_dir)
    elif checkpoint:
        point.set_aside()
        out = reopen_output_dir(cfg.output_dir, checkpoint.step)
    else:  # a new run, or a resumed one that never reached its first step: start over
        out = prepare_output_dir(cfg.output_dir, overwrite=overwrite or resume)
    files = RunFiles(out, accelerator.is_main_process)
    files.write_text("config.yaml", dump_config(cfg))
    accelerator.init_trackers(cfg.log.project, config=_tracker_config(cfg))  # main process only; none unless log.with

    # --- the student on Accelerate, its optimizer and schedule; the teacher for inference only
    trainable = [p for p in student.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = _adamw(trainable, cfg.train.lr, cfg.train.weight_decay)
    schedule = "constant_with_warmup" if cfg.train.schedule == "constant" else cfg.train.schedule
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps
    )
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    if accelerator.process_index > 0:
        # generation samples per process: the same seed everywhere would draw the same responses to the
        # same prompt on every process. Set-up above ran seeded alike; the main process keeps the run's
        # stream (a 1-process run is unchanged) and the policy's own draw stays shared (policy.reseed)
        set_seed(seed + accelerator.process_index)
    student.train()  # from_pretrained returns eval mode; dropout (GPT-2) belongs to training
    teacher = prepare_teacher(accelerator, teacher) if teacher is not None else None

    # --- generation, the evaluator, and the heads fused into the loss
    progress = lambda phase, done, total: report("progress", {"phase": phase, "done": done, "total": total})  # noqa: E731 (long passes)
    generate, context, ends, val_set = _generation(
        cfg, accelerator, tokenizer, student_tokenizer, data_tokenizer, teacher, student, apart, val_set, progress
    )
    probe = collate(train_set[:1], data_tokenizer.pad_token_id).to(
        accelerator.device
    )  # the fused heads are checked on one real example
    fused, head_line = plan_fused_head(
        cfg.train.fused_head, student, None if apart else teacher, probe, accelerator.unwrap_model, accelerator
    )
    evaluator = Evaluator(
        val_set,
        data_tokenizer,
        objective.default,
        generate,
        cfg.eval.batch_size,
        cfg.eval.rouge_samples,
        accelerator,
        # with a cache, the teacher's side is at the cache's temperature: so is val_kl (the start line says so)
        kl=registry.get_divergence("kl", temperature=cache.temperature if cache is not None else 1.0),
        rouge_before=cfg.eval.rouge_before,
        progress=progress,
        fused=fused,
        rouge_draws=cfg.eval.rouge_draws,
        seed=seed,
    )
    evaluate = functools.partial(evaluator, with_teacher=not apart)
    if cache is not None:  # validation divergences from the cache too (coarse, like training's)
        evaluate = lambda student, _teacher, **options: evaluator(student, cache, with_teacher=True, **options)  # noqa: E731
    mode = CROSS_TOKENIZER_NOTE if apart else cache.note(loaded=teacher is not None) if cache is not None else None
    report(
        "start",
        {
            "train_examples": len(train_set),
            "val_examples": len(val_set),
            "dropped": dropped,
            "output_dir": str(out),
            "processes": accelerator.num_processes,
            "precision": precision,
            "mode": mode,
            "head": head_line,
        },
    )
    return Session(
        cfg=cfg,
        accelerator=accelerator,
        report=report,
        objective=objective,
        policy=policy,
        cache=cache,
        teacher=teacher,
        student=student,
        student_tokenizer=student_tokenizer,
        data_tokenizer=data_tokenizer,
        apart=apart,
        train_set=train_set,
        sampler=sampler,
        evaluates_at=evaluates_at,
        evaluate=evaluate,
        context=context,
        ends=ends,
        fused=fused,
        optimizer=optimizer,
        scheduler=scheduler,
        out=out,
        files=files,
        saved=saved,
        checkpoint=checkpoint,
        lm_blocks=lm_blocks,
        lm_rng=random.Random(seed + accelerator.process_index),
        rank_log=rank_log(accelerator),
    )


def _load_models(cfg: RunConfig, checkpoint, policy, cache: TeacherCache | None, report: Reporter):
    """The teacher (None when a cache serves every sequence), the teacher's tokenizer, the student
    (from the checkpoint when resuming) and its tokenizer; whether the two tokenizers differ, and
    the number of logits the two heads share."""
    teacher = (
        load_model(cfg.teacher, "teacher") if cache is None or policy_generates(policy) else None
    )  # first: a wrong --teacher is named as such
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher)  # the teacher's
    # a prune:K student is cut from the teacher: loaded for that alone when the run needs no teacher
    base = (
        teacher if teacher is not None or not derives_from_teacher(cfg.student) else load_model(cfg.teacher, "teacher")
    )
    student = _load_student(cfg.student, checkpoint, base)
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
        report(
            "warning",
            {
                "message": f"the student's folder has no tokenizer, so the teacher's is assumed; their heads differ "
                f"({heads[0]} and {heads[1]} rows): if the student was trained with another tokenizer, "
                "set student.tokenizer=DIR"
            },
        )
    stop_warning = check_stop_ids(teacher, student, tokenizer, n_logits, student_tokenizer if apart else None)
    if stop_warning:
        report("warning", {"message": stop_warning})
    return teacher, tokenizer, student, student_tokenizer, apart, n_logits


def _generation(
    cfg: RunConfig,
    accelerator,
    tokenizer,
    student_tokenizer,
    data_tokenizer,
    teacher,
    student,
    apart: bool,
    val_set: list,
    progress,
):
    """The response generator, the policies' sampling context, the stop ids of each generated source,
    and the validation set (across tokenizers: the prompts with the teacher's greedy answers)."""
    unwrap, synced = accelerator.unwrap_model, synced_generation(accelerator)
    inference_dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        if cfg.generation.inference_copy and not synced
        else None
    )
    # generation has no backward to hold memory for: it answers a step's examples (all micro-batches) together
    batch = cfg.train.batch_size * cfg.train.grad_accum
    generate = ResponseGenerator(
        data_tokenizer, cfg.generation, batch, unwrap, synced, full_params(accelerator), inference_dtype
    )
    # even: a policy may ask the processes for different numbers of responses (contrastive's kept ones)
    context = SamplingContext(lambda ex: generate(student, ex, even=True), lambda ex: generate(teacher, ex, even=True))
    ends = {
        "teacher": set(generate.stop_ids(teacher)) if teacher is not None else set(),
        "student": set(generate.stop_ids(student)),
    }
    if apart:  # the teacher answers in its own tokens; the student trains on that text in its own
        generate_teacher = ResponseGenerator(
            tokenizer, cfg.generation, batch, unwrap, synced, full_params(accelerator), inference_dtype
        )
        bridge = TextBridge(tokenizer, student_tokenizer, cfg.data, generate_teacher.stop_ids(teacher))
        context = SamplingContext(
            context.generate_student,
            lambda ex: bridge.generate_teacher(lambda prompts: generate_teacher(teacher, prompts), ex),
        )
        ends["teacher"] = {student_tokenizer.eos_token_id}
        # validation: the teacher's greedy answers are the references (val CE and ROUGE-L against them)
        answers = generate_teacher(
            teacher,
            bridge.teacher_prompts(val_set),
            greedy=True,
            progress=functools.partial(progress, "teacher answers (validation)"),
        )
        val_set = [bridge.to_student(e, a) for e, a in zip(val_set, answers)]
    ends["replay"] = ends["student"]
    return generate, context, ends, val_set


def eval_schedule(every: int | str, micro_per_epoch: int, grad_accum: int) -> Callable[[int], bool]:
    """Whether step ``step`` ends with an evaluation (besides the last): every ``every`` steps, or with
    ``every="epoch"`` at each step that finishes a pass over the training set (``micro_per_epoch``
    micro-batches per process; a step takes ``grad_accum``, so it may finish an epoch part-way)."""
    if every == "epoch":
        return lambda step: step * grad_accum // micro_per_epoch > (step - 1) * grad_accum // micro_per_epoch
    return lambda step: bool(every) and step % every == 0


def _live(teacher, source: str):
    """The loaded teacher, for sequences a cache does not hold."""
    if teacher is None:
        raise RuntimeError(
            f"a {source} step holds sequences the teacher cache lacks, "
            "and the policy said it never generates (generates = False)"
        )
    return teacher


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
    return add_lora(
        load_model(spec, "student", teacher=teacher), spec.lora, checkpoint.student_dir if checkpoint else None
    )


def _tracker_config(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` values that every tracker stores."""
    flat = flatten_config(cfg.model_dump(mode="json", by_alias=True))
    return {
        key: (
            ", ".join(map(str, value))
            if isinstance(value, list)
            else json.dumps(value)
            if isinstance(value, dict)
            else value
        )
        for key, value in flat.items()
    }


def _lm_loss(student, blocks: list[list[int]], rng: random.Random, batch_size: int, accelerator) -> torch.Tensor:
    """Student cross-entropy on a batch of plain-text blocks (the auxiliary LM loss)."""
    ids = torch.tensor([blocks[rng.randrange(len(blocks))] for _ in range(batch_size)], device=accelerator.device)
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    mask = torch.ones(ids[:, 1:].shape, dtype=torch.bool, device=ids.device)
    return token_cross_entropy(logits, ids[:, 1:], mask)


__all__ = ["Session", "eval_schedule", "open_session"]
