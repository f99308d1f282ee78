"""The six built-in divergences. p = teacher, q = student, per position, over the vocabulary.

Inputs arrive as float32 logits with the temperature applied and -inf raised to a finite floor
(``distill.divergence.prepare_logits``); each returns ``[N]`` true divergence values (0 when p = q).
Mixtures are formed in log space with ``logaddexp`` so nothing underflows.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

import distill


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row from log-probabilities ``[N, V]`` -> ``[N]``, clamped at 0 (rounding)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1).clamp_min(0.0)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log-probabilities, for 0 < w < 1."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


class _NoParams(distill.Params):
    pass


class ForwardKL:
    """KL(p || q): mean-seeking; the classic KD loss (Hinton et al.)."""

    name = "kl"
    aliases = ("fkl",)
    Params = _NoParams

    def __init__(self, params: _NoParams) -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return _kl(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1))


class ReverseKL:
    """KL(q || p): mode-seeking; the objective MiniLLM optimises."""

    name = "rkl"
    aliases = ()
    Params = _NoParams

    def __init__(self, params: _NoParams) -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return _kl(student_logits.log_softmax(-1), teacher_logits.log_softmax(-1))


class JSD:
    """Generalised Jensen-Shannon: beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q (GKD).

    beta lies strictly between 0 and 1: at either end the value is identically 0. For the limits
    people usually mean, pick ``kl`` (TRL's beta=0) or ``rkl`` (TRL's beta=1) explicitly.
    DistiLLM's code hard-codes lambda=0.9, which is beta=0.1 here.
    """

    name = "jsd"
    aliases = ()

    class Params(distill.Params):
        beta: float = Field(
            0.5,
            gt=0.0,
            lt=1.0,
            description="teacher weight in the mixture m; 0 and 1 are refused (use kl or rkl)",
        )

    def __init__(self, params: "JSD.Params") -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        beta = self.params.beta
        log_p, log_q = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


class TVD:
    """Total variation distance: 1/2 * sum |p - q|, in [0, 1]."""

    name = "tvd"
    aliases = ()
    Params = _NoParams

    def __init__(self, params: _NoParams) -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return 0.5 * (teacher_logits.softmax(-1) - student_logits.softmax(-1)).abs().sum(-1)


class _SkewParams(distill.Params):
    alpha: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="share of the first distribution in the mixture; 0 = plain KL, 1 = always 0",
    )


def _skew(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """KL(a || alpha*a + (1-alpha)*b) from log-probabilities."""
    if alpha >= 1.0:  # identically 0; stays in the graph of both inputs so backward() gives zero gradients
        return 0.0 * (log_a.exp() + log_b.exp()).sum(-1)
    if alpha <= 0.0:
        return _kl(log_a, log_b)
    return _kl(log_a, _log_mix(log_a, log_b, alpha))


class SkewKL:
    """Skew KL (DistiLLM): KL(p || alpha*p + (1-alpha)*q), bounded by -log(alpha)."""

    name = "skew_kl"
    aliases = ("skl", "sfkl")
    Params = _SkewParams

    def __init__(self, params: _SkewParams) -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return _skew(teacher_logits.log_softmax(-1), student_logits.log_softmax(-1), self.params.alpha)


class SkewReverseKL:
    """Skew reverse KL (DistiLLM): KL(q || alpha*q + (1-alpha)*p), bounded by -log(alpha).

    ``detach_mixture`` (DistiLLM-2): the q inside the mixture carries no gradient, so the student
    learns only through the outer q: sum q (log q - log(alpha*sg(q) + (1-alpha)*p)). Same values.
    """

    name = "skew_rkl"
    aliases = ("srkl",)

    class Params(_SkewParams):
        detach_mixture: bool = Field(
            False,
            description="no gradient through the student's share of the mixture (DistiLLM-2); values unchanged",
        )

    def __init__(self, params: "SkewReverseKL.Params") -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
        alpha = self.params.alpha
        if not self.params.detach_mixture or alpha <= 0.0 or alpha >= 1.0:  # no student share to detach
            return _skew(log_q, log_p, alpha)
        return _kl(log_q, _log_mix(log_q.detach(), log_p, alpha))


@distill.hookimpl
def register_divergences(register) -> None:
    for divergence in (ForwardKL, ReverseKL, JSD, TVD, SkewKL, SkewReverseKL):
        register(divergence)
