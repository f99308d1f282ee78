"""The one helper that owns masking, temperature, chunking over tokens and the token mean.

Every divergence goes through ``divergence_loss``. It never materialises whole-vocabulary
temporaries: tokens are processed in chunks of ``chunk_size`` rows, and each chunk's gradient with
respect to the student logits is computed during the forward pass (a local backward through the
plugin) and written into one gradient buffer. Autograd therefore keeps nothing per chunk, and the
peak extra memory is that buffer plus a few chunk-sized temporaries.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from distill.divergence import ConfiguredDivergence, check_logits

CHUNK_ELEMENTS = 1 << 21
"""Elements per chunk-sized temporary (8 MiB in float32); the default chunk is CHUNK_ELEMENTS // V rows."""


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk for a vocabulary of ``vocab_size``: a float32 chunk of logits is about 8 MiB."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


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
        chunk_size: rows per chunk; default ``default_chunk_size(V)``.
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
    """``sum over masked positions of weight x fn(logits rows [c, V], other rows) / n_tokens``, chunk by chunk.

    The masking, chunking and reduction behind ``divergence_loss`` (``other`` = teacher logits) and
    the token cross-entropy (``other`` = labels ``[B, T]``); see ``divergence_loss`` for the arguments.
    """
    positions = logits.shape[:-1]
    if mask is None:
        mask = torch.ones(positions, dtype=torch.bool, device=logits.device)
    elif mask.shape != positions:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits positions {tuple(positions)}")
    index = mask.to(device=logits.device, dtype=torch.bool).nonzero(as_tuple=True)
    count = index[0].numel()
    denominator = count if n_tokens is None else n_tokens
    denominator = float(denominator.item() if isinstance(denominator, torch.Tensor) else denominator)
    if chunk_size is None:
        chunk_size = default_chunk_size(logits.shape[-1])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if count and not denominator > 0:
        raise ValueError(f"n_tokens must be > 0 when positions count, got {denominator}")
    scale = 0.0 if count == 0 else 1.0 / denominator
    if weights is not None:
        if weights.shape != positions:
            raise ValueError(f"weights shape {tuple(weights.shape)} does not match logits positions {tuple(positions)}")
        weights = weights.detach().to(device=logits.device, dtype=torch.float32)[index]
    if not torch.is_grad_enabled():  # e.g. evaluation: no graph, so no gradient buffer or local backward
        logits, other = logits.detach(), other.detach()
    return _ChunkedDivergenceLoss.apply(logits, other, fn, index, int(chunk_size), scale, weights)


class _ChunkedDivergenceLoss(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx, student, teacher, divergence, index, chunk_size, scale, weights=None):
        wants = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grads = [torch.zeros_like(x) if want else None for x, want in zip((student, teacher), wants)]
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        weight = torch.tensor(scale, dtype=torch.float32, device=student.device)
        count = index[0].numel()
        for start in range(0, count, chunk_size):
            rows = tuple(i[start : start + chunk_size] for i in index)
            inputs = [x[rows].requires_grad_(want) for x, want in zip((student, teacher), wants)]
            with torch.enable_grad() if any(wants) else nullcontext():
                values = divergence(*inputs)
                chunk_total = (values if weights is None else values * weights[start : start + chunk_size]).sum()
            if any(wants) and chunk_total.requires_grad:  # a constant divergence leaves zeros
                leaves = [x for x, want in zip(inputs, wants) if want]
                chunk_grads = torch.autograd.grad(chunk_total, leaves, grad_outputs=weight, allow_unused=True)
                for grad, chunk_grad in zip((g for g in grads if g is not None), chunk_grads):
                    if chunk_grad is not None:
                        grad.index_put_(rows, chunk_grad)
            total += chunk_total.detach()
        ctx.grads = grads  # zeros when no position counts: a real zero gradient, never None
        return total * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        grads = take_scaled_grads(ctx, grad_output, "divergence_loss")
        return grads[0], grads[1], None, None, None, None, None


def take_scaled_grads(ctx, grad_output: torch.Tensor, what: str) -> list:
    """The gradients a forward computed and kept in ``ctx.grads``, times ``grad_output`` (in place),
    handed over once: a second backward (``retain_graph``) is an error naming ``what``."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError(f"{what} supports one backward pass (retain_graph is not supported)")
    if not (grad_output == 1).all():
        grads = [g.mul_(grad_output) if g is not None else None for g in grads]
    return list(grads)
