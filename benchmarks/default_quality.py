"""The embedded default's quality over seeds, and over changed settings: does a setting beat the seed noise?

One run is ``distill run`` on the embedded default (``distill.builtin.DEFAULT_RUN``), exactly as
``scripts/run.sh`` runs it, with ``--seed S`` and the setting's ``--set key=value`` overrides, in its
own process, into ``<root>/<setting>-s<seed>/run``. A finished run leaves a ``done`` file next to
``run`` and is not run again (the script resumes). The report reads every finished run under the
root: its ``config.yaml`` (the overrides are the keys that differ from the embedded default's
resolved config, leaving out the output folder and the seed; runs are grouped by their overrides
and by the precision and dtypes they computed in),
``eval.jsonl`` (KL to the teacher and ROUGE-L before and after) and ``metrics.jsonl`` (the seconds
of its training steps). It prints a table of the settings with their seeds' range against the
targets of issue 11 (ROUGE-L >= 20 and KL <= 0.25x its start) and writes
``results/default_quality.json``.

Run (from the repository root; each run takes what ``distill run`` takes, 10-15 minutes on 2 cores)::

    .venv/bin/python benchmarks/default_quality.py --root /tmp/dq --seeds 0 1 \
        --setting default --setting lr2e-3:train.lr=2e-3
    .venv/bin/python benchmarks/default_quality.py --root /tmp/dq --jobs 2 --threads 1 ...  # 2 at a time
    .venv/bin/python benchmarks/default_quality.py --root /tmp/dq --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from distill.checkpoint import flatten_config
from distill.config import read_config_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, mean, read_jsonl, write_json

ROUGE_TARGET = 20.0
KL_FRACTION_TARGET = 0.25
IGNORED = {"output_dir", "train.seed"}
"""Config keys that are not a setting: where the run wrote and its seed."""
COMPUTE = ("train.precision", "teacher.dtype", "student.dtype")
"""What a run computed in. ``config.yaml`` holds what ``auto`` resolved to, which cannot be told from a
value set by hand, so these are not overrides: runs are grouped by them beside their overrides (a
default run on an AVX2-only CPU, float32, is not the same setting as one with native bf16)."""


def parse_setting(text: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME:key=value,key=value`` -> the name and its ``--set`` assignments."""
    name, _, assignments = text.partition(":")
    if not name or "-s" in name and name.rsplit("-s", 1)[1].isdigit():
        raise SystemExit(f"setting {text!r}: give it a name that does not end in -s<digits>, e.g. lr2e-3:train.lr=2e-3")
    pairs = [a for a in assignments.split(",") if a]
    bad = [a for a in pairs if "=" not in a]
    if bad:
        raise SystemExit(f"setting {text!r}: {bad[0]!r} is not key=value")
    return name, pairs


def run_one(root: Path, name: str, seed: int, pairs: list[str], threads: int | None) -> Path:
    """``distill run`` on the embedded default into ``<root>/<name>-s<seed>``; skipped when done."""
    folder = root / f"{name}-s{seed}"
    if (folder / "done").exists():
        launch = folder / "launch.json"
        done_with = json.loads(launch.read_text()).get("set") if launch.exists() else None
        if done_with is not None and done_with != pairs:
            before, now = " ".join(done_with) or "nothing", " ".join(pairs) or "nothing"
            raise SystemExit(
                f"{folder.name} was run with --set {before}, not {now}: name this setting otherwise, or remove it"
            )
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "distill", "run", "--output-dir", str(folder / "run"), "--seed", str(seed)]
    command += [arg for pair in pairs for arg in ("--set", pair)] + ["--overwrite"]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    started = time.time()
    with open(folder / "log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    launch = {
        "command": command,
        "set": pairs,
        "omp_num_threads": env.get("OMP_NUM_THREADS"),
        "seconds": time.time() - started,
    }
    (folder / "launch.json").write_text(json.dumps(launch, indent=2) + "\n")
    if code != 0:
        raise SystemExit(f"{folder.name} failed (exit {code}): see {folder / 'log'}")
    (folder / "done").touch()
    return folder


def reference_config() -> dict[str, Any]:
    """The embedded default as ``distill run`` with no arguments resolves it, flattened."""
    from distill.resolve import resolve_config

    return flatten_config(resolve_config().model_dump(mode="json", by_alias=True))


