"""Across vocabularies: aligning two tokenizations of one text, and the tokens two vocabularies share.

``align`` cuts a text into groups of characters whose boundaries are token boundaries in both
tokenizations (from the character offsets fast tokenizers return): a group is a run of the
student's tokens and a run of the teacher's that cover the same characters, the smallest such runs.
Where the tokenizers cut a word the same way a group is one token on each side; where they cut it
differently, the group holds the tokens of both cuts. Every character of the text lies in exactly one
group, and every token in exactly one group of its side.

``VocabularyMap`` pairs the ids whose token strings are equal in both vocabularies (``get_vocab()``
strings, as TRL's GOLD matches them), optionally after writing the byte-level BPE space marker
(``Ġ``) and the sentencepiece one (``▁``) the same way, which matches the words that begin with a
space across the two families.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import torch

from distill.data import Example
from distill.errors import ConfigError

BYTE_LEVEL_SPACE, SENTENCEPIECE_SPACE = "\u0120", "\u2581"  # Ġ and ▁


@dataclass(frozen=True)
class Group:
    """One aligned group: the student's tokens ``[student_start, student_end)``, the teacher's tokens
    ``[teacher_start, teacher_end)``, covering the characters ``[char_start, char_end)`` of the text."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int
    char_start: int
    char_end: int


def token_ends(tokenizer, text: str, role: str = "tokenizer") -> tuple[list[int], list[int]]:
    """``text``'s token ids (no special tokens) and the character where each token's span ends (a
    token that covers no character, such as one byte of a character split over tokens, ends where its
    predecessor does)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"the {role} is a slow (Python) tokenizer, which gives no character offsets to align two vocabularies "
            "by; load its fast version (tokenizer.json; use_fast=True)"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ends, last = [], 0
    for _, end in encoded["offset_mapping"]:
        last = max(last, end)
        ends.append(last)
    return list(encoded["input_ids"]), ends


def align_ends(student_ends: list[int], teacher_ends: list[int], length: int) -> list[Group]:
    """The groups of two tokenizations of a text of ``length`` characters, from each token's end."""
    groups: list[Group] = []
    i = j = 0
    start = 0
    n, m = len(student_ends), len(teacher_ends)
    while i < n or j < m:
        i0, j0 = i, j
        # one token from each side (when it has one left), then the side that ends first, until both end together
        s_end = student_ends[i] if i < n else length
        t_end = teacher_ends[j] if j < m else length
        i, j = min(i + 1, n), min(j + 1, m)
        while s_end != t_end:
            if s_end < t_end and i < n:
                s_end = student_ends[i]
                i += 1
            elif t_end < s_end and j < m:
                t_end = teacher_ends[j]
                j += 1
            else:  # one side ran out of tokens (trailing characters only one side covers): the rest is one group
                s_end = t_end = max(s_end, t_end)
                i, j = n, m
        end = s_end
        # tokens that cover no character past this end (a split character's other bytes) join this group
        while i < n and student_ends[i] <= end:
            i += 1
        while j < m and teacher_ends[j] <= end:
            j += 1
        if i == i0 and j == j0:
            break
        groups.append(Group(i0, i, j0, j, start, max(end, start)))
        start = max(end, start)
    if groups and groups[-1].char_end < length:  # characters after the last token on both sides
        last = groups[-1]
        groups[-1] = Group(
            last.student_start, last.student_end, last.teacher_start, last.teacher_end, last.char_start, length
        )
    return groups


def align(text: str, student_tokenizer, teacher_tokenizer) -> tuple[list[int], list[int], list[Group]]:
    """``text`` in the student's ids, in the teacher's ids, and their groups (``align_ends``)."""
    student_ids, student_ends = token_ends(student_tokenizer, text, "student's tokenizer")
    teacher_ids, teacher_ends = token_ends(teacher_tokenizer, text, "teacher's tokenizer")
    return student_ids, teacher_ids, align_ends(student_ends, teacher_ends, len(text))


def decoded_ends(tokenizer, ids: list[int]) -> tuple[str, list[int]]:
    """The text ``ids`` decode to and the character where each token ends in it: the length of the
    decoded prefix through that token (any token sequence, a model's samples too, which need not be
    the tokenizer's own cut of their text). A token that ends inside a character (one byte of several)
    ends where its predecessor does; a prefix that does not decode to a prefix of the text (a decoder
    that rewrites across tokens) ends no earlier than its predecessor and no later than the text."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    ends, last = [], 0
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if prefix.endswith("\ufffd") and not text.startswith(prefix):
            prefix = prefix[:-1]  # a character still incomplete: it ends with a later token
        if text.startswith(prefix):
            last = max(last, len(prefix))
        else:
            last = min(max(last, len(prefix)), len(text))
        ends.append(last)
    return text, ends


def check_round_trip(tokenizer, ids: list[int], role: str) -> str:
    """The text ``ids`` decode to, refused when encoding it again gives other ids (a text the two
    sides could not both hold)."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    again = list(tokenizer(text, add_special_tokens=False).input_ids)
    if again != list(ids):
        raise ConfigError(
            f"the {role}'s tokenizer does not round-trip its own tokens ({ids[:8]} decode to {text[:40]!r}, which "
            "encodes to other ids): alignment by text needs a tokenizer whose decoding encodes back to the same ids"
        )
    return text


