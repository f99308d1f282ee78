"""Built-in sequence-level terms: MiniLLM's long-term policy-gradient term.

MiniLLM (Gu et al., ICLR 2024; official code ``microsoft/LMOps``, ``minillm/``, read at commit
4f2a9deb5f08e459fd44c2e4792344d78ca89fc3) minimises the reverse KL of whole responses,
KL(q_θ(y|x) ‖ p(y|x)), by policy gradient. Its gradient splits (single-step decomposition) into the
token-level reverse KL at every sampled prefix, a divergence computed exactly over the vocabulary
(``rkl``, the term's divergence), and a long-term term over the sampled tokens, this plugin:

    -Σ_t A_t · w_t · ∇ log q_θ(y_t)

with the per-token reward r_t = log p(y_t) − log q(y_t) of the sampled tokens, the return A_t built
from the rewards from t on, and w_t = q(y_t) / p̃(y_t) the importance weight of teacher-mixed sampling
(``teacher_mixed``; 1 when the student samples alone). As the official code runs it:

- rewards are (log p − log q) divided by ``reward_scaling`` (0.5: the rewards double) and clipped at
  ± ``reward_clip`` (100): ``minillm/sampler.py:122-131``; script ``scripts/gpt2/minillm/train_base_xl.sh``
  lines 78-79 (defaults ``arguments.py:151-152``);
- the return at t is the discounted sum of the rewards from t on, r_t included (γ = 0.95,
  ``losses.py:43-46``, ``arguments.py:158``), divided by the number of response tokens from t on
  (``losses.py:39-41, 49``: always, whatever ``--length-norm`` says), then whitened (``losses.py:53-54``,
  ``utils.py:87-97``);
- the surrogate is PPO's clipped one on the ratio q_θ / q_old times w (w multiplies the ratio before the
  clip, ``losses.py:72-74, 88-94``; clip 0.2, ``arguments.py:156``), averaged over response tokens.

Every option can be switched off (``gamma: 1``, ``length_norm: false``, ``reward_scaling: null``,
``reward_clip: null``, ``whiten: false``, ``ratio_clip: null``), and ``include_current: false`` takes the
paper's R_{t+1} (the rewards after t) instead of the code's return from t: with all of them off and the
student sampling alone, the estimator's expectation is exactly the gradient of the sequence-level
reverse KL (``tests/test_sequence_terms.py`` proves it by enumerating every response of a tiny model).
With ``include_current`` (the code's return, r_t included) beside the single-step term, the current
token's log-ratio is counted twice in expectation: on that test's model the expected gradient then
departs from the exact one by 0.73 (relative norm); the recipe follows the code all the same.
Where this differs from the official code: the code whitens over its whole padded ``[B, T]`` tensor,
padding included (``utils.py:87-97``), so its statistics depend on its padding to ``max_length``; here
whitening is over the response tokens of the micro-batch.
"""

from __future__ import annotations

import torch
from pydantic import Field

import distill
from distill.sequence import Rollout


class MiniLLMLongTerm:
    """MiniLLM's long-term term (the policy gradient over the tokens after each position)."""

    name = "minillm_pg"

    class Params(distill.Params):
        gamma: float = Field(0.95, ge=0, le=1, description="discount of later rewards (1: none)")
        length_norm: bool = Field(True, description="divide each return by the response tokens it sums")
        reward_scaling: float | None = Field(
            0.5, gt=0, description="rewards are divided by this (the official scripts' 0.5); null: none"
        )
        reward_clip: float | None = Field(100.0, gt=0, description="rewards clipped to ±this; null: none")
        whiten: bool = Field(True, description="advantages to zero mean and unit variance over the tokens")
        ratio_clip: float | None = Field(
            0.2, gt=0, description="PPO's clip of the ratio q_θ/q_old x w to 1 ± this; null: none"
        )
        include_current: bool = Field(
            True, description="the return at t includes r_t (the official code); false: R_{t+1} (the paper)"
        )

    def __init__(self, params: "MiniLLMLongTerm.Params") -> None:
        self.params = params

    def rewards(self, rollout: Rollout) -> torch.Tensor:
        """``[B, R]`` float32 per-token rewards, scaled and clipped; 0 past each response."""
        p = self.params
        rewards = (rollout.teacher_logprobs.float() - rollout.old_logprobs.float()) * rollout.mask
        if p.reward_scaling is not None:
            rewards = rewards / p.reward_scaling
        if p.reward_clip is not None:
            rewards = rewards.clamp(-p.reward_clip, p.reward_clip)
        return rewards * rollout.mask

    def advantages(self, rollout: Rollout) -> torch.Tensor:
        """``[B, R]`` the constant each token's log-probability is pushed by (no gradient)."""
        p, mask = self.params, rollout.mask.float()
        rewards = self.rewards(rollout)
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            if p.include_current:
                running = rewards[:, t] + p.gamma * running
                returns[:, t] = running
            else:  # R_{t+1}: the discounted rewards after t
                returns[:, t] = running
                running = rewards[:, t] + p.gamma * running
        if p.length_norm:
            remaining = mask.flip(-1).cumsum(-1).flip(-1)  # response tokens from t on
            if not p.include_current:
                remaining = remaining - 1
            returns = returns / remaining.clamp_min(1)
        returns = returns * mask
        if p.whiten:
            counted = mask.bool()
            values = returns[counted]
            if values.numel() > 1:
                returns = torch.where(
                    counted, (returns - values.mean()) / (values.var(unbiased=False) + 1e-8).sqrt(), 0
                )
        return returns.detach()

    def surrogate(
        self, logq: torch.Tensor, advantages: torch.Tensor, old: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """``[c]`` per-token values from the student's log-probabilities of the sampled tokens ``logq``
        (with their graph) and the rollout's constants at the same tokens: their gradient is the
        estimator's. PPO's clipped surrogate on ``ratio = exp(logq − old) x weights``."""
        ratio = torch.exp(logq.float() - old.float()) * weights.float()
        loss = -advantages * ratio
        if self.params.ratio_clip is not None:
            eps = self.params.ratio_clip
            loss = torch.max(loss, -advantages * ratio.clamp(1 - eps, 1 + eps))
        return loss


@distill.hookimpl
def register_sequence_terms(register) -> None:
    register(MiniLLMLongTerm)
