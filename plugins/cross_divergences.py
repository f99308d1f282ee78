"""Divergences across vocabularies (#30): ULD, and a hybrid of a registered divergence on the tokens
both vocabularies hold with ULD on the rest, as TRL's GOLD trainer computes them (trl 1.16.0,
``trl/experimental/gold/gold_trainer.py``).

Both take student logits ``[N, Vs]`` and teacher logits ``[N, Vt]`` of any two widths (the class
attribute ``cross_vocabulary``), row k of each the distribution at one aligned position; with one
vocabulary they are ordinary divergences (0 when p = q, >= 0). ``uld_hybrid`` learns which ids match
from ``bind(VocabularyMap)`` (``distill.crossvocab``); unbound, the two vocabularies are one.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, model_validator

import distill
from distill.crossvocab import VocabularyMap, gold_jsd, sorted_l1


class _NoParams(distill.Params):
    pass


class ULD:
    """Universal logit distillation (Boizard et al., 2024): each distribution sorted by probability,
    the smaller vocabulary padded with zeros, the L1 distance (GOLD's ``_compute_distillation_loss``,
    ``gold_trainer.py:508-523``). No vocabulary map is needed; it is 0 for any permutation of p."""

    name = "uld"
    aliases = ()
    cross_vocabulary = True
    Params = _NoParams

    def __init__(self, params: _NoParams) -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return sorted_l1(student_logits.softmax(-1), teacher_logits.softmax(-1))


class ULDHybrid:
    """GOLD's hybrid (``_compute_hybrid_uld_loss``, ``gold_trainer.py:637-722``): on the tokens both
    vocabularies hold (``bind``), a registered divergence (``matched``; ``gold_jsd``: GOLD's JSD on the
    matched probabilities as they are, not renormalised, ``:724-751``); on the rest, ULD of the
    unmatched probabilities. Weights: ``matched_weight`` and ``unmatched_weight``, both or neither;
    neither, GOLD's: the matched share of the teacher's vocabulary (its logits' width) and the rest.
    A registered ``matched`` divergence sees the matched logits, so its distributions are renormalised
    over the matched tokens."""

    name = "uld_hybrid"
    aliases = ()
    cross_vocabulary = True

    class Params(distill.Params):
        matched: str = Field(
            "skew_kl",
            description="divergence on the matched tokens: a registered name, or gold_jsd (GOLD's JSD on raw p, q)",
        )
        matched_params: dict[str, Any] = Field(default_factory=dict, description="that divergence's parameters")
        beta: float = Field(0.5, ge=0, le=1, description="gold_jsd's teacher weight in the mixture (GOLD's beta)")
        matched_weight: float | None = Field(None, ge=0, description="weight of the matched part (none: GOLD's)")
        unmatched_weight: float | None = Field(None, ge=0, description="weight of the ULD part (none: GOLD's)")

        @model_validator(mode="after")
        def _both_or_neither(self):
            if (self.matched_weight is None) != (self.unmatched_weight is None):
                raise ValueError("matched_weight and unmatched_weight: set both or neither")
            return self

    def __init__(self, params: "ULDHybrid.Params") -> None:
        self.params = params
        self.inner = None
        if params.matched != "gold_jsd":
            if params.matched == self.name:
                raise distill.ConfigError("uld_hybrid.matched: a divergence other than uld_hybrid")
            # the plugin itself: the core has applied the temperature to the logits this one sees
            self.inner = distill.default_registry().get_divergence(params.matched, **params.matched_params).plugin
        self.map: VocabularyMap | None = None
        self._indices: dict[tuple, tuple[torch.Tensor, ...]] = {}

    def bind(self, vocabulary_map: VocabularyMap) -> None:
        """The ids the two vocabularies share; refused (one line) when they share none."""
        if vocabulary_map.matched == 0:
            raise distill.ConfigError(
                "uld_hybrid: the student's and the teacher's vocabularies share no token string; use uld (it needs "
                "no shared tokens)"
            )
        self.map = vocabulary_map
        self._indices.clear()

    def _masks(self, widths: tuple[int, int], device) -> tuple[torch.Tensor, ...]:
        """Matched student ids, matched teacher ids (paired), and the unmatched masks of each side."""
        key = (*widths, str(device))
        if key not in self._indices:
            vs, vt = widths
            if self.map is None:
                if vs != vt:
                    raise distill.ConfigError(
                        "uld_hybrid: the logits have two widths but no vocabulary map was bound (the engine binds one "
                        "across tokenizers)"
                    )
                s_ids = t_ids = list(range(vs))
            else:
                kept = [(s, t) for s, t in zip(self.map.student_ids, self.map.teacher_ids) if s < vs and t < vt]
                s_ids, t_ids = [s for s, _ in kept], [t for _, t in kept]
            s_idx = torch.tensor(s_ids, dtype=torch.long, device=device)
            t_idx = torch.tensor(t_ids, dtype=torch.long, device=device)
            s_rest = torch.ones(vs, dtype=torch.bool, device=device)
            t_rest = torch.ones(vt, dtype=torch.bool, device=device)
            s_rest[s_idx], t_rest[t_idx] = False, False
            self._indices[key] = (s_idx, t_idx, s_rest, t_rest)
        return self._indices[key]

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
        s_idx, t_idx, s_rest, t_rest = self._masks((vs, vt), student_logits.device)
        s_probs, t_probs = student_logits.softmax(-1), teacher_logits.softmax(-1)
        rows = student_logits.shape[0]
        matched = student_logits.new_zeros(rows)
        if len(t_idx):
            if self.inner is None:
                matched = gold_jsd(s_probs[:, s_idx], t_probs[:, t_idx], self.params.beta)
            else:
                matched = self.inner(student_logits[:, s_idx], teacher_logits[:, t_idx])
        unmatched = student_logits.new_zeros(rows)
        if bool(s_rest.any()) and bool(t_rest.any()):
            unmatched = sorted_l1(s_probs[:, s_rest], t_probs[:, t_rest])
        if self.params.matched_weight is None:
            w_matched = len(t_idx) / max(1, vt)
            w_unmatched = 1.0 - w_matched
        else:
            w_matched, w_unmatched = self.params.matched_weight, self.params.unmatched_weight
        return w_matched * matched + w_unmatched * unmatched


@distill.hookimpl
def register_divergences(register) -> None:
    for divergence in (ULD, ULDHybrid):
        register(divergence)
