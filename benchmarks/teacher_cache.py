"""The offline teacher (``distill cache-teacher`` / ``distill run --teacher-cache``): bytes per token,
step time with the cache against the live teacher, and the full-vocabulary validation KL after the
same run trained either way.

Two parts, each printing a table and writing JSON:

- ``steps`` (the default): on the embedded default's settings (``distill.builtin.DEFAULT_RUN``,
  changed by ``--teacher``/``--student``/``--data``/``--set`` as in ``step_cost.py``), the ``kd`` and
  ``distillm`` recipes are trained ``--warmup`` + ``--steps`` optimizer steps with the live teacher
  and with the cache ``--cache DIR`` (made by ``distill cache-teacher`` on the same settings; with
  ``--top-k K`` and no such folder it is made first). The cases alternate (live, cache, live, cache
  per recipe, ``--rounds`` times) so that a shared machine's load falls on both alike; step seconds
  are the runs' ``metrics.jsonl`` ``seconds``, warm-up steps left out. Also the compute floor's
  ratio (``floor``: the student's matmul FLOPs over the teacher's and the student's), the least a
  cached step can cost against a live one. ``distillm`` runs at its
  initial φ = 0 here (no evaluation in between), so its steps are dataset steps: the ones a cache
  serves. Also reported: the cache's bytes per response token from its manifest (files on disk) and
  the payload (K float16 log-probs, K ids, one float32 rest). Targets: cached step ≤ 0.6 × live;
  ≤ 512 bytes per token at K = 64.
- ``quality --live RUN --cached RUN``: two finished runs of the same settings, one with
  ``--teacher-cache``; each run's ``final/`` is evaluated against the live teacher over the whole
  vocabulary (``distill eval``'s ``val_kl`` on the run's ``data.validation``, else its
  ``data.path``; no generation). Target: the cached run's KL within 3% of the live run's. The runs'
  configs must agree except for ``teacher.cache`` and ``output_dir``.

Run (from the repository root)::

    .venv/bin/distill cache-teacher --top-k 64 -o runs/cache-k64
    .venv/bin/python benchmarks/teacher_cache.py --cache runs/cache-k64 --steps 5 --warmup 1
    .venv/bin/distill run --recipe kd --max-steps 40 -o runs/kd-live
    .venv/bin/distill run --recipe kd --max-steps 40 -o runs/kd-cache --teacher-cache runs/cache-k64
    .venv/bin/python benchmarks/teacher_cache.py quality --live runs/kd-live --cached runs/kd-cache

Writes ``benchmarks/results/teacher_cache_steps.json`` and ``teacher_cache_quality.json``
(``--output`` to change), with the machine (``common.environment()``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS,
    add_setting_flags,
    bench_layer,
    case_config,
    environment,
    mean,
    read_jsonl,
    set_threads,
    settings_record,
    write_json,
)

RECIPES = ("kd", "distillm")
TARGETS = {"step_ratio": 0.6, "bytes_per_token_k64": 512, "val_kl_relative": 0.03}


def cache_record(folder: Path) -> dict[str, Any]:
    """Size of a cache: bytes on disk per response token, and the payload per token."""
    manifest = json.loads((folder / "manifest.json").read_text())
    k = manifest["top_k"]
    id_bytes = 2 if manifest["storage"]["ids"] == "uint16" else 4
    return {
        "folder": str(folder),
        "top_k": k,
        "examples": manifest["examples"],
        "tokens": manifest["tokens"],
        "bytes": manifest["bytes"],
        "bytes_per_token": manifest["bytes"] / max(manifest["tokens"], 1),
        "payload_bytes_per_token": 2 * k + id_bytes * k + 4,
        "storage": manifest["storage"],
        "teacher": manifest["teacher"],
        "teacher_dtype": manifest["teacher_dtype"],
        "seconds_to_make": manifest.get("seconds"),
    }


def ensure_cache(args, registry) -> Path:
    folder = Path(args.cache)
    if (folder / "manifest.json").is_file():
        return folder
    if not args.top_k:
        raise SystemExit(
            f"{folder}: no cache there; make one with distill cache-teacher, or pass --top-k K to make it here"
        )
    from distill.teacher_cache import build_cache

    build_cache(case_config(args, registry, recipe="kd"), folder, top_k=args.top_k)
    return folder


def floor_ratio(cfg) -> dict[str, Any]:
    """The least a cached step can cost against a live one by matmul FLOPs (``compute_floor``): the
    student's forward and backward over the teacher's forward plus those, per training sequence of
    the run's data (mean real tokens; a logit row per response token). Both sides compute in one dtype
    here, so the ratio of FLOPs is the ratio of floors. Not counted on either side: the loss (the live
    one spans the vocabulary twice, the cached one once, for the student's remaining mass), the
    optimizer, attention scores."""
    import torch
    from compute_floor import ModelMatmuls

    from distill.data import load_examples
    from distill.models import freeze, load_model, load_tokenizer

    teacher = load_model(cfg.teacher, "teacher", torch.float32)
    student = load_model(cfg.student, "student", torch.float32, teacher=teacher)
    freeze(student, cfg.student.freeze)
    train_set, _, _ = load_examples(cfg.data, load_tokenizer(cfg.tokenizer or cfg.teacher), cfg.train.seed)
    tokens = mean([len(e.prompt_ids) + len(e.response_ids) for e in train_set])
    rows = mean([len(e.response_ids) for e in train_set])
    t, s = ModelMatmuls.of(teacher), ModelMatmuls.of(student)
    flops = {
        "teacher_forward": t.forward_flops(tokens, rows),
        "student_forward": s.forward_flops(tokens, rows),
        "student_backward": s.backward_flops(tokens, rows),
    }
    cached = flops["student_forward"] + flops["student_backward"]
    return {
        "tokens_per_sequence": tokens,
        "logit_rows_per_sequence": rows,
        "gflop_per_sequence": {k: v / 1e9 for k, v in flops.items()},
        "cached_over_live": cached / (cached + flops["teacher_forward"]),
    }


def run_case(args, registry, recipe: str, cache: Path | None, scratch: Path) -> list[float]:
    """Train one case; its timed steps' seconds (warm-up left out), all from dataset sequences."""
    from distill.engine import train

    out = scratch / f"{recipe}-{'cache' if cache else 'live'}"
    bench = bench_layer(args, out)
    if cache is not None:
        bench["teacher"] = {"cache": str(cache)}
    cfg = case_config(args, registry, recipe=recipe, bench=bench)
    train(cfg, registry=registry, overwrite=True)
    metrics = read_jsonl(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)
    assert all(m["source"] == "dataset" for m in metrics), (
        "a step on generated sequences: not what this benchmark compares"
    )
    return [m["seconds"] for m in metrics if m["step"] > args.warmup]


def steps(args, output: Path) -> dict[str, Any]:
    """Time every case; the JSON is rewritten after each case (``"complete": false`` until the last)."""
    import distill

    registry = distill.default_registry()
    cache = ensure_cache(args, registry)
    seconds: dict[str, dict[str, list[float]]] = {r: {"live": [], "cache": []} for r in args.recipes}
    record = {
        "environment": environment(),
        "settings": settings_record(case_config(args, registry, recipe="kd")),
        "cache": cache_record(cache),
        "warmup": args.warmup,
        "rounds": args.rounds,
        "targets": TARGETS,
        "complete": False,
    }
    record["floor"] = floor_ratio(case_config(args, registry, recipe="kd"))
    scratch = Path(tempfile.mkdtemp(prefix="teacher-cache-bench-"))
    try:
        for round_ in range(args.rounds):
            for recipe in args.recipes:
                for variant in ("live", "cache"):
                    times = run_case(args, registry, recipe, cache if variant == "cache" else None, scratch)
                    seconds[recipe][variant].extend(times)
                    print(
                        f"  round {round_ + 1} {recipe:<9} {variant:<5} {statistics.mean(times):7.2f} s/step",
                        flush=True,
                    )
                    record["recipes"] = _rows(seconds)
                    write_json(output, record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record.update(complete=True, steps_timed=args.steps * args.rounds)
    print_steps(record)
    return record


def _rows(seconds: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    rows = []
    for recipe, times in seconds.items():
        live, cached = times["live"], times["cache"]
        row: dict[str, Any] = {"recipe": recipe, "live_seconds": live, "cache_seconds": cached}
        if live and cached:
            row.update(
                live_mean=mean(live),
                cache_mean=mean(cached),
                live_median=statistics.median(live),
                cache_median=statistics.median(cached),
                ratio_mean=mean(cached) / mean(live),
                ratio_median=statistics.median(cached) / statistics.median(live),
            )
        rows.append(row)
    return rows


def print_steps(record: dict[str, Any]) -> None:
    cache = record["cache"]
    print(
        f"\nteacher cache K={cache['top_k']}: {cache['tokens']:,} tokens, {cache['bytes']:,} bytes on disk = "
        f"{cache['bytes_per_token']:.1f} bytes/token (payload {cache['payload_bytes_per_token']}: {cache['storage']})"
    )
    print(
        f"{'recipe':<10} {'live s/step':>12} {'cache s/step':>13} {'ratio (mean)':>13} "
        f"{'ratio (median)':>15}   target <= {TARGETS['step_ratio']}"
    )
    for row in record["recipes"]:
        print(
            f"{row['recipe']:<10} {row['live_mean']:>12.2f} {row['cache_mean']:>13.2f} "
            f"{row['ratio_mean']:>13.2f} {row['ratio_median']:>15.2f}"
        )
    print(
        f"CPU: {record['environment']['cpu']} ({record['environment']['cpu_path']}); "
        f"{record['steps_timed']} timed steps per case"
    )
    floor = record.get("floor")
    if floor:
        print(
            "compute floor (matmul FLOPs per sequence): a cached step "
            f"is at least {floor['cached_over_live']:.3f} x the live one"
        )


def quality(args) -> dict[str, Any]:
    from distill.evaluation import evaluate_model

    runs = {"live": Path(args.live), "cached": Path(args.cached)}
    configs = {name: yaml.safe_load((path / "config.yaml").read_text()) for name, path in runs.items()}
    differ = _differences(configs["live"], configs["cached"])
    if (
        differ - {"teacher.cache", "output_dir"}
        or configs["live"]["teacher"].get("cache")
        or not configs["cached"]["teacher"].get("cache")
    ):
        raise SystemExit(
            f"the runs must differ only in teacher.cache (the live one without): they differ in {sorted(differ)}"
        )
    cfg = configs["live"]
    validation = cfg["data"]["validation"] or cfg["data"]["path"]
    result: dict[str, Any] = {
        "environment": environment(),
        "config": cfg,
        "cache": cache_record(Path(configs["cached"]["teacher"]["cache"])),
    }
    for name, path in runs.items():
        evaluated = evaluate_model(
            str(path / "final"),
            cfg["teacher"]["ref"],
            validation,
            rouge_samples=0,
            max_prompt_tokens=cfg["data"]["max_prompt_tokens"],
            max_response_tokens=cfg["data"]["max_response_tokens"],
        )
        logged = read_jsonl(path / "eval.jsonl")
        result[name] = {
            "run": str(path),
            "val_kl_full": evaluated["val_kl"],
            "val_loss": evaluated["val_loss"],
            "examples": evaluated["examples"],
            "steps": len(read_jsonl(path / "metrics.jsonl")),
            "logged_val_kl": logged[-1].get("val_kl"),
        }
    result["relative_difference"] = result["cached"]["val_kl_full"] / result["live"]["val_kl_full"] - 1
    result["targets"] = TARGETS
    print(f"{'run':<8} {'steps':>5} {'val KL, full vocabulary':>24} {'val CE':>8} {'val KL in eval.jsonl':>21}")
    for name in runs:
        r = result[name]
        print(f"{name:<8} {r['steps']:>5} {r['val_kl_full']:>24.4f} {r['val_loss']:>8.4f} {r['logged_val_kl']:>21.4f}")
    print(
        f"cached / live - 1 = {100 * result['relative_difference']:+.2f}% (target within "
        f"±{100 * TARGETS['val_kl_relative']:.0f}%); the cached run's eval.jsonl KL is the coarse (K+1-outcome) one"
    )
    return result


def _differences(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return {d for key in a.keys() | b.keys() for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")}
    return set() if a == b else {prefix.rstrip(".")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", nargs="?", choices=("steps", "quality"), default="steps")
    add_setting_flags(parser)
    parser.add_argument("--cache", default="runs/cache-k64", help="teacher cache folder (steps)")
    parser.add_argument("--top-k", type=int, help="make the cache here with this K when --cache holds none (steps)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="live and cached cases alternate this many times")
    parser.add_argument("--live", help="finished run with the live teacher (quality)")
    parser.add_argument("--cached", help="finished run with --teacher-cache (quality)")
    parser.add_argument("--output", help="JSON path (default benchmarks/results/teacher_cache_<part>.json)")
    args = parser.parse_args(argv)
    set_threads(args)
    if args.part == "quality" and not (args.live and args.cached):
        parser.error("quality needs --live RUN and --cached RUN")
    output = Path(args.output) if args.output else RESULTS / f"teacher_cache_{args.part}.json"
    record = steps(args, output) if args.part == "steps" else quality(args)
    write_json(output, record)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
