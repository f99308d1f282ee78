"""The paper's claims at small scale: every recipe, several seeds, at equal steps and at equal seconds.

Setting (the defaults; flags change them):

- Teacher: the embedded default's (SmolLM2-135M-Instruct). Student: ``prune:6`` (6 of its 30
  layers, embeddings and output head frozen, as in the embedded default), small enough that the
  recipes part: after 100 steps of the embedded default's recipe it still sits at a token KL of 3.6
  (``prune:15``: 2.0), so there is room for a better method to show.
- The student starts, as in the DistiLLM paper, from a supervised fine-tune (``--init-steps`` steps
  of recipe ``sft`` on the whole built-in training set; made once, shared by every run). From a
  raw pruned model the validation loss only falls, and DistiLLM's scheduler, which raises φ when
  that loss rises above its reference, would never engage.
- Distillation runs on the first ``--train-prompts`` of the built-in training prompts (teacher
  answers) for ``--epochs`` passes, evaluated once per epoch (``eval.every: epoch``, the official
  code's cadence): several passes over few prompts let the validation loss stall and turn, so the
  adaptive scheduler gets its signal. Validation: the first ``--val-prompts`` of the 80 built-in validation prompts.
- Every recipe trains with the same learning rate and schedule (``--lr``, cosine, ``--warmup``). The
  first runs used one rate for all (5e-4, not tuned; their records keep their names); a run at
  another rate is named ``<recipe>@lr<rate>`` (``kd@lr0.0001``), so a grid is several calls with
  ``--lr``, each record keeping its ``lr``. The divergence term alone (``train.ce_weight``
  0), except ``sft``, which is the cross-entropy alone.

Recipes: kd, sft, skew_kl and skew_rkl (off-policy), rkl (off-policy reverse KL, the control that
"skew KL >= KL and RKL" needs beside kd), distillm, distillm with skew_rkl, gkd with TRL's
settings (β 0.5, λ 0.5), gkd as the DistiLLM paper ran it (jsd β 0.1, λ 0.5, replay buffer),
imitkd, minillm (as its authors run it), rkl_onpolicy (the approximation earlier runs called
minillm), and DistiLLM-2: ``distillm2_pairs`` (the official schedule: both sides sampled once before
training by ``distill prepare-pairs``, its seconds counted in the budget), ``distillm2`` (as shipped
without pairs: both sides sampled at every step), the ablations ``distillm2_dataset`` (the dataset's
responses on the teacher side) and ``distillm2_pairs_teacher_only`` (the student term's weight 0),
and ``distillm2_dataset_t1`` (the first runs' distillm2: the dataset's responses, fresh student
samples at temperature 1).

Budgets: ``steps``: every recipe runs epochs x steps-per-epoch optimizer steps. ``seconds``: every
recipe gets the training seconds (optimizer steps only) that ``distillm`` took at equal steps (at
the first runs' rate, whatever ``--lr``: one budget for every row), turned into steps at the
recipe's own pace at equal steps at its rate (its seconds per step):
``train.max_steps`` = budget / pace, so its learning-rate schedule fits. Both are the least over
the seeds: a shared machine's load only ever slows a run down, so the quickest run of a recipe is
the best measure of its own cost (seed runs measured at loads 2 and 5 differed 2x). The run's own
clock does not end it (no ``train.max_seconds``): on a shared machine a busy minute would cut one
recipe short and not another, and the quality numbers would measure the load. ``load_average`` in
each record says how busy the machine was.

Metrics on the validation prompts, at the end: ROUGE-L of greedy answers and of sampled ones
(temperature 1, mean of ``--draws`` draws per prompt, the official evaluation's 5), token KL to the
teacher, val CE; and the seconds per step, the student share, φ after each step.

Resumable: each finished run writes ``<root>/records/<budget>-<recipe>-s<seed>.json`` and is skipped
afterwards (a new machine's root first gets the records of ``--output``, the committed results);
an interrupted run of the same config goes on from its last checkpoint (a stopped
session sends SIGTERM, and the run saves one at the end of the step it is in), its record saying
``resumed``; any other interrupted run starts over. ``benchmarks/results/study.json`` (one record per run, the
settings, the environment) and the plots are rewritten after every run. Several processes may share a
root (one core each: ``--threads 1``): each claims a run before it starts it (``<root>/claims/``) and
skips the runs another process holds (a lock that ends with its process). Run in the background::

    nohup .venv/bin/python benchmarks/study.py > study.log 2>&1 &
    .venv/bin/python benchmarks/study.py --budgets steps --seeds 0 --only kd distillm   # a part
    .venv/bin/python benchmarks/study.py --report-only                                   # table and plots
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, count_sources, environment, save_figure, set_threads, write_json

SOURCES = ("dataset", "teacher", "student", "replay")

# name -> (recipe, config overrides); every recipe as the issue lists it
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "kd": ("kd", {}),
    "sft": ("sft", {"train": {"ce_weight": 1.0}}),  # the shared layer's ce_weight 0 would cancel the recipe's
    "skew_kl": ("kd", {"divergence": {"name": "skew_kl", "params": {"alpha": 0.1}}}),
    "skew_rkl": ("kd", {"divergence": {"name": "skew_rkl", "params": {"alpha": 0.1}}}),
    "rkl": ("kd", {"divergence": {"name": "rkl"}}),  # plain reverse KL: the other half of "skew KL >= KL and RKL"
    "distillm": ("distillm", {}),
    "distillm_rkl": ("distillm", {"divergence": {"name": "skew_rkl", "params": {"alpha": 0.1}}}),
    "gkd": ("gkd", {}),
    "gkd_distillm": (
        "gkd",
        {"divergence": {"params": {"beta": 0.1}}, "policy": {"params": {"prob": 0.5, "replay": True}}},
    ),
    "imitkd": ("imitkd", {}),
    "minillm": ("minillm", {}),  # MiniLLM as its authors run it (before 2026-12-04: the approximation below)
    "rkl_onpolicy": ("rkl_onpolicy", {}),  # the token-level approximation the study's first runs called minillm
    # DistiLLM-2 (#29): the recipe as its authors run it, with the official schedule (PAIRS: both sides
    # sampled once before training by distill prepare-pairs, from the initial student), and as shipped
    # without pairs (teacher samples and fresh student samples at every step, at 0.8 / 0.95)
    "distillm2_pairs": ("distillm2", {"policy": {"params": {"pairs": "{pairs}"}}}),
    "distillm2": ("distillm2", {}),
    # ablations: the dataset's responses on the teacher side; the student term's weight 0 (skew KL on the
    # teacher's samples alone)
    "distillm2_dataset": ("distillm2", {"policy": {"params": {"teacher": "dataset"}}}),
    "distillm2_pairs_teacher_only": (
        "distillm2",
        {
            "policy": {"params": {"pairs": "{pairs}"}},
            "objective": {"terms": {"student": {"weight": 0.0, "weight_end": 0.0}}},
        },
    ),
    # the first runs' distillm2 (before 2026-12-04 the recipe's defaults): the dataset's responses on the
    # teacher side, fresh student samples at temperature 1 (the study's train.ce_weight 0 in both terms)
    "distillm2_dataset_t1": (
        "distillm2",
        {"policy": {"params": {"teacher": "dataset"}}, "generation": {"train": {"temperature": 1.0, "top_p": 1.0}}},
    ),
}
PAIRS = "{pairs}"
"""In a variant's policy params: the prepared pairs of the run's seed (``<root>/pairs/s<seed>``), made
by ``distill.pairs.prepare_pairs`` before the run when missing; their seconds count in its budget."""


UNTUNED_LR = 5e-4
"""The one rate of the first runs (every recipe, not tuned): their records keep their names."""


def run_name(args, name: str) -> str:
    """A run's name in records and claims: the variant, with its rate when that is not ``UNTUNED_LR``
    (``kd@lr0.0001``), so runs of a learning-rate grid never collide with each other or the first runs."""
    return name if math.isclose(args.lr, UNTUNED_LR) else f"{name}@lr{args.lr:g}"


def variant_of(name: str) -> str:
    """The variant of a run name (``kd@lr0.0001`` -> ``kd``)."""
    return name.split("@", 1)[0]


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# --- the setting


def base_config(args) -> dict[str, Any]:
    """What every run shares (the models, data, batching and evaluation), as a config layer."""
    import copy

    from distill.builtin import DEFAULT_RUN

    layer = copy.deepcopy(DEFAULT_RUN)
    layer["data"] = {**layer["data"], "path": str(args.root / "train_subset.jsonl"), "validation": "builtin:val"}
    layer["train"] = {
        **layer["train"],
        "lr": args.lr,
        "warmup_steps": args.warmup,
        "schedule": "cosine",
        "ce_weight": 0.0,
    }
    layer["eval"] = {
        **layer["eval"],
        "every": "epoch",
        "rouge_samples": args.rouge_samples,
        "rouge_before": 0,
        "rouge_draws": args.draws,
    }
    layer["data"]["val_max"] = args.val_prompts
    layer["checkpoint"] = {"every": 0, "keep": 1}
    layer["log"] = {"with": []}
    layer["student"] = {"ref": str(args.root / "init" / "final"), "freeze": ["embeddings"]}
    if args.teacher:
        layer["teacher"] = args.teacher
    from distill.config import parse_assignments, set_dotted

    chosen = parse_assignments(args.settings, "--set")
    for key, value in chosen.items():
        set_dotted(layer, key, value)
    if "train.max_steps" not in chosen:
        layer["train"]["max_steps"] = steps_of(args, layer["train"])
    return layer


def steps_of(args, train: dict[str, Any]) -> int:
    """``--epochs`` passes over the prompts at the step size of ``train`` (batch_size x grad_accum)."""
    return args.epochs * (args.train_prompts // (train.get("batch_size", 8) * train.get("grad_accum", 1)))


def write_subset(args) -> Path:
    """The first ``--train-prompts`` built-in training prompts (with the teacher's answers)."""
    from distill.builtin import BUILTIN_DATA

    path = args.root / "train_subset.jsonl"
    lines = BUILTIN_DATA["builtin:train"].read_text().splitlines()[: args.train_prompts]
    if len(lines) < args.train_prompts:
        raise SystemExit(f"--train-prompts {args.train_prompts}: the built-in training set has {len(lines)}")
    args.root.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != "\n".join(lines) + "\n":
        path.write_text("\n".join(lines) + "\n")
    return path


def make_init(args, registry) -> Path:
    """The shared starting student: ``--init-steps`` of sft from ``--student`` on the whole training set."""
    from distill.engine import train
    from distill.resolve import resolve_config

    final = args.root / "init" / "final"
    if (final / "config.json").exists():
        return final
    print(f"init: {args.init_steps} steps of sft from {args.student} on builtin:train", flush=True)
    layer = merge(
        base_config(args),
        {
            "student": {"ref": args.student, "freeze": ["embeddings"]},
            "data": {"path": "builtin:train", "validation": "builtin:val"},
            "train": {"max_steps": args.init_steps, "seed": 0, "lr": args.init_lr, "ce_weight": 1.0},
            "eval": {"every": 0, "rouge_samples": 0, "rouge_draws": 0},
            "output_dir": str(args.root / "init"),
        },
    )
    cfg = resolve_config(layer, recipe="sft", embedded=False, registry=registry)
    train(cfg, registry=registry, overwrite=True)
    return final


# --- one run


def seconds_budget(args, name: str) -> tuple[float, float] | None:
    """The equal-seconds budget of ``name``: distillm's training seconds at equal steps and ``name``'s
    seconds per step there, each the least over the seeds with a record so far (a shared machine's
    load only ever slows a run down), whichever ``--seeds`` this call runs. None until both have an
    equal-steps run.

    The budget is always distillm's at ``UNTUNED_LR`` (532 s in the committed results), whatever
    ``--lr`` this call runs, so every equal-seconds row shares one budget: a recipe at its best rate
    gets the same seconds as the first runs. The pace is the recipe's own at ``--lr``."""

    def finished(recipe: str) -> list[dict[str, Any]]:
        pattern = re.compile(rf"steps-{re.escape(recipe)}-s\d+")
        paths = sorted((args.root / "records").glob("steps-*.json"))
        return [json.loads(p.read_text()) for p in paths if pattern.fullmatch(p.stem)]

    reference, own = finished("distillm"), finished(run_name(args, name))  # "distillm": its run at UNTUNED_LR
    if not reference or not own:
        return None
    return min(r["train_seconds"] for r in reference), min(r["seconds_per_step"] for r in own)


def claim_path(args, budget: str, name: str, seed: int) -> Path:
    return args.root / "claims" / f"{budget}-{run_name(args, name)}-s{seed}"


def claim(args, budget: str, name: str, seed: int):
    """Take a run for this process (several study processes may share a root, one core each): an
    open file holding an exclusive lock (``fcntl.flock``) on ``<root>/claims/<run>``, to keep open
    while the run lasts and hand to ``release``; None when another process holds the run. The lock
    ends with its process, so a killed process's claim is free at once."""
    import fcntl

    path = claim_path(args, budget, name, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        file = open(path, "a+")  # noqa: SIM115 (kept open while the run lasts)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return None
        try:
            same = os.fstat(file.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder removed between our open and our lock
            file.truncate(0)
            file.write(str(os.getpid()))
            file.flush()
            return file
        file.close()


def release(file) -> None:
    """End a claim: remove its file while still holding the lock, then let go."""
    Path(file.name).unlink(missing_ok=True)
    file.close()


def complete(args, records: list[dict[str, Any]], names: list[str]) -> bool:
    """Whether every run this call selects (budgets x recipes x seeds) has a record."""
    done = {(r["budget"], r["recipe"], r["seed"]) for r in records}
    return {(b, run_name(args, n), s) for b in args.budgets for n in names for s in args.seeds} <= done


def record_path(args, budget: str, name: str, seed: int) -> Path:
    return args.root / "records" / f"{budget}-{run_name(args, name)}-s{seed}.json"


def restore_records(args) -> list[str]:
    """Write the records of ``--output`` (the committed results) that ``<root>/records`` lacks, so a
    study goes on where the last machine stopped: a new machine has no root, and without the finished
    runs' records it would run them again and could not size the equal-seconds budget. A restored
    record lacks the per-step lists the results file leaves out; the summary and the budget do not
    use them. Returns the names restored."""
    if not args.output.is_file():
        return []
    restored = []
    results = json.loads(args.output.read_text())
    for run in results.get("runs", []):
        path = args.root / "records" / f"{run['budget']}-{run['recipe']}-s{run['seed']}.json"
        if not path.exists():
            # the first runs' records predate the lr field: they ran at UNTUNED_LR (a grid run's name says its rate)
            name = run["recipe"]
            lr = run.get("lr") or (float(name.split("@lr", 1)[1]) if "@lr" in name else UNTUNED_LR)
            write_json(path, {**run, "lr": lr, "restored_from": args.output.name})
            restored.append(path.stem)
    return restored


def run_one(
    args, registry, name: str, seed: int, budget: str, seconds: float | None, seconds_per_step: float | None
) -> dict[str, Any]:
    from distill.engine import train
    from distill.resolve import resolve_config

    recipe, overrides = VARIANTS[name]
    out = args.root / "runs" / f"{budget}-{run_name(args, name)}-s{seed}"
    pairs = (
        args.root / "pairs" / f"s{seed}"
        if overrides.get("policy", {}).get("params", {}).get("pairs") == PAIRS
        else None
    )
    if pairs is not None:
        overrides = merge(overrides, {"policy": {"params": {"pairs": str(pairs)}}})
    layer = merge(merge(base_config(args), overrides), {"output_dir": str(out), "train": {"seed": seed}})
    prepared = prepare_seconds(args, registry, layer, recipe, pairs) if pairs is not None else 0.0
    if budget == "seconds":
        # the budget in steps at the recipe's own pace at equal steps (its whole schedule fits), less the
        # seconds its pairs took to prepare; the run's own clock does not stop it: on a shared machine
        # the load, not the recipe, would decide
        steps = max(1, math.ceil((seconds - prepared) / seconds_per_step))
        layer = merge(layer, {"train": {"max_steps": steps}})
    cfg = resolve_config(layer, recipe=recipe, embedded=False, registry=registry)
    print(
        f"{budget} {run_name(args, name)} seed {seed}: {cfg.train.max_steps} steps"
        + (f", {seconds:.0f} s" if seconds else ""),
        flush=True,
    )
    state = _run_state(out, cfg)
    if state != "new":
        print(
            f"  {state} run found in {out}: " + ("its record from its files" if state == "finished" else "resuming it"),
            flush=True,
        )
    started = time.perf_counter()
    last_line = [started]

    def report(kind: str, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        if kind == "step" and (now - last_line[0] > 60 or record["step"] == 1):
            last_line[0] = now
            print(
                f"  step {record['step']}  loss {record['loss']:.4f}  {record['source']}  {record['seconds']:.1f} s"
                + (f"  φ {record['sgo_prob']:.1f}" if "sgo_prob" in record else ""),
                flush=True,
            )
        elif kind == "eval":
            print(
                "  eval @ {step}: ".format(**record)
                + "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"),
                flush=True,
            )

    if state != "finished":
        train(cfg, registry=registry, report=report, overwrite=state == "new", resume=state == "interrupted")
    wall = time.perf_counter() - started
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    clock, elapsed = 0.0, {0: 0.0}
    for m in metrics:
        clock += m["seconds"]
        elapsed[m["step"]] = clock
    sources = count_sources(metrics)
    final = evals[-1]
    record = {
        "recipe": run_name(args, name),
        "variant": name,
        "lr": args.lr,
        "distill_recipe": recipe,
        "seed": seed,
        "budget": budget,
        "divergence": cfg.divergence.name,
        "divergence_params": cfg.divergence.params,
        "policy": cfg.policy.name,
        "policy_params": cfg.policy.params,
        "budget_seconds": seconds,
        "prepare_seconds": prepared,  # prepared pairs (distill prepare-pairs), counted in the seconds budget
        "pace_seconds_per_step": seconds_per_step,
        "steps": len(metrics),
        "steps_planned": cfg.train.max_steps,
        "train_seconds": clock,
        "wall_seconds": wall,  # this process's part: a resumed run's earlier part is not in it
        "resumed": state != "new",
        "seconds_per_step": clock / max(len(metrics), 1),
        "sources": sources,
        "student_share": sum(  # student outputs: fresh, replayed, or drawn from the teacher-student mixture
            m["source"] in ("student", "replay", "mixed") or "student" in m["source"].split("+") for m in metrics
        )
        / max(len(metrics), 1),
        "max_sgo_prob": max((m.get("sgo_prob", 0.0) for m in metrics), default=0.0),
        "rouge_l_greedy": final.get("rouge_l"),
        "rouge_l_sampled": final.get("rouge_l_sampled"),
        "token_kl": final.get("val_kl"),
        "val_ce": final.get("val_loss"),
        "before": {k: v for k, v in evals[0].items() if k != "step"},
        "curve": [
            {
                "step": e["step"],
                "train_seconds": elapsed.get(e["step"], clock),
                "val_ce": e.get("val_loss"),
                "token_kl": e.get("val_kl"),
            }
            for e in evals
        ],
        "sgo_prob": [m.get("sgo_prob") for m in metrics] if any("sgo_prob" in m for m in metrics) else None,
        "step_sources": [m["source"] for m in metrics],
        "step_seconds": [round(m["seconds"], 3) for m in metrics],  # sources' paces within one run
        "seconds_by_source": {
            source: round(statistics.mean(m["seconds"] for m in metrics if m["source"] == source), 3)
            for source in sorted({m["source"] for m in metrics})
        },
        "load_average": _load_average(),
    }
    if not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    return record


# a manifest's fields that differ between preparations of the same work (another seed, another clock)
_PREPARATION_RUN_FIELDS = {"seed", "parts", "seconds", "created", "response_tokens"}


def prepare_seconds(args, registry, layer: dict[str, Any], recipe: str, pairs: Path) -> float:
    """The seconds that preparing the pairs at ``pairs`` costs (made first when missing: a fixed set for a
    seed, one preparation serves both budgets, and each counts its seconds): the least over the
    study's preparations of the same work, the same models, settings and prompts with another seed
    (``<root>/pairs/s*``), as the pace of a run is its recipe's least over the seeds. A shared machine's
    load only slows a preparation down: seed 0's took 456 s beside two study processes, seed 1's the
    same work, 204 s, and one seed's budget must not pay for the load of the hour it was made in."""
    from distill.pairs import MANIFEST, prepare_pairs
    from distill.resolve import resolve_config

    import fcntl

    pairs.parent.mkdir(parents=True, exist_ok=True)
    with open(pairs.parent / f".{pairs.name}.lock", "a") as lock:  # study processes sharing a root: one prepares
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (pairs / MANIFEST).is_file():
            cfg = resolve_config(layer, recipe=recipe, embedded=False, registry=registry)
            print(f"  preparing pairs in {pairs}", flush=True)
            prepare_pairs(cfg, pairs)  # an interrupted preparation goes on from its finished parts
    own = json.loads((pairs / MANIFEST).read_text())

    def work(manifest: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in manifest.items() if k not in _PREPARATION_RUN_FIELDS}

    same = [json.loads(m.read_text()) for m in sorted(pairs.parent.glob(f"s*/{MANIFEST}"))]
    seconds = min(m["seconds"] for m in same if work(m) == work(own))
    print(f"  pairs in {pairs}: {own['seconds']:.0f} s to prepare, {seconds:.0f} s counted", flush=True)
    return float(seconds)


def _run_state(out: Path, cfg) -> str:
    """``new``; ``interrupted``: a run of this very config stopped after a checkpoint (a session that
    ends sends SIGTERM, and the run saves one at the end of its step), which goes on from there;
    ``finished``: it reached ``final/`` but its record was never written. Any other folder is
    replaced."""
    from distill.checkpoint import latest_checkpoint
    from distill.config import dump_config
    from distill.hardware import resolve_precision

    saved = out / "config.yaml"
    if not saved.is_file() or saved.read_text() != dump_config(resolve_precision(cfg)[0]):
        return "new"
    if (out / "final").is_dir() and (out / "eval.jsonl").is_file():
        return "finished"
    return "interrupted" if latest_checkpoint(out) is not None else "new"


def _load_average() -> list[float] | None:
    try:
        import os

        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --- the report


def load_records(args) -> list[dict[str, Any]]:
    folder = args.root / "records"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (min-max) over seeds per (budget, recipe)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["budget"], r["recipe"]), []).append(r)
    rows = []
    order = list(VARIANTS)
    for (budget, name), runs in sorted(
        groups.items(),
        key=lambda kv: (
            kv[0][0] != "steps",
            order.index(variant_of(kv[0][1])) if variant_of(kv[0][1]) in order else 99,
            kv[0][1],
        ),
    ):
        row = {"budget": budget, "recipe": name, "seeds": sorted(r["seed"] for r in runs)}
        for key in (
            "rouge_l_greedy",
            "rouge_l_sampled",
            "token_kl",
            "val_ce",
            "seconds_per_step",
            "train_seconds",
            "student_share",
            "max_sgo_prob",
            "steps",
        ):
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                row[key] = statistics.fmean(values)
                row[key + "_range"] = [min(values), max(values)]
        rows.append(row)
    return rows


def summary_lines(rows: list[dict[str, Any]]) -> list[list[str]]:
    """The summary as text cells, a header first: each number the mean over seeds, with (min-max)
    when there are several (the console table here and RESULTS.md's, through ``report.py``)."""

    def cell(row, key, fmt):
        if key not in row:
            return "-"
        lo, hi = row[key + "_range"]
        return fmt.format(row[key]) + (f" ({fmt.format(lo)}-{fmt.format(hi)})" if len(row["seeds"]) > 1 else "")

    header = ["budget", "recipe", "seeds", "steps", "s/step", "student share", "max φ"]
    header += ["ROUGE-L greedy", "ROUGE-L sampled", "token KL", "val CE"]
    lines = [header]
    for r in rows:
        seeds, steps = ",".join(map(str, r["seeds"])), f"{r.get('steps', 0):.0f}"
        share, phi = f"{100 * r.get('student_share', 0):.0f}%", f"{r.get('max_sgo_prob', 0):.1f}"
        lines.append([r["budget"], r["recipe"], seeds, steps, cell(r, "seconds_per_step", "{:.2f}"), share, phi])
        lines[-1] += [cell(r, "rouge_l_greedy", "{:.1f}"), cell(r, "rouge_l_sampled", "{:.1f}")]
        lines[-1] += [cell(r, "token_kl", "{:.3f}"), cell(r, "val_ce", "{:.3f}")]
    return lines


def print_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    from rich.console import Console
    from rich.table import Table

    lines = summary_lines(rows)
    header = lines[0]
    table = Table(title="study: mean over seeds (min-max)", title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for line in lines[1:]:
        table.add_row(*line)
    Console(width=max(Console().width, 160)).print(table)
    return lines


def plot(records: list[dict[str, Any]], folder: Path) -> list[Path]:
    """study_quality.png: final greedy ROUGE-L and token KL against training seconds, each run a point
    (one colour a recipe; circles: equal steps, triangles: equal seconds); study_distillm.png: φ after
    each step and the step sources of every distillm run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    seen = {r["recipe"] for r in records}  # a record of a recipe this copy does not know still gets a colour
    names = [n for n in VARIANTS if n in seen] + sorted(seen - set(VARIANTS))
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for r in records:
        marker = "o" if r["budget"] == "steps" else "^"
        for ax, key in zip(axes, ("rouge_l_greedy", "token_kl")):
            if r.get(key) is not None:
                ax.scatter(r["train_seconds"], r[key], color=colours[r["recipe"]], marker=marker, s=30)
    for n in names:
        axes[0].scatter([], [], color=colours[n], label=n)
    axes[0].set_ylabel("ROUGE-L (greedy) against the teacher")
    axes[1].set_ylabel("token KL(teacher || student)")
    for ax in axes:
        ax.set_xlabel("training seconds (optimizer steps only)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Quality against training seconds (o: equal steps, ^: equal seconds)")
    written.append(save_figure(fig, folder / "study_quality.png"))

    runs = [r for r in records if r["recipe"] == "distillm" and r.get("sgo_prob")]
    if runs:
        fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 * len(runs) + 0.5), sharex=True, squeeze=False)
        levels = {"dataset": 0, "student": 1, "replay": 2}
        for ax, r in zip(axes[:, 0], runs):
            xs = list(range(1, len(r["sgo_prob"]) + 1))
            ax.step(xs, r["sgo_prob"], where="post", color="black", label="φ")
            for source, level in levels.items():
                # a record restored from the results file before they kept step_sources: φ alone
                picked = [x for x, s in zip(xs, r.get("step_sources") or []) if s == source]
                ax.scatter(picked, [0.05 + 0.1 * level] * len(picked), s=8, label=source)
            ax.set_ylim(-0.05, 1.05)
            ax.set_ylabel(f"{r['budget']}, seed {r['seed']}", fontsize=8)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7, ncol=4)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("distillm: φ after each step (line) and each step's source (dots)")
        written.append(save_figure(fig, folder / "study_distillm.png"))
    return written


def write_report(args, records: list[dict[str, Any]], settings: dict[str, Any], complete: bool) -> dict[str, Any]:
    rows = summarise(records)
    plots = plot(records, args.output.parent) if records else []
    slim = [{k: v for k, v in r.items() if k != "step_seconds"} for r in records]
    settings = {**settings, "lr_grid": sorted({r["lr"] for r in records if r.get("lr")})}  # every rate run so far
    report = {
        "benchmark": "study",
        "complete": complete,
        "environment": environment(),
        "settings": settings,
        "summary": rows,
        "plots": [p.name for p in plots],
        "runs": slim,
    }
    write_json(args.output, report)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--root", type=Path, default=RESULTS / "study", help="runs, records and the initial student (resumable)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "study.json")
    parser.add_argument("--budgets", nargs="+", choices=("steps", "seconds"), default=["steps", "seconds"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--only", nargs="+", choices=list(VARIANTS), metavar="RECIPE", help=f"these only: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--teacher", help="teacher reference (default: the embedded default's)")
    parser.add_argument("--student", default="prune:6", help="the student before its supervised fine-tune")
    parser.add_argument("--init-steps", type=int, default=40, help="sft steps that make the shared starting student")
    parser.add_argument("--init-lr", type=float, default=1e-3, help="learning rate of that fine-tune")
    parser.add_argument(
        "--train-prompts", type=int, default=96, help="distillation prompts (the first N built-in ones)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--val-prompts", type=int, default=48, help="validation prompts (val CE, token KL; evaluated every epoch)"
    )
    parser.add_argument("--rouge-samples", type=int, default=48, help="validation prompts answered for ROUGE-L")
    parser.add_argument("--draws", type=int, default=5, help="sampled answers per prompt (temperature 1)")
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE", help="any config key, every run"
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--keep-runs", action="store_true", help="keep each run's folder under ROOT/runs")
    parser.add_argument("--report-only", action="store_true", help="rewrite the JSON, table and plots from the records")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import distill

    args = build_parser().parse_args(argv)
    set_threads(args)
    registry = distill.default_registry()
    known = set(registry.names("recipe"))
    names = [n for n in (args.only or VARIANTS) if VARIANTS[n][0] in known]
    skipped = [n for n in (args.only or VARIANTS) if VARIANTS[n][0] not in known]
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("report_only", "only", "budgets", "seeds")
    }
    settings.update(
        {
            "steps": base_config(args)["train"]["max_steps"],
            "variants": {n: VARIANTS[n] for n in names},
            "lr_grid": [args.lr],
            "not_registered": skipped,
        }
    )
    if args.report_only:
        records = load_records(args)
        report = write_report(args, records, settings, complete=complete(args, records, names))
        print_table(report["summary"])
        return report
    write_subset(args)
    if skipped:
        print(f"not registered, left out: {', '.join(skipped)}", flush=True)
    (args.root / "records").mkdir(parents=True, exist_ok=True)
    restored = restore_records(args)
    if restored:
        print(f"restored {len(restored)} records from {args.output}", flush=True)
    make_init(args, registry)
    for budget in ("steps", "seconds"):
        if budget not in args.budgets:
            continue
        for seed in args.seeds:
            for name in names:
                path = record_path(args, budget, name, seed)
                if path.exists():
                    continue
                seconds = pace = None
                if budget == "seconds":
                    budget_pace = seconds_budget(args, name)
                    if budget_pace is None or not record_path(args, "steps", name, seed).exists():
                        print(
                            f"seconds {name} seed {seed}: needs the equal-steps "
                            f"runs of distillm and of {name} first; left out",
                            flush=True,
                        )
                        continue
                    seconds, pace = budget_pace
                held = claim(args, budget, name, seed)
                if held is None:
                    print(f"{budget} {name} seed {seed}: another study process is running it; left to it", flush=True)
                    continue
                try:
                    if path.exists():  # its holder finished it between our look and our claim
                        continue
                    record = run_one(args, registry, name, seed, budget, seconds, pace)
                    write_json(path, record)
                finally:
                    release(held)
                write_report(args, load_records(args), settings, complete=False)
    records = load_records(args)
    report = write_report(args, records, settings, complete=complete(args, records, names))
    print_table(report["summary"])
    print(f"\nwrote {args.output} and {', '.join(report['plots'])}")
    return report


if __name__ == "__main__":
    main()
