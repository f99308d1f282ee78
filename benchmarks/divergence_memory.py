"""Time and peak memory of ``distill.divergence_loss`` against whole-vocabulary peer implementations.

For each divergence (kl, rkl, jsd with beta 0.5, tvd, skew_kl and skew_rkl with alpha 0.1), each
vocabulary size V and each token count N, one forward+backward pass over float32 logits ``[N, V]``
(a mask with about 90% of positions counted) is measured twice:

- ``ours``: ``distill.divergence_loss(distill.get_divergence(name, ...), student, teacher, mask)``;
- ``peer``: the same divergence written the way TRL's ``generalized_jsd_loss`` (jsd) and DistiLLM's
  ``losses.py`` (the others) write it: whole-vocabulary float32 softmax / log_softmax tensors, plain
  autograd, a masked sum at the end. Written for this benchmark after those styles; the kl and
  skew_kl versions add the teacher's entropy term so every value is the true divergence.

Each (divergence, implementation, V, N) runs in a fresh subprocess, so one case's peak cannot hide in
another's. The subprocess allocates the logits, warms up on 16 rows, returns freed heap memory to the
OS (``malloc_trim``), reads its resident set size (RSS), then runs forward+backward ``--repeats``
times. Reported:

- seconds: the best repetition (the machine this was written on is shared and noisy);
- peak extra MiB: peak RSS during the first repetition minus RSS just before it. The peak is the
  kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), or where that reset
  is not allowed, ``/proc/self/statm`` sampled every millisecond; with CUDA logits it is
  ``torch.cuda.max_memory_allocated``. The gradient (``student.grad``, one logits-sized tensor) is
  part of both implementations' peaks;
- the same peaks in units of one ``[N, V]`` float32 tensor ("logits units");
- a second, allocator-independent peak: the most bytes of tensors alive at once, from the torch
  profiler's allocation events in one more untimed pass ("tensor ratio"). On CPU the RSS peak also
  holds what glibc keeps mapped after freeing the chunk-sized temporaries;
- agreement: relative difference of the two losses, and the largest absolute difference of the
  gradients over 32 evenly spaced rows (counted and masked-out rows alike).

A case whose estimated peak (from the same implementation's measured units at smaller sizes, or a
conservative default) does not fit in the memory available right now (or in ``--max-gib``) is shown
as ``skipped (memory)``. The JSON is rewritten after every case, so an interrupted run keeps its
measurements (``"complete": false``).

Targets reported at N=2048, V=49152: ours' peak <= 25% of the peer's, and ours' time <= 1.0x the
peer's, for every divergence.

Run (from the repository root; the full grid takes a while on a few CPU cores)::

    .venv/bin/python benchmarks/divergence_memory.py                  # V in {32768, 49152, 151936}, N in {1024, 2048}
    .venv/bin/python benchmarks/divergence_memory.py --quick          # a tiny grid, a minute or two
    .venv/bin/python benchmarks/divergence_memory.py --vocab 49152 --tokens 2048 --divergences kl jsd
    .venv/bin/python benchmarks/divergence_memory.py --threads 1      # steadier times on a busy machine
    .venv/bin/python benchmarks/divergence_memory.py --device cuda    # on a GPU

Prints a table and writes ``benchmarks/results/divergence_memory.json`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

DIVERGENCES: dict[str, dict[str, float]] = {
    "kl": {},
    "rkl": {},
    "jsd": {"beta": 0.5},
    "tvd": {},
    "skew_kl": {"alpha": 0.1},
    "skew_rkl": {"alpha": 0.1},
}
IMPLEMENTATIONS = ("ours", "peer")
FULL_VOCAB = (32768, 49152, 151936)
FULL_TOKENS = (1024, 2048)
QUICK_VOCAB = (8192, 32768)
QUICK_TOKENS = (512,)
TARGET = {"vocab": 49152, "tokens": 2048, "memory_ratio": 0.25, "time_ratio": 1.0}
MASK_FRACTION = 0.9
SAMPLED_ROWS = 32
WARMUP_ROWS = 16
MiB = 1 << 20

# Peak extra memory, in logits units, assumed for a case before a smaller case of the same
# divergence and implementation has been measured. Deliberately on the high side.
DEFAULT_PEAK_UNITS = {"ours": 2.0, "peer": {"jsd": 18.0, "skew_kl": 12.0, "skew_rkl": 12.0}}
DEFAULT_PEER_UNITS = 10.0
HEADROOM_BYTES = 2 << 30  # left free for the interpreter, the allocator and the rest of the machine


# --- peer implementations: whole-vocabulary float32 tensors, plain autograd
# student, teacher: [N, V] logits; mask: [N] bool. Each returns the masked token mean (a scalar).


def peer_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistiLLM's forward_kl, plus the teacher entropy term so the value is KL(p || q)."""
    teacher_probs = F.softmax(teacher, dim=-1, dtype=torch.float32)
    teacher_logprobs = F.log_softmax(teacher, dim=-1, dtype=torch.float32)
    student_logprobs = F.log_softmax(student, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student) | torch.isinf(teacher)
    prod_probs = torch.masked_fill(teacher_probs * student_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(teacher_probs * teacher_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = mask.int().view(-1)
    return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


def peer_rkl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistiLLM's reverse_kl: KL(q || p) = sum q log q - sum q log p."""
    student_probs = F.softmax(student, dim=-1, dtype=torch.float32)
    student_logprobs = F.log_softmax(student, dim=-1, dtype=torch.float32)
    teacher_logprobs = F.log_softmax(teacher, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(teacher) | torch.isinf(student)
    prod_probs = torch.masked_fill(student_probs * teacher_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = mask.int().view(-1)
    return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


def peer_jsd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized_jsd_loss (0 < beta < 1, temperature 1, reduction "batchmean")."""
    student_log_probs = F.log_softmax(student, dim=-1, dtype=torch.float32)
    teacher_log_probs = F.log_softmax(teacher, dim=-1, dtype=torch.float32)
    beta = torch.tensor(beta, dtype=student_log_probs.dtype)
    mixture_log_probs = torch.logsumexp(
        torch.stack([student_log_probs + torch.log(1 - beta), teacher_log_probs + torch.log(beta)]),
        dim=0,
    )
    kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    jsd = jsd[mask]
    return jsd.sum() / mask.sum()


def peer_tvd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Total variation in DistiLLM's style: 1/2 sum |p - q|."""
    teacher_probs = F.softmax(teacher, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(student, dim=-1, dtype=torch.float32)
    inf_mask = torch.isinf(student) | torch.isinf(teacher)
    prod_probs = torch.masked_fill(0.5 * torch.abs(teacher_probs - student_probs), inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = mask.int().view(-1)
    return torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


def peer_skew_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skewed_forward_kl, plus the teacher entropy term: KL(p || alpha p + (1 - alpha) q)."""
    teacher_probs = F.softmax(teacher, dim=-1, dtype=torch.float32)
    teacher_logprobs = F.log_softmax(teacher, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(student, dim=-1, dtype=torch.float32)
    mixed_probs = alpha * teacher_probs + (1 - alpha) * student_probs
    mixed_logprobs = torch.log(mixed_probs)
    inf_mask = torch.isinf(student) | torch.isinf(teacher)
    prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(teacher_probs * teacher_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = mask.int().view(-1)
    return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


def peer_skew_rkl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """DistiLLM's skewed_reverse_kl: KL(q || alpha q + (1 - alpha) p)."""
    teacher_probs = F.softmax(teacher, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(student, dim=-1, dtype=torch.float32)
    mixed_probs = (1 - alpha) * teacher_probs + alpha * student_probs
    student_logprobs = F.log_softmax(student, dim=-1, dtype=torch.float32)
    mixed_logprobs = torch.log(mixed_probs)
    inf_mask = torch.isinf(student) | torch.isinf(teacher)
    prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = mask.int().view(-1)
    return -torch.sum(x * mask, dim=0) / torch.sum(mask, dim=0)


PEERS = {
    "kl": peer_kl,
    "rkl": peer_rkl,
    "jsd": peer_jsd,
    "tvd": peer_tvd,
    "skew_kl": peer_skew_kl,
    "skew_rkl": peer_skew_rkl,
}


def loss_function(divergence: str, implementation: str):
    """``f(student [N, V], teacher [N, V], mask [N]) -> scalar`` for one divergence and implementation."""
    params = DIVERGENCES[divergence]
    if implementation == "peer":
        peer = PEERS[divergence]
        return lambda student, teacher, mask: peer(student, teacher, mask, **params)
    import distill

    d = distill.get_divergence(divergence, **params)
    return lambda student, teacher, mask: distill.divergence_loss(d, student, teacher, mask)


# --- memory of this process


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak RSS (VmHWM) to the current RSS; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_mark_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS, so that reusing it later shows up as RSS growth."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


class PeakRSS:
    """Peak RSS over a ``with`` block.

    The kernel's high-water mark (VmHWM, reset on entry) where ``/proc/self/clear_refs`` may be
    written; otherwise RSS sampled every ``interval_s`` by a thread. The sampler is only a fallback:
    a thread waking every millisecond changes the timing of code made of many small operations.
    """

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self.exact = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakRSS":
        self.peak = rss_bytes()
        self.exact = reset_high_water_mark()
        if not self.exact:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.exact:
            self.peak = max(self.peak, high_water_mark_bytes(), rss_bytes())
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())


# --- one case, in a fresh subprocess


def make_inputs(vocab: int, tokens: int, seed: int, device: str):
    """Seeded ``student [N, V]`` (a leaf that requires grad), ``teacher [N, V]``, ``mask [N]``."""
    generator = torch.Generator().manual_seed(seed)
    teacher = (2.0 * torch.randn(tokens, vocab, generator=generator)).to(device)
    student = (2.0 * torch.randn(tokens, vocab, generator=generator)).to(device).requires_grad_()
    mask = (torch.rand(tokens, generator=generator) < MASK_FRACTION).to(device)
    return student, teacher, mask


def sampled_rows(tokens: int) -> torch.Tensor:
    return torch.linspace(0, tokens - 1, min(SAMPLED_ROWS, tokens)).round().long().unique()


def run_case(
    divergence: str,
    implementation: str,
    vocab: int,
    tokens: int,
    repeats: int,
    seed: int,
    device: str,
    grad_path: str,
    threads: int | None = None,
) -> dict:
    """Measure one case in this process; save the gradient's sampled rows to ``grad_path``."""
    if threads:
        torch.set_num_threads(threads)
    loss_fn = loss_function(divergence, implementation)
    cuda = device.startswith("cuda")

    warm_student, warm_teacher, warm_mask = make_inputs(vocab, WARMUP_ROWS, seed + 1, device)
    loss_fn(warm_student, warm_teacher, warm_mask).backward()
    del warm_student, warm_teacher, warm_mask

    student, teacher, mask = make_inputs(vocab, tokens, seed, device)
    seconds, loss, peak_extra, exact = [], None, None, None
    for repeat in range(repeats):
        student.grad = None
        release_free_heap()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = rss_bytes()
        with PeakRSS() if repeat == 0 and not cuda else nullcontext() as peak:
            start = time.perf_counter()
            value = loss_fn(student, teacher, mask)
            value.backward()
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        if repeat == 0:
            loss = float(value)
            if cuda:
                peak_extra, exact = torch.cuda.max_memory_allocated() - before, True
            else:
                peak_extra, exact = peak.peak - before, peak.exact
            torch.save(student.grad[sampled_rows(tokens).to(device)].cpu(), grad_path)
        del value
    student.grad = None
    return {
        "seconds": min(seconds),
        "seconds_all": seconds,
        "peak_extra_bytes": peak_extra,
        "peak_from": "cuda.max_memory_allocated" if cuda else ("VmHWM" if exact else "RSS sampled every 1 ms"),
        "tensor_peak_bytes": peak_extra if cuda else tensor_peak_bytes(loss_fn, student, teacher, mask),
        "loss": loss,
    }


def tensor_peak_bytes(loss_fn, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> int | None:
    """Peak bytes of tensors allocated and alive at once during one more, untimed forward+backward.

    Read from the torch profiler's allocation events, so it leaves out what the C allocator keeps
    mapped after a free (heap fragmentation, trim thresholds): on CPU, the part of the RSS peak that a
    caching GPU allocator would not show. None where the profiler does not expose the events.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss_fn(student, teacher, mask).backward()
    try:
        events = prof.profiler.kineto_results.events()
        changes = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:
        return None
    live = peak = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


def worker_main(spec: str) -> None:
    args = json.loads(spec)
    torch.set_grad_enabled(True)
    print(json.dumps(run_case(**args)), flush=True)


# --- the grid, in the parent process


def logits_bytes(vocab: int, tokens: int) -> int:
    return vocab * tokens * 4


def estimated_units(divergence: str, implementation: str, measured: dict) -> float:
    """Peak extra memory expected, in logits units: 1.1x the largest measured so far, else a default."""
    seen = measured.get((divergence, implementation))
    if seen is not None:
        return 1.1 * seen
    default = DEFAULT_PEAK_UNITS[implementation]
    return default if isinstance(default, float) else default.get(divergence, DEFAULT_PEER_UNITS)


def run_in_subprocess(spec: dict) -> dict:
    """Run one case in a fresh interpreter; its result, or ``{"error": ...}``."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if done.returncode == -9 else f"exit {done.returncode}"
        tail = done.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"{reason} {tail[0]}".strip()}
    return json.loads(lines[-1])


def run_grid(args, save) -> list[dict]:
    """Every case of the grid, smallest logits first; ``save(rows)`` after each (divergence, V, N)."""
    shapes = sorted(((v, n) for v in args.vocab for n in args.tokens), key=lambda s: (s[0] * s[1], s[0]))
    measured: dict[tuple[str, str], float] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="divergence_memory_") as scratch:
        for vocab, tokens in shapes:
            size = logits_bytes(vocab, tokens)
            for divergence in args.divergences:
                row = {
                    "divergence": divergence,
                    "params": DIVERGENCES[divergence],
                    "vocab": vocab,
                    "tokens": tokens,
                    "logits_mib": size / MiB,
                }
                grads = {}
                for implementation in IMPLEMENTATIONS:
                    units = estimated_units(divergence, implementation, measured)
                    needed = (2 + units) * size + HEADROOM_BYTES  # inputs + peak + headroom
                    allowed = min(available_bytes(), args.max_gib * 2**30 if args.max_gib else math.inf)
                    if args.device == "cpu" and needed > allowed:
                        row[implementation] = {"skipped": "memory", "estimated_peak_mib": units * size / MiB}
                        print(
                            f"  {divergence:8} {implementation:4} V={vocab} N={tokens}: skipped (memory): "
                            f"needs ~{needed / 2**30:.1f} GiB, {allowed / 2**30:.1f} GiB available",
                            flush=True,
                        )
                        continue
                    grad_path = os.path.join(scratch, f"{implementation}.pt")
                    spec = {
                        "divergence": divergence,
                        "implementation": implementation,
                        "vocab": vocab,
                        "tokens": tokens,
                        "repeats": args.repeats,
                        "seed": args.seed,
                        "device": args.device,
                        "grad_path": grad_path,
                        "threads": args.threads,
                    }
                    result = run_in_subprocess(spec)
                    row[implementation] = result
                    if "error" in result:
                        print(
                            f"  {divergence:8} {implementation:4} V={vocab} N={tokens}: {result['error']}", flush=True
                        )
                        continue
                    result["peak_mib"] = result["peak_extra_bytes"] / MiB
                    result["peak_units"] = result["peak_extra_bytes"] / size
                    if result["tensor_peak_bytes"] is not None:
                        result["tensor_peak_units"] = result["tensor_peak_bytes"] / size
                    key = (divergence, implementation)
                    measured[key] = max(measured.get(key, 0.0), result["peak_units"])
                    grads[implementation] = torch.load(grad_path, weights_only=True)
                    print(
                        f"  {divergence:8} {implementation:4} V={vocab} N={tokens}: {result['seconds']:.3f} s, "
                        f"peak {result['peak_extra_bytes'] / MiB:.0f} MiB ({result['peak_units']:.2f} logits)",
                        flush=True,
                    )
                compare(row, grads)
                rows.append(row)
                save(rows)
    return rows


def compare(row: dict, grads: dict) -> None:
    """Ratios (ours / peer) and agreement of the two implementations, where both ran."""
    ours, peer = row.get("ours", {}), row.get("peer", {})
    if "seconds" not in ours or "seconds" not in peer:
        return
    row["time_ratio"] = ours["seconds"] / peer["seconds"]
    row["memory_ratio"] = ours["peak_extra_bytes"] / peer["peak_extra_bytes"]
    if ours["tensor_peak_bytes"] and peer["tensor_peak_bytes"]:
        row["tensor_memory_ratio"] = ours["tensor_peak_bytes"] / peer["tensor_peak_bytes"]
    row["loss_rel_diff"] = abs(ours["loss"] - peer["loss"]) / max(abs(peer["loss"]), 1e-30)
    row["grad_max_abs_diff"] = float((grads["ours"] - grads["peer"]).abs().max())
    row["grad_max_abs"] = float(grads["peer"].abs().max())


# --- report


def cell(result: dict, key: str, fmt: str) -> str:
    if "skipped" in result:
        return "skipped (memory)"
    if "error" in result:
        return "failed"
    return format(result[key], fmt)


def print_table(rows: list[dict]) -> None:
    columns = [
        ("divergence", 10),
        ("V", 7),
        ("N", 5),
        ("logits MiB", 10),
        ("ours s", 8),
        ("peer s", 16),
        ("time ratio", 10),
        ("ours MiB", 8),
        ("peer MiB", 16),
        ("mem ratio", 9),
        ("ours xlogits", 12),
        ("peer xlogits", 16),
        ("tensor ratio", 12),
        ("loss rel diff", 13),
        ("grad max diff", 13),
    ]
    header = "  ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        ours, peer = row["ours"], row["peer"]
        both = "time_ratio" in row
        values = [
            row["divergence"],
            str(row["vocab"]),
            str(row["tokens"]),
            f"{row['logits_mib']:.0f}",
            cell(ours, "seconds", ".3f"),
            cell(peer, "seconds", ".3f"),
            f"{row['time_ratio']:.2f}x" if both else "-",
            cell(ours, "peak_mib", ".0f"),
            cell(peer, "peak_mib", ".0f"),
            f"{row['memory_ratio']:.1%}" if both else "-",
            cell(ours, "peak_units", ".2f"),
            cell(peer, "peak_units", ".2f"),
            f"{row['tensor_memory_ratio']:.1%}" if "tensor_memory_ratio" in row else "-",
            f"{row['loss_rel_diff']:.1e}" if both else "-",
            f"{row['grad_max_abs_diff']:.1e}" if both else "-",
        ]
        print("  ".join(f"{value:>{width}}" for value, (_, width) in zip(values, columns)))


LEGEND = (
    "s: best forward+backward seconds; MiB: peak RSS during it minus RSS before (includes .grad); "
    "xlogits: that peak / logits MiB;\nratios: ours / peer; tensor ratio: the same for the peak of live "
    "tensors (profiler), without allocator retention;\nloss rel diff: |ours - peer| / |peer|; grad max diff: "
    "max |ours - peer| over 32 sampled rows of student.grad"
)


def check_targets(rows: list[dict]) -> dict:
    """Per divergence, at the target shape: does ours meet the memory and time targets?"""
    verdicts = {}
    for row in rows:
        if (row["vocab"], row["tokens"]) != (TARGET["vocab"], TARGET["tokens"]):
            continue
        if "time_ratio" not in row:
            verdicts[row["divergence"]] = {"measured": False}
            continue
        verdicts[row["divergence"]] = {
            "measured": True,
            "memory_ratio": row["memory_ratio"],
            "memory_ok": row["memory_ratio"] <= TARGET["memory_ratio"],
            "tensor_memory_ratio": row.get("tensor_memory_ratio"),
            "time_ratio": row["time_ratio"],
            "time_ok": row["time_ratio"] <= TARGET["time_ratio"],
        }
    return verdicts


def print_targets(verdicts: dict) -> None:
    print(
        f"\nTargets at N={TARGET['tokens']}, V={TARGET['vocab']}, float32: ours peak <= "
        f"{TARGET['memory_ratio']:.0%} of peer's, ours time <= {TARGET['time_ratio']:.1f}x peer's"
    )
    if not verdicts:
        print("  not measured (the target shape is not in this grid)")
    for divergence, v in verdicts.items():
        if not v["measured"]:
            print(f"  {divergence:8}  not measured")
            continue
        memory = "ok  " if v["memory_ok"] else "MISS"
        speed = "ok  " if v["time_ok"] else "MISS"
        tensors = v["tensor_memory_ratio"]
        tensors = f"(live tensors only: {tensors:.1%})" if tensors is not None else ""
        print(
            f"  {divergence:8}  memory {v['memory_ratio']:6.1%} {memory} {tensors:28}  "
            f"time {v['time_ratio']:5.2f}x {speed}"
        )


def source_info() -> dict:
    """Where the benchmarked ``distill`` was imported from, and its git commit where there is one."""
    import distill

    folder = os.path.dirname(os.path.abspath(distill.__file__))
    info = {"path": folder}
    try:
        git = ["git", "-C", folder]
        info["commit"] = subprocess.run(
            git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(git + ["status", "--porcelain", "."], capture_output=True, text=True, check=True)
        info["uncommitted_changes"] = bool(status.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny grid: V in {QUICK_VOCAB}, N in {QUICK_TOKENS}")
    parser.add_argument("--vocab", type=int, nargs="+", help=f"vocabulary sizes (default {FULL_VOCAB})")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts N (default {FULL_TOKENS})")
    parser.add_argument("--divergences", nargs="+", choices=list(DIVERGENCES), default=list(DIVERGENCES))
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads in each case (default: torch's own)")
    parser.add_argument(
        "--max-gib", type=float, help="skip CPU cases estimated to need more (default: what is available)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).resolve().parent / "results" / "divergence_memory.json"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    args.vocab = args.vocab or (QUICK_VOCAB if args.quick else FULL_VOCAB)
    args.tokens = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    print(
        f"distill.divergence_loss vs peer-style whole-vocabulary losses on {args.device}, float32, "
        f"torch {torch.__version__}, threads: {args.threads or torch.get_num_threads()}, best of {args.repeats}",
        flush=True,
    )
    started = time.time()
    rows = run_grid(args, save=lambda rows: write_report(args, rows, started, complete=False))
    print()
    print_table(rows)
    print(LEGEND)
    print_targets(check_targets(rows))
    write_report(args, rows, started, complete=True)
    print(f"\nwrote {args.output}")


def write_report(args, rows: list[dict], started: float, *, complete: bool) -> None:
    """The JSON result; written after every case too, so that an interrupted run keeps what it measured."""
    report = {
        "benchmark": "divergence_memory",
        "complete": complete,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads or torch.get_num_threads(),
        "device": args.device,
        "distill": source_info(),
        "dtype": "float32",
        "repeats": args.repeats,
        "mask_fraction": MASK_FRACTION,
        "wall_seconds": time.time() - started,
        "targets": TARGET,
        "verdicts": check_targets(rows),
        "cases": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_suffix(".json.tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(args.output)


if __name__ == "__main__":
    main()
