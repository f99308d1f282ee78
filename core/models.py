"""Loading teacher, student and tokenizer from a model reference, and checking they fit together.

A reference is a local Hugging Face directory, a hub id (where the network allows), or a name that a
resolver registered with ``register_model_resolver`` understands (built-in models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from distill.errors import ConfigError

_RESOLVERS: list[Callable[[str, str], "torch.nn.Module | None"]] = []


def register_model_resolver(resolver: Callable[[str, str], "torch.nn.Module | None"]) -> None:
    """Add ``resolver(ref, role) -> model or None``; tried before Hugging Face loading."""
    _RESOLVERS.append(resolver)


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1


def load_model(ref: str | None, role: str, dtype: torch.dtype = torch.float32):
    """The causal LM for ``ref``; ``role`` ("teacher"/"student") names the flag in errors."""
    if not ref:
        raise ConfigError(f"{role}: required; pass --{role} DIR (a Hugging Face model directory or hub id)")
    for resolver in _RESOLVERS:
        model = resolver(ref, role)
        if model is not None:
            return model
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
    """The tokenizer at ``ref``, with a pad token (the EOS token when it has none)."""
    if not ref:
        raise ConfigError("tokenizer: required; pass --teacher DIR or set tokenizer")
    from transformers import AutoTokenizer

    path = Path(ref).expanduser()
    if _looks_local(ref) and not path.exists():
        raise ConfigError(f"tokenizer {ref}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else ref)
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokenizer {ref}: cannot load ({str(error).splitlines()[0]})") from None
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
