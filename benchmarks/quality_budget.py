"""Validation quality of every recipe after the same wall-clock training budget.

Every registered recipe (kd, seqkd, imitkd, gkd, minillm, distillm) trains from the same student
initialisation on the same settings: by default the embedded default's (``distill.builtin.DEFAULT_RUN``:
teacher, student, data, batch size, generation length, precision, learning rate and schedule;
``--teacher``/``--student``/``--data``/``--set`` change them), through ``distill.train``.

The budget (``--budget`` seconds) counts training time only: the ``seconds`` of the optimizer steps
(the policy's sampling, generation included, forward, backward, optimizer), not evaluation, loading
or checkpoints. So that each recipe runs its whole learning-rate schedule (and ``distillm`` its
replay schedule) within the budget, its ``train.max_steps`` is the budget divided by its seconds per
step, rounded up: from ``benchmarks/results/step_cost.json`` when that file was measured on the same
settings, else from a short calibration run (``--calibration-steps``, the first step not counted).
``train.max_seconds`` = the budget then ends any run that is slower than calibrated (``distillm``
generates more once φ rises), with the final evaluation as at ``max_steps``.

Each run evaluates ``--evals`` times (``eval.every`` = max_steps / evals) and at the end; at every
evaluation ``distillm``'s φ may rise (the validation loss is its signal), so its schedule depends on
how often it is evaluated. Reported per recipe, from ``eval.jsonl`` and ``metrics.jsonl``:

- validation CE (``val_loss``: the student's cross-entropy on the teacher's answers to the
  validation prompts), token KL to the teacher (``val_kl``: KL(teacher || student) per response
  token on the same), ROUGE-L of the student's greedy answers to the validation prompts against the
  teacher's (``--rouge-samples``, default all), before training and at the end;
- steps done and planned, training seconds, mean seconds per step over the whole run (its full-run
  cost, under its own sampling schedule), the share of steps on student outputs, what ended it.

Targets (issue 7): at equal budget ``distillm``'s token KL is lower than ``kd``'s and ``gkd``'s; its
full-run seconds per step are at most 1.3 x ``kd``'s and at most 0.5 x ``gkd``'s.

Plots (PNG, matplotlib), under ``benchmarks/results/``: ``quality_budget_curves.png``, validation
loss and token KL against training seconds, one line per recipe; ``quality_budget_distillm.png``,
``distillm``'s φ (``sgo_prob``) and the source of each step (dataset, student, replay) against step.

Run (from the repository root; about 6 x (budget + evaluations) on the embedded default)::

    .venv/bin/python benchmarks/quality_budget.py --budget 300
    .venv/bin/python benchmarks/quality_budget.py --budget 120 --only kd gkd distillm --evals 5
    .venv/bin/python benchmarks/quality_budget.py --teacher T --student S --data train.jsonl --budget 60

Prints a table and writes ``benchmarks/results/quality_budget.json`` (``--output`` to change; the
plots go beside it), rewritten after every recipe (``"complete": false`` until the last).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    add_setting_flags,
    case_config,
    environment,
    read_jsonl,
    save_figure,
    set_threads,
    settings_record,
    write_json,
)

TARGETS = {"distillm_over_kd": 1.3, "distillm_over_gkd": 0.5}
SOURCES = ("dataset", "teacher", "student", "replay")


# --- seconds per step, to size each run to the budget


def step_cost_from_file(path: Path, settings: dict[str, Any]) -> dict[str, float]:
    """Seconds per step by recipe from a step_cost.json measured on the same settings; else empty."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    measured = report.get("settings", {})
    if any(measured.get(key) != value for key, value in settings.items()):
        return {}
    return {
        c["name"]: c["seconds_per_step"]
        for c in report.get("cases", [])
        if c.get("kind") == "ours" and c.get("seconds_per_step")
    }


