"""Seconds per optimizer step of every recipe, and of TRL's GKDTrainer at the same settings.

All cases share the teacher, the student initialisation, the data, the batch size, the generation
length and the precision: by default the embedded default's (``distill.builtin.DEFAULT_RUN``, read at
run time; ``--teacher``/``--student``/``--data``/``--batch-size``/``--max-new-tokens``/``--set`` change
them). The cases, each trained for ``--warmup`` + ``--steps`` optimizer steps, the first ``--warmup``
not counted:

- every registered recipe (``distill list recipes``: kd, seqkd, imitkd, gkd, minillm, distillm), as
  ``distill run --recipe NAME`` trains it on these settings, through ``distill.train``; the step time
  is the ``seconds`` field of the run's ``metrics.jsonl`` (the policy's sampling, generation
  included, the forward and backward passes and the optimizer step; not evaluation or checkpoints).
  ``distillm`` runs here at its initial φ = 0 (φ only rises at evaluations, which these short runs
  do not make), so its steps are dataset steps; ``quality_budget.py`` measures its full-run cost;
- ``jsd-offpolicy`` and ``jsd-onpolicy``: JSD with β = 0.5 on the dataset's responses / on fresh
  student samples every step, without the cross-entropy term: the same objective and sampling as
  TRL's GKDTrainer at λ = 0 / λ = 1;
- with ``trl`` installed (``pip install 'distill[bench]'``): ``trl.experimental.gkd.GKDTrainer`` at
  λ = 0 and λ = 1, β = 0.5, sampling temperature as ours (1), the same ``max_new_tokens``, batch
  size, learning rate and schedule, with gradient checkpointing off (``trl-lmbda0``, ``trl-lmbda1``)
  and on (``-gc``, TRL's default). It gets the same model objects' weights and dtypes (teacher as
  loaded by distill, e.g. bfloat16; a float32 student under bf16 autocast, ``bf16=True``), the same
  tokenized prompts and responses in the same batches (``train_sampling_strategy="sequential"`` over
  the order our batch sampler draws), and logging, saving and evaluation off. A ``TrainerCallback``
  times each step from ``on_step_begin`` to ``on_step_end``. TRL keeps its defaults otherwise (its
  fused AdamW; logits over every position, prompt included).

Each step is also split into generation, teacher forward, student forward and optimizer time (by
timed wrappers and hooks, nested calls counted once); "other" is the rest: the loss, the backward
pass, clipping and batching. Reported per case: mean, median and spread of the step seconds, the
mean per source (dataset, teacher, student, replay), the breakdown, response tokens per step, and
the ratios to ``kd`` and to the TRL case at the same sampling (λ = 0 for off-policy, λ = 1 for
on-policy). Targets (issue 7): ``jsd-offpolicy`` ≤ 0.6 × ``trl-lmbda0`` and ``jsd-onpolicy`` ≤ 0.6 ×
``trl-lmbda1`` (gradient checkpointing off); ``distillm`` ≤ 1.3 × ``kd`` and ≤ 0.5 × ``gkd`` (here at
φ = 0; the full-run check is ``quality_budget.py``'s).

Run (from the repository root; the default cases on the embedded default take a while on a few CPU cores)::

    .venv/bin/python benchmarks/step_cost.py                         # every case, 10 timed steps after 2 warm-up steps
    .venv/bin/python benchmarks/step_cost.py --steps 20 --warmup 3
    .venv/bin/python benchmarks/step_cost.py --only kd distillm trl-lmbda0
    .venv/bin/python benchmarks/step_cost.py --teacher T --student S --data train.jsonl --batch-size 4

Prints a table and writes ``benchmarks/results/step_cost.json`` (``--output`` to change), rewritten
after every case so an interrupted run keeps what it measured (``"complete": false``), and with
matplotlib ``step_cost.png`` beside it: each case's step time split into the breakdown's parts.
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
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BREAKDOWN_PARTS,
    RESULTS,
    Breakdown,
    add_setting_flags,
    case_config,
    distill_patches,
    environment,
    mean,
    read_jsonl,
    save_figure,
    set_threads,
    settings_record,
    summarise_parts,
    trl_available,
    write_json,
)

JSD_CASES = {
    "jsd-offpolicy": {"policy": "offpolicy", "compare_to": "trl-lmbda0"},
    "jsd-onpolicy": {"policy": "onpolicy", "compare_to": "trl-lmbda1"},
}
TRL_CASES = {
    "trl-lmbda0": {"lmbda": 0.0, "gradient_checkpointing": False},
    "trl-lmbda1": {"lmbda": 1.0, "gradient_checkpointing": False},
    "trl-lmbda0-gc": {"lmbda": 0.0, "gradient_checkpointing": True},
    "trl-lmbda1-gc": {"lmbda": 1.0, "gradient_checkpointing": True},
}
BETA = 0.5
TARGETS = {"trl_ratio": 0.6, "distillm_over_kd": 1.3, "distillm_over_gkd": 0.5}


def case_names(registry) -> list[str]:
    """Every case in the order they run: the recipes (kd first), our JSD cases, TRL's."""
    recipes = sorted(registry.names("recipe"), key=lambda name: (name != "kd", name))
    return [*recipes, *JSD_CASES, *TRL_CASES]


