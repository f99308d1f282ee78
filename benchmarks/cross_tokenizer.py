"""Logit-level KD across tokenizers (#30): what it costs and what it gives, on a real pair.

The pair: the embedded teacher (SmolLM2-135M-Instruct, 49,152 tokens) and a student with another
tokenizer made by ``scripts/make_cross_student.py`` (an 8,192-token byte-level BPE trained on the
built-in data, its own special tokens and chat template; 15 of the teacher's layers, embeddings
rebuilt for the new vocabulary). Made once under ``<root>/student`` when missing.

Parts (``--parts``):

- ``map``: the tokens the two vocabularies share, exactly (as GOLD matches them) and with the
  space markers written alike (``VocabularyMap(normalised=True)``).
- ``memory``: the loss alone at the same response positions (``--batch`` x ``--positions``),
  forward and backward, peak bytes of tensors alive at once (the torch profiler's allocation
  events): the same-tokenizer loss (``skew_kl`` over V = 49,152, both sides) against the
  cross-vocabulary one (``uld_hybrid`` with ``skew_kl``: the teacher's rows read from its logits a
  block at a time, ``AlignedRows``; the student's 8,192-wide rows). Target: the cross-vocabulary
  peak <= 2x the other.
- ``cost``: seconds per optimizer step (``--warmup`` steps left out, then ``--steps``), from the runs'
  ``metrics.jsonl``: ``kd`` of the embedded pair (the teacher into ``prune:15``, one tokenizer)
  against ``kd`` across tokenizers with ``uld`` and ``uld_hybrid`` (alignment and re-encoding
  included), the same batch, data and response length. Target: <= 1.5x.
- ``quality``: at equal steps (``--quality-steps``, evaluated every quarter so that DistiLLM's
  scheduler gets its signal), seeds ``--seeds``: ``seqkd``, ``kd`` with ``uld`` and with
  ``uld_hybrid`` (skew KL on the shared tokens), ``distillm`` with each, and (``phi0.5-*``, not
  DistiLLM's setting) its policy with φ from 0.5 instead of 0, with each; ROUGE-L of greedy
  answers against the teacher's (tokenizer-free) and the student's CE on the teacher's answers, on
  the first ``--val-prompts`` validation prompts. Resumable: each finished run's record is kept
  under ``<root>/records`` (a new machine's root first gets those of ``--output``) and skipped
  afterwards.

Results: ``benchmarks/results/cross_tokenizer.json`` (rewritten after every part and run).

    nohup .venv/bin/python benchmarks/cross_tokenizer.py --threads 1 > cross.log 2>&1 &

The step cost on the AVX2 path (float32; ``report.py`` shows every ``cross_tokenizer-*.json``'s cost)::

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 DISTILL_NATIVE_BF16=0 .venv/bin/python \
        benchmarks/cross_tokenizer.py --parts cost --output benchmarks/results/cross_tokenizer-avx2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, count_sources, environment, set_threads, write_json

REPO = Path(__file__).resolve().parent.parent
QUALITY = {
    "seqkd": {"recipe": "seqkd"},
    "kd-uld": {"recipe": "kd", "divergence": "uld"},
    "kd-hybrid": {"recipe": "kd", "divergence": "uld_hybrid"},
    "distillm-uld": {"recipe": "distillm", "divergence": "uld"},
    "distillm-hybrid": {"recipe": "distillm", "divergence": "uld_hybrid"},
    # not DistiLLM's setting (its φ starts at 0 and rises only when the validation loss does, which it
    # never did in these runs): its policy with φ from 0.5, so that student outputs, decoded and
    # re-encoded for the teacher, are trained on across tokenizers from the start
    "phi0.5-uld": {"recipe": "distillm", "divergence": "uld", "policy_params": ["init_prob=0.5"]},
    "phi0.5-hybrid": {"recipe": "distillm", "divergence": "uld_hybrid", "policy_params": ["init_prob=0.5"]},
}


def student_folder(args) -> Path:
    folder = args.root / "student"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(REPO / "scripts"))
        from make_cross_student import build

        build(folder, args.vocab, args.layers)
    return folder


def part_map(args) -> dict[str, Any]:
    from distill.crossvocab import VocabularyMap
    from distill.models import load_tokenizer

    teacher, student = load_tokenizer("smollm2-135m-instruct"), load_tokenizer(str(student_folder(args)))
    exact = VocabularyMap.build(student, teacher)
    normalised = VocabularyMap.build(student, teacher, normalised=True)
    return {
        "teacher_vocab": len(teacher),
        "student_vocab": len(student),
        "matched_exact": exact.matched,
        "matched_normalised": normalised.matched,
        "more_when_normalised": normalised.matched - exact.matched,
    }


def peak_bytes(fn) -> int | None:
    from divergence_memory import tensor_peak_bytes

    return tensor_peak_bytes(lambda *_: fn(), None, None, None)


def part_memory(args) -> dict[str, Any]:
    """The loss alone at ``batch x positions`` response positions, forward and backward."""
    from distill import default_registry
    from distill.crossvocab import VocabularyMap
    from distill.loss import LogitRows, TokenTerms, token_loss
    from distill.models import load_tokenizer
    from distill.teacher import AlignedRows, GroupStarts

    teacher_tok, student_tok = load_tokenizer("smollm2-135m-instruct"), load_tokenizer(str(student_folder(args)))
    vt, vs, b, r = len(teacher_tok), len(student_tok), args.batch, args.positions
    generator = torch.Generator().manual_seed(0)
    index = tuple(x.reshape(-1) for x in torch.meshgrid(torch.arange(b), torch.arange(r), indexing="ij"))
    registry = default_registry()

    def same() -> torch.Tensor:
        student = torch.randn(b, r, vt, generator=generator, requires_grad=True)
        teacher = torch.randn(b, r, vt, generator=generator)
        loss, _ = token_loss(
            LogitRows(student, index), LogitRows(teacher, index), TokenTerms(registry.get_divergence("skew_kl")), index
        )
        return loss

    hybrid = registry.get_divergence("uld_hybrid")
    hybrid.plugin.bind(VocabularyMap.build(student_tok, teacher_tok))

    def cross() -> torch.Tensor:
        student = torch.randn(b, r, vs, generator=generator, requires_grad=True)
        teacher_logits = torch.randn(b, r, vt, generator=generator)  # the teacher's response logits (its cut)
        first = torch.ones(b * r, dtype=torch.bool)  # every position begins a group: the most rows counted
        teacher = AlignedRows(teacher_logits, index[0], index[1], first)  # as CrossVocabTeacher reads them
        loss, _ = token_loss(LogitRows(student, index), teacher, TokenTerms(GroupStarts(hybrid)), index)
        return loss

    same_peak, cross_peak = peak_bytes(same), peak_bytes(cross)
    return {
        "positions": b * r,
        "same_tokenizer_peak_mib": same_peak / 2**20 if same_peak else None,
        "cross_vocabulary_peak_mib": cross_peak / 2**20 if cross_peak else None,
        "ratio": cross_peak / same_peak if same_peak and cross_peak else None,
        "target": 2.0,
        "note": "peak bytes of tensors alive at once (torch profiler), inputs and the gradient included",
    }


def run(args, out: Path, student: str, case: dict[str, Any], settings: list[str], steps: int, seed: int = 0):
    """``distill run`` (through the library) on the embedded default's data and teacher with
    ``student`` and ``case``'s recipe and divergence; its metrics and evaluations."""
    from distill.engine import train
    from distill.resolve import flag_layer, plan_run, resolve_run

    flags = flag_layer(
        **case, student=student, output_dir=str(out), max_steps=steps, seed=seed, settings=[*settings, *args.settings]
    )
    train(plan_run(resolve_run(None, flags)), overwrite=True)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals_file = out / "eval.jsonl"
    evals = [json.loads(x) for x in evals_file.read_text().splitlines()] if evals_file.is_file() else []
    return metrics, evals


