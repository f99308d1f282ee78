"""Seconds to generate answers: transformers' ``generate`` (what ``ResponseGenerator`` called before,
and still calls for synced generation) against distill's own decode loop (``distill.generation.decode``),
on the embedded default.

Models (``distill.builtin.DEFAULT_RUN`` unless ``--teacher``/``--student``/``--data`` say otherwise):
the student (``prune:15`` of the teacher, as initialised: its answers run to the cap) and the teacher
(SmolLM2-135M-Instruct: many of its answers end early, where rows leaving the batch pays, as they will
for a trained student), each in float32 and as a bfloat16 copy (what ``InferenceCopies`` makes for
bf16 runs). ``--max-new-tokens`` (128). Two workloads:

- ``train``: one batch of ``--batch-size`` (8) training prompts drawn with ``--seed``, answered
  sampled (temperature 1, top-k 0, top-p 1: a policy's on-policy or teacher step) and greedy;
- ``eval``: the ROUGE-L evaluation's generation: the first ``eval.rouge_samples`` (64) validation
  prompts, greedy, in batches of ``eval.batch_size`` (64). ``--eval-repeats 0`` skips it.

For every (workload, model, dtype, mode), three implementations run through the same
``ResponseGenerator`` (``always_generate=True`` for the old path) on the same prompts: ``generate``,
``decode``, and for float32 models ``decode-linear-head`` (``decode`` with its few-row head turned off,
so the output head multiplies as ``F.linear``: what that change alone is worth; it touches nothing
else).
One untimed warm-up call each, then ``--repeats`` (``--eval-repeats``) timed calls each, in one
process, rotating which goes first. Before each call torch's generator is seeded with ``seed + repetition``,
so all start from the same random state (sampled answers of ``generate`` still differ: the two samplers
draw differently, so their lengths differ too; compare ms per forward for sampled runs of the teacher).

Reported per case: median and best seconds per call, mean new tokens (answers up to their EOS),
mean forwards (per batch, as many as its longest answer has tokens: the prefill and one per further
token), milliseconds per forward, and the ratio generate / decode of the medians (the machine this
was written on is shared and noisy: read ratios, not absolute times), and "linear head/fwd": ms per
forward of ``decode-linear-head`` over ``decode``. For greedy cases, whether ``decode`` produced the
same tokens as ``generate`` and as ``decode-linear-head`` ("same g/l").
The JSON is rewritten after every case (``"complete": false`` until the end).

Run (from the repository root; about 30 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/generation_speed.py                   # the embedded default, 2 threads
    .venv/bin/python benchmarks/generation_speed.py --repeats 3 --eval-repeats 0 --models student --dtypes bfloat16

Prints a table and writes ``benchmarks/results/generation_speed.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, add_setting_flags, case_config, environment, set_threads, write_json

from distill.config import GenerationConfig
from distill.data import Example, load_examples
import distill.generation as generation_module
from distill.generation import ResponseGenerator
from distill.models import load_model, load_tokenizer

IMPLEMENTATIONS = ("generate", "decode", "decode-linear-head")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_setting_flags(parser)
    parser.set_defaults(threads=2)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed calls per implementation and case (training batches)"
    )
    parser.add_argument(
        "--eval-repeats", type=int, default=3, help="the same for the ROUGE-L evaluation's generation (0: skip it)"
    )
    parser.add_argument("--models", nargs="+", choices=("student", "teacher"), default=["student", "teacher"])
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    parser.add_argument("--modes", nargs="+", choices=("sampled", "greedy"), default=["sampled", "greedy"])
    parser.add_argument("--output", type=Path, default=RESULTS / "generation_speed.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args)
    cfg = case_config(args, None)  # the embedded default < the flags < --set, as every benchmark case

    # --- models, tokenizer and prompts, as a run loads them
    teacher = load_model(cfg.teacher.ref, "teacher", torch.float32)
    student = load_model(cfg.student.ref, "student", torch.float32, teacher=teacher)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher)
    train, val, _ = load_examples(cfg.data, tokenizer, args.seed)
    generation = GenerationConfig(max_new_tokens=cfg.generation.max_new_tokens)  # temperature 1, top-k 0, top-p 1
    workloads = {
        "train": Workload(
            random.Random(args.seed).sample(train, min(cfg.train.batch_size, len(train))), args.modes, args.repeats
        )
    }
    if args.eval_repeats and cfg.eval.rouge_samples:
        workloads["eval"] = Workload(val[: cfg.eval.rouge_samples], ["greedy"], args.eval_repeats, cfg.eval.batch_size)
    report: dict[str, Any] = {
        "benchmark": "generation_speed",
        "environment": environment(),
        "settings": {
            "teacher": cfg.teacher.ref,
            "student": cfg.student.ref,
            "data": cfg.data.path,
            "max_new_tokens": generation.max_new_tokens,
            "temperature": generation.temperature,
            "top_k": generation.top_k,
            "top_p": generation.top_p,
            "seed": args.seed,
            "workloads": {
                name: {
                    "prompts": len(w.prompts),
                    "batch_size": w.batch_size,
                    "repeats": w.repeats,
                    "modes": w.modes,
                    "prompt_tokens": [len(e.prompt_ids) for e in w.prompts],
                }
                for name, w in workloads.items()
            },
        },
        "cases": [],
        "complete": False,
    }

    # --- every case: both implementations, alternating, from the same random state
    for model_name in args.models:
        for dtype_name in args.dtypes:
            base = teacher if model_name == "teacher" else student
            model = base if DTYPES[dtype_name] == torch.float32 else copy.deepcopy(base).to(DTYPES[dtype_name])
            model.eval().requires_grad_(False)
            for workload_name, workload in workloads.items():
                generators = {
                    "generate": ResponseGenerator(tokenizer, generation, workload.batch_size, always_generate=True),
                    "decode": ResponseGenerator(tokenizer, generation, workload.batch_size),
                    "decode-linear-head": LinearHeadGenerator(tokenizer, generation, workload.batch_size),
                }
                # the few-row head only touches float32 heads: elsewhere decode-linear-head is decode itself
                names = IMPLEMENTATIONS if dtype_name == "float32" else IMPLEMENTATIONS[:2]
                for mode in workload.modes:
                    greedy = mode == "greedy"
                    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                    for name in names:  # warm-up: first-call allocations, lazy initialisation
                        generators[name](model, workload.prompts[:2], greedy=greedy, max_new_tokens=4)
                    for repetition in range(workload.repeats):
                        turn = repetition % len(names)
                        order = names[turn:] + names[:turn]
                        for name in order:
                            torch.manual_seed(args.seed + repetition)
                            runs[name].append(timed_call(generators[name], model, workload.prompts, greedy))
                    case = summarise(workload_name, workload.batch_size, model_name, dtype_name, mode, runs)
                    report["cases"].append(case)
                    print(
                        f"{workload_name} {model_name} {dtype_name} {mode}: generate "
                        f"{case['generate']['median_seconds']:.2f} s, decode "
                        f"{case['decode']['median_seconds']:.2f} s, ratio {case['generate_over_decode']:.2f}"
                        + (
                            f"; decode with F.linear's head {case['decode-linear-head']['median_seconds']:.2f} s"
                            if "decode-linear-head" in case
                            else ""
                        ),
                        flush=True,
                    )
                    write_json(args.output, report)
            del model

    report["complete"] = True
    write_json(args.output, report)
    print_table(report)
    print(f"\nwritten: {args.output}")
    return report


class LinearHeadGenerator(ResponseGenerator):
    """``decode`` with its few-row head turned off (``distill.generation.FEW_ROWS = 0``) during each call:
    the head multiplies as ``F.linear``, as it did before, for a comparison within the same run."""

    def __call__(self, *args, **kwargs):
        kept = generation_module.FEW_ROWS
        generation_module.FEW_ROWS = 0
        try:
            return super().__call__(*args, **kwargs)
        finally:
            generation_module.FEW_ROWS = kept


@dataclass
class Workload:
    """Prompts answered in batches of ``batch_size`` (default: all at once), in each mode, ``repeats`` times."""

    prompts: list[Example]
    modes: list[str]
    repeats: int
    batch_size: int = 0

    def __post_init__(self) -> None:
        self.batch_size = self.batch_size or len(self.prompts)


def timed_call(generator: ResponseGenerator, model, prompts: list[Example], greedy: bool) -> dict[str, Any]:
    """Seconds, new tokens and forwards (per batch: as many as its longest answer has tokens) of one call."""
    began = time.perf_counter()
    answers = generator(model, prompts, greedy=greedy)
    seconds = time.perf_counter() - began
    lengths = [len(a.response_ids) for a in answers]
    batches = [lengths[start : start + generator.batch_size] for start in range(0, len(lengths), generator.batch_size)]
    return {
        "seconds": seconds,
        "new_tokens": sum(lengths),
        "forwards": sum(max(b) for b in batches),
        "responses": [a.response_ids for a in answers],
    }


def summarise(
    workload: str, batch_size: int, model: str, dtype: str, mode: str, runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    """Median / best seconds, tokens, forwards and ms per forward of each implementation, and the ratio."""
    case: dict[str, Any] = {
        "workload": workload,
        "batch_size": batch_size,
        "model": model,
        "dtype": dtype,
        "mode": mode,
    }
    for name, calls in runs.items():
        seconds = [c["seconds"] for c in calls]
        forwards = sum(c["forwards"] for c in calls)
        case[name] = {
            "seconds": seconds,
            "median_seconds": statistics.median(seconds),
            "best_seconds": min(seconds),
            "mean_new_tokens": statistics.mean(c["new_tokens"] for c in calls),
            "mean_forwards": forwards / len(calls),
            "ms_per_forward": 1000 * sum(seconds) / forwards,
        }
    case["generate_over_decode"] = case["generate"]["median_seconds"] / case["decode"]["median_seconds"]
    case["generate_over_decode_per_forward"] = case["generate"]["ms_per_forward"] / case["decode"]["ms_per_forward"]
    if "decode-linear-head" in case:
        case["linear_head_over_decode_per_forward"] = (
            case["decode-linear-head"]["ms_per_forward"] / case["decode"]["ms_per_forward"]
        )
    if mode == "greedy":
        case["same_tokens"] = all(a["responses"] == b["responses"] for a, b in zip(runs["generate"], runs["decode"]))
        if "decode-linear-head" in runs:
            case["same_tokens_linear_head"] = all(
                a["responses"] == b["responses"] for a, b in zip(runs["decode-linear-head"], runs["decode"])
            )
    return case


def print_table(report: dict[str, Any]) -> None:
    env, settings = report["environment"], report["settings"]
    print(
        f"\n{env['cpu']} ({env['cpu_count']} cores), torch threads "
        f"{env['torch_threads']}, torch {env['torch']}, transformers {env['transformers']}"
    )
    for name, w in settings["workloads"].items():
        print(f"{name}: {w['prompts']} prompts in batches of {w['batch_size']}, {w['repeats']} repeats")
    print(f"max_new_tokens {settings['max_new_tokens']}; seconds are medians; g/d: generate/decode\n")
    header = (
        "workload",
        "model",
        "dtype",
        "mode",
        "generate s",
        "decode s",
        "ratio",
        "new tokens g/d",
        "forwards g/d",
        "ms/forward g/d",
        "ratio/fwd",
        "linear head/fwd",
        "same g/l",
    )
    rows = []
    for c in report["cases"]:
        g, d = c["generate"], c["decode"]
        rows.append(
            (
                c["workload"],
                c["model"],
                c["dtype"],
                c["mode"],
                f"{g['median_seconds']:.2f}",
                f"{d['median_seconds']:.2f}",
                f"{c['generate_over_decode']:.2f}x",
                f"{g['mean_new_tokens']:.0f}/{d['mean_new_tokens']:.0f}",
                f"{g['mean_forwards']:.0f}/{d['mean_forwards']:.0f}",
                f"{g['ms_per_forward']:.1f}/{d['ms_per_forward']:.1f}",
                f"{c['generate_over_decode_per_forward']:.2f}x",
                f"{c['linear_head_over_decode_per_forward']:.2f}x"
                if "linear_head_over_decode_per_forward" in c
                else "-",
                "/".join(
                    {True: "yes", False: "no"}.get(c.get(k), "-") for k in ("same_tokens", "same_tokens_linear_head")
                ),
            )
        )
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
