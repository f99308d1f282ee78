"""Seconds per optimizer step of every recipe, of TRL's GKDTrainer and DistillationTrainer at the same
settings, and of each against its compute floor.

All cases share the teacher, the student initialisation, the data, the batch size, the generation
length and the precision: by default the embedded default's (``distill.builtin.DEFAULT_RUN``, read at
run time, with ``train.precision`` and model ``dtype`` ``auto`` resolved as a run on this machine
resolves them; ``--teacher``/``--student``/``--data``/``--batch-size``/``--max-new-tokens``/``--set``
change them). The cases, each trained for ``--warmup`` + ``--steps`` optimizer steps, the first
``--warmup`` not counted:

- every registered recipe (``distill list recipes``: kd, seqkd, imitkd, gkd, minillm, distillm), as
  ``distill run --recipe NAME`` trains it on these settings, through ``distill.train``; the step time
  is the ``seconds`` field of the run's ``metrics.jsonl`` (the policy's sampling, generation
  included, the forward and backward passes and the optimizer step; not evaluation or checkpoints).
  ``distillm`` runs here at its initial φ = 0 (φ only rises at evaluations, which these short runs
  do not make), so its steps are dataset steps; ``quality_budget.py`` measures its full-run cost;
- ``jsd-offpolicy`` and ``jsd-onpolicy``: JSD with β = 0.5 on the dataset's responses / on fresh
  student samples every step, without the cross-entropy term: the same objective and sampling as
  TRL's GKDTrainer at λ = 0 / λ = 1 and (on-policy) its DistillationTrainer;
- with ``trl`` installed (``pip install 'distill[bench]'``): ``trl.experimental.gkd.GKDTrainer`` at
  λ = 0 and λ = 1 (``trl-lmbda0``, ``trl-lmbda1``), and ``trl.DistillationTrainer``, TRL's stable
  on-policy distillation (student generations every step; its head and JSD are tiled, so no logits
  are held whole; it has no off-policy mode: ``trl-distill-onpolicy``), each with gradient
  checkpointing off and on (``-gc``, TRL's default). β = 0.5, sampling temperature as ours (1, top-k
  0, top-p 1), the same ``max_new_tokens``, batch size, learning rate and schedule. They get the same
  model objects' weights and dtypes (teacher as loaded by distill; the student's float32 master
  weights, ``bf16=True`` when the run's precision resolves to bf16), the same tokenized prompts (and
  for GKD responses) in the same batches (sequential sampling over the order our batch sampler
  draws; DistillationTrainer takes our prompt ids instead of tokenizing text), and logging, saving
  and evaluation off. A ``TrainerCallback`` times each step from ``on_step_begin`` to
  ``on_step_end``. TRL keeps its defaults otherwise (its fused AdamW; GKD: logits over every
  position, prompt included).

Each step is also split into generation, teacher forward, student forward and optimizer time (by
timed wrappers and hooks, nested calls counted once); "other" is the rest: the loss, the backward
pass, clipping and batching (and for DistillationTrainer, whose hooks sit on the decoders, the
output heads, which it projects inside its tiled loss).

The compute floor of a step (details in ``compute_floor.py``): the matmul FLOPs of the real tokens
it trained on and generated (no padding; generated answers up to their first EOS), over this
machine's matmul throughput. With ``P`` the weights of a model's linear layers but the output head
(counted on the model objects; embeddings are lookups), ``P_train`` the trainable ones and ``H·V``
the head: teacher forward ``2·P_t`` per token + ``2·H·V`` per response position (logit row); student
forward likewise; student backward ``2·P_s`` (input gradients; less below frozen lowest layers) +
``2·P_train`` (weight gradients) per token and ``2·H·V`` per logit row (twice that if the head
trains); generation ``2·P`` per prompt token and per new token but the last, ``2·H·V`` per new
token. Attention scores, norms, the loss and the optimizer are left out: a lower bound. Each part is
divided by the GFLOP/s of ``torch.matmul`` of ``[tokens, hidden] x [hidden, intermediate]`` (the
student's sizes, a step's mean real tokens; best of several runs), measured at the start of the run
with its torch threads, in the dtype the part computes in: ours from the run's resolved
``config.yaml`` (the autocast dtype under bf16 / fp16, else the weights'), TRL's observed by a hook
on one decoder matmul of each model (DistillationTrainer runs the student's decoder outside
Accelerate's autocast: float32 even with ``bf16=True``). "x floor" is the step over its floor.

Reported per case: mean, median and spread of the step seconds, the mean per source (dataset,
teacher, student, replay), the breakdown, the tokens per step, the floor, and the ratios to ``kd``
and to the TRL cases at the same sampling. Targets: ``jsd-offpolicy`` ≤ 0.6 × ``trl-lmbda0`` and
``jsd-onpolicy`` ≤ 0.6 × ``trl-lmbda1`` (issue 7) and ≤ 0.6 × ``trl-distill-onpolicy`` (issue 11),
gradient checkpointing off; ``distillm`` ≤ 1.3 × ``kd`` and ≤ 0.5 × ``gkd`` (here at φ = 0; the
full-run check is ``quality_budget.py``'s); off-policy steps (``kd``, ``distillm`` at φ = 0) ≤ 1.5 ×
their compute floor (issue 11).

Run (from the repository root; the default cases on the embedded default take a while on a few CPU cores)::

    .venv/bin/python benchmarks/step_cost.py                         # every case, 10 timed steps after 2 warm-up steps
    .venv/bin/python benchmarks/step_cost.py --steps 20 --warmup 3
    .venv/bin/python benchmarks/step_cost.py --only kd distillm trl-lmbda0 trl-distill-onpolicy
    .venv/bin/python benchmarks/step_cost.py --teacher T --student S --data train.jsonl --batch-size 4

Prints a table and writes ``benchmarks/results/step_cost.json`` (``--output`` to change), rewritten
after every case so an interrupted run keeps what it measured (``"complete": false``), and with
matplotlib ``step_cost.png`` beside it: each case's step time split into the breakdown's parts, its
floor marked.
"""

