"""Time and peak memory of the output head plus the loss: fused (``train.fused_head``) against today's
full-logits path and a peer-style implementation.

Each case is one forward+backward pass from the final hidden states to the loss, for one divergence
at N response tokens, a vocabulary of V and hidden size H (float32, about 90% of positions counted):

- ``fused``: ``distill.fused.fused_loss``: teacher and student logits a chunk of positions at a time,
  the divergence through the plugin interface, gradients pushed through the head per chunk;
- ``today``: the full-logits path of ``train.fused_head=false``: ``[N, V]`` student and teacher
  logits from the heads, then ``distill.divergence_loss`` (chunked, with its gradient buffer), then
  autograd through the student's head;
- ``peer``: the full logits and the whole-vocabulary softmax / log_softmax style of TRL's
  ``generalized_jsd_loss`` and DistiLLM's ``losses.py`` (``divergence_memory.PEERS``), plain autograd.

The student's head weight is trainable (its gradient, ``[V, H]`` float32, is part of every peak), the
teacher's frozen; the teacher's logits are computed without gradients in every implementation.
Each case runs in a fresh subprocess; the peak is measured as in ``divergence_memory.py`` (peak RSS
during the first repetition minus RSS just before it, inputs and weights already allocated; VmHWM
where it can be reset). Seconds: the best of ``--repeats``. Agreement with ``today``: relative loss
difference and largest absolute difference of the hidden states' and head weight's gradients.

Targets at N=2048, V=49152: fused extra peak <= 0.1x peer's, fused time <= 1.0x peer's.

A second part measures a whole ``distill run`` (recipe kd, 2 steps, evaluation before and after) on
tiny Llama models whose tokenizer has ``--run-vocab`` tokens (262,144 by default, Gemma 3's size):
8 sequences of 128 response tokens per micro-batch, fused and not. Each run is a fresh subprocess;
reported: its peak RSS (VmHWM) minus its RSS when training starts (models loaded), against one
``[B, R, V]`` float32 tensor.

Run (from the repository root)::

    .venv/bin/python benchmarks/fused_head.py                    # V 49152 (6 divergences) and 152064 (kl, jsd), N 2048
    .venv/bin/python benchmarks/fused_head.py --vocab 49152 --divergences kl --threads 1
    .venv/bin/python benchmarks/fused_head.py --part run         # only the distill run at V = 262,144

Prints a table and writes ``benchmarks/results/fused_head.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence_memory import DIVERGENCES, PEERS, PeakRSS, available_bytes, release_free_heap, rss_bytes  # noqa: E402

IMPLEMENTATIONS = ("fused", "today", "peer")
TARGET = {"vocab": 49152, "tokens": 2048, "memory_ratio": 0.1, "time_ratio": 1.0}
HIDDEN = {49152: 576, 152064: 896}  # SmolLM2's and Qwen2.5-0.5B's hidden sizes for their vocabularies
MASK_FRACTION = 0.9
MiB = 1 << 20
PEER_UNITS = 14.0  # peer peak in [N, V] float32 units, for the skip estimate (measured 8-13)
HEADROOM = 2 << 30


def make_inputs(vocab: int, hidden: int, tokens: int, seed: int):
    """Student hidden ``[N, H]`` (requires grad), head ``nn.Linear(H, V)`` (trainable), the teacher's
    hidden states and frozen head, mask ``[N]``, labels ``[N]``."""
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, hidden, generator=generator).requires_grad_()
    teacher_hidden = torch.randn(tokens, hidden, generator=generator)
    student_head = torch.nn.Linear(hidden, vocab, bias=False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden))
        teacher_head.weight.copy_(2.0 * torch.randn(vocab, hidden, generator=generator) / math.sqrt(hidden))
    mask = torch.rand(tokens, generator=generator) < MASK_FRACTION
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    return student_hidden, student_head, teacher_hidden, teacher_head, mask, labels


def loss_function(divergence: str, implementation: str, chunk_rows: int | None = None, block_rows: int | None = None):
    """``f(student_hidden, student_head, teacher_hidden, teacher_head, mask) -> scalar``."""
    import distill
    from distill.fused import Head, fused_loss

    params = DIVERGENCES[divergence]
    d = distill.get_divergence(divergence, **params)

    def fused(hidden, head, teacher_hidden, teacher_head, mask):
        student, teacher = (
            Head(head, head.weight.shape[0], None),
            Head(teacher_head, teacher_head.weight.shape[0], None),
        )
        return fused_loss(
            student, hidden, teacher, teacher_hidden, d, mask, chunk_size=chunk_rows, block_size=block_rows
        )[0]

    def today(hidden, head, teacher_hidden, teacher_head, mask):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        return distill.divergence_loss(d, head(hidden), teacher_logits, mask)

    def peer(hidden, head, teacher_hidden, teacher_head, mask):
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
        return PEERS[divergence](head(hidden), teacher_logits, mask, **params)

    return {"fused": fused, "today": today, "peer": peer}[implementation]


def run_case(
    divergence: str,
    implementation: str,
    vocab: int,
    hidden: int,
    tokens: int,
    repeats: int,
    seed: int,
    grad_path: str,
    threads: int | None = None,
    chunk_rows: int | None = None,
    block_rows: int | None = None,
) -> dict:
    """Measure one case in this process; save the sampled gradients to ``grad_path``."""
    if threads:
        torch.set_num_threads(threads)
    loss_fn = loss_function(divergence, implementation, chunk_rows, block_rows)
    warm = make_inputs(vocab, hidden, 16, seed + 1)
    loss_fn(*warm[:5]).backward()
    del warm
    student_hidden, head, teacher_hidden, teacher_head, mask, _ = make_inputs(vocab, hidden, tokens, seed)
    seconds, loss, peak_extra, exact = [], None, None, None
    for repeat in range(repeats):
        student_hidden.grad = head.weight.grad = None
        release_free_heap()
        before = rss_bytes()
        with PeakRSS() if repeat == 0 else _nothing() as peak:
            start = time.perf_counter()
            value = loss_fn(student_hidden, head, teacher_hidden, teacher_head, mask)
            value.backward()
            seconds.append(time.perf_counter() - start)
        if repeat == 0:
            loss, peak_extra, exact = float(value.detach()), peak.peak - before, peak.exact
            rows = torch.linspace(0, tokens - 1, min(32, tokens)).round().long().unique()
            torch.save(
                {
                    "hidden": student_hidden.grad[rows].clone(),
                    "weight": head.weight.grad[:: max(1, vocab // 64)].clone(),
                },
                grad_path,
            )
        del value
    return {
        "seconds": min(seconds),
        "seconds_all": seconds,
        "peak_extra_bytes": peak_extra,
        "peak_from": "VmHWM" if exact else "RSS sampled every 1 ms",
        "loss": loss,
    }


class _nothing:
    peak = exact = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def run_in_subprocess(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if done.returncode == -9 else f"exit {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"{reason} {tail[0]}".strip()}
    return json.loads(lines[-1])


def run_grid(args, save) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fused_head_") as scratch:
        for vocab in args.vocab:
            hidden = args.hidden or HIDDEN.get(vocab, 896)
            divergences = args.divergences or (list(DIVERGENCES) if vocab <= TARGET["vocab"] else ["kl", "jsd"])
            logits = 4 * vocab * args.tokens
            for divergence in divergences:
                row = {
                    "divergence": divergence,
                    "params": DIVERGENCES[divergence],
                    "vocab": vocab,
                    "hidden": hidden,
                    "tokens": args.tokens,
                    "logits_mib": logits / MiB,
                }
                grads = {}
                for implementation in IMPLEMENTATIONS:
                    units = {"fused": 1.0, "today": 5.0, "peer": PEER_UNITS}[implementation]
                    needed = units * logits + 3 * 4 * vocab * hidden + HEADROOM
                    allowed = min(available_bytes(), args.max_gib * 2**30 if args.max_gib else math.inf)
                    if needed > allowed:
                        row[implementation] = {"skipped": "memory"}
                        print(
                            f"  {divergence:8} {implementation:5} V={vocab}: skipped (memory): "
                            f"needs ~{needed / 2**30:.1f} GiB, {allowed / 2**30:.1f} GiB available",
                            flush=True,
                        )
                        continue
                    grad_path = os.path.join(scratch, f"{implementation}.pt")
                    spec = {
                        "divergence": divergence,
                        "implementation": implementation,
                        "vocab": vocab,
                        "hidden": hidden,
                        "tokens": args.tokens,
                        "repeats": args.repeats,
                        "seed": args.seed,
                        "grad_path": grad_path,
                        "threads": args.threads,
                        "chunk_rows": args.chunk_rows,
                        "block_rows": args.block_rows,
                    }
                    result = run_in_subprocess(spec)
                    row[implementation] = result
                    if "error" in result:
                        print(f"  {divergence:8} {implementation:5} V={vocab}: {result['error']}", flush=True)
                        continue
                    result["peak_mib"] = result["peak_extra_bytes"] / MiB
                    grads[implementation] = torch.load(grad_path, weights_only=True)
                    print(
                        f"  {divergence:8} {implementation:5} V={vocab} N={args.tokens} "
                        f"H={hidden}: {result['seconds']:.3f} s, peak {result['peak_mib']:.0f} MiB",
                        flush=True,
                    )
                compare(row, grads)
                rows.append(row)
                save(rows)
    return rows


def compare(row: dict, grads: dict) -> None:
    """Ratios of fused and today against peer, and fused's agreement with today."""
    for name in ("fused", "today"):
        if "seconds" in row.get(name, {}) and "seconds" in row.get("peer", {}):
            row[f"{name}_time_ratio"] = row[name]["seconds"] / row["peer"]["seconds"]
            row[f"{name}_memory_ratio"] = row[name]["peak_extra_bytes"] / row["peer"]["peak_extra_bytes"]
    if "fused" in grads and "today" in grads:
        row["loss_rel_diff"] = abs(row["fused"]["loss"] - row["today"]["loss"]) / max(abs(row["today"]["loss"]), 1e-30)
        row["grad_max_abs_diff"] = max(
            float((grads["fused"][k] - grads["today"][k]).abs().max()) for k in ("hidden", "weight")
        )


