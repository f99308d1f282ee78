"""A short check of distill on one GPU: seconds per step, peak GPU memory and tokens per second.

Two measurements:

- ``run``: ``distill run`` on the embedded default (SmolLM2-135M-Instruct teacher, layer-pruned
  student, the built-in data; the ``distillm`` recipe) for ``--max-steps`` steps (20) in bf16
  (``train.precision=bf16``, ``teacher.dtype=bfloat16``) without ROUGE generation
  (``eval.rouge_samples=0``). Seconds per step and tokens per second (response tokens trained on,
  the ``tokens`` of ``metrics.jsonl``) come from ``metrics.jsonl``, leaving out the first
  ``--warmup`` steps; peak memory is ``torch.cuda.max_memory_allocated`` over the whole run
  (loading and the evaluations before and after training included).
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

DIVERGENCES = {
    "kl": {},
    "rkl": {},
    "jsd": {"beta": 0.5},
    "tvd": {},
    "skew_kl": {"alpha": 0.1},
    "skew_rkl": {"alpha": 0.1},
}
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


def measure_run(max_steps: int, warmup: int) -> dict:
    """A short bf16 distillation of the embedded default on the GPU."""
    from transformers.utils import logging as hf_logging

    from distill.cli.run_cmd import flag_layer, resolve_config
    from distill.engine import train

    settings = [
        "train.precision=bf16",
        "teacher.dtype=bfloat16",
        "eval.rouge_samples=0",
        f"eval.every={max_steps}",
        f"checkpoint.every={max_steps}",
    ]
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
        reset_peak()
        started = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - started
        peak_bytes = peak()
        steps = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
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
        "config": {
            "recipe": config.recipe,
            "teacher": config.teacher.ref,
            "student": config.student.ref,
            "batch_size": config.train.batch_size,
            "precision": config.train.precision,
            "teacher_dtype": config.teacher.dtype,
        },
    }


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
        run = measure_run(args.max_steps, args.warmup)
        result["run"] = run
        print(f"\ndistill run, embedded default, bf16, {run['steps']} steps (timed: last {run['timed_steps']})")
        print(f"  {'seconds/step':>14} {'tokens/s':>10} {'peak GPU MiB':>13} {'wall s':>8}  sources")
        print(
            f"  {run['seconds_per_step']:>14.3f} {run['tokens_per_second']:>10,.0f} "
            f"{run['peak_gpu_mib']:>13,.0f} {run['wall_seconds']:>8.1f}  {run['sources']}"
        )

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