def part_cost(args) -> dict[str, Any]:
    cross = str(student_folder(args))
    quiet = ["eval.every=0", "eval.rouge_samples=0", "eval.rouge_draws=0", "data.val_max=8"]
    cases = {
        "kd (one tokenizer: prune:15)": ("prune:15", {"recipe": "kd"}),
        "kd uld (across)": (cross, {"recipe": "kd", "divergence": "uld"}),
        "kd uld_hybrid (across)": (cross, {"recipe": "kd", "divergence": "uld_hybrid"}),
    }
    rows = {}
    for name, (student, case) in cases.items():
        metrics, _ = run(args, args.root / "cost", student, case, quiet, args.warmup + args.steps)
        timed = [m["seconds"] for m in metrics[args.warmup :]]
        rows[name] = {
            "seconds_per_step": statistics.fmean(timed),
            "median": statistics.median(timed),
            "tokens_per_step": statistics.fmean(m["tokens"] for m in metrics[args.warmup :]),
        }
        print(f"  {name}: {rows[name]['seconds_per_step']:.2f} s a step", flush=True)
    base = rows["kd (one tokenizer: prune:15)"]["seconds_per_step"]
    for row in rows.values():
        row["x_kd_one_tokenizer"] = row["seconds_per_step"] / base
    return {"cases": rows, "target": 1.5, "steps": args.steps, "warmup": args.warmup}


