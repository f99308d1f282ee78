"""The output head and the loss fused, chunk by chunk: the ``[N, V]`` logits never exist whole.

``train.fused_head``: instead of asking each model for its logits, the engine takes the final
hidden states that enter its output head (``head_input``) and multiplies them by the head's weight
one chunk of response positions at a time, for the teacher and for the student. Each chunk's
logits go through the divergence plugin exactly as ``divergence_loss`` hands them over (the same
``ConfiguredDivergence``: temperature, plugin, float32 values), plus the cross-entropy term, and
the chunk's gradient is pushed through the head at once (``_FusedHeadLoss``): into the gradient of
the student's hidden states and of the head's weight and bias. Autograd keeps nothing per chunk;
what stays is the hidden states' gradient ``[N, H]`` and the head's weight gradient, which any path
has.

What the head does is read from the model, not assumed: a plain ``nn.Linear`` (bias, tied
embeddings and a frozen head included), the rows ``distill.models.trim_head`` keeps, and Gemma's
``final_logit_softcapping``. ``plan_fused_head`` checks at start, on one real example, that
weight @ hidden (+ bias, soft-capped) reproduces the model's own logits; anything else (a LoRA or
quantised head, a model that rescales its logits, sharded weights) keeps the full-logits path,
with one line saying why.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from distill.divergence import ConfiguredDivergence
from distill.errors import ConfigError
from distill.loss import TokenTerms, chunk_rows, counted, row_values, token_loss
from distill.models import contiguous_head_input

BLOCK_ELEMENTS = 1 << 22
"""Logits per block (16 MiB in float32), at least ``MIN_BLOCK_ROWS`` rows: the rows multiplied by
the head weight at once. A block must be tall enough for those matmuls to run at full speed: each
one reads the whole weight, and the weight gradient's update reads and writes all of it (64-row
blocks made the V = 152,064 head ~20% slower than 128-row ones on CPU)."""
MIN_BLOCK_ROWS = 128
MAX_BLOCK_ELEMENTS = 1 << 23
"""But never more than this many logits per block (64 MiB in float32): with a very large vocabulary
(262,144 tokens) 128 rows of two models' logits and their gradient would weigh more than the rest
of a small run. Blocks shrink below ``MIN_BLOCK_ROWS`` there, trading a little speed for memory."""


def fused_sizes(vocab_size: int, chunk_size: int | None = None, block_size: int | None = None) -> tuple[int, int]:
    """``(block, chunk)`` rows for a vocabulary of ``vocab_size``: the head multiplies ``block`` rows
    at once, the loss runs on ``chunk`` rows at once (``distill.loss.chunk_rows``; ``chunk <= block``)."""
    vocab_size = max(1, vocab_size)
    chunk = int(chunk_size or chunk_rows(vocab_size))
    bounded = min(max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // vocab_size), max(1, MAX_BLOCK_ELEMENTS // vocab_size))
    block = int(block_size or bounded)
    if chunk < 1 or block < 1:
        raise ValueError(f"chunk and block sizes must be >= 1, got {chunk_size} and {block_size}")
    return max(block, chunk), chunk


@dataclass
class Head:
    """A model's output head as the fused path uses it: ``logits = softcap(hidden @ weight[:n].T + bias[:n])``.

    ``dtype``: the dtype the head multiplies in (the autocast dtype when the model's forward runs
    under autocast, else the weight's); ``softcap``: ``final_logit_softcapping`` or None."""

    module: torch.nn.Linear
    n: int
    softcap: float | None
    dtype: torch.dtype | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def operands(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight ``[n, H]`` and bias ``[n]`` in the compute dtype (views when no cast is needed)."""
        dtype = self.dtype or self.weight.dtype
        weight = self.weight.detach()[: self.n].to(dtype)
        bias = None if self.bias is None else self.bias.detach()[: self.n].to(dtype)
        return weight, bias

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``[c, H]`` -> ``[c, n]`` raw head outputs in the compute dtype (before soft-capping)."""
        return F.linear(hidden.to(weight.dtype), weight, bias)

    def cap(self, raw: torch.Tensor) -> torch.Tensor:
        """Gemma's soft-capping, as transformers applies it (in the logits' own dtype)."""
        if self.softcap is None:
            return raw
        return torch.tanh(raw / self.softcap) * self.softcap


def head_of(model, unwrap=lambda m: m) -> Head | str:
    """The model's ``Head``, or why the fused path cannot use it (a short phrase)."""
    inner = unwrap(model)
    module = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if module is None:
        return "it has no output head"
    if type(module) is not torch.nn.Linear:  # a LoRA layer, a quantised linear, a custom head
        return f"its output head is a {type(module).__module__}.{type(module).__name__}, not a plain torch.nn.Linear"
    n = getattr(module, "_distill_trim", None) or module.weight.shape[0]
    config = getattr(inner, "config", None)
    softcap = getattr(getattr(config, "get_text_config", lambda: config)(), "final_logit_softcapping", None)
    return Head(module, int(n), float(softcap) if softcap else None)


@contextmanager
def _capturing(head: Head):
    """Within: the head returns an empty ``[..., 0]`` tensor and records its input instead (the
    model's forward runs as always: DDP, peft, autocast, ``logits_to_keep``, its hooks)."""
    seen: dict[str, object] = {}

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        seen["hidden"] = hidden
        device = hidden.device.type
        seen["dtype"] = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return hidden.new_zeros((*hidden.shape[:-1], 0))

    head.module.forward = forward
    try:
        yield seen
    finally:
        del head.module.forward


def head_input(model, batch, head: Head, unwrap=lambda m: m) -> torch.Tensor:
    """Final hidden states predicting each response token, ``[B, R, H]``: what ``response_logits``
    would multiply by the head. Sets ``head.dtype`` to the dtype the model's head multiplies in."""
    from distill.objective import response_logits

    with _capturing(head) as seen:
        response_logits(model, batch, unwrap)
    r = batch.response_mask.shape[1]
    hidden = seen["hidden"]
    head.dtype = seen["dtype"] or head.weight.dtype
    return hidden[:, -(r + 1) : -1]


# --- a head's rows for the one loss path (distill.loss.token_loss)


class HeadRows:
    """A model's head applied to its hidden states ``[n, H]`` (the counted rows) a block at a time: the
    row source of the fused path (``distill.loss.Rows``). The loss hands back each block's gradient
    with respect to the head's raw outputs, ``g``, which goes through the head at once:
    ``grad hidden = g @ W``, ``grad W += g.T @ hidden``, ``grad b += sum g``.

    The gradients are kept in float32 and cast to their inputs' dtypes only after the scaling by the
    loss's ``grad_output`` (a GradScaler's factor). A float16 head also takes ``g`` and both matmuls
    through the head in float32: ``g`` is divided by the token count, and float16 flushes what falls
    below ~6e-8 to zero (a rare token's ``(q - p) / 4096``) before the GradScaler's factor could lift
    it. bfloat16 has float32's exponent range and keeps ``g`` in its own dtype.
    """

    def __init__(self, head: Head, hidden: torch.Tensor, block_rows: int, *, trained: bool = True) -> None:
        self.head, self.hidden, self.block_rows = head, hidden, block_rows
        self.width = head.n
        self.w, self.b = head.operands()
        self.compute_dtype = torch.float32 if self.w.dtype == torch.float16 else self.w.dtype
        self.inputs = (hidden, head.weight, head.bias) if trained else ()
        self.wants = (False, False, False)
        self._grads: list[torch.Tensor | None] = [None, None, None]
        self._block: torch.Tensor | None = None

    def want(self, flags: tuple[bool, ...]) -> None:
        self.wants = (flags[0], flags[1], self.head.bias is not None and flags[2])
        shapes = (self.hidden, self.head.weight, self.head.bias)
        self._grads = [
            torch.zeros(x.shape, dtype=torch.float32, device=x.device) if want else None
            for x, want in zip(shapes, self.wants)
        ]
        self.back_weight = self.w.to(self.compute_dtype)  # the weight g goes back through

    def block(self, start: int, stop: int) -> torch.Tensor:
        self._block = self.hidden[start:stop].detach()
        raw = self.head.logits(self._block, self.w, self.b)
        return raw.to(self.compute_dtype) if self.inputs else self.head.cap(raw)

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        return self.head.cap(rows)

    def add_grad(self, start: int, stop: int, grad: torch.Tensor) -> None:
        grad_hidden, grad_weight, grad_bias = self._grads
        h, n = self._block, self.head.n
        if grad_hidden is not None:
            grad_hidden[start:stop] = grad @ self.back_weight
        if grad_weight is not None:
            if grad.dtype == torch.float32:
                grad_weight[:n].addmm_(grad.t(), h.float())
            else:  # the matmul in the head's dtype (as autocast's backward), summed over blocks in float32
                grad_weight[:n].add_(grad.t() @ h.to(self.w.dtype))
        if grad_bias is not None:
            grad_bias[:n].add_(grad.float().sum(0))

    def grads(self) -> list[torch.Tensor | None]:
        grads, self._grads = self._grads, [None, None, None]
        return grads


def fused_loss(
    student: Head,
    hidden: torch.Tensor,
    teacher: Head | None = None,
    teacher_hidden: torch.Tensor | None = None,
    divergence=None,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    n_tokens: float | None = None,
    chunk_size: int | None = None,
    block_size: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(kd_weight x divergence + ce_weight x cross-entropy)`` summed over the positions where ``mask``
    is true, divided by ``n_tokens``, computed from the heads' inputs: ``distill.loss.token_loss`` over
    ``HeadRows`` (the fused ``divergence_loss`` + ``token_cross_entropy``).

    Args:
        student, teacher: the heads (``head_of``); the teacher's may be None with ``divergence`` None
            (cross-entropy alone).
        hidden, teacher_hidden: ``[B, T, H]`` (or ``[N, H]``) hidden states entering the heads; the
            gradient flows to ``hidden`` and to the student head's weight and bias.
        divergence: from ``distill.get_divergence`` (or a bare plugin), or None.
        mask: ``[B, T]`` (or ``[N]``) booleans, true where a position counts; None = all.
        labels: ``[B, T]`` (or ``[N]``) target ids, needed when ``ce_weight > 0``.
        n_tokens: the denominator (default: the number of counted positions).
        chunk_size, block_size: rows per loss chunk and per head block (default ``fused_sizes(V)``).
        weights: like ``mask``, a weight per position (``train.normalize: sequence``); None = 1.

    Returns:
        The float32 scalar loss and its parts ``{"divergence": ..., "ce": ...}`` (each already divided
        by ``n_tokens``, unweighted; a term not computed is absent).
    """
    if divergence is None and ce_weight <= 0:
        raise ValueError("fused_loss needs a divergence or ce_weight > 0")
    if divergence is not None and (teacher is None or teacher_hidden is None):
        raise ValueError("a divergence needs the teacher's head and hidden states")
    if divergence is not None and teacher.n != student.n:
        raise ConfigError(
            f"student and teacher vocabularies differ: the student's head gives {student.n} logits, the teacher's "
            f"{teacher.n}; use models that share a tokenizer"
        )
    positions = hidden.shape[:-1]
    index = counted(mask, positions, hidden.device)
    block, chunk = fused_sizes(student.n, chunk_size, block_size)
    use_teacher = divergence is not None and kd_weight != 0
    return token_loss(
        HeadRows(student, hidden[index], block),
        HeadRows(teacher, teacher_hidden[index].detach(), block, trained=False) if use_teacher else None,
        TokenTerms(ConfiguredDivergence.wrap(divergence) if use_teacher else None, kd_weight, float(ce_weight)),
        index,
        n_tokens=n_tokens,
        labels=row_values(positions, index, labels, "labels"),
        weights=row_values(positions, index, weights, "weights", torch.float32),
        chunk_size=chunk,
    )


@torch.no_grad()
def fused_sums(
    student: Head,
    hidden: torch.Tensor,
    teacher: Head | None,
    teacher_hidden: torch.Tensor | None,
    mask: torch.Tensor,
    labels: torch.Tensor,
    divergences: dict,
    *,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> dict[str, float]:
    """Sums over the counted positions, without gradients (evaluation): ``"ce"`` (the student's
    cross-entropy) and, with a teacher, each named divergence of ``divergences``."""
    positions = hidden.shape[:-1]
    index = counted(mask, positions, hidden.device)
    block, chunk = fused_sizes(student.n, chunk_size, block_size)
    reported = {name: ConfiguredDivergence.wrap(d) for name, d in divergences.items()} if teacher is not None else {}
    _, sums = token_loss(
        HeadRows(student, hidden[index], block),
        HeadRows(teacher, teacher_hidden[index], block, trained=False) if reported else None,
        TokenTerms(ce_weight=1.0, reported=reported),
        index,
        n_tokens=1.0,
        labels=row_values(positions, index, labels, "labels"),
        chunk_size=chunk,
    )
    return sums


# --- choosing the path at start


@dataclass
class FusedHeads:
    """The heads of a run that uses the fused path (``teacher`` None: cross-entropy only)."""

    student: Head
    teacher: Head | None
    unwrap: Callable


SHARDED_BACKENDS = ("FSDP",)


def plan_fused_head(
    setting, student, teacher, batch, unwrap=lambda m: m, accelerator=None
) -> tuple[FusedHeads | None, str]:
    """Whether this run computes its loss through the fused heads, and the start line saying so.

    ``setting``: ``train.fused_head`` (``"auto"``, True, False). ``batch``: one real example, on
    which the fused logits must reproduce each model's own (in eval mode, without gradients). With
    ``True`` a model the fused path cannot serve is a ``ConfigError``; with ``"auto"`` the run keeps
    the full-logits path and the line says why.
    """
    if setting is False:
        return None, "fused head: off (train.fused_head=false): full logits"
    why = _unsupported(student, teacher, batch, unwrap, accelerator)
    if isinstance(why, str):
        if setting is True:
            raise ConfigError(
                f"train.fused_head true: {why}; set train.fused_head=auto (falls back to full logits) or false"
            )
        return None, f"fused head: off ({why}): full logits"
    block, chunk = fused_sizes(why.student.n)
    return why, f"fused head: on (logits {block} positions at a time, the loss {chunk} at a time; never whole)"


def _unsupported(student, teacher, batch, unwrap, accelerator) -> FusedHeads | str:
    kind = accelerator.distributed_type.name if accelerator is not None else "NO"
    if kind in SHARDED_BACKENDS or (kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3):
        return "the heads' weights are sharded (FSDP / ZeRO-3)"
    models = {"student": student, "teacher": teacher} if teacher is not None else {"student": student}
    heads: dict[str, Head] = {}
    for role, model in models.items():
        head = head_of(model, unwrap)
        if isinstance(head, str):
            return f"the {role}'s {head[4:]}" if head.startswith("its ") else f"the {role}: {head}"
        contiguous_head_input(unwrap(model))
        mismatch = _reproduces(model, head, batch, unwrap)
        if mismatch:
            return f"the {role}'s logits are not its head's linear output ({mismatch})"
        heads[role] = head
    return FusedHeads(heads["student"], heads.get("teacher"), unwrap)


def _reproduces(model, head: Head, batch, unwrap) -> str | None:
    """None when ``head`` applied to the captured hidden states gives the model's own logits."""
    from distill.objective import response_logits

    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            expected = response_logits(model, batch, unwrap).float()
            try:
                hidden = head_input(model, batch, head, unwrap)
            except Exception as error:  # noqa: BLE001 - an architecture whose forward cannot run headless
                return f"its forward fails without the head: {type(error).__name__}"
            weight, bias = head.operands()
            got = head.cap(head.logits(hidden.reshape(-1, hidden.shape[-1]), weight, bias)).float()
    finally:
        inner.train(was_training)
    expected = expected.reshape(-1, expected.shape[-1])
    if got.shape != expected.shape:
        return f"{got.shape[-1]} logits against {expected.shape[-1]}"
    tolerance = 1e-3 if head.dtype == torch.float32 else 5e-2
    error = float((got - expected).abs().max()) if got.numel() else 0.0
    if not math.isfinite(error) or error > tolerance * (1.0 + float(expected.abs().max())):
        return f"largest difference {error:.3g}"
    return None


__all__ = ["FusedHeads", "Head", "fused_sizes", "fused_loss", "fused_sums", "head_input", "head_of", "plan_fused_head"]