def fmt(result: dict, key: str, spec: str) -> str:
    return "skipped" if "skipped" in result else "failed" if "error" in result else format(result[key], spec)


def print_table(rows: list[dict]) -> None:
    columns = [
        ("divergence", 10),
        ("V", 7),
        ("H", 4),
        ("logits MiB", 10),
        ("fused s", 8),
        ("today s", 8),
        ("peer s", 8),
        ("fused MiB", 9),
        ("today MiB", 9),
        ("peer MiB", 9),
        ("fused/peer t", 12),
        ("fused/peer mem", 14),
        ("today/peer mem", 14),
        ("loss diff", 9),
        ("grad diff", 9),
    ]
    header = "  ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        values = [
            row["divergence"],
            str(row["vocab"]),
            str(row["hidden"]),
            f"{row['logits_mib']:.0f}",
            *(fmt(row.get(i, {"skipped": 1}), "seconds", ".3f") for i in IMPLEMENTATIONS),
            *(fmt(row.get(i, {"skipped": 1}), "peak_mib", ".0f") for i in IMPLEMENTATIONS),
            f"{row['fused_time_ratio']:.2f}x" if "fused_time_ratio" in row else "-",
            f"{row['fused_memory_ratio']:.3f}x" if "fused_memory_ratio" in row else "-",
            f"{row['today_memory_ratio']:.3f}x" if "today_memory_ratio" in row else "-",
            f"{row['loss_rel_diff']:.1e}" if "loss_rel_diff" in row else "-",
            f"{row['grad_max_abs_diff']:.1e}" if "grad_max_abs_diff" in row else "-",
        ]
        print("  ".join(f"{value:>{width}}" for value, (_, width) in zip(values, columns)))
    print(
        "s: best forward+backward seconds (head + loss); MiB: peak RSS during it minus RSS "
        "before (inputs and weights allocated; the gradients of the hidden states and the "
        "head weight included);\nratios within this run; loss/grad diff: fused against today"
    )


