"""A short check of distill on one GPU: seconds per step, peak GPU memory and tokens per second.

Two measurements:

- ``run``: ``distill run`` on the embedded default (SmolLM2-135M-Instruct teacher, layer-pruned
  student, the built-in data; the ``distillm`` recipe) for ``--max-steps`` steps (20) without ROUGE
  generation (``eval.rouge_samples=0``), in three cases (``RUN_CASES``): ``auto``, the defaults
  (``train.precision: auto``, which a CUDA device with bf16 must resolve to bf16, and the fused
  head); ``full-logits`` (``train.fused_head=false``: the head's peak memory is the difference);
  ``on-policy`` (``init_prob=1``: every step generates, so its seconds are mostly generation).
  Seconds per step and tokens per second (response tokens trained on, the ``tokens`` of
  ``metrics.jsonl``) come from ``metrics.jsonl``, leaving out the first ``--warmup`` steps; peak
  memory is ``torch.cuda.max_memory_allocated`` over the whole run (loading and the evaluations
  before and after training included); the precision the run resolved and why, and the head line,
  come from its start event.
- ``loss``: ``distill.divergence_loss`` forward + backward on synthetic bf16 logits with a
  large vocabulary (``--vocab`` 151936, Qwen's, at ``--tokens`` 4096 positions), for each
  divergence: the best of ``--repeats`` times, and the peak memory above the two input tensors.

    .venv/bin/python benchmarks/gpu_check.py                    # on a machine with a CUDA GPU
    .venv/bin/python benchmarks/gpu_check.py --max-steps 50 --skip-run

Without a CUDA GPU it prints one line saying so and exits with code 0 having measured nothing.
Prints a table and writes ``benchmarks/results/gpu_check.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

DIVERGENCES = {
    "kl": {},
    "rkl": {},
    "jsd": {"beta": 0.5},
    "tvd": {},
    "skew_kl": {"alpha": 0.1},
    "skew_rkl": {"alpha": 0.1},
}
RUN_CASES = {
    "auto": [],
    "full-logits": ["train.fused_head=false"],
    "on-policy": ["policy.params.init_prob=1"],
}
"""The embedded default's cases: the defaults, without the fused head, every step generating."""
RESULTS = Path(__file__).parent / "results" / "gpu_check.json"
MIB = 2**20
DEVICE = "cuda"


def reset_peak() -> None:
    import torch

    torch.cuda.reset_peak_memory_stats()


def allocated() -> int:
    import torch

    return torch.cuda.memory_allocated()


def peak() -> int:
    import torch

    return torch.cuda.max_memory_allocated()


def synchronize() -> None:
    import torch

    torch.cuda.synchronize()


def measure_run(max_steps: int, warmup: int, extra: list[str] = (), cuda: bool = True) -> dict:
    """A short distillation of the embedded default (``extra``: ``--set`` items on top) on the GPU;
    ``cuda=False`` measures no GPU memory (the tests run it on CPU with tiny models)."""
    from transformers.utils import logging as hf_logging

    from distill.cli.run_cmd import flag_layer, resolve_config
    from distill.engine import train

    settings = ["eval.rouge_samples=0", f"eval.every={max_steps}", f"checkpoint.every={max_steps}", *extra]
    started_event: dict = {}
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        flags = flag_layer(
            recipe=None,
            divergence=None,
            divergence_params=[],
            policy=None,
            policy_params=[],
            teacher=None,
            student=None,
            data=None,
            output_dir=str(Path(folder) / "run"),
            max_steps=max_steps,
            seed=None,
            settings=settings,
        )
        config = resolve_config(None, flags)
        if cuda:
            reset_peak()
        started = time.perf_counter()
        result = train(config, report=lambda kind, record: started_event.update(record) if kind == "start" else None)
        wall = time.perf_counter() - started
        peak_bytes = peak() if cuda else 0
        steps = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
        resolved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    timed = steps[warmup:] or steps
    seconds = [s["seconds"] for s in timed]
    return {
        "steps": len(steps),
        "timed_steps": len(timed),
        "seconds_per_step": statistics.mean(seconds),
        "seconds_per_step_median": statistics.median(seconds),
        "tokens_per_second": sum(s["tokens"] for s in timed) / sum(seconds),
        "peak_gpu_mib": peak_bytes / MIB,
        "wall_seconds": wall,
        "sources": result.sources,
        "val_loss_before": result.before.get("val_loss"),
        "val_loss_after": result.after.get("val_loss"),
        "truncated": statistics.mean(s["truncated"] for s in timed) if all("truncated" in s for s in timed) else None,
        "settings": list(extra),
        "precision_line": started_event.get("precision"),
        "head_line": started_event.get("head"),
        "config": {
            "recipe": config.recipe,
            "teacher": config.teacher.ref,
            "student": config.student.ref,
            "batch_size": config.train.batch_size,
            "precision": resolved["train"]["precision"],
            "teacher_dtype": resolved["teacher"]["dtype"],
            "student_dtype": resolved["student"]["dtype"],
            "fused_head": resolved["train"]["fused_head"],
        },
    }