def part_quality(args, report: dict[str, Any]) -> dict[str, Any]:
    cross = str(student_folder(args))
    records = args.root / "records"
    records.mkdir(parents=True, exist_ok=True)
    for run_ in (report.get("quality") or {}).get("runs", []):  # a new machine goes on from the committed results
        kept = records / f"{run_['case']}-s{run_['seed']}.json"
        if not kept.exists():
            write_json(kept, run_)
    settings = [f"data.val_max={args.val_prompts}", f"eval.rouge_samples={args.val_prompts}"]
    # evaluated every quarter of the run: DistiLLM's scheduler raises φ only at an evaluation (with none,
    # distillm is kd); ROUGE-L is answered at the end only
    settings += [f"eval.every={max(1, args.quality_steps // 4)}", "eval.rouge_before=0"]
    for seed in args.seeds:
        for name, case in QUALITY.items():
            path = records / f"{name}-s{seed}.json"
            if path.exists():
                continue
            started = time.perf_counter()
            print(f"quality {name} seed {seed}: {args.quality_steps} steps", flush=True)
            metrics, evals = run(
                args, args.root / "runs" / f"{name}-s{seed}", cross, case, settings, args.quality_steps, seed
            )
            final = evals[-1]
            record = {
                "case": name,
                "seed": seed,
                "steps": len(metrics),
                "seconds_per_step": statistics.fmean(m["seconds"] for m in metrics),
                "rouge_l": final.get("rouge_l"),
                "val_ce": final.get("val_loss"),
                "before": {k: v for k, v in evals[0].items() if k != "step"},
                "wall_seconds": time.perf_counter() - started,
                # distillm trains on student outputs only once its scheduler has raised φ at an evaluation
                "sources": count_sources(metrics),
                "sgo_prob_final": metrics[-1].get("sgo_prob") if metrics else None,
            }
            write_json(path, record)
            report["quality"] = summarise(records)
            write_json(args.output, report)
    return summarise(records)


def summarise(records: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    out: dict[str, Any] = {"runs": runs, "summary": {}}
    for name in QUALITY:
        mine = [r for r in runs if r["case"] == name]
        if mine:
            out["summary"][name] = {
                key: {
                    "mean": statistics.fmean(r[key] for r in mine),
                    "range": [min(r[key] for r in mine), max(r[key] for r in mine)],
                }
                for key in ("rouge_l", "val_ce", "seconds_per_step")
                if all(r.get(key) is not None for r in mine)
            } | {
                "seeds": sorted(r["seed"] for r in mine),
                # per seed, in seed order: steps on the student's own outputs (fresh or replayed); None unknown
                "student_output_steps": [
                    (r["sources"].get("student", 0) + r["sources"].get("replay", 0)) if "sources" in r else None
                    for r in sorted(mine, key=lambda r: r["seed"])
                ],
            }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=RESULTS / "cross_tokenizer", help="the student, runs, records")
    parser.add_argument("--output", type=Path, default=RESULTS / "cross_tokenizer.json")
    parser.add_argument("--parts", nargs="+", default=["map", "memory", "cost", "quality"])
    parser.add_argument("--vocab", type=int, default=8192, help="the student's tokenizer size (when it is made)")
    parser.add_argument("--layers", type=int, default=15, help="the student's layers (when it is made)")
    parser.add_argument("--batch", type=int, default=8, help="memory: sequences")
    parser.add_argument("--positions", type=int, default=128, help="memory: response positions per sequence")
    parser.add_argument("--steps", type=int, default=6, help="cost: timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="cost: steps left out of the timing")
    parser.add_argument("--quality-steps", type=int, default=100, help="quality: optimizer steps per run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--val-prompts", type=int, default=32, help="quality: validation prompts (CE and ROUGE-L)")
    parser.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    set_threads(args)
    report: dict[str, Any] = json.loads(args.output.read_text()) if args.output.is_file() else {}
    report.update({"benchmark": "cross_tokenizer", "environment": environment()})
    for part in args.parts:
        print(f"part {part}", flush=True)
        if part == "quality":
            report["quality"] = part_quality(args, report)
        else:
            report[part] = {"map": part_map, "memory": part_memory, "cost": part_cost}[part](args)
        write_json(args.output, report)
        print(json.dumps({k: v for k, v in report[part].items() if k != "runs"}, indent=1)[:3000], flush=True)
    return report


if __name__ == "__main__":
    main()