def check_targets(rows: list[dict]) -> list[dict]:
    verdicts = []
    for row in rows:
        if (row["vocab"], row["tokens"]) != (TARGET["vocab"], TARGET["tokens"]) or "fused_time_ratio" not in row:
            continue
        verdicts.append(
            {
                "divergence": row["divergence"],
                "memory_ratio": row["fused_memory_ratio"],
                "memory_ok": row["fused_memory_ratio"] <= TARGET["memory_ratio"],
                "time_ratio": row["fused_time_ratio"],
                "time_ok": row["fused_time_ratio"] <= TARGET["time_ratio"],
            }
        )
    return verdicts


# --- a whole run on tiny models with a large vocabulary


def write_tiny_pair(root: Path, vocab: int, response_tokens: int, sequences: int) -> dict[str, Path]:
    """A word-level tokenizer of ``vocab`` tokens (ids past the words are unused fillers), a teacher
    (2 layers) and a student (1 layer) Llama of hidden size 32, and data whose responses are
    ``response_tokens`` tokens long (EOS included)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(200)]
    table = {"<s>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    table.update({f"<x{i}>": i for i in range(len(table), vocab)})
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    paths = {"teacher": root / "teacher", "student": root / "student", "data": root / "data.jsonl"}
    for layers, seed, role in ((2, 1, "teacher"), (1, 2, "student")):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=1,
        )
        LlamaForCausalLM(config).save_pretrained(paths[role])
        fast.save_pretrained(paths[role])
    rng = __import__("random").Random(0)
    lines = [
        json.dumps(
            {
                "prompt": " ".join(rng.choices(words, k=8)),
                "response": " ".join(rng.choices(words, k=response_tokens - 1)),
            }
        )
        for _ in range(4 * sequences)
    ]
    paths["data"].write_text("\n".join(lines) + "\n")
    return paths


def run_worker(spec: dict) -> dict:
    """One ``distill.train`` in this process: RSS at start and peak RSS (VmHWM, reset at start)."""
    from distill.engine import train
    from distill.resolve import resolve_config

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    seen: dict = {}

    def report(kind, record):
        if kind == "start":
            release_free_heap()
            seen["start_rss"] = rss_bytes()
            seen["exact"] = PeakRSS().__enter__().exact  # resets VmHWM to the current RSS
            seen["head"] = record.get("head")

    cfg = resolve_config(
        {
            "teacher": {"ref": spec["teacher"]},
            "student": {"ref": spec["student"]},
            "data": {"path": spec["data"], "max_response_tokens": spec["response_tokens"], "group_by_length": "off"},
            "divergence": {"name": "kl"},
            "policy": {"name": "offpolicy"},
            "output_dir": spec["output_dir"],
            "train": {
                "max_steps": 2,
                "batch_size": spec["sequences"],
                "fused_head": spec["fused_head"],
                "precision": "fp32",
            },
            "eval": {"batch_size": spec["sequences"], "every": 0, "rouge_samples": 0},
        },
        recipe=False,
        embedded=False,
    )
    started = time.perf_counter()
    train(cfg, report=report, overwrite=True)
    from divergence_memory import high_water_mark_bytes

    peak = high_water_mark_bytes() if seen.get("exact") else None
    return {
        "start_rss_bytes": seen["start_rss"],
        "peak_rss_bytes": peak,
        "peak_extra_bytes": None if peak is None else peak - seen["start_rss"],
        "head": seen.get("head"),
        "seconds": time.perf_counter() - started,
    }


def run_memory(args) -> dict:
    """The run part: the same tiny run with ``train.fused_head`` auto and false."""
    result = {"vocab": args.run_vocab, "sequences": 8, "response_tokens": 128}
    logits = 4 * result["sequences"] * result["response_tokens"] * args.run_vocab
    result["logits_bytes_per_model"] = logits
    with tempfile.TemporaryDirectory(prefix="fused_head_run_") as scratch:
        paths = write_tiny_pair(Path(scratch), args.run_vocab, result["response_tokens"], result["sequences"])
        for name, setting in (("fused", "auto"), ("full", False)):
            spec = {
                "run": True,
                "teacher": str(paths["teacher"]),
                "student": str(paths["student"]),
                "data": str(paths["data"]),
                "output_dir": str(Path(scratch) / f"run-{setting}"),
                "sequences": result["sequences"],
                "response_tokens": result["response_tokens"],
                "fused_head": setting,
                "threads": args.threads,
            }
            run = run_in_subprocess(spec)
            result[name] = run
            if "error" not in run and run["peak_extra_bytes"] is not None:
                run["peak_extra_mib"] = run["peak_extra_bytes"] / MiB
                run["in_logits_units"] = run["peak_extra_bytes"] / logits
                print(
                    f"  distill run, V={args.run_vocab}, fused_head={setting}: peak RSS "
                    f"{run['peak_rss_bytes'] / MiB:.0f} MiB, {run['peak_extra_mib']:.0f} MiB above its RSS at "
                    f"start = {run['in_logits_units']:.2f}x one [B, R, V] float32 tensor ({logits / MiB:.0f} MiB); "
                    f"{run['head']}",
                    flush=True,
                )
            else:
                print(
                    f"  distill run, fused_head={setting}: {run.get('error', 'no peak (VmHWM cannot be reset here)')}",
                    flush=True,
                )
    return result


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 152064])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, help="hidden size (default: 576 at V=49152, else 896)")
    parser.add_argument(
        "--divergences", nargs="+", choices=list(DIVERGENCES), help="default: all six at V <= 49152, kl and jsd above"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--chunk-rows", type=int, help="fused: rows per loss chunk (default: distill.fused.fused_sizes(V))"
    )
    parser.add_argument(
        "--block-rows", type=int, help="fused: rows per head block (default: distill.fused.fused_sizes(V))"
    )
    parser.add_argument("--threads", type=int)
    parser.add_argument("--max-gib", type=float, help="skip cases expected to need more")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--part", choices=["grid", "run", "both"], default="both", help="the head+loss grid, the distill run, or both"
    )
    parser.add_argument("--run-vocab", type=int, default=262144, help="tokenizer size of the run part")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results" / "fused_head.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(run_worker(spec) if spec.pop("run", False) else run_case(**spec)), flush=True)
        return args.output
    from common import environment, write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "worker")},
        "environment": environment(),
        "target": TARGET,
        "complete": False,
        "cases": [],
    }

    def save(rows):
        report["cases"] = rows
        write_json(args.output, report)

    rows = run_grid(args, save) if args.part != "run" else []
    if rows:
        print_table(rows)
    if args.part != "grid":
        report["run"] = run_memory(args)
    report["verdicts"] = check_targets(rows)
    for v in report["verdicts"]:
        print(
            f"  {v['divergence']:8} memory {v['memory_ratio']:.3f}x peer {'ok' if v['memory_ok'] else 'MISS'}, "
            f"time {v['time_ratio']:.2f}x peer {'ok' if v['time_ok'] else 'MISS'}"
        )
    report["complete"] = True
    save(rows)
    return args.output


if __name__ == "__main__":
    main()