def calibrate(args, registry, name: str, scratch: Path) -> float:
    """Mean seconds per step of a short run of ``name`` (its first step left out)."""
    from step_cost import run_ours

    short = Namespace(**{**vars(args), "warmup": 1, "steps": args.calibration_steps})
    return run_ours(short, registry, name, scratch)["seconds_per_step"]


# --- one recipe for the budget


def run_recipe(args, registry, name: str, seconds_per_step: float, out: Path) -> dict[str, Any]:
    from distill.engine import train

    max_steps = max(1, math.ceil(args.budget / seconds_per_step))
    bench = {
        "output_dir": str(out),
        "train": {"max_steps": max_steps, "max_seconds": args.budget},
        "eval": {"every": max(1, max_steps // args.evals), "rouge_samples": args.rouge_samples},
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"with": []},
    }
    cfg = case_config(args, registry, recipe=name, bench=bench)
    trained = [0.0]

    def report(kind: str, record: dict[str, Any]) -> None:
        if kind == "step":
            trained[0] += record["seconds"]
            if record["step"] % 10 == 0 or record["step"] == 1:
                print(f"  {name}: step {record['step']}/{max_steps}, {trained[0]:.1f}/{args.budget:g} s", flush=True)
        elif kind == "eval":
            shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
            print(f"  {name}: eval @ step {record['step']}: {shown}", flush=True)

    started = time.perf_counter()
    train(cfg, registry=registry, report=report, overwrite=True)
    wall = time.perf_counter() - started
    metrics, evals = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval.jsonl")
    elapsed, clock = {0: 0.0}, 0.0
    for m in metrics:
        clock += m["seconds"]
        elapsed[m["step"]] = clock
    sources = {s: sum(m["source"] == s for m in metrics) for s in SOURCES}
    final, before = evals[-1], evals[0]
    return {
        "recipe": name,
        "divergence": cfg.divergence.name,
        "divergence_params": cfg.divergence.params,
        "policy": cfg.policy.name,
        "policy_params": cfg.policy.params,
        "eval_every": cfg.eval.every,
        "calibrated_seconds_per_step": seconds_per_step,
        "steps_planned": max_steps,
        "steps_done": len(metrics),
        "stopped_by": "max_steps" if len(metrics) == max_steps else "budget",
        "train_seconds": clock,
        "wall_seconds": wall,
        "seconds_per_step": clock / len(metrics),
        "sources": {k: v for k, v in sources.items() if v},
        "student_share": (sources["student"] + sources["replay"]) / len(metrics),
        "before": {k: v for k, v in before.items() if k != "step"},
        "final": {k: v for k, v in final.items() if k != "step"},
        "curve": [
            {
                "step": e["step"],
                "train_seconds": elapsed[e["step"]],
                **{k: e.get(k) for k in ("val_loss", "val_kl", "val_divergence")},
            }
            for e in evals
        ],
        "steps": [
            {
                "step": m["step"],
                "seconds": m["seconds"],
                "source": m["source"],
                "loss": m["loss"],
                **({"sgo_prob": m["sgo_prob"]} if "sgo_prob" in m else {}),
            }
            for m in metrics
        ],
    }


# --- targets, table, plots


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_name = {r["recipe"]: r for r in rows}
    checks = []
    d = by_name.get("distillm")
    for other in ("kd", "gkd"):
        o = by_name.get(other)
        ours, theirs = (d or {}).get("final", {}).get("val_kl"), (o or {}).get("final", {}).get("val_kl")
        checks.append(
            {
                "target": f"distillm token KL < {other}'s at equal budget",
                "distillm": ours,
                "other": theirs,
                "pass": None if ours is None or theirs is None else ours < theirs,
            }
        )
    for other, key in (("kd", "distillm_over_kd"), ("gkd", "distillm_over_gkd")):
        o = by_name.get(other)
        ratio = d["seconds_per_step"] / o["seconds_per_step"] if d and o else None
        checks.append(
            {
                "target": f"distillm full-run s/step <= {TARGETS[key]} x {other}'s",
                "ratio": ratio,
                "limit": TARGETS[key],
                "pass": None if ratio is None else ratio <= TARGETS[key],
            }
        )
    return checks


def format_table(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and rows (plain strings, for the console and RESULTS.md); first row: the initial student."""

    def num(value, fmt="{:.3f}"):
        return "-" if value is None else fmt.format(value)

    table = [
        ["recipe", "steps (planned)", "train s", "s/step", "student share", "val CE", "token KL", "ROUGE-L", "ended by"]
    ]
    if rows:
        b = rows[0]["before"]
        table.append(
            [
                "(initial student)",
                "0",
                "0",
                "-",
                "-",
                num(b.get("val_loss")),
                num(b.get("val_kl")),
                num(b.get("rouge_l"), "{:.1f}"),
                "-",
            ]
        )
    for r in rows:
        f = r["final"]
        table.append(
            [
                r["recipe"],
                f"{r['steps_done']} ({r['steps_planned']})",
                f"{r['train_seconds']:.1f}",
                num(r["seconds_per_step"]),
                f"{100 * r['student_share']:.0f}%",
                num(f.get("val_loss")),
                num(f.get("val_kl")),
                num(f.get("rouge_l"), "{:.1f}"),
                r["stopped_by"],
            ]
        )
    return table


def print_table(table: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    rich_table = Table(title="equal training budget", title_justify="left")
    for i, header in enumerate(table[0]):
        rich_table.add_column(header, justify="left" if i == 0 else "right")
    for line in table[1:]:
        rich_table.add_row(*line)
    Console(width=max(Console().width, 140)).print(rich_table)


def plot(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """The two PNGs (see the module docstring); the distillm one only when distillm ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        xs = [p["train_seconds"] for p in r["curve"]]
        for ax, key in zip(axes, ("val_loss", "val_kl")):
            ax.plot(xs, [p[key] for p in r["curve"]], marker="o", markersize=3, label=r["recipe"])
    axes[0].set_ylabel("validation loss (student CE, nats/token)")
    axes[1].set_ylabel("token KL(teacher || student), nats")
    for ax in axes:
        ax.set_xlabel("training seconds (steps only, evaluation excluded)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Equal wall-clock budget: validation against training time")
    written.append(save_figure(fig, folder / "quality_budget_curves.png"))

    distillm = next((r for r in rows if r["recipe"] == "distillm"), None)
    if distillm is not None:
        steps = distillm["steps"]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        top.step([s["step"] for s in steps], [s.get("sgo_prob", 0.0) for s in steps], where="post")
        top.set_ylabel("φ (SGO probability)")
        top.set_ylim(-0.05, 1.05)
        top.grid(alpha=0.3)
        for point in distillm["curve"][1:]:
            top.axvline(point["step"], color="grey", alpha=0.25, linewidth=0.8)
        levels = {"dataset": 0, "student": 1, "replay": 2, "teacher": 3}
        used = [k for k in levels if any(s["source"] == k for s in steps)]
        for k in used:
            picked = [s["step"] for s in steps if s["source"] == k]
            bottom.scatter(picked, [used.index(k)] * len(picked), s=10, label=k)
        bottom.set_yticks(range(len(used)), used)
        bottom.set_ylim(-0.5, len(used) - 0.5)
        bottom.set_xlabel("step")
        bottom.set_ylabel("source")
        top.set_title("distillm: φ (grey lines: evaluations) and the source of each step")
        written.append(save_figure(fig, folder / "quality_budget_distillm.png"))
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import distill

    registry = distill.default_registry()
    recipes = sorted(registry.names("recipe"), key=lambda name: (name != "kd", name))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per recipe (steps only)")
    parser.add_argument("--evals", type=int, default=10, help="evaluations per run besides the one before training")
    parser.add_argument(
        "--rouge-samples", type=int, default=None, help="validation prompts answered for ROUGE-L (default: all)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=recipes, metavar="RECIPE", help=f"these recipes only: {', '.join(recipes)}"
    )
    parser.add_argument(
        "--step-cost", type=Path, default=RESULTS / "step_cost.json", help="seconds per step measured by step_cost.py"
    )
    parser.add_argument(
        "--calibration-steps",
        type=int,
        default=4,
        help="timed steps of a calibration run, where step_cost.json does not fit",
    )
    parser.add_argument(
        "--runs-dir", type=Path, help="keep each recipe's run folder here (default: a temporary folder, removed)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "quality_budget.json")
    add_setting_flags(parser)
    args = parser.parse_args(argv)
    if args.budget <= 0 or args.evals < 1 or args.calibration_steps < 1:
        parser.error("--budget must be > 0, --evals and --calibration-steps >= 1")
    set_threads(args)
    reference = case_config(args, registry, recipe="kd")
    if args.rouge_samples is None:
        args.rouge_samples = reference.data.val_max  # every validation prompt
    settings = {
        **settings_record(reference),
        "budget_seconds": args.budget,
        "evals": args.evals,
        "rouge_samples": args.rouge_samples,
        "lr": reference.train.lr,
        "schedule": reference.train.schedule,
        "warmup_steps": reference.train.warmup_steps,
        "ce_weight": reference.train.ce_weight,
        "seed": args.seed,
    }
    measured = step_cost_from_file(args.step_cost, settings_record(reference))
    selected = args.only or recipes
    print(
        f"quality at equal budget: {', '.join(selected)}; {args.budget:.0f} training seconds each, {args.evals} "
        f"evaluations; seconds per step from {'step_cost.json' if measured else 'calibration runs'}",
        flush=True,
    )
    started = time.time()
    rows: list[dict[str, Any]] = []

    def save(complete: bool, plots: list[Path] = ()) -> dict[str, Any]:
        report = {
            "benchmark": "quality_budget",
            "complete": complete,
            "environment": environment(),
            "settings": settings,
            "seconds_per_step_from": sorted({r["seconds_per_step_from"] for r in rows}),
            "wall_seconds": time.time() - started,
            "targets": TARGETS,
            "verdicts": check_targets(rows),
            "plots": [p.name for p in plots],
            "recipes": rows,
        }
        write_json(args.output, report)
        return report

    with tempfile.TemporaryDirectory(prefix="quality_budget_") as scratch:
        runs = args.runs_dir or Path(scratch)
        for name in selected:
            print(f"{name} ...", flush=True)
            try:
                seconds = measured.get(name) or calibrate(args, registry, name, Path(scratch))
                rows.append(run_recipe(args, registry, name, seconds, runs / name))
                rows[-1]["seconds_per_step_from"] = "step_cost.json" if name in measured else "calibration"
            except distill.ConfigError as error:
                raise SystemExit(f"{name}: {error}") from None
            if not args.runs_dir:
                shutil.rmtree(runs / name, ignore_errors=True)
            save(complete=False)
    plots = plot(rows, args.output.parent)
    report = save(complete=True, plots=plots)
    print()
    print_table(format_table(rows))
    for verdict in report["verdicts"]:
        if "ratio" in verdict:
            shown = "not measured" if verdict["ratio"] is None else f"{verdict['ratio']:.2f}"
        else:
            shown = (
                "not measured" if verdict["pass"] is None else f"{verdict['distillm']:.3f} vs {verdict['other']:.3f}"
            )
        status = "" if verdict["pass"] is None else (" (pass)" if verdict["pass"] else " (MISS)")
        print(f"target {verdict['target']}: {shown}{status}")
    print(f"\nwrote {args.output} and {', '.join(str(p) for p in plots)}")
    return report


if __name__ == "__main__":
    main()
