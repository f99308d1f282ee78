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
from distill.loss import take_scaled_grads
from distill.errors import ConfigError
from distill.models import contiguous_head_input

BLOCK_ELEMENTS = 1 << 22
"""Logits per block (16 MiB in float32), at least ``MIN_BLOCK_ROWS`` rows: the rows multiplied by
the head weight at once. A block must be tall enough for those matmuls to run at full speed: each
one reads the whole weight, and the weight gradient's update reads and writes all of it (64-row
blocks made the V = 152,064 head ~20% slower than 128-row ones on CPU)."""
MIN_BLOCK_ROWS = 128
CHUNK_ELEMENTS = 1 << 19
"""Logits per chunk (2 MiB in float32): the rows a divergence plugin sees at once, inside a block.
Plugins hold about 15 chunk-sized temporaries at their peak (autograd's included), so this is what
keeps the peak low; it costs no speed (the matmuls run per block)."""
MIN_CHUNK_ROWS = 4


def fused_sizes(vocab_size: int, chunk_size: int | None = None, block_size: int | None = None) -> tuple[int, int]:
    """``(block, chunk)`` rows for a vocabulary of ``vocab_size``: the head multiplies ``block`` rows
    at once, the loss runs on ``chunk`` rows at once (``chunk <= block``)."""
    vocab_size = max(1, vocab_size)
    chunk = int(chunk_size or max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size))
    block = int(block_size or max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // vocab_size))
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


# --- the loss: one autograd function for the divergence and the cross-entropy of one micro-batch


@dataclass
class _Terms:
    """What ``_FusedHeadLoss`` computes per chunk; ``parts`` receives each term's scaled total."""

    student: Head
    teacher: Head | None
    divergence: ConfiguredDivergence | None
    labels: torch.Tensor | None  # [n] targets of the counted rows (needed when ce_weight > 0)
    ce_weight: float
    scale: float
    block_size: int
    chunk_size: int
    parts: dict[str, float]
    weights: torch.Tensor | None = None  # [n] per-row weights of the counted rows (train.normalize: sequence), None = 1


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and, block by block, its gradients with respect to the student's
    hidden states and head; backward only scales them (as ``distill.loss._ChunkedDivergenceLoss``).

    Per block of rows: the student's raw head outputs and the teacher's logits ``[block, n]``; per
    chunk of the block, the loss terms and, by a local backward, their gradient with respect to the
    raw outputs, written over those outputs (they are not needed again); then that gradient goes
    through the head: ``grad hidden = g @ W``, ``grad W += g.T @ hidden``, ``grad b += sum g``.

    The gradients are kept in float32 and cast to their inputs' dtypes only in backward, after the
    scaling by ``grad_output`` (a GradScaler's factor). A float16 head also takes ``g`` and both
    matmuls through the head in float32: ``g`` is divided by the token count, and float16 flushes
    what falls below ~6e-8 to zero (a rare token's ``(q - p) / 4096``) before the GradScaler's factor
    could lift it. bfloat16 has float32's exponent range and keeps ``g`` in its own dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, terms: _Terms):
        student, teacher = terms.student, terms.teacher
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        wants = want_hidden or want_weight or want_bias
        w, b = student.operands()
        tw, tb = teacher.operands() if teacher is not None else (None, None)
        grad_dtype = torch.float32 if w.dtype == torch.float16 else w.dtype
        back_weight = w.to(grad_dtype)  # the weight g goes back through
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        scale = torch.tensor(terms.scale, dtype=torch.float32, device=hidden.device)
        totals = {"divergence": 0.0, "ce": 0.0}
        n = student.n
        for block_start in range(0, hidden.shape[0], terms.block_size):
            block = slice(block_start, block_start + terms.block_size)
            h = hidden[block].detach()
            raw = student.logits(h, w, b).to(grad_dtype)
            teacher_logits = teacher.cap(teacher.logits(teacher_hidden[block], tw, tb)) if teacher is not None else None
            any_grad = False
            for start in range(0, raw.shape[0], terms.chunk_size):
                rows = slice(start, start + terms.chunk_size)
                leaf = raw[rows].detach().requires_grad_(wants)
                with torch.enable_grad() if wants else torch.no_grad():
                    logits = student.cap(leaf)
                    chunk_terms = []
                    row_weights = terms.weights[block][rows] if terms.weights is not None else None
                    if terms.divergence is not None:
                        values = terms.divergence(logits, teacher_logits[rows])
                        value = (values * row_weights).sum() if row_weights is not None else values.sum()
                        totals["divergence"] += float(value.detach())
                        chunk_terms.append(value)
                    if terms.ce_weight > 0:
                        ce = F.cross_entropy(
                            logits.float(),
                            terms.labels[block][rows],
                            reduction="none" if row_weights is not None else "sum",
                        )
                        if row_weights is not None:
                            ce = (ce * row_weights).sum()
                        totals["ce"] += float(ce.detach())
                        chunk_terms.append(terms.ce_weight * ce)
                    total = sum(chunk_terms)
                if wants and isinstance(total, torch.Tensor) and total.requires_grad:
                    (grad_raw,) = torch.autograd.grad(total, leaf, grad_outputs=scale)
                    raw[rows] = grad_raw  # the raw outputs of these rows are spent: their storage holds their gradient
                    any_grad = True
                else:  # a constant divergence: a zero gradient
                    raw[rows] = 0
            del teacher_logits
            if not any_grad:
                continue
            if want_hidden:
                grad_hidden[block] = raw @ back_weight
            if want_weight:
                if raw.dtype == torch.float32:
                    grad_weight[:n].addmm_(raw.t(), h.float())
                else:  # the matmul in the head's dtype (as autocast's backward), summed over blocks in float32
                    grad_weight[:n].add_(raw.t() @ h.to(w.dtype))
            if want_bias:
                grad_bias[:n].add_(raw.float().sum(0))
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        for key, value in totals.items():
            terms.parts[key] = value * terms.scale
        loss = totals["divergence"] + terms.ce_weight * totals["ce"]
        return torch.tensor(loss * terms.scale, dtype=torch.float32, device=hidden.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = take_scaled_grads(ctx, grad_output, "the fused head loss")
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)
        )
        return grad_hidden, grad_weight, grad_bias, None, None


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
    n_tokens: float | None = None,
    chunk_size: int | None = None,
    block_size: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``(divergence + ce_weight x cross-entropy)`` summed over the positions where ``mask`` is true,
    divided by ``n_tokens``, computed from the heads' inputs: the fused ``divergence_loss`` +
    ``token_cross_entropy``.

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
        by ``n_tokens``; ``ce`` unweighted).
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
    if mask is None:
        mask = torch.ones(positions, dtype=torch.bool, device=hidden.device)
    elif mask.shape != positions:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden positions {tuple(positions)}")
    index = mask.to(device=hidden.device, dtype=torch.bool).nonzero(as_tuple=True)
    count = index[0].numel()
    denominator = float(count if n_tokens is None else n_tokens)
    if count and not denominator > 0:
        raise ValueError(f"n_tokens must be > 0 when positions count, got {denominator}")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    parts: dict[str, float] = {}
    terms = _Terms(
        student,
        teacher if divergence is not None else None,
        None if divergence is None else ConfiguredDivergence.wrap(divergence),
        None if labels is None else labels[index],
        float(ce_weight),
        0.0 if count == 0 else 1.0 / denominator,
        *fused_sizes(student.n, chunk_size, block_size),
        parts,
        None if weights is None else weights.to(hidden.device)[index].float(),
    )
    rows = hidden[index]
    teacher_rows = teacher_hidden[index].detach() if divergence is not None else None
    weight, bias = student.weight, student.bias
    if not torch.is_grad_enabled():
        rows, weight, bias = rows.detach(), weight.detach(), None if bias is None else bias.detach()
    loss = _FusedHeadLoss.apply(rows, weight, bias, teacher_rows, terms)
    return loss, parts


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
    index = mask.to(device=hidden.device, dtype=torch.bool).nonzero(as_tuple=True)
    rows, targets = hidden[index], labels[index]
    teacher_rows = teacher_hidden[index] if teacher is not None else None
    w, b = student.operands()
    tw, tb = teacher.operands() if teacher is not None else (None, None)
    divergences = {name: ConfiguredDivergence.wrap(d) for name, d in divergences.items()} if teacher is not None else {}
    sums = {"ce": 0.0, **{name: 0.0 for name in divergences}}
    block_rows, chunk_rows = fused_sizes(student.n, chunk_size, block_size)
    for block_start in range(0, rows.shape[0], block_rows):
        block = slice(block_start, block_start + block_rows)
        logits = student.cap(student.logits(rows[block], w, b))
        teacher_logits = teacher.cap(teacher.logits(teacher_rows[block], tw, tb)) if divergences else None
        for start in range(0, logits.shape[0], chunk_rows):
            chunk = slice(start, start + chunk_rows)
            sums["ce"] += float(F.cross_entropy(logits[chunk].float(), targets[block][chunk], reduction="sum"))
            for name, divergence in divergences.items():
                sums[name] += float(divergence(logits[chunk], teacher_logits[chunk]).sum())
    return sums


# --- choosing the path at start


@dataclass
class FusedHeads:
    """The heads of a run that uses the fused path (``teacher`` None: cross-entropy only)."""

    student: Head
    teacher: Head | None
    unwrap: Callable

    def inputs(self, student, teacher, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, R, H]`` hidden states of the student (with its graph) and the teacher (without)."""
        hidden = head_input(student, batch, self.student, self.unwrap)
        if teacher is None or self.teacher is None:
            return hidden, None
        with torch.no_grad():
            teacher_hidden = head_input(teacher, batch, self.teacher, self.unwrap)
        return hidden, teacher_hidden

    def micro_batch_loss(
        self,
        student,
        teacher,
        batch,
        divergence,
        denominator: float,
        ce_weight: float = 0.0,
        *,
        kd_weight: float = 1.0,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``distill.objective.micro_batch_loss`` through the fused heads."""
        if teacher is None or kd_weight == 0:  # cross-entropy alone: the teacher is not run
            hidden, _ = self.inputs(student, None, batch)
            loss, parts = fused_loss(
                self.student,
                hidden,
                mask=batch.response_mask,
                labels=batch.labels,
                ce_weight=1.0,
                n_tokens=denominator,
                weights=weights,
            )
            return (loss if teacher is None else ce_weight * loss), {"ce": parts["ce"]}
        hidden, teacher_hidden = self.inputs(student, teacher, batch)
        # kd_weight x (divergence + ce_weight / kd_weight x cross-entropy): one pass over the heads
        loss, parts = fused_loss(
            self.student,
            hidden,
            self.teacher,
            teacher_hidden,
            divergence,
            batch.response_mask,
            batch.labels,
            ce_weight=ce_weight / kd_weight,
            n_tokens=denominator,
            weights=weights,
        )
        if kd_weight != 1.0:
            loss = kd_weight * loss
        return loss, {"divergence": parts["divergence"], **({"ce": parts["ce"]} if ce_weight > 0 else {})}


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