def read_run(folder: Path, reference: dict[str, Any]) -> dict[str, Any] | None:
    """One finished run's record; None if it has not finished (no ``done`` or no final evaluation)."""
    run = folder / "run"
    if not (folder / "done").exists() or not (run / "eval.jsonl").exists():
        return None
    config = flatten_config(read_config_file(run / "config.yaml"))
    evals = read_jsonl(run / "eval.jsonl")
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    if "rouge_l" not in last or last["step"] != config["train.max_steps"]:
        return None
    overrides = {
        key: value
        for key, value in sorted(config.items())
        if key not in IGNORED and key not in COMPUTE and reference.get(key, object()) != value
    }
    steps = read_jsonl(run / "metrics.jsonl")
    launch = json.loads((folder / "launch.json").read_text()) if (folder / "launch.json").exists() else {}
    return {
        "name": folder.name,
        "setting": folder.name.rsplit("-s", 1)[0],
        "seed": config["train.seed"],
        "overrides": overrides,
        "precision": config["train.precision"],
        "compute": {key: config[key] for key in COMPUTE},
        "kl_start": first["val_kl"],
        "kl_end": last["val_kl"],
        "kl_fraction": last["val_kl"] / first["val_kl"],
        "rouge_l": last["rouge_l"],
        "rouge_prompts": last.get("rouge_prompts"),
        "rouge_l_subset": last.get("rouge_l_subset"),
        "steps": len(steps),
        "training_seconds": sum(s["seconds"] for s in steps),
        "omp_num_threads": launch.get("omp_num_threads"),
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs grouped by their overrides and what they computed in (the same: one setting, whatever the
    folders are called)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(json.dumps([run["overrides"], run["compute"]], sort_keys=True), []).append(run)
    rows = []
    for key, members in groups.items():
        members.sort(key=lambda r: r["seed"])
        seeds = [r["seed"] for r in members]
        for seed in sorted({seed for seed in seeds if seeds.count(seed) > 1}):
            twice = ", ".join(r["name"] for r in members if r["seed"] == seed)
            print(f"warning: {twice} ran the same setting at seed {seed}; each is counted")
        rouge = [r["rouge_l"] for r in members]
        kl = [r["kl_fraction"] for r in members]
        rows.append(
            {
                "setting": members[0]["setting"],
                "overrides": members[0]["overrides"],
                "compute": members[0]["compute"],
                "threads": sorted({str(r["omp_num_threads"] or "unset") for r in members}),
                "seeds": [r["seed"] for r in members],
                "rouge_l": rouge,
                "rouge_l_mean": mean(rouge),
                "kl_end": [r["kl_end"] for r in members],
                "kl_fraction_max": max(kl),
                "every_seed_reaches_rouge": min(rouge) >= ROUGE_TARGET,
                "every_seed_reaches_kl": max(kl) <= KL_FRACTION_TARGET,
            }
        )
    rows.sort(key=lambda r: (bool(r["overrides"]), r["setting"], r["compute"]["train.precision"]))
    return rows


def compute_text(compute: dict[str, str]) -> str:
    """``bf16 (teacher bfloat16, student float32)``."""
    return f"{compute['train.precision']} (teacher {compute['teacher.dtype']}, student {compute['student.dtype']})"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = [
        "setting",
        "overrides",
        "computed in",
        "seeds",
        "ROUGE-L each",
        "mean",
        "KL end each",
        f">= {ROUGE_TARGET:g} all",
    ]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row["setting"],
                ", ".join(f"{k}={v}" for k, v in row["overrides"].items()) or "(the default)",
                compute_text(row["compute"]),
                " ".join(str(s) for s in row["seeds"]),
                " ".join(f"{v:.2f}" for v in row["rouge_l"]),
                f"{row['rouge_l_mean']:.2f}",
                " ".join(f"{v:.2f}" for v in row["kl_end"]),
                "yes" if row["every_seed_reaches_rouge"] else "no",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="the runs' folder (resumable)")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME[:KEY=VALUE,...]",
        help="a setting to run at every seed (repeatable; 'default' for the embedded default as it is)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: unset)")
    parser.add_argument("--report-only", action="store_true", help="only read the finished runs under --root")
    parser.add_argument("--json", type=Path, default=RESULTS / "default_quality.json")
    args = parser.parse_args(argv)

    settings = [parse_setting(text) for text in args.setting]
    failures: list[str] = []
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [
                pool.submit(run_one, args.root, name, seed, pairs, args.threads)
                for name, pairs in settings
                for seed in args.seeds
            ]
            for job in jobs:  # a failed run does not stop the others; the report then says which failed
                try:
                    job.result()
                except SystemExit as failure:
                    failures.append(str(failure))
    reference = reference_config()
    folders = sorted(p for p in args.root.iterdir() if p.is_dir()) if args.root.is_dir() else []
    runs = [run for run in (read_run(folder, reference) for folder in folders) if run is not None]
    if not runs:
        raise SystemExit("; ".join(failures) or f"no finished runs under {args.root}")
    rows = summarise(runs)
    print_table(rows)
    report = {
        "benchmark": "default_quality",
        "environment": environment(),
        "targets": {"rouge_l": ROUGE_TARGET, "kl_fraction": KL_FRACTION_TARGET},
        "settings": rows,
        "runs": runs,
        "reference": reference,
    }
    write_json(args.json, report)
    print(f"wrote {args.json}")
    if failures:
        raise SystemExit("; ".join(failures))
    return report


if __name__ == "__main__":
    main()