# --- a training sequence in the teacher's tokens


@dataclass(frozen=True)
class TeacherView:
    """A student sequence as the teacher reads it: its prompt in the teacher's chat template, its
    response text in the teacher's tokens (ending with the teacher's EOS where the student's ended),
    and for each aligned group the first response position on each side (``starts``: pairs
    ``(student position, teacher position)``; the student's final stop token pairs with the
    teacher's EOS)."""

    example: Example
    starts: tuple[tuple[int, int], ...]


class CrossBridge:
    """Student sequences seen by a teacher with another tokenizer (logit-level KD across vocabularies).

    The teacher's prompt is the example's chat messages in the teacher's chat template, looked up by
    the student's prompt ids (``prompts``: every training and validation example, whose messages the
    data gave; generated responses keep their example's prompt ids). The response is decoded from the
    student's ids (``decoded_ends``: sampled ids need not be the tokenizer's own cut) and encoded by
    the teacher's tokenizer with its offsets (``token_ends``); ``align_ends`` pairs their groups."""

    def __init__(self, student_tokenizer, teacher_tokenizer, examples: list[Example], data_cfg, student_stops) -> None:
        from distill.data import PromptFormatter

        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_stops = set(student_stops)
        self.teacher_eos = teacher_tokenizer.eos_token_id
        self.max_response_tokens = data_cfg.max_response_tokens
        format_teacher = PromptFormatter(teacher_tokenizer, data_cfg.prompt_template)
        self.prompts: dict[tuple[int, ...], list[int]] = {}
        for example in examples:
            key = tuple(example.prompt_ids)
            if key not in self.prompts and example.messages is not None:
                self.prompts[key] = list(format_teacher(example.messages))

    def view(self, example: Example) -> TeacherView:
        prompt = self.prompts.get(tuple(example.prompt_ids))
        if prompt is None:
            raise RuntimeError("a training sequence's prompt is not one of the data's (CrossBridge.prompts)")
        ids = list(example.response_ids)
        ended = bool(ids) and ids[-1] in self.student_stops
        body = ids[:-1] if ended else ids
        text, student_ends = decoded_ends(self.student_tokenizer, body)
        teacher_ids, teacher_ends = token_ends(self.teacher_tokenizer, text, "teacher's tokenizer")
        cap = self.max_response_tokens - (1 if ended else 0)
        length, cut = len(text), len(teacher_ids) > cap
        if cut:  # the teacher's cut of the text is longer than a response may be: its first tokens only
            teacher_ids, teacher_ends = teacher_ids[:cap], teacher_ends[:cap]
            length = teacher_ends[-1] if teacher_ends else 0
            student_ends = [e for e in student_ends if e <= length]
        starts = [
            (g.student_start, g.teacher_start)
            for g in align_ends(student_ends, teacher_ends, length)
            if g.student_end > g.student_start and g.teacher_end > g.teacher_start
        ]
        if ended and not cut and self.teacher_eos is not None:
            starts.append((len(body), len(teacher_ids)))
            teacher_ids = teacher_ids + [self.teacher_eos]
        response = teacher_ids or [self.teacher_eos]
        return TeacherView(Example(prompt, response, reference=text), tuple(starts))


# --- the tokens both vocabularies hold


def normalise(token: str) -> str:
    """A token string with the byte-level and sentencepiece space markers written alike (``Ġ`` -> ``▁``)."""
    return token.replace(BYTE_LEVEL_SPACE, SENTENCEPIECE_SPACE)


