"""The training objective of one micro-batch, and the one place the token normalisation lives.

Every loss term of a step is ``sum over counted tokens / denominator`` where the denominator comes
from ``loss_denominator``: the global number of response tokens of the optimizer step (all
micro-batches, all processes) divided by the number of processes, because data-parallel backends
average gradients over processes. Summing the micro-batch gradients then gives exactly the gradient
of the mean over every response token of the global batch.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from distill.data import Batch
from distill.loss import chunked_token_mean, divergence_loss
from distill.models import contiguous_head_input


def loss_denominator(local_counts: list[int], accelerator=None) -> float:
    """Global token count of an optimizer step divided by the number of processes.

    ``local_counts``: response tokens of each of this process's micro-batches. Accelerate's own
    ``backward`` divides by ``gradient_accumulation_steps``; the engine keeps that at 1 and
    accumulates by hand, so this is the only normalisation.
    """
    local = float(sum(local_counts))
    if accelerator is None or accelerator.num_processes == 1:
        return max(local, 1.0)
    total = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")
    return max(float(total), 1.0) / accelerator.num_processes


def _cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, n_tokens: float | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]`` summed where ``mask`` / ``n_tokens``.

    Chunked like ``divergence_loss`` (the same autograd function), so no whole-vocabulary
    log-softmax is kept.
    """
    return chunked_token_mean(_cross_entropy_rows, logits, labels, mask, chunk_size=chunk_size, n_tokens=n_tokens)


_KEEPS_LOGITS: dict[type, bool] = {}


def response_logits(model, batch: Batch, unwrap=lambda m: m) -> torch.Tensor:
    """Logits predicting each response token: ``[B, R, V]``.

    Responses sit at the same offset in every row, so only the last R + 1 positions are projected
    onto the vocabulary where the model supports ``logits_to_keep``.
    """
    r = batch.response_mask.shape[1]
    inner = unwrap(model)
    contiguous_head_input(inner)
    inner = type(inner.get_base_model() if hasattr(inner, "get_base_model") else inner)  # peft passes the argument on
    if inner not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[inner] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    extra = {"logits_to_keep": r + 1} if _KEEPS_LOGITS[inner] else {}
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids, use_cache=False, **extra)
    return out.logits[:, -(r + 1):-1]


def micro_batch_loss(student, teacher, batch: Batch, divergence, denominator: float, ce_weight: float = 0.0, unwrap=lambda m: m,
                     fused=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Divergence (+ ``ce_weight`` x student cross-entropy) on the response tokens of one micro-batch.
    Without a teacher (sequence-level KD across tokenizers: no logits in common), the student's
    cross-entropy alone. ``fused``: a ``distill.fused.FusedHeads`` (``train.fused_head``): the same
    loss with the heads fused into it, so no ``[B, R, V]`` logits are held."""
    if fused is not None:
        return fused.micro_batch_loss(student, teacher, batch, divergence, denominator, ce_weight)
    if teacher is None:
        ce = token_cross_entropy(response_logits(student, batch, unwrap), batch.labels, batch.response_mask, n_tokens=denominator)
        return ce, {"ce": float(ce.detach())}
    with torch.no_grad():
        teacher_logits = response_logits(teacher, batch, unwrap)
    student_logits = response_logits(student, batch, unwrap)
    loss = divergence_loss(divergence, student_logits, teacher_logits, batch.response_mask, n_tokens=denominator)
    parts = {"divergence": float(loss.detach())}
    if ce_weight > 0:
        ce = token_cross_entropy(student_logits, batch.labels, batch.response_mask, n_tokens=denominator)
        parts["ce"] = float(ce.detach())
        loss = loss + ce_weight * ce
    return loss, parts
