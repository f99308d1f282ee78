"""The training objective of one micro-batch, and the one place the token normalisation lives.

Every loss term of a step is ``sum over counted tokens / denominator`` where the denominator comes
from ``group_denominator`` (``loss_denominator`` for a step of one group): the global number of
response tokens of the optimizer step (all micro-batches, all processes) divided by the number of
processes, because data-parallel backends average gradients over processes. Summing the micro-batch
gradients then gives exactly the gradient of the mean over every response token of the global batch.

A step may hold several groups of sequences (``{source: examples}`` from the policy). Each group has
its own term (``Objective.term``: divergence, weight schedule, cross-entropy weight) and its own
denominator (``group_counts``): the group's global response tokens, or with ``train.normalize:
sequence`` its global number of sequences, each token then weighing 1 / its sequence's length. The
step's loss is the sum over groups of ``weight x divergence mean + ce_weight x cross-entropy mean``.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any

import torch

from distill.config import RunConfig, TermSpec
from distill.data import Batch
from distill.errors import ConfigError, UnknownPluginError
from distill.interfaces import Source
from distill.sequence import Rollout
from distill.loss import TokenTerms, counted, token_loss
from distill.models import contiguous_head_input

KNOWN_SOURCES = typing.get_args(Source)
"""The built-in policies' sources (``distill.interfaces.Source``); ``objective.terms`` may also name a
source a policy declares."""


@dataclass
class Term:
    """The loss term of one source's group: ``weight x divergence + ce_weight x cross-entropy``, plus
    ``sequence_weight x`` a sequence-level term (``distill.sequence``) when the spec names one."""

    divergence: Any
    spec: TermSpec
    ce_weight: float
    sequence: Any = None

    @property
    def sequence_weight(self) -> float:
        return self.spec.sequence.weight if self.spec.sequence is not None else 0.0

    def weight(self, step: int, total_steps: int, curriculum: bool = True) -> float:
        return self.spec.weight_at(step, total_steps) if curriculum else self.spec.weight

    @property
    def scheduled(self) -> bool:
        return self.spec.weight_end is not None and self.spec.weight_end != self.spec.weight


class Objective:
    """The run's loss terms: ``objective.terms.<source>``, and the run's divergence (weight 1,
    ``train.ce_weight``) for any source without a term of its own."""

    def __init__(self, cfg: RunConfig, registry) -> None:
        run = cfg.divergence
        self.default = registry.get_divergence(run.name, temperature=run.temperature, **run.params)
        self.curriculum = cfg.objective.curriculum
        self.fallback = Term(self.default, TermSpec(), cfg.train.ce_weight)
        self.terms: dict[str, Term] = {}
        for source, spec in cfg.objective.terms.items():
            name = spec.divergence or run.name
            params = spec.params if spec.divergence else {**run.params, **spec.params}
            temperature = spec.temperature if spec.temperature is not None else run.temperature
            try:
                divergence = registry.get_divergence(name, temperature=temperature, **params)
                sequence = (
                    registry.get_sequence_term(spec.sequence.name, **spec.sequence.params) if spec.sequence else None
                )
            except (ConfigError, UnknownPluginError) as error:
                raise type(error)(f"objective.terms.{source}: {error}") from None
            self.terms[source] = Term(
                divergence, spec, cfg.train.ce_weight if spec.ce_weight is None else spec.ce_weight, sequence
            )

    def term(self, source: str) -> Term:
        return self.terms.get(source, self.fallback)

    @property
    def across_vocabularies(self) -> bool:
        """Whether every divergence of the run compares distributions over two vocabularies (``uld``,
        ``uld_hybrid``): the condition for logit-level KD between different tokenizers."""
        divergences = [self.default, *(t.divergence for t in self.terms.values())]
        return all(getattr(d, "cross_vocabulary", False) for d in divergences)

    def bind_vocabularies(self, vocabulary_map) -> None:
        """Give each divergence that matches tokens across vocabularies (``bind``) the run's map."""
        for divergence in [self.default, *(t.divergence for t in self.terms.values())]:
            bind = getattr(getattr(divergence, "plugin", divergence), "bind", None)
            if bind is not None:
                bind(vocabulary_map)

    @property
    def scheduled(self) -> bool:
        """Whether some term's weight changes during the run."""
        return self.curriculum and any(t.scheduled for t in self.terms.values())

    def check_sequence_terms(self, policy, policy_name: str) -> None:
        """A sequence-level term reads the sampling record of its group's responses: a policy that
        records none (dataset responses carry no sampling probabilities) is refused in one line."""
        for source, term in self.terms.items():
            if term.sequence is not None and not getattr(policy, "records_rollouts", False):
                raise ConfigError(
                    f"objective.terms.{source}.sequence: {term.sequence.name} needs sampled responses with their "
                    f"log-probabilities, and policy {policy_name} records none; use --policy teacher_mixed"
                )

    def check_sources(self, policy, policy_name: str) -> None:
        """A term for a source no policy returns is a typo: one line naming the sources there are.
        A policy that declares no ``sources`` may return any; then only the built-in names are known."""
        declared = tuple(getattr(policy, "sources", ()) or ())
        if not declared:
            return
        for source in self.terms:
            if source not in declared and source not in KNOWN_SOURCES:
                raise ConfigError(
                    f"objective.terms.{source}: no such source; policy {policy_name} returns {', '.join(declared)} "
                    f"(built-in sources: {', '.join(KNOWN_SOURCES)})"
                )