# --- our cases, through distill.train


def bench_layer(args, out: Path) -> dict[str, Any]:
    """Short runs: warm-up + timed steps, no evaluation between, a small validation set (the
    evaluations before and after training are not timed, but they take time)."""
    return {
        "output_dir": str(out),
        "train": {"max_steps": args.warmup + args.steps},
        "eval": {"every": 0, "rouge_samples": 0},
        "data": {"val_max": 8},
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"with": []},
    }


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
    """Train one of our cases; its step times from metrics.jsonl, warm-up steps left out."""
    from distill.engine import train

    out = scratch / name
    cfg = ours_config(args, registry, name, out)
    breakdown = Breakdown()
    parts: dict[int, dict[str, float]] = {}

    def report(kind: str, record: dict[str, Any]) -> None:
        if kind == "step":
            parts[record["step"]] = breakdown.take()
            progress(name, record["step"], cfg.train.max_steps, record["seconds"], record["source"])
        elif kind == "eval":
            breakdown.take()  # evaluation is not part of a step

    with breakdown.active(distill_patches()):
        train(cfg, registry=registry, report=report, overwrite=True)
    metrics = read_jsonl(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    timed = [m for m in metrics if m["step"] > args.warmup]
    row = summarise(name, [m["seconds"] for m in timed], [m["source"] for m in timed], [parts.get(m["step"], {}) for m in timed])
    row.update(kind="ours", recipe=cfg.recipe, divergence=cfg.divergence.name, divergence_params=cfg.divergence.params,
               policy=cfg.policy.name, policy_params=cfg.policy.params, ce_weight=cfg.train.ce_weight,
               tokens_per_step=mean([m["tokens"] for m in timed]))
    if name in JSD_CASES:
        row["compare_to"] = JSD_CASES[name]["compare_to"]
    return row


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


# --- TRL's GKDTrainer on the same models, data and batches


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
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids, mask


class TRLModels:
    """Teacher, initial student, tokenizer and the batches of our runs, loaded once for every TRL case
    the way ``distill.train`` loads them (same references, dtypes and pruning)."""

    def __init__(self, cfg) -> None:
        from distill import models
        from distill.data import BatchSampler, load_examples

        self.cfg = cfg
        self.teacher = models.load_model(cfg.teacher, "teacher").eval().requires_grad_(False)
        self.tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.teacher)
        self.student = models.load_model(cfg.student, "student", teacher=self.teacher)
        models.freeze(self.student, cfg.student.freeze)  # the parameters our runs keep fixed (student.freeze)
        train_set, _, _ = load_examples(cfg.data, self.tokenizer, cfg.train.seed)
        sampler = iter(BatchSampler(len(train_set), cfg.train.batch_size, cfg.train.seed))
        batches = [next(sampler) for _ in range(cfg.train.max_steps)]
        self.rows = [{"prompt_ids": train_set[i].prompt_ids, "response_ids": train_set[i].response_ids} for batch in batches for i in batch]