def print_runs(runs: dict[str, dict]) -> None:
    first = next(iter(runs.values()))
    print(f"\ndistill run, embedded default, {first['steps']} steps (timed: last {first['timed_steps']})")
    print(
        f"  {'case':<12} {'precision':>9} {'seconds/step':>13} {'tokens/s':>9} "
        f"{'peak GPU MiB':>13} {'wall s':>7}  sources"
    )
    for name, run in runs.items():
        print(
            f"  {name:<12} {run['config']['precision']:>9} {run['seconds_per_step']:>13.3f} "
            f"{run['tokens_per_second']:>9,.0f} {run['peak_gpu_mib']:>13,.0f} {run['wall_seconds']:>7.1f}  "
            f"{run['sources']}"
        )
    print(f"  auto: {first['precision_line']}; {first['head_line']}")


def measure_loss(name: str, params: dict, vocab: int, tokens: int, repeats: int) -> dict:
    """divergence_loss forward + backward on [tokens, vocab] bf16 logits."""
    import torch

    import distill

    divergence = distill.get_divergence(name, **params)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    student = torch.randn(tokens, vocab, device=DEVICE, dtype=torch.bfloat16, generator=generator).requires_grad_()
    teacher = torch.randn(tokens, vocab, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    distill.divergence_loss(divergence, student[:16], teacher[:16]).backward()  # warm-up (kernels, allocator)
    student.grad = None
    synchronize()
    times, extra = [], 0
    for _ in range(repeats):
        reset_peak()
        base = allocated()
        start = time.perf_counter()
        distill.divergence_loss(divergence, student, teacher).backward()
        synchronize()
        times.append(time.perf_counter() - start)
        extra = max(extra, peak() - base)
        student.grad = None
    logits_mib = tokens * vocab * 2 / MIB
    return {
        "divergence": name,
        "seconds": min(times),
        "peak_extra_mib": extra / MIB,
        "logits_mib_bf16": logits_mib,
        "peak_in_logits": extra / MIB / logits_mib,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the per-step numbers")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-run", action="store_true", help="only the synthetic loss measurement")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA GPU here (torch {torch.__version__}, "
            "torch.cuda.is_available() is False); nothing measured"
        )
        return 0
    device = torch.cuda.get_device_name(0)
    print(f"gpu_check on {device} (torch {torch.__version__})")
    result = {
        "benchmark": "gpu_check",
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    if not args.skip_run:
        result["runs"] = {name: measure_run(args.max_steps, args.warmup, extra) for name, extra in RUN_CASES.items()}
        print_runs(result["runs"])

    losses = [measure_loss(name, params, args.vocab, args.tokens, args.repeats) for name, params in DIVERGENCES.items()]
    result["loss"] = {
        "vocab": args.vocab,
        "tokens": args.tokens,
        "dtype": "bfloat16",
        "repeats": args.repeats,
        "cases": losses,
    }
    print(
        f"\ndivergence_loss forward+backward, N={args.tokens}, V={args.vocab}, "
        f"bf16 logits ({losses[0]['logits_mib_bf16']:,.0f} MiB each)"
    )
    print(f"  {'divergence':<10} {'seconds':>9} {'tokens/s':>11} {'peak extra MiB':>15} {'in logits':>10}")
    for case in losses:
        print(
            f"  {case['divergence']:<10} {case['seconds']:>9.4f} {args.tokens / case['seconds']:>11,.0f} "
            f"{case['peak_extra_mib']:>15,.0f} {case['peak_in_logits']:>10.2f}"
        )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