@dataclass(frozen=True)
class VocabularyMap:
    """The ids of the tokens two vocabularies share: ``student_ids[k]`` and ``teacher_ids[k]`` are one
    token string (sorted by the teacher's id)."""

    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    normalised: bool
    teacher_size: int
    student_size: int

    @property
    def matched(self) -> int:
        return len(self.teacher_ids)

    @classmethod
    def build(cls, student_tokenizer, teacher_tokenizer, *, normalised: bool = False) -> VocabularyMap:
        """Match ``get_vocab()`` strings exactly (GOLD), or after ``normalise`` (``normalised``): a
        string several ids hold on one side (after normalising) keeps its lowest id."""
        key = normalise if normalised else (lambda token: token)
        student: dict[str, int] = {}
        for token, i in sorted(student_tokenizer.get_vocab().items(), key=lambda item: item[1]):
            student.setdefault(key(token), i)
        pairs: dict[int, int] = {}
        used: set[int] = set()
        for token, i in sorted(teacher_tokenizer.get_vocab().items(), key=lambda item: item[1]):
            s = student.get(key(token))
            if s is not None and i not in pairs and s not in used:
                pairs[i] = s
                used.add(s)
        teacher_ids = tuple(sorted(pairs))
        return cls(
            tuple(pairs[t] for t in teacher_ids),
            teacher_ids,
            normalised,
            len(teacher_tokenizer),
            len(student_tokenizer),
        )

    @classmethod
    def cached(cls, student_tokenizer, teacher_tokenizer, *, normalised: bool = False) -> VocabularyMap:
        """``build``, kept in distill's cache folder by the two tokenizers' fingerprints (``$DISTILL_CACHE``;
        ``off``: not kept)."""
        from distill.builtin import cache_root
        from distill.teacher_cache import tokenizer_fingerprint

        folder = cache_root()
        digest = hashlib.sha256(
            f"{tokenizer_fingerprint(student_tokenizer)}|{tokenizer_fingerprint(teacher_tokenizer)}|{normalised}".encode()
        ).hexdigest()[:32]
        path = folder / "vocabulary-maps" / f"{digest}.json" if folder is not None else None
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text())
                return cls(tuple(saved["student_ids"]), tuple(saved["teacher_ids"]), normalised, *saved["sizes"])
            except (ValueError, KeyError, TypeError):
                pass  # a damaged entry is made again
        built = cls.build(student_tokenizer, teacher_tokenizer, normalised=normalised)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            record = {
                "student_ids": built.student_ids,
                "teacher_ids": built.teacher_ids,
                "sizes": [built.teacher_size, built.student_size],
            }
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        return built


# --- distances across vocabularies (TRL's GOLD, trl 1.16.0, trl/experimental/gold/gold_trainer.py)


def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD's distance per row: each row's probabilities sorted in decreasing order, the shorter
    vocabulary padded with zeros, then the L1 distance. ``[N, Vs]``, ``[N, Vt]`` -> ``[N]``. (GOLD sums it
    over rows and divides by their number, ``gold_trainer.py:508-523``: the mean of these values.)

    Past the narrower width the padded side is 0, so those positions add the wider side's remaining
    mass: only the wider side's top ``min(Vs, Vt)`` are sorted (``topk``, about 4x quicker than sorting
    49,152 ids), the rest is its total less those. The same value and gradient as sorting both."""
    narrow = min(student_probs.shape[-1], teacher_probs.shape[-1])

    def top(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if probs.shape[-1] == narrow:
            return probs.sort(dim=-1, descending=True).values, probs.new_zeros(probs.shape[:-1])
        values = probs.topk(narrow, dim=-1).values
        return values, (probs.sum(-1) - values.sum(-1)).clamp_min(0.0)

    (s, s_rest), (t, t_rest) = top(student_probs), top(teacher_probs)
    return (s - t).abs().sum(-1) + s_rest + t_rest


def gold_jsd(student_probs: torch.Tensor, teacher_probs: torch.Tensor, beta: float) -> torch.Tensor:
    """GOLD's generalised JSD on probabilities as given (not renormalised; logs of values clamped at
    1e-8), per row: beta x KL(t || m) + (1 - beta) x KL(s || m), m = beta t + (1 - beta) s in log space;
    beta 0: KL(t || s); beta 1: KL(s || t) (``generalized_jsd_loss``, ``gold_trainer.py:2249-2342``)."""
    log_s, log_t = student_probs.clamp_min(1e-8).log(), teacher_probs.clamp_min(1e-8).log()

    def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:  # torch's kl_div(log_b, log_a, log_target)
        return (log_a.exp() * (log_a - log_b)).sum(-1)

    if beta == 0:
        return kl(log_t, log_s)
    if beta == 1:
        return kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_s + math.log1p(-beta), log_t + math.log(beta)]), dim=0)
    return beta * kl(log_t, log_m) + (1 - beta) * kl(log_s, log_m)


def merge_groups(
    probs: torch.Tensor, groups: list[list[int]], token_ids: list[int], strategy: str = "observed"
) -> torch.Tensor:
    """One row per aligned group from a sequence's per-position probabilities ``[T, V]``, as GOLD merges
    them (``_merge_probabilities_with_alignment_groups``, ``gold_trainer.py:555-623``): ``observed``, the
    first position's row times the probability of each later position's own token; ``bayesian``, the
    last position's row times that of each earlier one (clamped at 1e-8; not renormalised)."""
    rows = []
    for group in groups:
        if len(group) == 1:
            rows.append(probs[group[0]])
            continue
        head, rest = (group[0], group[1:]) if strategy == "observed" else (group[-1], group[:-1])
        scale = torch.stack([probs[i, token_ids[i]].clamp_min(1e-8) for i in rest]).prod()
        rows.append(probs[head] * scale)
    return torch.stack(rows) if rows else probs.new_zeros((0, probs.shape[-1]))


__all__ = [
    "CrossBridge",
    "Group",
    "TeacherView",
    "VocabularyMap",
    "align",
    "align_ends",
    "check_round_trip",
    "decoded_ends",
    "gold_jsd",
    "merge_groups",
    "normalise",
    "sorted_l1",
    "token_ends",
]