from __future__ import annotations

import argparse
import copy
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BREAKDOWN_PARTS,
    RESULTS,
    Breakdown,
    add_setting_flags,
    bench_layer,
    case_config,
    distill_patches,
    environment,
    mean,
    read_jsonl,
    resolve_auto,
    save_figure,
    set_threads,
    settings_record,
    summarise_parts,
    trl_trainers,
    write_json,
)
from compute_floor import (
    DtypeProbe,
    MatmulThroughput,
    WorkCounter,
    add_floor,
    config_compute_dtypes,
    distill_observers,
    summarise_work,
)

JSD_CASES = {
    "jsd-offpolicy": {"policy": "offpolicy", "compare_to": ["trl-lmbda0"]},
    "jsd-onpolicy": {"policy": "onpolicy", "compare_to": ["trl-lmbda1", "trl-distill-onpolicy"]},
}
TRL_CASES = {
    "trl-lmbda0": {"trainer": "GKDTrainer", "lmbda": 0.0, "gradient_checkpointing": False},
    "trl-lmbda1": {"trainer": "GKDTrainer", "lmbda": 1.0, "gradient_checkpointing": False},
    "trl-lmbda0-gc": {"trainer": "GKDTrainer", "lmbda": 0.0, "gradient_checkpointing": True},
    "trl-lmbda1-gc": {"trainer": "GKDTrainer", "lmbda": 1.0, "gradient_checkpointing": True},
    "trl-distill-onpolicy": {"trainer": "DistillationTrainer", "gradient_checkpointing": False},
    "trl-distill-onpolicy-gc": {"trainer": "DistillationTrainer", "gradient_checkpointing": True},
}
BETA = 0.5
TARGETS = {"trl_ratio": 0.6, "distillm_over_kd": 1.3, "distillm_over_gkd": 0.5, "floor_ratio": 1.5}


def case_names(registry) -> list[str]:
    """Every case in the order they run: the recipes (kd first), our JSD cases, TRL's."""
    recipes = sorted(registry.names("recipe"), key=lambda name: (name != "kd", name))
    return [*recipes, *JSD_CASES, *TRL_CASES]


# --- our cases, through distill.train


