"""Sequence-level terms (MiniLLM's long-term policy gradient) through the one loss path.

The proof: on a tiny autoregressive model (3 tokens, EOS among them, responses of at most 3 tokens)
every response can be enumerated, so expectations are sums. With the student sampling alone and every
option that biases the estimator off, the expected gradient of (token-level reverse KL + the long-term
term) is exactly the gradient of the sequence-level reverse KL KL(q(y) ‖ p(y)). With teacher-mixed
sampling (alpha 0.2) and length normalisation it is not, by design; there the implementation equals an
independent float64 computation of the same formulas, and how far each departs is reported."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import distill
from distill.loss import LogitRows, TokenTerms, token_loss
from distill.registry import default_registry
from distill.sequence import Rollout

V, EOS, MAX_LEN = 3, 2, 3
PREFIXES = [()] + [p for n in (1, 2) for p in itertools.product((0, 1), repeat=n)]
"""Every prefix a response can continue from (EOS ends a response)."""
UNBIASED = dict(
    gamma=1.0,
    length_norm=False,
    reward_scaling=None,
    reward_clip=None,
    whiten=False,
    ratio_clip=None,
    include_current=False,
)


def responses() -> list[tuple[int, ...]]:
    """Every response: ending on EOS, or cut at MAX_LEN tokens."""
    found = []
    for n in range(1, MAX_LEN + 1):
        for body in itertools.product((0, 1), repeat=n - 1):
            found.append((*body, EOS))
            if n == MAX_LEN:
                found += [(*body, t) for t in (0, 1)]
    return found


def rows(table: torch.Tensor, y: tuple[int, ...]) -> torch.Tensor:
    """``[len(y), V]`` logits predicting each token of ``y`` from its prefix."""
    return table[[PREFIXES.index(tuple(y[:t])) for t in range(len(y))]]


def token_logprobs(table: torch.Tensor, y: tuple[int, ...]) -> torch.Tensor:
    return rows(table, y).log_softmax(-1)[torch.arange(len(y)), list(y)]


@pytest.fixture(scope="module")
def tables() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(len(PREFIXES), V, generator=generator, dtype=torch.float64)
    teacher = torch.randn(len(PREFIXES), V, generator=generator, dtype=torch.float64) * 1.5
    return student, teacher


def exact_gradient(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The gradient of KL(q(y) ‖ p(y)) over whole responses, every response enumerated (float64)."""
    theta = student.clone().requires_grad_(True)
    kl = sum(
        token_logprobs(theta, y).sum().exp() * (token_logprobs(theta, y).sum() - token_logprobs(teacher, y).sum())
        for y in responses()
    )
    (grad,) = torch.autograd.grad(kl, theta)
    return grad


def sampling_logprobs(student, teacher, y, alpha: float) -> torch.Tensor:
    """log p̃(y_t) of each token under the mixture alpha p + (1 - alpha) q."""
    mixed = alpha * rows(teacher, y).softmax(-1) + (1 - alpha) * rows(student, y).softmax(-1)
    return mixed[torch.arange(len(y)), list(y)].log()


def expected_gradient(student, teacher, term, alpha: float) -> torch.Tensor:
    """Our estimator through ``token_loss`` (float32: token-level reverse KL + the sequence term, each
    response a micro-batch, sums), its gradient weighted by each response's probability of being sampled."""
    rkl = distill.get_divergence("rkl")
    total = torch.zeros_like(student)
    for y in responses():
        sampled = sampling_logprobs(student, teacher, y, alpha)
        old, teacher_lp = token_logprobs(student, y), token_logprobs(teacher, y)
        rollout = Rollout(
            teacher_lp.float()[None],
            old.float()[None],
            (old - sampled).exp().float()[None],  # w = q / p̃
            torch.ones(1, len(y), dtype=torch.bool),
        )
        advantages = term.advantages(rollout)[0]
        theta = student.float().clone().requires_grad_(True)
        index = (torch.arange(len(y)),)
        loss, _ = token_loss(
            LogitRows(rows(theta, y), index),
            LogitRows(rows(teacher.float(), y), index),
            TokenTerms(rkl, sequence=term),
            index,
            n_tokens=1.0,
            labels=torch.tensor(y),
            rollout=(advantages, rollout.old_logprobs[0], rollout.weights[0]),
        )
        (grad,) = torch.autograd.grad(loss, theta)
        total += sampled.sum().exp() * grad.double()
    return total


def reference_gradient(student, teacher, alpha: float, gamma: float = 1.0) -> torch.Tensor:
    """An independent float64 computation of the same formulas: E_{y ~ p̃} of, at each position t, the
    gradient of KL(q_t ‖ p_t) at the sampled prefix, plus -w_t x R_{t+1} x grad log q(y_t), with R_{t+1} the
    mean of the discounted rewards log p - log q after t and w_t = q(y_t) / p̃(y_t)."""
    theta = student.clone().requires_grad_(True)
    total = 0.0
    for y in responses():
        with torch.no_grad():
            sampled = sampling_logprobs(student, teacher, y, alpha)
            reward = token_logprobs(teacher, y) - token_logprobs(student, y)
            w = (token_logprobs(student, y) - sampled).exp()
            after = []
            for t in range(len(y)):
                later = [gamma ** (k - t - 1) * float(reward[k]) for k in range(t + 1, len(y))]
                after.append(sum(later) / max(len(later), 1))
        q, p = rows(theta, y).log_softmax(-1), rows(teacher, y).log_softmax(-1)
        single = (q.exp() * (q - p)).sum()
        long_term = -(w * torch.tensor(after, dtype=torch.float64) * token_logprobs(theta, y)).sum()
        total = total + sampled.sum().exp() * (single + long_term)
    (grad,) = torch.autograd.grad(total, theta)
    return grad


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_response_is_enumerated(tables):
    student, _ = tables
    assert len(responses()) == 15
    assert float(sum(token_logprobs(student, y).sum().exp() for y in responses())) == pytest.approx(1.0, abs=1e-12)


