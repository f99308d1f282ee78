"""The teacher's side of the loss, chosen once when a session opens.

``distill.objective.micro_loss`` computes every micro-batch's terms the same way: the student's rows
and the teacher's rows (``distill.loss.Rows``) go through ``distill.loss.token_loss``. What differs
from run to run is where the teacher's rows come from, and so which student rows match them. That
choice is one of these implementations of ``TeacherSide``, made by ``teacher_side`` at start:

- ``LiveTeacher``: full logits of a loaded teacher (and of the student);
- ``FusedTeacher``: the hidden states entering both models' heads and the heads' weights
  (``train.fused_head``): logits a block at a time, never whole;
- ``CachedTeacher``: a teacher cache's top-K log-probs (``distill cache-teacher``), against the
  student's rows as the live side computes them, through ``CoarseDivergence``;
- ``CacheOrLive``: a run with a cache whose policy may generate: each step's micro-batches read the
  cache where it holds every sequence on every process, the live teacher elsewhere (``prepare``);
- ``CrossVocabTeacher``: a teacher with another tokenizer, read through the alignment of its tokens
  with the student's (``distill.crossvocab``), for a divergence across vocabularies.

A side's ``teacher`` may be None: sequence-level KD across tokenizers, where the loss is the
student's cross-entropy alone.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from distill.divergence import ConfiguredDivergence
from distill.errors import ConfigError
from distill.fused import FusedHeads, HeadRows, fused_sizes, head_input
from distill.loss import LogitRows, Rows
from distill.objective import response_logits

MicroBatch = tuple[str, Any, list]
"""``(source, batch, examples)``: one micro-batch of a step and the examples it was collated from."""


class TeacherSide(Protocol):
    """Where the teacher's rows of each micro-batch come from (and the student's that match them)."""

    teacher: Any
    """The loaded teacher, or None (across tokenizers, or when a cache serves every sequence)."""
    logit_level: bool
    """Whether the side gives teacher rows at all: false only for a live side without a teacher
    (sequence-level KD across tokenizers), where the loss is the student's cross-entropy alone."""

    def prepare(self, batches: list[MicroBatch]) -> list[Any]:
        """Once a step, before any micro-batch: what each one's teacher rows are read from (passed back
        as ``prepared``). Every process calls it together; it may run one collective."""

    def student_rows(self, student, batch, index: tuple[torch.Tensor, ...]) -> Rows:
        """The student's rows at the counted positions ``index`` (with its graph)."""

    def teacher_rows(self, batch, index: tuple[torch.Tensor, ...], prepared: Any) -> Rows:
        """The teacher's rows at ``index`` (without a graph)."""

    def wrap(self, divergence, prepared: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The function of (student rows, teacher rows) that gives ``divergence``'s per-row values on them."""


class LiveTeacher:
    """Full ``[B, R, V]`` logits of both models (the path every model supports)."""

    def __init__(self, teacher, unwrap=lambda m: m) -> None:
        self.teacher, self.unwrap = teacher, unwrap
        self.logit_level = teacher is not None

    def prepare(self, batches: list[MicroBatch]) -> list[Any]:
        return [None] * len(batches)

    def student_rows(self, student, batch, index):
        return LogitRows(response_logits(student, batch, self.unwrap), index)

    def teacher_rows(self, batch, index, prepared):
        with torch.no_grad():
            return LogitRows(response_logits(live(self.teacher), batch, self.unwrap), index)

    def wrap(self, divergence, prepared):
        return divergence


class FusedTeacher:
    """Both heads fused into the loss: the hidden states entering them, a block of rows at a time."""

    def __init__(self, heads: FusedHeads, teacher) -> None:
        self.heads, self.teacher = heads, teacher
        self.logit_level = teacher is not None
        self.block = fused_sizes(heads.student.n)[0]

    def prepare(self, batches: list[MicroBatch]) -> list[Any]:
        return [None] * len(batches)

    def student_rows(self, student, batch, index):
        hidden = head_input(student, batch, self.heads.student, self.heads.unwrap)
        return HeadRows(self.heads.student, hidden[index], self.block)

    def teacher_rows(self, batch, index, prepared):
        with torch.no_grad():
            hidden = head_input(live(self.teacher), batch, self.heads.teacher, self.heads.unwrap)
        return HeadRows(self.heads.teacher, hidden[index], self.block, trained=False)

    def wrap(self, divergence, prepared):
        return divergence


class CachedTeacher:
    """A teacher cache's packed top-K targets ``[B, R, 2K + 1]`` against the student's rows as
    ``student_side`` computes them (full logits, or its fused head), through ``CoarseDivergence``."""

    def __init__(self, cache, student_side) -> None:
        self.cache, self.student_side, self.teacher = cache, student_side, student_side.teacher
        self.logit_level = True

    def prepare(self, batches: list[MicroBatch]) -> list[Any]:
        return [
            self.cache.targets(examples, batch.response_mask.shape[1], batch.input_ids.device)
            for _, batch, examples in batches
        ]

    def student_rows(self, student, batch, index):
        return self.student_side.student_rows(student, batch, index)

    def teacher_rows(self, batch, index, prepared):
        if prepared is None:
            raise RuntimeError("a sequence is missing from the teacher cache (check_run lets no such run start)")
        return LogitRows(prepared, index)

    def wrap(self, divergence, prepared):
        from distill.teacher_cache import CoarseDivergence

        divergence = ConfiguredDivergence.wrap(divergence)
        self.cache.check_temperature(
            f"objective.terms.<source>.temperature of the {divergence.name} term", divergence.temperature
        )
        return CoarseDivergence(divergence)


class CacheOrLive:
    """A cache for the sequences it holds, the live side (``LiveTeacher`` or ``FusedTeacher``) for the
    rest: generated sequences, or a step whose micro-batches the cache lacks on some process."""

    def __init__(self, cache, live_side, accelerator) -> None:
        self.cached = CachedTeacher(cache, live_side)
        self.live_side, self.accelerator, self.teacher = live_side, accelerator, live_side.teacher
        self.logit_level = True  # a micro-batch the cache lacks needs the live teacher (``live`` says so)

    def prepare(self, batches: list[MicroBatch]) -> list[Any]:
        """The cache's targets of each micro-batch, or None where the live teacher answers. A source's
        group reads the cache only if the cache holds every micro-batch of that group on every process:
        one reduction a step, so every process runs the same number of teacher forwards (a collective
        under FSDP / ZeRO-3). A damaged part found by one process stops every process."""
        from distill.teacher_cache import DamagedPart

        sources = list(dict.fromkeys(source for source, _, _ in batches))
        found: list[torch.Tensor | None] = []
        damaged: DamagedPart | None = None
        for _, batch, examples in batches:
            try:
                found.append(self.cached.prepare([(None, batch, examples)])[0])
            except DamagedPart as error:
                damaged = error
                found.append(None)
        misses = torch.zeros(len(sources) + 1, dtype=torch.float64)
        for (source, _, _), packed in zip(batches, found):
            misses[sources.index(source)] += packed is None
        misses[-1] = damaged is not None
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            misses = self.accelerator.reduce(misses.to(self.accelerator.device), reduction="sum").cpu()
        if damaged is not None:
            raise damaged
        if misses[-1] > 0:
            raise ConfigError("another process found a damaged teacher cache part (its line names it); see there")
        return [
            packed if misses[sources.index(source)] == 0 else None for (source, _, _), packed in zip(batches, found)
        ]

    def student_rows(self, student, batch, index):
        return self.live_side.student_rows(student, batch, index)

    def teacher_rows(self, batch, index, prepared):
        side = self.cached if prepared is not None else self.live_side
        return side.teacher_rows(batch, index, prepared)

    def wrap(self, divergence, prepared):
        side = self.cached if prepared is not None else self.live_side
        return side.wrap(divergence, prepared)


class GroupStarts:
    """A divergence across vocabularies at the aligned groups' first positions: the teacher's rows carry
    one more column, 1 at a group's first student position (its teacher row there) and 0 elsewhere."""

    def __init__(self, divergence) -> None:
        self.divergence = ConfiguredDivergence.wrap(divergence)
        self.name = self.divergence.name

    def __call__(self, student_rows: torch.Tensor, teacher_rows: torch.Tensor) -> torch.Tensor:
        return self.divergence(student_rows, teacher_rows[:, :-1]) * teacher_rows[:, -1]


class AlignedRows:
    """The teacher's rows across vocabularies, read a block at a time from its own logits ``[B, Rt, Vt]``
    (never copied whole): counted row k is the teacher's row at ``(batch_rows[k], positions[k])`` with
    one more column, 1 where the student's position begins an aligned group (``GroupStarts`` counts
    the divergence there) and 0 elsewhere (its row then is any of the sequence's, unused)."""

    block_rows = None

    def __init__(self, logits: torch.Tensor, batch_rows: torch.Tensor, positions: torch.Tensor, first: torch.Tensor):
        self.logits, self.batch_rows, self.positions, self.first = logits, batch_rows, positions, first
        self.width = logits.shape[-1] + 1
        self.inputs = ()  # no gradient to the teacher

    def want(self, flags: tuple[bool, ...]) -> None:
        pass

    def block(self, start: int, stop: int) -> torch.Tensor:
        rows = self.logits[self.batch_rows[start:stop], self.positions[start:stop]].float()
        return torch.cat([rows, self.first[start:stop, None].to(rows.dtype)], dim=-1)

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def add_grad(self, start: int, stop: int, grad: torch.Tensor) -> None:
        pass

    def grads(self) -> list[torch.Tensor | None]:
        return []


class CrossVocabTeacher:
    """A teacher with another tokenizer (``distill.crossvocab``): each micro-batch's sequences are read
    by the teacher in its own tokens (``CrossBridge.view``: its chat template, the response text in its
    tokens), and its logits at each aligned group's first position become the teacher's row at the
    group's first student position; the divergence (one across vocabularies) counts there only
    (``GroupStarts``), the student's cross-entropy at every response token. Full logits of both models."""

    logit_level = True

    def __init__(self, teacher, bridge, pad_id: int, unwrap=lambda m: m) -> None:
        self.teacher, self.bridge, self.pad_id, self.unwrap = teacher, bridge, pad_id, unwrap

    def prepare(self, batches: list[MicroBatch]) -> list[Any]:
        return [examples for _, _, examples in batches]

    def student_rows(self, student, batch, index):
        return LogitRows(response_logits(student, batch, self.unwrap), index)

    def teacher_rows(self, batch, index, prepared):
        from distill.data import collate

        views = [self.bridge.view(example) for example in prepared]
        teacher_batch = collate([v.example for v in views], self.pad_id).to(batch.input_ids.device)
        with torch.no_grad():
            logits = response_logits(live(self.teacher), teacher_batch, self.unwrap)
        # each student position's teacher position (a group's first), and whether it is a group's first
        position = torch.zeros(batch.response_mask.shape, dtype=torch.long)
        first = torch.zeros(batch.response_mask.shape, dtype=torch.bool)
        for b, view in enumerate(views):
            for s, t in view.starts:
                position[b, s], first[b, s] = t, True
        rows = tuple(i.cpu() for i in index)
        return AlignedRows(logits, index[0], position[rows].to(logits.device), first[rows].to(logits.device))

    def wrap(self, divergence, prepared):
        return GroupStarts(divergence)


def live(teacher):
    """The loaded teacher, for sequences a cache does not hold."""
    if teacher is None:
        raise RuntimeError(
            "a step holds sequences the teacher cache lacks, and the policy said it never generates (generates = False)"
        )
    return teacher


def teacher_side(
    teacher, *, fused: FusedHeads | None = None, cache=None, unwrap=lambda m: m, accelerator=None
) -> TeacherSide:
    """The run's teacher side: the live teacher's full logits, or the fused heads (``fused``), read
    from ``cache`` where it holds a micro-batch's sequences."""
    side = FusedTeacher(fused, teacher) if fused is not None else LiveTeacher(teacher, unwrap)
    return CacheOrLive(cache, side, accelerator) if cache is not None else side


__all__ = [
    "AlignedRows",
    "CacheOrLive",
    "CachedTeacher",
    "CrossVocabTeacher",
    "FusedTeacher",
    "GroupStarts",
    "LiveTeacher",
    "MicroBatch",
    "TeacherSide",
    "teacher_side",
]
