"""Loading teacher, student and tokenizer from a model reference, and checking they fit together.

A reference is a local Hugging Face directory, a hub id (where the network allows), a built-in name
(``smollm2-135m-instruct``), or, for the student, ``prune:K`` (the teacher with K evenly spaced
layers) or ``prune:K:REF``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill.builtin import load_builtin_model, load_builtin_tokenizer
from distill.errors import ConfigError
from distill.pruning import prune_layers


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1


def load_model(ref, role: str, dtype: torch.dtype = torch.float32, *, teacher=None):
    """The causal LM for ``ref`` (a string or a ``ModelSpec`` with ``ref`` and ``dtype``); ``role``
    ("teacher"/"student") names the flag in errors.

    ``prune:K`` derives the model from ``teacher`` (already loaded) by keeping K of its layers.
    """
    if hasattr(ref, "ref"):
        ref, dtype = ref.ref, getattr(torch, ref.dtype)
    if not ref:
        raise ConfigError(f"{role}: required; pass --{role} DIR (a Hugging Face model directory or hub id)")
    if ref.startswith("prune:"):
        _, count, *base = ref.split(":", 2)
        if not count.isdigit():
            raise ConfigError(f"--{role} {ref}: expected prune:K or prune:K:REF with K a number of layers")
        source = load_model(base[0], role, dtype) if base else teacher
        if source is None:
            raise ConfigError(f"--{role} {ref}: prune:K needs a teacher to derive from")
        return prune_layers(source, int(count)).to(dtype)
    builtin = load_builtin_model(ref, dtype)
    if builtin is not None:
        return builtin
    from transformers import AutoModelForCausalLM

    path = Path(ref).expanduser()
    if _looks_local(ref):
        if not path.exists():
            raise ConfigError(f"--{role} {ref}: no such directory")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--{role} {ref}: not a model directory (no config.json)")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else ref, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ConfigError(f"--{role} {ref}: cannot load a causal language model ({str(error).splitlines()[0]})") from None


def load_tokenizer(ref: str | None):
    """The tokenizer at ``ref`` (a string or a ``ModelSpec``), with a pad token (EOS when it has none)."""
    ref = getattr(ref, "ref", ref)
    if not ref:
        raise ConfigError("tokenizer: required; pass --teacher DIR or set tokenizer")
    from transformers import AutoTokenizer

    tokenizer = load_builtin_tokenizer(ref)
    if tokenizer is not None:
        return _with_pad(tokenizer, ref)

    path = Path(ref).expanduser()
    if _looks_local(ref) and not path.exists():
        raise ConfigError(f"tokenizer {ref}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else ref)
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokenizer {ref}: cannot load ({str(error).splitlines()[0]})") from None
    return _with_pad(tokenizer, ref)


def _with_pad(tokenizer, ref: str):
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer {ref}: has neither a pad nor an EOS token; add one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def vocab_size(model) -> int:
    """Rows of the output projection: the size of the model's logits."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_vocabularies(teacher, student, tokenizer) -> None:
    """Fail before training unless teacher and student produce logits over the same vocabulary."""
    v_teacher, v_student = vocab_size(teacher), vocab_size(student)
    if v_teacher != v_student:
        raise ConfigError(
            f"teacher and student vocabularies differ: teacher has {v_teacher} logits, student {v_student}; "
            "distil between models that share a tokenizer"
        )
    if len(tokenizer) > v_student:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the models only {v_student} logits")
