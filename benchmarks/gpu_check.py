"""A short check of distill on one GPU: seconds per step, peak GPU memory and tokens per second.

Three measurements:

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
- ``float16_head``: one forward + backward of the KL divergence through the student's head under
  fp16 autocast (float32 parameters, the head multiplying in float16, a float16 teacher), at the
  embedded default's head (V = 49,152, width 576) on 4,096 response tokens (``FLOAT16_HEAD``), the
  gradient scaled by a GradScaler's initial factor: the share of exactly-zero entries of the
  gradients of the hidden states and the head weight, their error and the peak memory above the
  inputs, for the fused head, the full logits under autocast, and the float32 full logits (the
  reference). The weights give the vocabulary a language model's prior (the rarest token e^-12
  below the commonest), where float16 once flushed rare tokens' gradients to zero.
- ``seq2seq``: encoder-decoder runs (``SEQ2SEQ_CASES``) on a random T5 pair built from configs
  (``make_t5_pair``: d_model 256, 4 and 2 layers a stack, the embedded default's tokenizer), the
  ``gkd`` recipe on the built-in data, fused head on (auto) and off: seconds per step, tokens per
  second, peak memory, and the lines the run resolved. Wiring and speed only: random weights.

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
FLOAT16_HEAD = {"vocab": 49152, "rows": 4096, "width": 576, "grad_scale": 2.0**16}
"""The float16 head case: SmolLM2's head on 4,096 tokens, ``grad_scale`` the GradScaler's initial factor."""
FLOAT16_PATHS = ("fused, fp16 autocast", "full logits, fp16 autocast", "full logits, float32")
"""The paths the float16 head case compares; the last is the reference."""
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


def measure_run(
    max_steps: int, warmup: int, extra: list[str] = (), cuda: bool = True, recipe: str | None = None
) -> dict:
    """A short distillation of the embedded default (``extra``: ``--set`` items on top) on the GPU;
    ``cuda=False`` measures no GPU memory (the tests run it on CPU with tiny models)."""
    from transformers.utils import logging as hf_logging

    from distill.engine import train
    from distill.resolve import flag_layer, resolve_run

    settings = ["eval.rouge_samples=0", f"eval.every={max_steps}", f"checkpoint.every={max_steps}", *extra]
    started_event: dict = {}
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        flags = flag_layer(recipe=recipe, output_dir=str(Path(folder) / "run"), max_steps=max_steps, settings=settings)
        config = resolve_run(None, flags)  # as `distill run --output-dir ... --max-steps ... --set ...`
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


SEQ2SEQ_CASES = {
    "t5 gkd": [],
    "t5 gkd full-logits": ["train.fused_head=false"],
}
"""Encoder-decoder cases: a T5 pair built from configs (no weights can be downloaded where this was
written), the ``gkd`` recipe (half its steps generate through transformers' generate)."""


def make_t5_pair(folder: Path, tokenizer_ref: str = "smollm2-135m-instruct", d_model: int = 256, layers=(4, 2)):
    """Random T5 teacher (``layers[0]`` a stack) and student (``layers[1]``) with the tokenizer of
    ``tokenizer_ref`` (its EOS ends answers, its first id starts the decoder); ``--set`` items naming them."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_ref)
    ids = dict(decoder_start_token_id=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    for role, count, seed in (("teacher", layers[0], 1), ("student", layers[1], 2)):
        torch.manual_seed(seed)
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=max(8, d_model // 8),
            d_ff=4 * d_model,
            num_layers=count,
            num_heads=max(2, d_model // 64),
            **ids,
        )
        model = T5ForConditionalGeneration(config)
        model.generation_config.decoder_start_token_id = 0
        model.save_pretrained(folder / role)
        tokenizer.save_pretrained(folder / role)
    return [f"teacher.ref={folder / 'teacher'}", f"student.ref={folder / 'student'}", "student.freeze=[]"]


def measure_seq2seq(max_steps: int, warmup: int, extra: list[str] = (), cuda: bool = True, **pair) -> dict[str, dict]:
    """``SEQ2SEQ_CASES`` on a T5 pair (``make_t5_pair(**pair)``) and the embedded default's data."""
    with tempfile.TemporaryDirectory() as folder:
        models = make_t5_pair(Path(folder), **pair)
        return {
            name: measure_run(max_steps, warmup, [*models, *extra, *settings], cuda=cuda, recipe="gkd")
            for name, settings in SEQ2SEQ_CASES.items()
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


def zero_share(*grads) -> float:
    """Percentage of the entries of ``grads`` that are exactly zero."""
    return 100 * sum(int((g == 0).sum()) for g in grads) / sum(g.numel() for g in grads)


def float16_head_problem(vocab: int, rows: int, width: int, device: str) -> dict:
    """Student weight ``[vocab, width]`` and hidden states ``[rows, width]`` in float32 holding float16
    values (autocast's master copies), the teacher's in float16. A constant feature of the hidden
    states times a per-token rarity puts the rarest token e^-12 below the commonest at every position,
    as a language model's prior over its vocabulary does."""
    import torch

    generator = torch.Generator().manual_seed(0)
    weight, teacher_weight = (torch.randn(vocab, width, generator=generator) / width**0.5 for _ in range(2))
    hidden, teacher_hidden = (torch.randn(rows, width, generator=generator) for _ in range(2))
    hidden[:, 0] = teacher_hidden[:, 0] = 1.0
    weight[:, 0] = teacher_weight[:, 0] = -torch.linspace(0, 12, vocab)
    return {
        "weight": weight.half().float().to(device),
        "hidden": hidden.half().float().to(device),
        "teacher_weight": teacher_weight.half().to(device),
        "teacher_hidden": teacher_hidden.half().to(device),
    }


def float16_head_pass(path: str, problem: dict, rows: int, grad_scale: float) -> tuple:
    """Gradients ``(hidden [rows, width], weight [vocab, width])`` of the mean KL over ``rows`` tokens
    times ``grad_scale``, along ``path`` (one of ``FLOAT16_PATHS``)."""
    import torch
    import torch.nn.functional as F

    import distill
    from distill.fused import Head, fused_loss

    def head(weight: torch.nn.Parameter) -> Head:  # as head_input finds it under fp16 autocast
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        module.weight = weight
        return Head(module, weight.shape[0], None, torch.float16)

    divergence = distill.get_divergence("kl")
    weight = torch.nn.Parameter(problem["weight"])  # shares the input's storage: the peak counts the pass alone
    hidden = problem["hidden"][:rows].detach().requires_grad_()
    teacher_weight, teacher_hidden = problem["teacher_weight"], problem["teacher_hidden"][:rows]
    device = weight.device.type
    if path == "fused, fp16 autocast":
        teacher = head(torch.nn.Parameter(teacher_weight, requires_grad=False))
        loss, _ = fused_loss(head(weight), hidden, teacher, teacher_hidden, divergence, n_tokens=rows)
    elif path == "full logits, fp16 autocast":
        with torch.autocast(device, dtype=torch.float16):  # as Accelerate wraps the model's forward
            logits = F.linear(hidden, weight)
            teacher_logits = F.linear(teacher_hidden, teacher_weight)
        loss = distill.divergence_loss(divergence, logits, teacher_logits, n_tokens=rows)
    elif path == "full logits, float32":
        logits = F.linear(hidden, weight)
        teacher_logits = F.linear(teacher_hidden.float(), teacher_weight.float())
        loss = distill.divergence_loss(divergence, logits, teacher_logits, n_tokens=rows)
    else:
        raise ValueError(f"unknown path {path!r}; one of {FLOAT16_PATHS}")
    loss.backward(torch.tensor(grad_scale, device=loss.device))
    return hidden.grad, weight.grad


def measure_float16_head(vocab: int, rows: int, width: int, grad_scale: float, cuda: bool = True) -> dict:
    """Each of ``FLOAT16_PATHS`` once (after a warm-up on 64 rows): zero shares, error against the
    float32 path, peak memory above the inputs and seconds; ``cuda=False`` runs on CPU and measures no
    memory (for checking the script at small sizes)."""
    problem = float16_head_problem(vocab, rows, width, DEVICE if cuda else "cpu")
    grads, cases = {}, []
    for path in FLOAT16_PATHS:
        float16_head_pass(path, problem, min(64, rows), grad_scale)
        if cuda:
            synchronize()
            reset_peak()
        base = allocated() if cuda else 0
        start = time.perf_counter()
        grads[path] = float16_head_pass(path, problem, rows, grad_scale)
        if cuda:
            synchronize()
        seconds = time.perf_counter() - start
        cases.append(
            {
                "path": path,
                "zero_share_percent": zero_share(*grads[path]),
                "zero_share_hidden_percent": zero_share(grads[path][0]),
                "zero_share_weight_percent": zero_share(grads[path][1]),
                "finite": all(bool(g.isfinite().all()) for g in grads[path]),
                "seconds": seconds,
                "peak_extra_mib": (peak() - base) / MIB if cuda else 0.0,
            }
        )
    reference = grads[FLOAT16_PATHS[-1]]
    for case in cases:
        case["relative_error"] = max(
            float((got.float() - expected).norm() / expected.norm())
            for got, expected in zip(grads[case["path"]], reference)
        )
    return {"vocab": vocab, "rows": rows, "width": width, "grad_scale": grad_scale, "cases": cases}


def print_float16_head(result: dict) -> None:
    print(
        f"\nfloat16 head: KL forward+backward, N={result['rows']}, V={result['vocab']}, width {result['width']}, "
        f"fp16 autocast, gradient x {result['grad_scale']:g}; reference: {FLOAT16_PATHS[-1]}"
    )
    print(
        f"  {'path':<28} {'zero grads %':>12} {'hidden %':>9} {'weight %':>9} {'rel. error':>10} "
        f"{'peak extra MiB':>15} {'seconds':>8}"
    )
    for case in result["cases"]:
        print(
            f"  {case['path']:<28} {case['zero_share_percent']:>12.4f} {case['zero_share_hidden_percent']:>9.4f} "
            f"{case['zero_share_weight_percent']:>9.4f} {case['relative_error']:>10.2e} "
            f"{case['peak_extra_mib']:>15,.0f} {case['seconds']:>8.3f}" + ("" if case["finite"] else "  (inf/nan)")
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the per-step numbers")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-run", action="store_true", help="only the synthetic loss measurement")
    parser.add_argument("--skip-seq2seq", action="store_true", help="leave out the encoder-decoder (T5) cases")
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
    if not args.skip_run and not args.skip_seq2seq:
        result["seq2seq"] = measure_seq2seq(args.max_steps, args.warmup)
        print_runs(result["seq2seq"])

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

    result["float16_head"] = measure_float16_head(**FLOAT16_HEAD)
    print_float16_head(result["float16_head"])

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