def ours_config(args, registry, name: str, out: Path):
    if name in JSD_CASES:
        case = {
            "recipe": None,
            "divergence": {"name": "jsd", "params": {"beta": BETA}},
            "policy": {"name": JSD_CASES[name]["policy"], "params": {}},
            "train": {"ce_weight": 0.0},  # TRL's GKD loss has no cross-entropy term
        }
        return case_config(args, registry, recipe="kd", case=case, bench=bench_layer(args, out))
    return case_config(args, registry, recipe=name, bench=bench_layer(args, out))


def run_ours(args, registry, name: str, scratch: Path) -> dict[str, Any]:
    """Train one of our cases; its step times from metrics.jsonl, warm-up steps left out; what each
    step ran on counted, for the compute floor, with the compute dtypes of the run's config.yaml."""
    from distill.engine import train

    out = scratch / name
    cfg = ours_config(args, registry, name, out)
    breakdown, work = Breakdown(), WorkCounter()
    parts: dict[int, dict[str, float]] = {}
    works: dict[int, dict[str, Any]] = {}

    def report(kind: str, record: dict[str, Any]) -> None:
        if kind == "step":
            parts[record["step"]], works[record["step"]] = breakdown.take(), work.take()
            progress(name, record["step"], cfg.train.max_steps, record["seconds"], record["source"])
        elif kind == "eval":
            breakdown.take()  # evaluation is not part of a step
            work.take()

    with breakdown.active(distill_patches()), work.active(distill_observers(work)):
        train(cfg, registry=registry, report=report, overwrite=True)
    metrics = read_jsonl(out / "metrics.jsonl")
    dtypes, dtypes_from = run_compute_dtypes(yaml.safe_load((out / "config.yaml").read_text()))
    shutil.rmtree(out, ignore_errors=True)
    timed = [m for m in metrics if m["step"] > args.warmup]
    row = summarise(
        name, [m["seconds"] for m in timed], [m["source"] for m in timed], [parts.get(m["step"], {}) for m in timed]
    )
    row.update(
        kind="ours",
        recipe=cfg.recipe,
        divergence=cfg.divergence.name,
        divergence_params=cfg.divergence.params,
        policy=cfg.policy.name,
        policy_params=cfg.policy.params,
        ce_weight=cfg.train.ce_weight,
        tokens_per_step=mean([m["tokens"] for m in timed]),
    )
    row.update(
        summarise_work([works[m["step"]] for m in timed if m["step"] in works], work.matmuls()),
        compute_dtypes=dtypes,
        compute_dtypes_from=dtypes_from,
    )
    if name in JSD_CASES:
        row["compare_to"] = JSD_CASES[name]["compare_to"]
    return row