def test_student_sampling_without_biasing_options_is_the_exact_sequence_level_gradient(tables):
    student, teacher = tables
    term = default_registry().get_sequence_term("minillm_pg", **UNBIASED)
    ours, exact = expected_gradient(student, teacher, term, alpha=0.0), exact_gradient(student, teacher)
    assert relative(ours, exact) < 1e-5, (ours, exact)


def test_the_long_term_term_is_needed_for_the_exact_gradient(tables):
    # the token-level reverse KL alone (what the project shipped as minillm before) is not it
    student, teacher = tables
    term = default_registry().get_sequence_term("minillm_pg", **UNBIASED)
    no_long_term = type(term)(term.params)
    no_long_term.advantages = lambda rollout: torch.zeros_like(rollout.old_logprobs)
    assert relative(expected_gradient(student, teacher, no_long_term, 0.0), exact_gradient(student, teacher)) > 0.05


def test_teacher_mixed_sampling_with_length_normalisation_equals_an_independent_computation(tables, capsys):
    student, teacher = tables
    params = {**UNBIASED, "length_norm": True}
    term = default_registry().get_sequence_term("minillm_pg", **params)
    ours = expected_gradient(student, teacher, term, alpha=0.2)
    reference = reference_gradient(student, teacher, alpha=0.2)
    exact = exact_gradient(student, teacher)
    assert relative(ours, reference) < 1e-5
    with capsys.disabled():
        print(
            f"\n  alpha 0.2, length-normalised: ours departs from the exact gradient by {relative(ours, exact):.3f} "
            f"(relative norm), the float64 reference by {relative(reference, exact):.3f}"
        )
    assert relative(ours, exact) > 1e-3  # biased by design, and the test would see it


def test_one_batch_with_the_official_settings_equals_a_float64_recomputation():
    term = default_registry().get_sequence_term("minillm_pg")  # gamma .95, /0.5, clip 100, whiten, ratio clip .2
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 3, 1]
    mask = torch.tensor([[t < n for t in range(5)] for n in lengths])
    teacher = -torch.rand(3, 5, generator=generator, dtype=torch.float64) * 4
    old = -torch.rand(3, 5, generator=generator, dtype=torch.float64) * 4
    teacher[0, 0] = -400.0  # a reward past the clip: (-400 - old) / 0.5 < -100
    w = 0.5 + torch.rand(3, 5, generator=generator, dtype=torch.float64)
    now = old + 0.4 * torch.randn(3, 5, generator=generator, dtype=torch.float64)  # some ratios leave 1 ± 0.2
    rollout = Rollout(teacher.float(), old.float(), w.float(), mask)
    ours_adv = term.advantages(rollout)
    ours_loss = term.surrogate(now.float(), ours_adv, old.float(), w.float())

    expected_adv = torch.zeros(3, 5, dtype=torch.float64)
    for b, n in enumerate(lengths):
        rewards = [min(max((float(teacher[b, t]) - float(old[b, t])) / 0.5, -100.0), 100.0) for t in range(n)]
        running = 0.0
        for t in reversed(range(n)):
            running = rewards[t] + 0.95 * running
            expected_adv[b, t] = running / (n - t)
    values = expected_adv[mask]
    whitened = (expected_adv - values.mean()) / math.sqrt(float(((values - values.mean()) ** 2).mean()) + 1e-8)
    expected_adv = torch.where(mask, whitened, 0.0)
    ratio = (now - old).exp() * w
    expected_loss = torch.max(-expected_adv * ratio, -expected_adv * ratio.clamp(0.8, 1.2))

    assert torch.allclose(ours_adv.double()[mask], expected_adv[mask], rtol=1e-5, atol=1e-5)
    assert torch.allclose(ours_loss.double()[mask], expected_loss[mask], rtol=1e-5, atol=1e-5)
    clipped = ((ratio < 0.8) | (ratio > 1.2))[mask]
    assert clipped.any() and (~clipped).any()  # both sides of the ratio clip are exercised
    assert float(term.rewards(rollout)[0, 0]) == -100.0


def test_a_sequence_term_is_registered_like_any_plugin():
    registry = default_registry()
    assert "minillm_pg" in registry.names("sequence_term")
    with pytest.raises(distill.ConfigError, match="gamma"):
        registry.get_sequence_term("minillm_pg", gamma=1.5)
    with pytest.raises(distill.ConfigError):
        registry.get_sequence_term("minillm_pg", discount=0.9)  # unknown keys are refused