def run_trl(args, models: TRLModels, name: str, scratch: Path) -> dict[str, Any]:
    """Train TRL's GKDTrainer for warm-up + timed steps; each step timed by a callback."""
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    cfg, setting = models.cfg, TRL_CASES[name]
    breakdown = Breakdown()
    seconds: list[float] = []
    parts: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            breakdown.take()
            self.tick = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.tick)
            parts.append(breakdown.take())
            source = "student" if setting["lmbda"] >= 1 else "dataset"
            progress(name, state.global_step, cfg.train.max_steps, seconds[-1], source)

    config = GKDConfig(
        output_dir=str(scratch / name),
        lmbda=setting["lmbda"],
        beta=BETA,
        temperature=cfg.generation.temperature,
        max_new_tokens=cfg.generation.max_new_tokens,
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
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    student = copy.deepcopy(models.student)
    AcceleratorState._reset_state()  # another run in this process may have set another precision
    random.seed(cfg.train.seed)
    trainer = GKDTrainer(
        model=student,
        teacher_model=models.teacher,
        args=config,
        data_collator=TRLBatches(models.tokenizer.pad_token_id),
        train_dataset=Dataset.from_list(models.rows),
        processing_class=models.tokenizer,
        callbacks=[StepTimer()],
    )
    patches = [(GKDTrainer, "generate_on_policy_outputs", "generation")]
    with breakdown.active(patches, modules={"teacher_forward": models.teacher, "student_forward": student}):
        trainer.train()
    shutil.rmtree(scratch / name, ignore_errors=True)
    timed_seconds, timed_parts = seconds[args.warmup:], parts[args.warmup:]
    source = "student" if setting["lmbda"] >= 1 else "dataset"
    row = summarise(name, timed_seconds, [source] * len(timed_seconds), timed_parts)
    row.update(kind="trl", lmbda=setting["lmbda"], beta=BETA, gradient_checkpointing=setting["gradient_checkpointing"],
               temperature=cfg.generation.temperature, optimizer=getattr(config.optim, "value", str(config.optim)),
               mixed_precision=str(trainer.accelerator.mixed_precision))
    del trainer, student
    return row


# --- ratios, targets, table


def add_ratios(rows: list[dict[str, Any]]) -> None:
    by_name = {r["name"]: r for r in rows}
    kd = by_name.get("kd", {}).get("seconds_per_step")
    for row in rows:
        s = row.get("seconds_per_step")
        row["ratio_to_kd"] = s / kd if s and kd else None
        trl = by_name.get(row.get("compare_to") or "", {}).get("seconds_per_step")
        row["ratio_to_trl"] = s / trl if s and trl else None


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {r["name"]: r.get("seconds_per_step") for r in rows}
    checks = []

    def check(target: str, ours: str, theirs: str, limit: float) -> None:
        a, b = by_name.get(ours), by_name.get(theirs)
        ratio = a / b if a and b else None
        checks.append({"target": target, "ratio": ratio, "limit": limit, "pass": None if ratio is None else ratio <= limit})

    check("jsd-offpolicy <= 0.6 x trl-lmbda0 (TRL gradient checkpointing off)", "jsd-offpolicy", "trl-lmbda0", TARGETS["trl_ratio"])
    check("jsd-onpolicy <= 0.6 x trl-lmbda1 (TRL gradient checkpointing off)", "jsd-onpolicy", "trl-lmbda1", TARGETS["trl_ratio"])
    check("distillm <= 1.3 x kd (step cost at phi = 0)", "distillm", "kd", TARGETS["distillm_over_kd"])
    check("distillm <= 0.5 x gkd (step cost at phi = 0)", "distillm", "gkd", TARGETS["distillm_over_gkd"])
    return checks


def format_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and rows of the summary table (plain strings, for the console and RESULTS.md)."""
    def num(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    table = [["case", "s/step", "median", "by source (s/step)", "generation", "teacher fwd", "optimizer", "x kd", "x TRL"]]
    for r in rows:
        if r.get("error"):
            table.append([r["name"], "error: " + r["error"], *[""] * 7])
            continue
        sources = ", ".join(f"{k} {v['seconds_per_step']:.2f} ({v['steps']})" for k, v in r["by_source"].items())
        b = r.get("breakdown", {})
        table.append([r["name"], num(r["seconds_per_step"]), num(r["median_seconds"]), sources, num(b.get("generation")),
                      num(b.get("teacher_forward")), num(b.get("optimizer")), num(r.get("ratio_to_kd"), "{:.2f}"),
                      num(r.get("ratio_to_trl"), "{:.2f}")])
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
    Console(width=max(Console().width, 160)).print(rich_table)


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Stacked bars: each case's mean step seconds split into the breakdown's parts. None without matplotlib."""
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
    parser.add_argument("--only", nargs="+", choices=names, metavar="CASE", help=f"run these cases only: {', '.join(names)}")
    parser.add_argument("--no-trl", action="store_true", help="skip TRL's cases even when trl is installed")
    parser.add_argument("--output", type=Path, default=RESULTS / "step_cost.json")
    add_setting_flags(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    set_threads(args)
    with_trl = not args.no_trl and trl_available()
    selected = [n for n in (args.only or names) if with_trl or n not in TRL_CASES]
    skipped = [n for n in (args.only or names) if n not in selected]

    reference = ours_config(args, registry, "kd", Path("unused"))
    if with_trl and reference.student.lora is not None:
        parser.error("the TRL cases train every student weight; with student.lora pass --no-trl")
    settings = {**settings_record(reference), "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                "lr": reference.train.lr, "schedule": reference.train.schedule, "jsd_beta": BETA,
                "generation_temperature": reference.generation.temperature}
    print(f"step cost: {len(selected)} cases, {args.warmup} warm-up + {args.steps} timed steps each, batch {settings['batch_size']}, "
          f"max_new_tokens {settings['max_new_tokens']}, {settings['precision']}, teacher {settings['teacher']}, "
          f"student {settings['student']}, threads {torch.get_num_threads()}", flush=True)
    if skipped:
        print(f"  skipped (trl not installed or --no-trl): {', '.join(skipped)}", flush=True)
    started = time.time()
    rows: list[dict[str, Any]] = []
    models = None

    def save(complete: bool) -> dict[str, Any]:
        add_ratios(rows)
        report = {"benchmark": "step_cost", "complete": complete, "environment": environment(), "settings": settings,
                  "wall_seconds": time.time() - started, "targets": TARGETS, "verdicts": check_targets(rows),
                  "skipped": skipped, "plot": args.output.with_suffix(".png").name if complete else None, "cases": rows}
        write_json(args.output, report)
        return report

    with tempfile.TemporaryDirectory(prefix="step_cost_") as scratch:
        for name in selected:
            print(f"{name} ...", flush=True)
            try:
                if name in TRL_CASES:
                    if models is None:
                        models = TRLModels(ours_config(args, registry, "kd", Path(scratch) / "unused"))
                    rows.append(run_trl(args, models, name, Path(scratch)))
                else:
                    rows.append(run_ours(args, registry, name, Path(scratch)))
            except distill.ConfigError as error:
                raise SystemExit(f"{name}: {error}") from None
            save(complete=False)
    picture = plot(rows, args.output.with_suffix(".png"))
    report = save(complete=True)
    print()
    print_table(format_table(rows))
    for verdict in report["verdicts"]:
        shown = "not measured" if verdict["ratio"] is None else f"{verdict['ratio']:.2f} ({'pass' if verdict['pass'] else 'MISS'})"
        print(f"target {verdict['target']}: {shown}")
    print(f"\nwrote {args.output}" + (f" and {picture}" if picture else ""))
    return report


if __name__ == "__main__":
    main()