def run_compute_dtypes(config: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The dtype each part of a step computes in, from a run's resolved ``config.yaml``, and whence."""
    precision, teacher, student = config["train"]["precision"], config["teacher"]["dtype"], config["student"]["dtype"]
    source = f"config.yaml: train.precision {precision}, teacher.dtype {teacher}, student.dtype {student}"
    if "auto" in (precision, teacher, student):
        raise RuntimeError(f"config.yaml holds an unresolved auto ({source}): distill.train writes resolved values")
    return config_compute_dtypes(precision, teacher, student), source


def progress(name: str, step: int, total: int, seconds: float, source: str) -> None:
    print(f"  {name}: step {step}/{total} {seconds:.2f} s ({source})", flush=True)


def summarise(name: str, seconds: list[float], sources: list[str], parts: list[dict[str, float]]) -> dict[str, Any]:
    by_source: dict[str, list[float]] = {}
    for s, source in zip(seconds, sources):
        by_source.setdefault(source, []).append(s)
    return {
        "name": name,
        "steps_timed": len(seconds),
        "seconds_per_step": mean(seconds),
        "median_seconds": statistics.median(seconds) if seconds else None,
        "min_seconds": min(seconds, default=None),
        "max_seconds": max(seconds, default=None),
        "seconds": seconds,
        "sources": sources,
        "by_source": {k: {"steps": len(v), "seconds_per_step": mean(v)} for k, v in sorted(by_source.items())},
        "breakdown": summarise_parts(parts, seconds),
    }


# --- TRL's GKDTrainer and DistillationTrainer on the same models, data and batches


class TRLBatches:
    """Our tokenized examples in the batch format GKDTrainer trains on (what its ChatML collator
    builds): prompt + response ``input_ids`` and ``attention_mask`` left-padded, ``labels`` = -100
    outside the response, and the left-padded ``prompts`` / ``prompt_attention_mask`` it samples from."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
        labels = [[-100] * len(r["prompt_ids"]) + r["response_ids"] for r in rows]
        prompts = [r["prompt_ids"] for r in rows]
        input_ids, attention_mask = self._left_pad(sequences, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": self._left_pad(labels, -100)[0],
            "prompts": self._left_pad(prompts, self.pad_id)[0],
            "prompt_attention_mask": self._left_pad(prompts, self.pad_id)[1],
        }

    @staticmethod
    def _left_pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids, mask


class CaseInputs:
    """Teacher, initial student, tokenizer and the batches of our runs, loaded once (the way
    ``distill.train`` loads them: same references, resolved dtypes and pruning), for TRL's cases and
    for the shape of the throughput measurement."""

    def __init__(self, cfg) -> None:
        from distill import models
        from distill.data import BatchSampler, load_examples

        self.cfg = cfg
        self.teacher = models.load_model(cfg.teacher, "teacher").eval().requires_grad_(False)
        self.tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.teacher)
        self.student = models.load_model(cfg.student, "student", teacher=self.teacher)
        models.freeze(self.student, cfg.student.freeze)  # the parameters our runs keep fixed (student.freeze)
        train_set, _, _ = load_examples(cfg.data, self.tokenizer, cfg.train.seed)
        # the sampler as distill.train builds it (one process), so the batches come in the same order
        grouping = cfg.data.group_by_length
        lengths = [(len(e.prompt_ids), len(e.response_ids)) for e in train_set] if grouping != "off" else None
        sampler = iter(
            BatchSampler(
                len(train_set),
                cfg.train.batch_size,
                cfg.train.seed,
                lengths=lengths,
                grad_accum=cfg.train.grad_accum,
                grouping=grouping if lengths else "groups",
            )
        )
        batches = [next(sampler) for _ in range(cfg.train.max_steps * cfg.train.grad_accum)]
        self.rows = [
            {"prompt_ids": train_set[i].prompt_ids, "response_ids": train_set[i].response_ids}
            for batch in batches
            for i in batch
        ]

    def tokens_per_step(self) -> int:
        """Mean real tokens (prompt + response) of a step's dataset sequences."""
        return round(sum(len(r["prompt_ids"]) + len(r["response_ids"]) for r in self.rows) / self.cfg.train.max_steps)


@dataclass
class TRLRun:
    """One TRL trainer, ready to train, and where to look inside its steps."""

    trainer: Any
    source: str
    """The source of every step's sequences (dataset or student)."""
    timed: list[tuple[object, str, str]]
    """Patches for the breakdown: (owner, attribute, part)."""
    modules: dict[str, torch.nn.Module]
    """Modules whose forward is a part of the breakdown."""
    counted: list[tuple[object, str, Callable[..., None]]] = field(default_factory=list)
    """Observers for the work counter: (owner, attribute, observer(result, *args, **kwargs))."""
    settings: dict[str, Any] = field(default_factory=dict)
    """What the JSON records of this trainer's settings."""


def trl_common_settings(cfg, name: str, scratch: Path, setting: dict[str, Any]) -> dict[str, Any]:
    """The TrainingArguments both TRL trainers take from our settings."""
    return dict(
        output_dir=str(scratch / name),
        beta=BETA,
        temperature=cfg.generation.temperature,
        gradient_checkpointing=setting["gradient_checkpointing"],
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.lr,
        lr_scheduler_type=cfg.train.schedule if cfg.train.schedule != "constant" else "constant_with_warmup",
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        bf16=cfg.train.precision == "bf16",
        fp16=cfg.train.precision == "fp16",
        seed=cfg.train.seed,
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )


def gkd_run(inputs: CaseInputs, name: str, scratch: Path, student, work: WorkCounter, callbacks: list) -> TRLRun:
    """``trl.experimental.gkd.GKDTrainer`` at the case's λ, on our batches in our order."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg, setting = inputs.cfg, TRL_CASES[name]
    config = GKDConfig(
        lmbda=setting["lmbda"],
        max_new_tokens=cfg.generation.max_new_tokens,
        train_sampling_strategy="sequential",
        **trl_common_settings(cfg, name, scratch, setting),
    )
    random.seed(cfg.train.seed)  # GKDTrainer draws λ with the random module
    trainer = GKDTrainer(
        model=student,
        teacher_model=inputs.teacher,
        args=config,
        data_collator=TRLBatches(inputs.tokenizer.pad_token_id),
        train_dataset=Dataset.from_list(inputs.rows),
        processing_class=inputs.tokenizer,
        callbacks=callbacks,
    )

    def trained(loss, trainer_, model, batch, *_, **__) -> None:
        # after on-policy generation the batch holds the generated sequences, masked after the first EOS
        n_tokens, n_logit_rows = int(batch["attention_mask"].sum()), int((batch["labels"] != -100).sum())
        work.trained("teacher", n_tokens, n_logit_rows)
        work.trained("student", n_tokens, n_logit_rows)

    def generated(outputs, model, batch, generation_config) -> None:
        _, attention_mask, _ = outputs
        prompt_width = batch["prompts"].shape[1]
        work.generated(
            "student",
            attention_mask.shape[0],
            int(attention_mask[:, :prompt_width].sum()),
            int(attention_mask[:, prompt_width:].sum()),
        )

    return TRLRun(
        trainer=trainer,
        source="student" if setting["lmbda"] >= 1 else "dataset",
        timed=[(GKDTrainer, "generate_on_policy_outputs", "generation")],
        modules={"teacher_forward": inputs.teacher, "student_forward": student},
        counted=[(GKDTrainer, "compute_loss", trained), (GKDTrainer, "generate_on_policy_outputs", generated)],
        settings={"lmbda": setting["lmbda"], "max_new_tokens": config.max_new_tokens},
    )


def distillation_run(
    inputs: CaseInputs, name: str, scratch: Path, student, work: WorkCounter, callbacks: list
) -> TRLRun:
    """``trl.DistillationTrainer`` (on-policy only: every step trains on the student's generations
    for the batch's prompts), given our prompt ids in our batch order."""
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    class PretokenizedDistillationTrainer(DistillationTrainer):
        """Prompts arrive as our token ids (the dataset's ``prompt`` column), so generation starts
        from exactly the prompts our runs use; TRL would otherwise tokenize text itself."""

        def _tokenize_prompts(self, prompts: list[list[int]]):
            return [list(p) for p in prompts], None, {}

    cfg, setting = inputs.cfg, TRL_CASES[name]
    config = DistillationConfig(
        max_completion_length=cfg.generation.max_new_tokens,
        top_k=cfg.generation.top_k,
        top_p=cfg.generation.top_p,
        shuffle_dataset=False,
        **trl_common_settings(cfg, name, scratch, setting),
    )
    trainer = PretokenizedDistillationTrainer(
        model=student,
        teacher_model=inputs.teacher,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": r["prompt_ids"]} for r in inputs.rows]),
        processing_class=inputs.tokenizer,
        callbacks=callbacks,
    )

    def generated_and_trained(batch, trainer_, rows) -> None:
        # one generation per optimizer step, for all its micro-batches; completions end at the first EOS
        n_prompt, n_new = int(batch["prompt_mask"].sum()), int(batch["completion_mask"].sum())
        work.generated("student", batch["prompt_ids"].shape[0], n_prompt, n_new)
        work.trained("teacher", n_prompt + n_new, n_new)
        work.trained("student", n_prompt + n_new, n_new)

    return TRLRun(
        trainer=trainer,
        source="student",
        timed=[(DistillationTrainer, "_generate_single_turn", "generation")],
        # its loss calls the decoders directly and projects onto the vocabulary in tiles inside the loss
        modules={"teacher_forward": inputs.teacher.base_model, "student_forward": student.base_model},
        counted=[(DistillationTrainer, "_generate_and_score_completions", generated_and_trained)],
        settings={"max_completion_length": config.max_completion_length, "top_k": config.top_k, "top_p": config.top_p},
    )


TRL_RUNS = {"GKDTrainer": gkd_run, "DistillationTrainer": distillation_run}


def run_trl(args, inputs: CaseInputs, name: str, scratch: Path) -> dict[str, Any]:
    """Train one of TRL's cases for warm-up + timed steps; each step timed by a callback; the
    compute dtypes observed by a hook on each model."""
    from accelerate.state import AcceleratorState
    from transformers import TrainerCallback

    cfg, setting = inputs.cfg, TRL_CASES[name]
    breakdown, work = Breakdown(), WorkCounter()
    seconds: list[float] = []
    parts: list[dict[str, float]] = []
    works: list[dict[str, Any]] = []
    # the run being trained, for StepTimer's progress line: the run is built after StepTimer (it takes
    # the callbacks), and emptied at the end like `run` itself
    current: dict[str, TRLRun] = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            breakdown.take()
            work.take()
            self.tick = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.tick)
            parts.append(breakdown.take())
            works.append(work.take())
            progress(name, state.global_step, cfg.train.max_steps, seconds[-1], current["run"].source)

    student = copy.deepcopy(inputs.student)
    AcceleratorState._reset_state()  # another run in this process may have set another precision
    run = current["run"] = TRL_RUNS[setting["trainer"]](inputs, name, scratch, student, work, [StepTimer()])
    work.model("teacher", inputs.teacher)
    work.model("student", student)
    probe = DtypeProbe(breakdown)
    with (
        work.active(run.counted),
        breakdown.active(run.timed, modules=run.modules),
        probe.active({"teacher": inputs.teacher, "student": student}),
    ):
        run.trainer.train()
    shutil.rmtree(scratch / name, ignore_errors=True)
    timed_seconds, timed_parts = seconds[args.warmup :], parts[args.warmup :]
    row = summarise(name, timed_seconds, [run.source] * len(timed_seconds), timed_parts)
    mixed_precision = str(run.trainer.accelerator.mixed_precision)
    settings_precision = {"bf16": "bf16", "fp16": "fp16"}.get(mixed_precision, "fp32")
    fallback = config_compute_dtypes(
        settings_precision, str(inputs.teacher.dtype).removeprefix("torch."), str(student.dtype).removeprefix("torch.")
    )
    dtypes, observed = probe.dtypes(fallback)
    row.update(
        kind="trl",
        trainer=setting["trainer"],
        beta=BETA,
        gradient_checkpointing=setting["gradient_checkpointing"],
        temperature=cfg.generation.temperature,
        optimizer=getattr(run.trainer.args.optim, "value", str(run.trainer.args.optim)),
        mixed_precision=mixed_precision,
        **run.settings,
    )
    row.update(
        summarise_work(works[args.warmup :], work.matmuls()),
        compute_dtypes=dtypes,
        compute_dtypes_from=(
            f"observed by a hook on one decoder matmul of each model ({', '.join(observed)}); "
            f"the rest from mixed precision {mixed_precision} and the weights' dtypes"
        ),
    )
    del run, student
    current.clear()
    return row


# --- ratios, targets, table


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_to_kd``, and ``ratio_to_trl``: {TRL case: ratio} for each case our JSD case compares to."""
    by_name = {r["name"]: r for r in rows}
    kd = by_name.get("kd", {}).get("seconds_per_step")
    for row in rows:
        s = row.get("seconds_per_step")
        row["ratio_to_kd"] = s / kd if s and kd else None
        if row.get("compare_to"):
            theirs = {name: by_name.get(name, {}).get("seconds_per_step") for name in row["compare_to"]}
            row["ratio_to_trl"] = {name: s / t if s and t else None for name, t in theirs.items()}


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {r["name"]: r for r in rows}
    checks = []

    def check(target: str, ratio: float | None, limit: float) -> None:
        checks.append(
            {"target": target, "ratio": ratio, "limit": limit, "pass": None if ratio is None else ratio <= limit}
        )

    def step_ratio(ours: str, theirs: str) -> float | None:
        a, b = (by_name.get(n, {}).get("seconds_per_step") for n in (ours, theirs))
        return a / b if a and b else None

    check(
        "jsd-offpolicy <= 0.6 x trl-lmbda0 (TRL gradient checkpointing off)",
        step_ratio("jsd-offpolicy", "trl-lmbda0"),
        TARGETS["trl_ratio"],
    )
    check(
        "jsd-onpolicy <= 0.6 x trl-lmbda1 (TRL gradient checkpointing off)",
        step_ratio("jsd-onpolicy", "trl-lmbda1"),
        TARGETS["trl_ratio"],
    )
    check(
        "jsd-onpolicy <= 0.6 x trl-distill-onpolicy (TRL DistillationTrainer, gradient checkpointing off)",
        step_ratio("jsd-onpolicy", "trl-distill-onpolicy"),
        TARGETS["trl_ratio"],
    )
    check("distillm <= 1.3 x kd (step cost at phi = 0)", step_ratio("distillm", "kd"), TARGETS["distillm_over_kd"])
    check("distillm <= 0.5 x gkd (step cost at phi = 0)", step_ratio("distillm", "gkd"), TARGETS["distillm_over_gkd"])
    check(
        "kd <= 1.5 x its compute floor (off-policy step)",
        by_name.get("kd", {}).get("ratio_to_floor"),
        TARGETS["floor_ratio"],
    )
    check(
        "distillm <= 1.5 x its compute floor (off-policy step at phi = 0)",
        by_name.get("distillm", {}).get("ratio_to_floor"),
        TARGETS["floor_ratio"],
    )
    return checks


def trl_ratio(row: dict[str, Any], trainer: str) -> float | None:
    """The ratio of ``row`` to the TRL case it compares to that runs ``trainer``, if any."""
    ratios = row.get("ratio_to_trl")
    if isinstance(ratios, (int, float)):  # a result written when GKDTrainer was the only TRL case
        return ratios if trainer == "GKDTrainer" else None
    return next((r for name, r in (ratios or {}).items() if TRL_CASES.get(name, {}).get("trainer") == trainer), None)


def format_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and rows of the summary table (plain strings, for the console and RESULTS.md)."""

    def num(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    table = [
        [
            "case",
            "s/step",
            "median",
            "by source (s/step)",
            "generation",
            "teacher fwd",
            "optimizer",
            "floor s",
            "x floor",
            "x kd",
            "x TRL GKD",
            "x TRL Distill",
        ]
    ]
    for r in rows:
        if r.get("error"):
            table.append([r["name"], "error: " + r["error"], *[""] * (len(table[0]) - 2)])
            continue
        sources = ", ".join(f"{k} {v['seconds_per_step']:.2f} ({v['steps']})" for k, v in r["by_source"].items())
        b = r.get("breakdown", {})
        table.append(
            [
                r["name"],
                num(r["seconds_per_step"]),
                num(r["median_seconds"]),
                sources,
                num(b.get("generation")),
                num(b.get("teacher_forward")),
                num(b.get("optimizer")),
                num(r.get("floor_seconds"), "{:.3g}"),
                num(r.get("ratio_to_floor"), "{:.2f}"),
                num(r.get("ratio_to_kd"), "{:.2f}"),
                num(trl_ratio(r, "GKDTrainer"), "{:.2f}"),
                num(trl_ratio(r, "DistillationTrainer"), "{:.2f}"),
            ]
        )
    return table


def print_table(table: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for line in table:
            print(" | ".join(line))
        return
    rich_table = Table(title="seconds per optimizer step", title_justify="left")
    for i, header in enumerate(table[0]):
        rich_table.add_column(header, justify="left" if i in (0, 3) else "right")
    for line in table[1:]:
        rich_table.add_row(*line)
    Console(width=max(Console().width, 180)).print(rich_table)


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Stacked bars: each case's mean step seconds split into the breakdown's parts, and a mark at its
    compute floor. None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("breakdown")]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for part in (*BREAKDOWN_PARTS, "other"):
        widths = [max(r["breakdown"].get(part, 0.0), 0.0) for r in rows]
        ax.barh(range(len(rows)), widths, left=left, label=part.replace("_", " "))
        left = [a + b for a, b in zip(left, widths)]
    floors = [(i, r["floor_seconds"]) for i, r in enumerate(rows) if r.get("floor_seconds")]
    if floors:
        ax.scatter(
            [f for _, f in floors],
            [i for i, _ in floors],
            marker="|",
            s=300,
            color="black",
            zorder=3,
            label="compute floor",
        )
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds per optimizer step (mean)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Step cost and where it goes (other: loss, backward, clipping, batching)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import distill

    registry = distill.default_registry()
    names = case_names(registry)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each case left out of the timing")
    parser.add_argument(
        "--only", nargs="+", choices=names, metavar="CASE", help=f"run these cases only: {', '.join(names)}"
    )
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's cases even when trl is installed")
    parser.add_argument("--output", type=Path, default=RESULTS / "step_cost.json")
    add_setting_flags(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    set_threads(args)
    trainers = set() if args.no_trl else trl_trainers()
    selected = [n for n in (args.only or names) if n not in TRL_CASES or TRL_CASES[n]["trainer"] in trainers]
    skipped = [n for n in (args.only or names) if n not in selected]

    reference, resolved_by = resolve_auto(ours_config(args, registry, "kd", Path("unused")))
    if any(n in TRL_CASES for n in selected) and reference.student.lora is not None:
        parser.error("the TRL cases train every student weight; with student.lora pass --no-trl")
    settings = {
        **settings_record(reference),
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "lr": reference.train.lr,
        "schedule": reference.train.schedule,
        "jsd_beta": BETA,
        "generation_temperature": reference.generation.temperature,
        "precision_resolved_by": resolved_by,
    }
    print(
        f"step cost: {len(selected)} cases, {args.warmup} warm-up + {args.steps} timed steps each, batch "
        f"{settings['batch_size']}, max_new_tokens {settings['max_new_tokens']}, {resolved_by}, teacher "
        f"{settings['teacher']}, student {settings['student']}, threads {torch.get_num_threads()}",
        flush=True,
    )
    if skipped:
        print(f"  skipped (trl, or its trainer, not installed, or --no-trl): {', '.join(skipped)}", flush=True)
    started = time.time()
    rows: list[dict[str, Any]] = []

    # --- the models once (TRL's cases train copies of them) and this machine's matmul throughput, before any case
    inputs = CaseInputs(reference)
    throughput = MatmulThroughput.for_model(
        inputs.student, inputs.tokens_per_step(), "cuda" if torch.cuda.is_available() else "cpu"
    )
    for dtype in ("float32", "bfloat16"):
        throughput.rate(dtype)
    print(
        f"  matmul throughput {throughput.record()['shape']}: "
        + ", ".join(f"{d} {g:.1f} GFLOP/s" for d, g in throughput.gflops.items()),
        flush=True,
    )
    if not any(n in TRL_CASES for n in selected):
        inputs = None  # only the throughput's shape was needed

    def save(complete: bool) -> dict[str, Any]:
        for row in rows:
            add_floor(row, throughput)
        add_ratios(rows)
        report = {
            "benchmark": "step_cost",
            "complete": complete,
            "environment": environment(),
            "settings": settings,
            "wall_seconds": time.time() - started,
            "targets": TARGETS,
            "verdicts": check_targets(rows),
            "matmul_throughput": throughput.record(),
            "skipped": skipped,
            "plot": args.output.with_suffix(".png").name if complete else None,
            "cases": rows,
        }
        write_json(args.output, report)
        return report

    with tempfile.TemporaryDirectory(prefix="step_cost_") as scratch:
        for name in selected:
            print(f"{name} ...", flush=True)
            try:
                if name in TRL_CASES:
                    rows.append(run_trl(args, inputs, name, Path(scratch)))
                else:
                    rows.append(run_ours(args, registry, name, Path(scratch)))
            except distill.ConfigError as error:
                raise SystemExit(f"{name}: {error}") from None
            save(complete=False)
    report = save(complete=True)
    picture = plot(rows, args.output.with_suffix(".png"))
    print()
    print_table(format_table(rows))
    for verdict in report["verdicts"]:
        shown = (
            "not measured"
            if verdict["ratio"] is None
            else f"{verdict['ratio']:.2f} ({'pass' if verdict['pass'] else 'MISS'})"
        )
        print(f"target {verdict['target']}: {shown}")
    print(f"\nwrote {args.output}" + (f" and {picture}" if picture else ""))
    return report


if __name__ == "__main__":
    main()
