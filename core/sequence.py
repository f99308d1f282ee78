"""Sequence-level terms: plugins whose loss is over whole sampled responses, not per-token distributions.

A divergence sees each position's two next-token distributions. A policy-gradient term (MiniLLM's
long-term term) needs more: per response, the log-probabilities of the sampled tokens under the
teacher and under the student that sampled them, the importance weight of each token when the
samples came from a mixture, and where each response ends. A ``SequenceTerm`` plugin gets these as a
``Rollout`` and answers in two parts, so that the core keeps the chunk loop, the masking and the
normalisation (``distill.loss.token_loss``):

- ``advantages(rollout) -> [B, R]``: a constant per sampled token (no gradient), computed over whole
  responses (returns, discounting, whitening: whatever the method does);
- ``surrogate(logq, advantages, old, weights) -> [c]``: per-token values from the student's current
  log-probabilities of the sampled tokens ``logq [c]`` (with their graph) and the rollout's constants
  at the same tokens; the gradient of their sum is the term's estimator.

The core sums ``surrogate`` over the counted response tokens with the term's weight and divides by
the group's token count, like every other term. Plugins register through
``register_sequence_terms(register)`` and are named in ``objective.terms.<source>.sequence``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """The sampling record of a micro-batch's responses, ``[B, R]`` each, aligned with ``Batch.response_mask``."""

    teacher_logprobs: torch.Tensor
    """log p(y_t) of each sampled token under the teacher."""
    old_logprobs: torch.Tensor
    """log q_old(y_t) under the student that sampled it (at collection time)."""
    weights: torch.Tensor
    """q_old(y_t) / p̃(y_t): the importance weight of a token sampled from a mixture p̃ (1 when the
    student sampled alone)."""
    mask: torch.Tensor
    """True at response tokens (EOS included)."""

    def at(self, index: tuple[torch.Tensor, ...]) -> "Rollout":
        """The rollout's values at the counted positions ``index`` (``[n]`` each)."""
        return Rollout(*(t[index] for t in (self.teacher_logprobs, self.old_logprobs, self.weights, self.mask)))


__all__ = ["Rollout"]
