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
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.optim.lr_scheduler import LRScheduler

from distill.checkpoint import (
    Checkpoint,
    ResumePoint,
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
from distill.data import BatchSampler, Example, collate, load_examples, load_lm_corpus
from distill.distributed import full_params, make_accelerator, prepare_teacher, rank_log, synced_generation
from distill.errors import ConfigError
from distill.evaluation import Evaluator, check_metrics
from distill.fused import FusedHeads, plan_fused_head
from distill.generation import ResponseGenerator
from distill.hardware import resolve_precision
from distill.models import (
    derives_from_teacher,
    add_lora,
    check_stop_ids,
    decoder_start,
    is_encoder_decoder,
    freeze,
    load_model,
    load_tokenizer,
    merge_adapter,
    share_vocabulary,
    vocab_size,
)
from distill.loss import LogitRows, TokenTerms, counted, token_cross_entropy, token_loss
from distill.objective import Objective, micro_loss
from distill.outputs import RunFiles, prepare_output_dir, reopen_output_dir
from distill.interfaces import SamplingPolicy
from distill.policy import PolicyRun, SamplingContext, policy_generates
from distill.registry import Registry, default_registry
from distill.resolve import RunPlan
from distill.teacher import CrossVocabTeacher, TeacherSide, live, teacher_side
from distill.teacher_cache import TeacherCache
from distill.vocabulary import TextBridge, check_data_ids, cross_tokenizer_error, mismatch, student_tokenizer_ref

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Reporter = Callable[[str, dict[str, Any]], None]

CROSS_VOCABULARY_NOTE = (
    "teacher and student tokenizers differ: logit-level KD across vocabularies; each sequence is read by the "
    "teacher in its own chat template and tokens, aligned with the student's by character spans, the divergence "
    "compared at each aligned group's first position; validation: CE and ROUGE-L against the teacher's answers"
)
CROSS_TOKENIZER_NOTE = (
    "teacher and student tokenizers (or model kinds) differ: sequence-level KD; the teacher answers in its own "
    "chat template, the student trains with token cross-entropy on that text in its own tokens (no logit-level term); "
    "validation: CE and ROUGE-L against the teacher's answers, no KL"
)


@dataclass(eq=False)
class Session:
    """One run's parts, ready to train: the student is prepared by Accelerate, the output folder open."""

    cfg: RunConfig
    """The resolved config (``auto`` precision and dtypes decided); ``config.yaml`` holds it."""
    accelerator: Accelerator
    report: Reporter
    """The console's events; a no-op in every process but the main one."""
    objective: Objective
    policy: SamplingPolicy
    teacher: PreTrainedModel | None
    """None when a teacher cache serves every sequence the policy can pick."""
    student: torch.nn.Module
    """The student as Accelerate prepared it (DDP-wrapped on several processes)."""
    student_tokenizer: PreTrainedTokenizerBase
    data_tokenizer: PreTrainedTokenizerBase
    """The tokenizer the training sequences are in: the student's when the two tokenizers differ."""
    train_set: list[Example]
    sampler: BatchSampler
    evaluates_at: Callable[[int], bool]
    evaluate: Callable[..., dict[str, float]]
    """``evaluate(student, teacher, rouge=... | with_rouge=...)``: the validation numbers."""
    context: SamplingContext
    ends: dict[str, set[int]]
    """Stop ids per generated source: a response that ends on none of them hit the token cap."""
    teacher_side: TeacherSide
    """Where each micro-batch's teacher rows come from (live logits, fused heads, a cache): chosen
    once, here (``distill.teacher``)."""
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    out: Path
    files: RunFiles
    saved: dict[str, Any] | None
    """The checkpoint's contents when resuming, else None."""
    checkpoint: Checkpoint | None
    lm_blocks: list[list[int]] | None
    lm_rng: random.Random
    rank_log: Callable[[dict[str, Any]], None]
    decoder_start: int | None = None
    """Encoder-decoder models: the decoder's start id (batches put the prompt in the encoder)."""

    def micro_loss(self, batch, term, denominator: float, weight: float, prepared: Any):
        """One micro-batch's loss and its parts, the teacher's side as the run's ``teacher_side`` reads
        it (``prepared``: what its ``prepare`` gave for this micro-batch, once for the step)."""
        train = self.cfg.train
        return micro_loss(
            self.teacher_side,
            self.student,
            batch,
            term.divergence,
            denominator,
            term.ce_weight,
            kd_weight=train.kd_weight * weight,
            normalize=train.normalize,
            prepared=prepared,
            sequence=term.sequence,
            sequence_weight=term.sequence_weight * weight,
        )

    @property
    def lm_loss(self) -> Callable[[int], torch.Tensor] | None:
        """``lm_loss(n)``: the auxiliary LM loss share of one of ``n`` micro-batches (None: no LM loss)."""
        if self.lm_blocks is None:
            return None
        teacher = self.teacher if self.cfg.train.lm_kd_ratio > 0 else None
        return lambda n: (
            _lm_loss(
                self.student,
                self.lm_blocks,
                self.lm_rng,
                self.cfg.train.batch_size,
                self.accelerator,
                teacher,
                self.cfg.train.lm_kd_ratio,
            )
            / n
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
        """``final/``: the student, loadable with ``AutoModelForCausalLM.from_pretrained`` (an encoder-decoder:
        ``AutoModelForSeq2SeqLM``; with LoRA:
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
    """Build a run from ``plan`` (a config whose plugins are checked, ``distill.resolve.plan_run``),
    one named step at a time: everything that can fail on bad input fails before the output folder
    is touched. Reports ``warning`` events and, last, the ``start`` event."""
    from accelerate.utils import set_seed

    # `auto` precision and dtypes become what this hardware computes fastest; config.yaml keeps the answer
    cfg, precision, precision_warning = resolve_precision(plan.config)
    point = resume_point(cfg) if resume else None
    policy = plan.make_policy()
    # with a teacher cache, dataset sequences need no teacher; a policy that never generates never loads it
    cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
    accelerator = make_accelerator(cfg)
    if not accelerator.is_main_process:
        report = lambda kind, record: None  # noqa: E731 (one console: the main process's)
    for message in [precision_warning, *(point.notices() if point else [])]:
        if message:
            report("warning", {"message": message})
    set_seed(cfg.train.seed)
    policy.reseed(cfg.train.seed)  # the same seed on every rank: every rank draws the same branch
    checkpoint = point.checkpoint if point else None
    check_metrics(cfg.eval.metrics)  # bleu without sacrebleu: one line, nothing loaded or written
    models = _load_models(cfg, checkpoint, policy, cache, report, across=plan.objective.across_vocabularies)
    data = _load_data(cfg, models, cache)
    bridge = _cross_vocabulary(cfg, plan.objective, models, data) if models.apart and models.logit_level else None
    bind = getattr(policy, "bind", None)
    if bind is not None:  # a policy that reads files (prepared pairs) checks them against the run, before the folder
        bind(PolicyRun(cfg, models.data_tokenizer, data.train_set, models.apart))
    sampler = _batch_sampler(cfg, data.train_set, accelerator)
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        rank_state(saved, accelerator)  # fails now if the number of processes changed
    out, files = _open_output(cfg, accelerator, point, overwrite=overwrite or resume)
    student, teacher, optimizer, scheduler = _prepare_training(cfg, accelerator, models)
    progress = lambda phase, done, total: report("progress", {"phase": phase, "done": done, "total": total})  # noqa: E731 (long passes)
    generate, context, ends, val_set = _generation(cfg, accelerator, models, teacher, student, data.val_set, progress)
    fused, head_line = (
        (None, "fused head: off (teacher and student vocabularies differ): full logits")
        if bridge is not None
        else _fused_heads(cfg, accelerator, models, student, teacher, data.train_set)
    )
    evaluate = _evaluation(
        cfg, accelerator, registry, plan.objective, models, cache, generate, fused, val_set, progress
    )
    mode = (
        (CROSS_VOCABULARY_NOTE if bridge is not None else CROSS_TOKENIZER_NOTE)
        if models.apart
        else cache.note(loaded=teacher is not None)
        if cache
        else None
    )
    report(
        "start",
        {
            "train_examples": len(data.train_set),
            "val_examples": len(val_set),
            "dropped": data.dropped,
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
        objective=plan.objective,
        policy=policy,
        teacher=teacher,
        student=student,
        student_tokenizer=models.student_tokenizer,
        data_tokenizer=models.data_tokenizer,
        train_set=data.train_set,
        sampler=sampler,
        evaluates_at=eval_schedule(
            cfg.eval.every,
            len(data.train_set) // (cfg.train.batch_size * accelerator.num_processes),
            cfg.train.grad_accum,
        ),
        evaluate=evaluate,
        context=context,
        ends=ends,
        teacher_side=CrossVocabTeacher(teacher, bridge, models.tokenizer.pad_token_id, accelerator.unwrap_model)
        if bridge is not None
        else teacher_side(
            None if models.apart else teacher,
            fused=fused,
            cache=cache,
            unwrap=accelerator.unwrap_model,
            accelerator=accelerator,
        ),
        optimizer=optimizer,
        scheduler=scheduler,
        out=out,
        files=files,
        saved=saved,
        checkpoint=checkpoint,
        lm_blocks=data.lm_blocks,
        lm_rng=random.Random(cfg.train.seed + accelerator.process_index),
        rank_log=rank_log(accelerator),
        decoder_start=decoder_start(models.student),
    )


@dataclass
class Models:
    """The run's models and tokenizers as ``_load_models`` loads and checks them."""

    teacher: PreTrainedModel | None
    """None when a teacher cache serves every sequence the policy can pick."""
    tokenizer: PreTrainedTokenizerBase
    """The teacher's."""
    student: PreTrainedModel
    student_tokenizer: PreTrainedTokenizerBase
    apart: bool
    """Teacher and student tokenizers (or model kinds) differ: text in between (sequence-level KD, or with
    divergences across vocabularies the teacher's own reading of each sequence, ``logit_level``)."""
    n_logits: int
    """The logits the two heads share (the tokenizer's size)."""
    logit_level: bool = False
    """Across tokenizers (``apart``): whether a logit-level loss runs anyway (divergences across
    vocabularies); else the student's cross-entropy on the teacher's text alone."""

    @property
    def data_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer the training sequences are in: the student's when the two tokenizers differ."""
        return self.student_tokenizer if self.apart else self.tokenizer


@dataclass
class Data:
    """The run's examples, tokenized and split, and the LM corpus's blocks (``train.lm_weight``)."""

    train_set: list[Example]
    val_set: list[Example]
    dropped: dict[str, int]
    lm_blocks: list[list[int]] | None


def _load_data(cfg: RunConfig, models: Models, cache: TeacherCache | None) -> Data:
    """The training and validation examples in the data tokenizer, checked against the heads and a
    teacher cache before anything is written."""
    train_set, val_set, dropped = load_examples(cfg.data, models.data_tokenizer, cfg.train.seed)
    teacher_size, student_size = len(models.tokenizer), len(models.student_tokenizer)
    if not models.apart and student_size != teacher_size:
        check_data_ids(train_set + val_set, models.n_logits, "student" if student_size < teacher_size else "teacher")
    if cache is not None:  # a cache of another teacher, tokenizer or data is refused
        if models.apart:
            raise ConfigError(
                "--teacher-cache: holds log-probs over the teacher's tokens; a student "
                "with another tokenizer trains on generated text, drop the cache"
            )
        cache.check_run(cfg, models.tokenizer, train_set + val_set, models.n_logits)
    lm_blocks = None
    if cfg.data.lm_path and cfg.train.lm_weight > 0:
        lm_blocks = load_lm_corpus(
            cfg.data.lm_path, models.student_tokenizer, cfg.data.max_prompt_tokens + cfg.data.max_response_tokens
        )
    return Data(train_set, val_set, dropped, lm_blocks)


def _batch_sampler(cfg: RunConfig, train_set: list[Example], accelerator) -> BatchSampler:
    """This process's batches of training examples (grouped by length unless ``data.group_by_length: off``)."""
    grouped = cfg.data.group_by_length != "off"
    lengths = [(len(e.prompt_ids), len(e.response_ids)) for e in train_set] if grouped else None
    return BatchSampler(
        len(train_set),
        cfg.train.batch_size,
        cfg.train.seed,
        accelerator.process_index,
        accelerator.num_processes,
        lengths,
        cfg.train.grad_accum,
        grouping=cfg.data.group_by_length if lengths else "groups",
    )


def _open_output(cfg: RunConfig, accelerator, point: ResumePoint | None, *, overwrite: bool) -> tuple[Path, RunFiles]:
    """The output folder: new (only what a previous run wrote is replaced, with ``overwrite``), or
    reopened at the checkpoint; ``config.yaml`` written, the trackers started (main process only)."""
    if not accelerator.is_main_process:
        out = Path(cfg.output_dir)
    elif point is not None and point.checkpoint is not None:
        point.set_aside()
        out = reopen_output_dir(cfg.output_dir, point.checkpoint.step)
    else:  # a new run, or a resumed one that never reached its first step: start over
        out = prepare_output_dir(cfg.output_dir, overwrite=overwrite)
    files = RunFiles(out, accelerator.is_main_process)
    files.write_text("config.yaml", dump_config(cfg))
    accelerator.init_trackers(cfg.log.project, config=_tracker_config(cfg))  # none unless log.with
    return out, files


def _prepare_training(cfg: RunConfig, accelerator, models: Models):
    """The student on Accelerate with its optimizer and schedule, the teacher for inference only;
    then generation seeded per process."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    trainable = [p for p in models.student.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = _adamw(trainable, cfg.train.lr, cfg.train.weight_decay)
    schedule = "constant_with_warmup" if cfg.train.schedule == "constant" else cfg.train.schedule
    scheduler = get_scheduler(
        schedule, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=cfg.train.max_steps
    )
    student, optimizer, scheduler = accelerator.prepare(models.student, optimizer, scheduler)
    if accelerator.process_index > 0:
        # generation samples per process: the same seed everywhere would draw the same responses to the
        # same prompt on every process. Set-up ran seeded alike; the main process keeps the run's
        # stream (a 1-process run is unchanged) and the policy's own draw stays shared (policy.reseed)
        set_seed(cfg.train.seed + accelerator.process_index)
    student.train()  # from_pretrained returns eval mode; dropout (GPT-2) belongs to training
    teacher = prepare_teacher(accelerator, models.teacher) if models.teacher is not None else None
    return student, teacher, optimizer, scheduler


def _fused_heads(cfg: RunConfig, accelerator, models: Models, student, teacher, train_set: list[Example]):
    """The heads fused into the loss, or None, and the start line saying which (checked on one real example)."""
    probe = collate(train_set[:1], models.data_tokenizer.pad_token_id, decoder_start(student)).to(accelerator.device)
    return plan_fused_head(
        cfg.train.fused_head, student, None if models.apart else teacher, probe, accelerator.unwrap_model, accelerator
    )


def _evaluation(
    cfg: RunConfig,
    accelerator,
    registry: Registry,
    objective: Objective,
    models: Models,
    cache: TeacherCache | None,
    generate,
    fused: FusedHeads | None,
    val_set: list[Example],
    progress,
) -> Callable[..., dict[str, float]]:
    """``evaluate(student, teacher, **options)``: the validation numbers (``Evaluator``); with a cache,
    its divergences from the cache, like training's."""
    evaluator = Evaluator(
        val_set,
        models.data_tokenizer,
        objective.default,
        generate.using(cfg.generation.purpose("eval")),
        cfg.eval.batch_size,
        cfg.eval.rouge_samples,
        accelerator,
        # with a cache, the teacher's side is at the cache's temperature: so is val_kl (the start line says so)
        kl=registry.get_divergence("kl", temperature=cache.temperature if cache is not None else 1.0),
        rouge_before=cfg.eval.rouge_before,
        progress=progress,
        fused=fused,
        rouge_draws=cfg.eval.rouge_draws,
        seed=cfg.train.seed,
        metrics=tuple(cfg.eval.metrics),
    )
    if cache is not None:
        return lambda student, _teacher, **options: evaluator(student, cache, with_teacher=True, **options)
    return functools.partial(evaluator, with_teacher=not models.apart)


def _load_models(
    cfg: RunConfig, checkpoint, policy, cache: TeacherCache | None, report: Reporter, *, across: bool = False
) -> Models:
    """The teacher (None when a cache serves every sequence), the teacher's tokenizer, the student
    (from the checkpoint when resuming) and its tokenizer; whether the two tokenizers differ, and
    the number of logits the two heads share. ``across``: every divergence of the run compares two
    vocabularies, so tokenizers that differ keep a logit-level loss (``CrossVocabTeacher``)."""
    teacher = (
        load_model(cfg.teacher, "teacher")
        if cache is None or policy_generates(policy) or (cfg.train.lm_weight > 0 and cfg.train.lm_kd_ratio > 0)
        else None
    )  # first: a wrong --teacher is named as such
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher)  # the teacher's
    # a prune:K student is cut from the teacher: loaded for that alone when the run needs no teacher
    base = (
        teacher if teacher is not None or not derives_from_teacher(cfg.student) else load_model(cfg.teacher, "teacher")
    )
    student = _load_student(cfg.student, checkpoint, base)
    kinds = _check_kinds(cfg, teacher if teacher is not None else base, student, policy, across)
    own = student_tokenizer_ref(cfg.student, cfg.student.tokenizer)
    student_tokenizer = load_tokenizer(own) if own else tokenizer
    # one vocabulary (logit-level), or text in between (sequence-level KD across tokenizers or model kinds)
    difference = mismatch(tokenizer, student_tokenizer) if student_tokenizer is not tokenizer else None
    apart = difference is not None or kinds is not None
    if apart and not across and getattr(policy, "name", None) != "teacher":
        raise cross_tokenizer_error(difference, cfg.policy.name)
    if apart and across and is_encoder_decoder(student):
        raise ConfigError(
            "teacher and student tokenizers differ: logit-level KD across vocabularies reads decoder-only models; "
            "with encoder-decoders use --recipe seqkd (the student learns the teacher's generated text)"
        )
    if cfg.train.lm_weight > 0 and cfg.data.lm_path and is_encoder_decoder(student):
        raise ConfigError(
            "train.lm_weight: the auxiliary LM loss is next-token prediction on plain text, for decoder-only "
            "students; set train.lm_weight=0 for an encoder-decoder"
        )
    if cfg.train.lm_weight > 0 and cfg.train.lm_kd_ratio > 0 and cfg.data.lm_path and apart:
        raise ConfigError(
            "train.lm_kd_ratio: the teacher's soft targets on the LM text need one vocabulary (and one model kind); "
            "set train.lm_kd_ratio=0 (cross-entropy alone) when they differ"
        )
    if apart and across and getattr(policy, "records_rollouts", False):
        raise ConfigError(
            f"teacher and student tokenizers differ: {difference}; policy {cfg.policy.name} samples from a mixture "
            "of the two models' next-token distributions, which needs one vocabulary"
        )
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
    return Models(teacher, tokenizer, student, student_tokenizer, apart, n_logits, logit_level=across)


def _check_kinds(cfg: RunConfig, teacher, student, policy, across: bool = False) -> str | None:
    """Teacher and student both decoder-only or both encoder-decoders for a logit-level loss; models of
    two kinds train sequence-level (``seqkd``: the teacher's text as the student's target), and the
    difference is returned (None when they are one kind)."""
    kinds = {role: is_encoder_decoder(m) for role, m in (("teacher", teacher), ("student", student)) if m is not None}
    mixed = None
    if len(set(kinds.values())) > 1:
        name = {True: "an encoder-decoder", False: "a decoder-only model"}
        mixed = f"the teacher is {name[kinds['teacher']]} and the student {name[kinds['student']]}"
        if across or getattr(policy, "name", None) != "teacher":
            raise ConfigError(
                f"{mixed}: logits of one kind do not line up with the other's; distil between models of one kind, "
                "or use --recipe seqkd (the student learns the teacher's generated text)"
            )
    if mixed is None and all(kinds.values()) and len(kinds) == 2 and decoder_start(teacher) != decoder_start(student):
        raise ConfigError(
            f"the teacher's decoder starts from id {decoder_start(teacher)} and the student's from "
            f"{decoder_start(student)}: their responses would not line up; give both one decoder_start_token_id"
        )
    return mixed


def _cross_vocabulary(cfg: RunConfig, objective: Objective, models: Models, data: Data):
    """Across tokenizers with a divergence across vocabularies: the map of the tokens both hold (for the
    divergences that match tokens), checked before anything is written, and the bridge that shows the
    teacher each sequence in its own tokens."""
    from distill.crossvocab import CrossBridge, VocabularyMap, check_round_trip, token_ends
    from distill.models import stop_ids

    tokenizer, student_tokenizer = models.tokenizer, models.student_tokenizer
    token_ends(student_tokenizer, "a", "student's tokenizer")  # a slow tokenizer (no offsets) is refused here
    token_ends(tokenizer, "a", "teacher's tokenizer")
    stops = set(stop_ids(models.student, student_tokenizer))
    for example in data.train_set[:64]:  # texts whose decoding does not encode back are refused before training
        ended = bool(example.response_ids) and example.response_ids[-1] in stops
        if ended:  # a response cut at max_response_tokens may end inside a character: not the tokenizer's fault
            check_round_trip(student_tokenizer, list(example.response_ids[:-1]), "student")
    objective.bind_vocabularies(VocabularyMap.cached(student_tokenizer, tokenizer))
    return CrossBridge(student_tokenizer, tokenizer, data.train_set + data.val_set, cfg.data, stops)


def _generation(cfg: RunConfig, accelerator, models: Models, teacher, student, val_set: list[Example], progress):
    """The response generator, the policies' sampling context, the stop ids of each generated source,
    and the validation set (across tokenizers: the prompts with the teacher's greedy answers)."""
    tokenizer, student_tokenizer, data_tokenizer = models.tokenizer, models.student_tokenizer, models.data_tokenizer
    unwrap, synced = accelerator.unwrap_model, synced_generation(accelerator)
    inference_dtype = (
        {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        if cfg.generation.inference_copy and not synced
        else None
    )
    # generation has no backward to hold memory for: it answers a step's examples (all micro-batches) together
    batch = cfg.train.batch_size * cfg.train.grad_accum
    # training samples at generation.train's settings; evaluation (``_evaluation``) at generation.eval's
    settings = cfg.generation.purpose("train")
    generate = ResponseGenerator(
        data_tokenizer, settings, batch, unwrap, synced, full_params(accelerator), inference_dtype
    )
    # even: a policy may ask the processes for different numbers of responses (contrastive's kept ones)
    context = SamplingContext(
        lambda ex: generate(student, ex, even=True),
        lambda ex: generate(teacher, ex, even=True),
        lambda ex, alpha: generate.mixed(student, live(teacher), ex, alpha),
    )
    ends = {
        "teacher": set(generate.stop_ids(teacher)) if teacher is not None else set(),
        "student": set(generate.stop_ids(student)),
    }
    if models.apart:  # the teacher answers in its own tokens; the student trains on that text in its own
        generate_teacher = ResponseGenerator(
            tokenizer, settings, batch, unwrap, synced, full_params(accelerator), inference_dtype
        )
        bridge = TextBridge(tokenizer, student_tokenizer, cfg.data, generate_teacher.stop_ids(teacher))
        context = SamplingContext(
            context.generate_student,
            lambda ex: bridge.generate_teacher(lambda prompts: generate_teacher(teacher, prompts), ex),
        )
        ends["teacher"] = {student_tokenizer.eos_token_id}
        # validation: the teacher's greedy answers are the references (val CE and ROUGE-L against them)
        answers = generate_teacher.using(cfg.generation.purpose("eval"))(
            teacher,
            bridge.teacher_prompts(val_set),
            greedy=True,
            progress=functools.partial(progress, "teacher answers (validation)"),
        )
        val_set = [bridge.to_student(e, a) for e, a in zip(val_set, answers)]
    ends["replay"] = ends["mixed"] = ends["student"]
    return generate, context, ends, val_set


def eval_schedule(every: int | str, micro_per_epoch: int, grad_accum: int) -> Callable[[int], bool]:
    """Whether step ``step`` ends with an evaluation (besides the last): every ``every`` steps, or with
    ``every="epoch"`` at each step that finishes a pass over the training set (``micro_per_epoch``
    micro-batches per process; a step takes ``grad_accum``, so it may finish an epoch part-way)."""
    if every == "epoch":
        return lambda step: step * grad_accum // micro_per_epoch > (step - 1) * grad_accum // micro_per_epoch
    return lambda step: bool(every) and step % every == 0


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


def _lm_loss(
    student, blocks: list[list[int]], rng: random.Random, batch_size: int, accelerator, teacher=None, kd_ratio=0.0
) -> torch.Tensor:
    """The auxiliary LM loss on a batch of plain-text blocks: the student's cross-entropy, or with a
    teacher (``train.lm_kd_ratio``, MiniLLM's pre-training term, ``minillm/losses.py:206-226``)
    ``(1 - kd_ratio) x`` cross-entropy ``+ kd_ratio x`` KL(teacher ‖ student) per token. The official
    code's distillation part is the cross-entropy to the teacher's distribution, which differs from
    the KL by the teacher's entropy: the same gradient, a true divergence as value."""
    ids = torch.tensor([blocks[rng.randrange(len(blocks))] for _ in range(batch_size)], device=accelerator.device)
    logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
    mask = torch.ones(ids[:, 1:].shape, dtype=torch.bool, device=ids.device)
    if teacher is None or kd_ratio == 0:
        return token_cross_entropy(logits, ids[:, 1:], mask)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
    n = min(logits.shape[-1], teacher_logits.shape[-1])  # heads padded past the tokenizer
    index = counted(mask, mask.shape, mask.device)
    loss, _ = token_loss(
        LogitRows(logits[..., :n], index),
        LogitRows(teacher_logits[..., :n], index),
        TokenTerms(default_registry().get_divergence("kl"), kd_ratio, 1.0 - kd_ratio),
        index,
        labels=ids[:, 1:][index],
    )
    return loss


__all__ = ["Session", "eval_schedule", "open_session"]
