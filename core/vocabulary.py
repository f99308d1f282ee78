"""Teacher and student tokenizers: the same ids (logit-level distillation), or text in between.

A logit-level divergence compares the two models' distributions id by id, so it needs one
vocabulary: the student's tokenizer (its own folder's, or ``student.tokenizer``) must map every
token of the shared id range to the same id as the teacher's. Across different tokenizers only
sequence-level KD works: the teacher answers in its own tokens and chat template, and the student
trains with token cross-entropy on that text re-encoded in its own (``TextBridge``).
"""

from __future__ import annotations

from pathlib import Path

from distill.data import Example, PromptFormatter
from distill.errors import ConfigError

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def student_tokenizer_ref(spec, explicit: str | None) -> str | None:
    """Where the student's own tokenizer is: ``student.tokenizer``; else the student's folder when it
    holds tokenizer files, the student's hub id or built-in name; None for ``prune:K`` (the teacher's
    layers, the teacher's tokenizer) and a folder without tokenizer files (the teacher's serves)."""
    if explicit:
        return explicit
    ref = getattr(spec, "ref", spec) or ""
    if not ref or ref.startswith("prune:"):
        return None
    path = Path(ref).expanduser()
    if path.is_dir():
        return str(path) if any((path / name).is_file() for name in _TOKENIZER_FILES) else None
    return ref  # a hub id or a built-in name: its own tokenizer


def mismatch(teacher_tokenizer, student_tokenizer) -> str | None:
    """None when both tokenizers map every id of their shared range to the same token (and so a
    logit-level divergence over that range is exact); else the first difference, in words."""
    teacher_tokens = {i: token for token, i in teacher_tokenizer.get_vocab().items()}
    student_tokens = {i: token for token, i in student_tokenizer.get_vocab().items()}
    shared = min(len(teacher_tokenizer), len(student_tokenizer))
    for i in range(shared):
        if teacher_tokens.get(i) != student_tokens.get(i):
            return (
                f"id {i} is {teacher_tokens.get(i)!r} in the teacher's tokenizer and {student_tokens.get(i)!r} "
                f"in the student's ({len(teacher_tokenizer)} and {len(student_tokenizer)} tokens)"
            )
    return None


def cross_tokenizer_error(difference: str, policy: str) -> ConfigError:
    return ConfigError(
        f"teacher and student tokenizers differ: {difference}; the {policy} policy's divergence needs one "
        "vocabulary: across tokenizers use --divergence uld or uld_hybrid (logit-level, the tokens aligned by "
        "text), or --recipe seqkd (the student learns the teacher's generated text), or give both models one "
        "tokenizer (tokenizer=DIR, student.tokenizer=DIR)"
    )


def check_data_ids(examples: list[Example], n: int, role: str) -> None:
    """Every token id of the encoded data lies below ``n`` (the logits both models share)."""
    for example in examples:
        for i in (*example.prompt_ids, *example.response_ids):
            if i >= n:
                raise ConfigError(
                    f"the data encodes to token id {i}, past the {n} ids the {role}'s tokenizer shares with the "
                    "other's; encode with the smaller tokenizer (set tokenizer=DIR)"
                )


class TextBridge:
    """Sequence-level KD across tokenizers: the teacher's answer as the student's training sequence.

    The teacher answers the prompt in its own chat template (``teacher_prompts``); its answer is
    decoded to text and re-encoded with the student's tokenizer after the student's own prompt
    (``to_student``), ending with the student's EOS when the teacher ended its answer (one cut at
    the token cap gets none: the student must not learn to stop there).
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, data_cfg, teacher_stops: list[int]) -> None:
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.format_teacher = PromptFormatter(teacher_tokenizer, data_cfg.prompt_template)
        self.max_response_tokens = data_cfg.max_response_tokens
        self.teacher_stops = set(teacher_stops)

    def teacher_prompts(self, examples: list[Example]) -> list[Example]:
        """The examples' prompts in the teacher's tokens and chat template (responses empty)."""
        return [
            Example(self.format_teacher(e.messages), [], reference=e.reference, messages=e.messages) for e in examples
        ]

    def to_student(self, example: Example, answer: Example) -> Example:
        """``example`` (student tokens) with the teacher's ``answer`` (teacher tokens) as its response."""
        ids = list(answer.response_ids)
        ended = bool(ids) and ids[-1] in self.teacher_stops
        text = self.teacher_tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
        response = list(self.student_tokenizer(text, add_special_tokens=False).input_ids)
        if ended and self.student_tokenizer.eos_token_id is not None:
            response.append(self.student_tokenizer.eos_token_id)
        response = response[: self.max_response_tokens] or [self.student_tokenizer.eos_token_id]
        return Example(example.prompt_ids, response, reference=text, messages=example.messages)

    def generate_teacher(self, generate, examples: list[Example]) -> list[Example]:
        """``generate(prompts)`` (the teacher's generator) on the examples, re-encoded for the student."""
        answers = generate(self.teacher_prompts(examples))
        return [self.to_student(e, a) for e, a in zip(examples, answers)]


__all__ = ["TextBridge", "check_data_ids", "cross_tokenizer_error", "mismatch", "student_tokenizer_ref"]