def group_counts(groups: dict[str, list[Batch]], accelerator=None) -> dict[str, tuple[float, float]]:
    """Global ``(response tokens, sequences)`` of each group of an optimizer step, all processes
    together (one reduction for all groups; the groups are the same, in the same order, everywhere)."""
    local = torch.tensor(
        [
            [float(sum(b.n_tokens for b in batches)), float(sum(b.n_sequences for b in batches))]
            for batches in groups.values()
        ],
        dtype=torch.float64,
    )
    if accelerator is not None and accelerator.num_processes > 1:
        local = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    return {source: (tokens, sequences) for source, (tokens, sequences) in zip(groups, local.tolist())}


def group_denominator(counts: tuple[float, float], normalize: str, num_processes: int = 1) -> float:
    """The denominator of a group's term: its global tokens (``token``) or sequences (``sequence``)
    over the number of processes (data-parallel backends average gradients over processes)."""
    total = counts[0] if normalize == "token" else counts[1]
    return max(total, 1.0) / num_processes


def sequence_weights(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` weights 1 / (response tokens of the row) at counted positions: with the number of
    sequences as denominator, the mean over sequences of each sequence's token mean."""
    lengths = mask.sum(-1, keepdim=True).clamp_min(1)
    return mask.float() / lengths


def loss_denominator(local_counts: list[int], accelerator=None) -> float:
    """Global token count of an optimizer step divided by the number of processes (one group).

    ``local_counts``: response tokens of each of this process's micro-batches. Accelerate's own
    ``backward`` divides by ``gradient_accumulation_steps``; the engine keeps that at 1 and
    accumulates by hand, so this is the only normalisation.
    """
    local = float(sum(local_counts))
    if accelerator is None or accelerator.num_processes == 1:
        return group_denominator((local, 0.0), "token")
    total = accelerator.reduce(torch.tensor(local, device=accelerator.device), reduction="sum")
    return group_denominator((float(total), 0.0), "token", accelerator.num_processes)


_KEEPS_LOGITS: dict[type, bool] = {}


def response_logits(model, batch: Batch, unwrap=lambda m: m) -> torch.Tensor:
    """Logits predicting each response token: ``[B, R, V]``.

    Responses sit at the same offset in every row, so only the last R + 1 positions are projected
    onto the vocabulary where the model supports ``logits_to_keep``.
    """
    r = batch.response_mask.shape[1]
    if batch.encoder_ids is not None:
        # an encoder-decoder: the prompt is the encoder's input, the decoder reads its start id then the response
        out = model(
            input_ids=batch.encoder_ids,
            attention_mask=batch.encoder_mask,
            decoder_input_ids=batch.input_ids,
            decoder_attention_mask=batch.attention_mask,
            use_cache=False,
        )
        return out.logits[:, -(r + 1) : -1]
    inner = unwrap(model)
    contiguous_head_input(inner)
    inner = type(inner.get_base_model() if hasattr(inner, "get_base_model") else inner)  # peft passes the argument on
    if inner not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[inner] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    extra = {"logits_to_keep": r + 1} if _KEEPS_LOGITS[inner] else {}
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **extra,
    )
    return out.logits[:, -(r + 1) : -1]


def micro_loss(
    side,
    student,
    batch: Batch,
    divergence,
    denominator: float,
    ce_weight: float = 0.0,
    *,
    kd_weight: float = 1.0,
    normalize: str = "token",
    prepared: Any = None,
    sequence: Any = None,
    sequence_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The one micro-batch loss: ``kd_weight`` x divergence + ``ce_weight`` x the student's
    cross-entropy on the response tokens of ``batch``, over ``denominator`` (``group_denominator``;
    with ``normalize="sequence"`` each token weighs 1 / its sequence's length). ``side``: the run's
    ``distill.teacher.TeacherSide`` (live logits, fused heads, a cache; ``prepared``: what its
    ``prepare`` gave for this micro-batch). Without a teacher (sequence-level KD across tokenizers: no
    logits in common) the student's cross-entropy alone; with ``kd_weight`` 0 the teacher is not run
    and the loss is ``ce_weight`` x cross-entropy. ``sequence``: a sequence-level term over the batch's
    rollout (``distill.sequence``), weighted ``sequence_weight``. ``parts``: the unweighted values."""
    mask = batch.response_mask
    index = counted(mask, mask.shape, mask.device)
    weights = sequence_weights(mask)[index] if normalize == "sequence" else None
    student_rows = side.student_rows(student, batch, index)
    if not side.logit_level:
        terms, teacher_rows = TokenTerms(ce_weight=1.0), None  # no logits in common: cross-entropy alone
    elif kd_weight == 0:
        terms, teacher_rows = TokenTerms(ce_weight=ce_weight), None
    else:
        teacher_rows = side.teacher_rows(batch, index, prepared)
        terms = TokenTerms(side.wrap(divergence, prepared), kd_weight, ce_weight)
    rollout = None
    if sequence is not None:
        if batch.rollout is None:
            raise RuntimeError("a sequence term's group holds responses without a rollout (check_sequence_terms)")
        record = Rollout(*batch.rollout, mask)
        rollout = (sequence.advantages(record)[index], record.old_logprobs[index], record.weights[index])
        terms.sequence, terms.sequence_weight = sequence, sequence_weight
    return token_loss(
        student_rows,
        teacher_rows,
        terms,
        index,
        n_tokens=denominator,
        labels=batch.labels[index],
        weights=weights,
        rollout=rollout,
    )


def micro_batch_loss(
    student,
    teacher,
    batch: Batch,
    divergence,
    denominator: float,
    ce_weight: float = 0.0,
    unwrap=lambda m: m,
    *,
    kd_weight: float = 1.0,
    normalize: str = "token",
    fused=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``micro_loss`` for a loaded ``teacher`` (or None) without a session: full logits, or through
    ``fused`` (a ``distill.fused.FusedHeads``) when given."""
    from distill.teacher import teacher_side

    side = teacher_side(teacher, fused=fused, unwrap=unwrap)
    return micro_loss(
        side, student, batch, divergence, denominator, ce_weight, kd_weight=kd_weight, normalize=normalize
    )
