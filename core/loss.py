"""The token math, once: masking, weights, the denominator and the chunk loop of every loss term.

A micro-batch's loss is ``(kd_weight x divergence + ce_weight x cross-entropy)`` summed over its
counted response positions (``mask``, each position times its ``weights``) and divided by
``n_tokens``. ``token_loss`` computes it without whole-vocabulary temporaries: the counted rows are
read a block at a time from a *row source* (``Rows``), and each block is cut into chunks of
``chunk_rows(V)`` rows that go through the divergence plugin and the cross-entropy. Each chunk's
gradient with respect to the student's logits is computed during the forward pass (a local backward
through the plugin) and handed to the row source, so autograd keeps nothing per chunk.

Row sources (the teacher's side is chosen once per run, ``distill.teacher``):

- ``LogitRows``: the rows of a ``[B, T, V]`` tensor (full logits; a teacher cache's packed top-K); a
  block is one chunk, and a gradient is written into one buffer of the tensor's shape;
- ``distill.fused.HeadRows``: a model's output head applied to its hidden states a block at a time
  (``train.fused_head``); a gradient goes through the head into the hidden states and the weight.

``divergence_loss``, ``token_cross_entropy`` and ``chunked_token_mean`` are this function with one
term; ``distill.fused.fused_loss`` and the teacher cache's coarse loss are it with other row sources.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from distill.divergence import ConfiguredDivergence, check_logits

CHUNK_ELEMENTS = 1 << 19
"""Elements per chunk (2 MiB in float32): the rows a divergence plugin sees at once. Plugins hold
about 15 chunk-sized temporaries at their peak (autograd's included), so this keeps the peak low;
it costs little speed (the head's matmuls run per block, not per chunk)."""


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab_size``: a float32 chunk of logits is about 2 MiB."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


default_chunk_size = chunk_rows


class Rows(Protocol):
    """The counted rows of one side of a micro-batch's loss, a block at a time."""

    width: int
    """V: the logits' (or packed targets') last dimension."""
    block_rows: int | None
    """Rows per block (None: one chunk per block)."""

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the counted rows, ``[b, width]``: a fresh tensor the caller may overwrite."""

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        """What the loss sees of a chunk of ``block`` rows (a head's soft-capping; else the rows)."""

    inputs: tuple
    """The tensors the loss is differentiable in (a gradient flows to those that require one)."""

    def want(self, flags: tuple[bool, ...]) -> None:
        """Which of ``inputs`` get a gradient (set when the loss starts)."""

    def add_grad(self, start: int, stop: int, grad: torch.Tensor) -> None:
        """The loss's gradient with respect to rows ``start:stop`` of ``block``."""

    def grads(self) -> list[torch.Tensor | None]:
        """The gradients of ``inputs``, float32 or their dtype; None where none."""


@dataclass
class LogitRows:
    """The rows of ``tensor [..., V]`` at ``index`` (the counted positions, in order): full logits,
    or a teacher cache's packed top-K targets."""

    tensor: torch.Tensor
    index: tuple[torch.Tensor, ...]
    block_rows: int | None = None
    grad: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.width = self.tensor.shape[-1]
        self.inputs = (self.tensor,)
        # float16 rows are read, and their gradient kept, in float32 until the GradScaler's factor has
        # been applied (backward): (q - p) / n_tokens of a rare token is below what float16 can hold
        self.compute_dtype = torch.float32 if self.tensor.dtype == torch.float16 else self.tensor.dtype

    def want(self, flags: tuple[bool, ...]) -> None:
        self.grad = (
            torch.zeros(self.tensor.shape, dtype=self.compute_dtype, device=self.tensor.device) if flags[0] else None
        )

    def _rows(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        return tuple(i[start:stop] for i in self.index)

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[self._rows(start, stop)].to(self.compute_dtype)

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def add_grad(self, start: int, stop: int, grad: torch.Tensor) -> None:
        self.grad.index_put_(self._rows(start, stop), grad)

    def grads(self) -> list[torch.Tensor | None]:
        return [self.grad]


@dataclass
class TokenTerms:
    """What ``token_loss`` sums per counted row: ``kd_weight x divergence(student, teacher)`` and
    ``ce_weight x cross-entropy(student, label)``; either may be absent."""

    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """``[c, V]`` student rows and ``[c, ...]`` teacher rows -> ``[c]`` values (a plugin, wrapped)."""
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    reported: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    """More divergences summed in the same pass without a gradient (evaluation's ``kl``), by name."""
    sequence: Any = None
    """A sequence-level term (``distill.sequence``): its ``surrogate`` of the student's log-probabilities
    of the sampled tokens, summed as ``sequence_weight x`` a term of its own (``sequence``)."""
    sequence_weight: float = 1.0

    def uses_teacher(self) -> bool:
        return (self.divergence is not None and self.kd_weight != 0) or bool(self.reported)


def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def counted(mask: torch.Tensor | None, positions: torch.Size, device) -> tuple[torch.Tensor, ...]:
    """The counted positions of ``mask`` (all of them when None), as an index tuple."""
    if mask is None:
        mask = torch.ones(positions, dtype=torch.bool, device=device)
    elif mask.shape != positions:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the positions {tuple(positions)}")
    return mask.to(device=device, dtype=torch.bool).nonzero(as_tuple=True)


def token_scale(count: int, n_tokens: int | float | torch.Tensor | None) -> float:
    """1 / the denominator (the counted positions by default); 0 when nothing counts."""
    denominator = count if n_tokens is None else n_tokens
    denominator = float(denominator.item() if isinstance(denominator, torch.Tensor) else denominator)
    if count and not denominator > 0:
        raise ValueError(f"n_tokens must be > 0 when positions count, got {denominator}")
    return 0.0 if count == 0 else 1.0 / denominator


def row_values(
    positions: torch.Size, index: tuple[torch.Tensor, ...], values: torch.Tensor | None, what: str, dtype=None
) -> torch.Tensor | None:
    """``values`` (``[B, T]`` like the mask) at the counted positions, ``[n]``; None stays None."""
    if values is None:
        return None
    if values.shape != positions:
        raise ValueError(f"{what} shape {tuple(values.shape)} does not match the positions {tuple(positions)}")
    values = values.detach().to(index[0].device)[index]
    return values if dtype is None else values.to(dtype)


@dataclass
class LossPlan:
    """One micro-batch's loss: the two sides' rows, the terms, the counted rows' labels and weights."""

    student: Any
    teacher: Any | None
    terms: TokenTerms
    count: int
    scale: float
    chunk_rows: int
    device: torch.device
    labels: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    rollout: Any = None
    """The sequence term's constants at the counted rows: ``(advantages, old log-probs, weights)``, ``[n]`` each."""
    parts: dict[str, float] = field(default_factory=dict)

    def sums(self, want_grad: bool, want_teacher_grad: bool = False) -> dict[str, torch.Tensor]:
        """Each term's sum over the counted rows (float32 tensors: ``divergence``, ``ce``, and the
        ``reported`` ones); with ``want_grad`` the student's (and ``want_teacher_grad``: the teacher's)
        gradients of ``scale x (kd_weight x divergence + ce_weight x ce)`` go to the row sources."""
        student, teacher, terms = self.student, self.teacher, self.terms
        trained = []  # (name, coefficient, fn): the terms with a gradient
        if terms.divergence is not None and terms.kd_weight != 0:
            trained.append(("divergence", terms.kd_weight, terms.divergence))
        if terms.ce_weight > 0:
            trained.append(("ce", terms.ce_weight, None))
        if terms.sequence is not None:
            trained.append(("sequence", terms.sequence_weight, terms.sequence))
        names = [name for name, _, _ in trained] + list(terms.reported)
        totals = {name: torch.zeros((), dtype=torch.float32, device=self.device) for name in names}
        scale = torch.tensor(self.scale, dtype=torch.float32, device=self.device)
        block_rows = student.block_rows or self.chunk_rows
        for block_start in range(0, self.count, block_rows):
            block_stop = min(block_start + block_rows, self.count)
            rows = student.block(block_start, block_stop)
            other = teacher.block(block_start, block_stop) if terms.uses_teacher() else None
            any_grad = False
            for start in range(0, rows.shape[0], self.chunk_rows):
                chunk = slice(start, start + self.chunk_rows)
                first = block_start + start
                leaf = rows[chunk].detach().requires_grad_(want_grad)
                other_leaf = other[chunk].detach().requires_grad_(want_teacher_grad) if other is not None else None
                n = leaf.shape[0]
                weights = self.weights[first : first + n] if self.weights is not None else None
                with torch.enable_grad() if want_grad or want_teacher_grad else nullcontext():
                    logits = student.transform(leaf)
                    values = {}
                    for name, _, fn in trained:
                        if name == "ce":
                            row = cross_entropy_rows(logits, self.labels[first : first + n])
                        elif name == "sequence":  # of the log-probabilities of the sampled tokens
                            logq = -cross_entropy_rows(logits, self.labels[first : first + n])
                            row = fn.surrogate(logq, *(x[first : first + n] for x in self.rollout))
                        else:
                            row = fn(logits, other_leaf)
                        values[name] = row.sum() if weights is None else (row * weights).sum()
                    total = sum(coefficient * values[name] for name, coefficient, _ in trained)
                with torch.no_grad():
                    for name, fn in terms.reported.items():
                        row = fn(logits.detach(), other_leaf.detach())
                        values[name] = row.sum() if weights is None else (row * weights).sum()
                for name, value in values.items():
                    totals[name] += value.detach()
                leaves = [x for x, want in ((leaf, want_grad), (other_leaf, want_teacher_grad)) if want]
                if leaves and isinstance(total, torch.Tensor) and total.requires_grad:
                    found = torch.autograd.grad(total, leaves, grad_outputs=scale, allow_unused=True)
                    if want_grad:  # a chunk's rows are spent: their storage holds their gradient
                        rows[chunk] = found[0] if found[0] is not None else 0
                        any_grad = True
                    if want_teacher_grad:
                        other[chunk] = found[-1] if found[-1] is not None else 0
                elif want_grad:  # a constant divergence: a zero gradient
                    rows[chunk] = 0
            if want_grad and any_grad:
                student.add_grad(block_start, block_stop, rows)
            if want_teacher_grad:
                teacher.add_grad(block_start, block_stop, other)
        return totals


class _TokenLoss(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients (``LossPlan.sums``); backward
    only scales them by ``grad_output`` (a GradScaler's factor) and casts them to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, plan: LossPlan, *inputs):
        n_student = len(plan.student.inputs)
        flags = ctx.needs_input_grad[1:]
        want_grad, want_teacher_grad = any(flags[:n_student]), any(flags[n_student:])
        plan.student.want(flags[:n_student])
        if want_teacher_grad:
            plan.teacher.want(flags[n_student:])
        totals = plan.sums(want_grad, want_teacher_grad)
        values = torch.stack(list(totals.values())).tolist() if totals else []  # one device sync
        plan.parts.update({name: value * plan.scale for name, value in zip(totals, values)})
        ctx.n_inputs = len(inputs)
        ctx.grads = [*plan.student.grads(), *(plan.teacher.grads() if want_teacher_grad else [])]
        ctx.dtypes = [None if x is None else x.dtype for x in inputs]
        terms, loss = plan.terms, torch.zeros((), dtype=torch.float32, device=plan.device)
        if "divergence" in totals:
            divergence = totals["divergence"]
            loss = loss + (divergence if terms.kd_weight == 1.0 else terms.kd_weight * divergence)
        if "ce" in totals:
            loss = loss + terms.ce_weight * totals["ce"]
        if "sequence" in totals:
            loss = loss + terms.sequence_weight * totals["sequence"]
        return loss * plan.scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = take_scaled_grads(ctx, grad_output, "the token loss")
        grads += [None] * (ctx.n_inputs - len(grads))
        cast = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (None, *cast)


def take_scaled_grads(ctx, grad_output: torch.Tensor, what: str) -> list:
    """The gradients a forward computed and kept in ``ctx.grads``, times ``grad_output`` (in place),
    handed over once: a second backward (``retain_graph``) is an error naming ``what``."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(f"{what} supports one backward pass (retain_graph is not supported)")
    if not (grad_output == 1).all():
        grads = [g.mul_(grad_output) if g is not None else None for g in grads]
    return list(grads)


def token_loss(
    student,
    teacher,
    terms: TokenTerms,
    index: tuple[torch.Tensor, ...],
    *,
    n_tokens: int | float | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    rollout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The one micro-batch loss: ``(kd_weight x divergence + ce_weight x cross-entropy + sequence_weight
    x sequence term)`` summed over the counted rows (``index``; ``labels``, ``weights`` and the sequence
    term's ``rollout`` constants already at those rows, ``[n]``) over ``n_tokens``, from two row sources.
    Returns the float32 scalar and its parts (each term's sum over ``n_tokens``, unweighted by its
    coefficient)."""
    count = index[0].numel()
    if (terms.ce_weight > 0 or terms.sequence is not None) and labels is None:
        raise ValueError("the cross-entropy and a sequence term need labels")
    if terms.sequence is not None and rollout is None:
        raise ValueError("a sequence term needs the rollout's advantages, old log-probs and weights")
    size = chunk_size if chunk_size is not None else chunk_rows(student.width)
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {size}")
    plan = LossPlan(
        student,
        teacher,
        terms,
        count,
        token_scale(count, n_tokens),
        int(size),
        index[0].device,
        labels,
        weights,
        rollout,
    )
    inputs = list(student.inputs)
    if teacher is not None and getattr(teacher, "inputs", None):
        inputs += list(teacher.inputs)
    if not torch.is_grad_enabled():  # e.g. evaluation: no graph, so no gradient buffers or local backward
        inputs = [x if x is None else x.detach() for x in inputs]
    loss = _TokenLoss.apply(plan, *inputs)
    return loss, plan.parts


def chunked_token_mean(
    fn,
    logits: torch.Tensor,
    other: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    n_tokens: int | float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum over masked positions of weight x fn(logits rows [c, V], other rows) / n_tokens``, chunk
    by chunk: ``token_loss`` with one term (``other``: the teacher's logits, or a cache's packed rows)."""
    positions = logits.shape[:-1]
    index = counted(mask, positions, logits.device)
    loss, _ = token_loss(
        LogitRows(logits, index),
        LogitRows(other, index),
        TokenTerms(divergence=fn),
        index,
        n_tokens=n_tokens,
        weights=row_values(positions, index, weights, "weights", torch.float32),
        chunk_size=chunk_size,
    )
    return loss


def divergence_loss(
    divergence,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    n_tokens: int | float | torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-token divergence over the positions where ``mask`` is true.

    Args:
        divergence: from ``distill.get_divergence`` (its temperature is applied here), or a bare
            plugin instance (temperature 1).
        student_logits: ``[B, T, V]`` or ``[N, V]``, any float dtype; the gradient flows to it.
        teacher_logits: same shape; treated like any input (a gradient flows only if it requires one).
        mask: ``[B, T]`` or ``[N]`` booleans, true where a position counts; ``None`` = all positions.
        chunk_size: rows per chunk; default ``chunk_rows(V)``.
        n_tokens: the denominator. Default: the number of counted positions. Pass the global count of
            response tokens of an optimizer step (all micro-batches, all processes) so that summing
            the micro-batch losses gives the global mean.
        weights: ``[B, T]`` or ``[N]`` floats, each counted position's weight (default 1); e.g.
            ``1 / length`` of its sequence with ``n_tokens`` = the number of sequences gives the mean
            over sequences of each sequence's token mean (``train.normalize: sequence``).

    Returns:
        A float32 scalar: sum of (weighted) per-token values over counted positions / ``n_tokens``.
        0 (with a zero gradient) when no position counts.
    """
    divergence = ConfiguredDivergence.wrap(divergence)
    check_logits(student_logits, teacher_logits)
    return chunked_token_mean(
        divergence, student_logits, teacher_logits, mask, chunk_size=chunk_size, n_tokens=n_tokens, weights=weights
    )


def token_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_tokens: float | None = None,
    chunk_size: int | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` summed where ``mask`` (times
    ``weights [B, T]`` if given) / ``n_tokens``; chunked like ``divergence_loss`` (``token_loss``)."""
    positions = logits.shape[:-1]
    index = counted(mask, positions, logits.device)
    loss, _ = token_loss(
        LogitRows(logits, index),
        None,
        TokenTerms(ce_weight=1.0),
        index,
        n_tokens=n_tokens,
        labels=row_values(positions, index, labels, "labels"),
        weights=row_values(positions, index, weights, "weights", torch.float32),
        chunk_size=chunk_size,
    )
    return loss


__all__ = [
    "CHUNK_ELEMENTS",
    "LogitRows",
    "TokenTerms",
    "chunk_rows",
    "chunked_token_mean",
    "counted",
    "default_chunk_size",
    "divergence_loss",
    "token_cross_entropy",
    "token_loss",
]
