"""Loading teacher, student and tokenizer from a model reference, and checking they fit together.

A reference is a local Hugging Face directory, a hub id (where the network allows), a built-in name
(``smollm2-135m-instruct``), or, for the student, ``prune:K`` (the teacher with K evenly spaced
layers) or ``prune:K:REF``.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import torch

from distill.builtin import load_builtin_model, load_builtin_tokenizer
from distill.errors import ConfigError
from distill.pruning import prune_layers


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or Path(ref).exists() or ref.count("/") > 1


def load_model(ref, role: str, dtype: torch.dtype = torch.float32, *, teacher=None, encoder_layers: int | None = None):
    """The causal LM for ``ref`` (a string or a ``ModelSpec`` with ``ref``, ``dtype`` and an optional
    ``adapter`` merged at load); ``role`` ("teacher"/"student") names the flag in errors.

    ``prune:K`` derives the model from ``teacher`` (already loaded) by keeping K of its layers (of an
    encoder-decoder's: K of its decoder's and ``encoder_layers``, default K, of its encoder's).
    """
    if hasattr(ref, "ref"):
        spec = ref
        if role == "teacher" and spec.lora is not None:
            raise ConfigError(
                "teacher.lora: the teacher is frozen; to load a LoRA-tuned teacher set teacher.adapter=PATH"
            )
        if role == "teacher" and spec.tokenizer:
            raise ConfigError(
                "teacher.tokenizer: the teacher's tokenizer is set by "
                "tokenizer=DIR (student.tokenizer is the student's own)"
            )
        if role == "teacher" and spec.freeze:
            raise ConfigError("teacher.freeze: the teacher is always frozen; set student.freeze instead")
        if role == "student" and spec.cache:
            raise ConfigError(
                "student.cache: a cache holds the teacher's log-probs; set teacher.cache=DIR (--teacher-cache DIR)"
            )
        if spec.lora is not None and spec.freeze:
            raise ConfigError("student.freeze: with student.lora only the adapters train already; drop one of the two")
        if spec.encoder_layers is not None and not str(spec.ref or "").startswith("prune:"):
            raise ConfigError(f"{role}.encoder_layers: only with {role}=prune:K (the layers a pruned copy keeps)")
        model = load_model(
            spec.ref,
            role,
            getattr(torch, _concrete_dtype(spec.dtype, role)),
            teacher=teacher,
            encoder_layers=spec.encoder_layers,
        )
        return merge_adapter(model, spec.adapter, role) if spec.adapter else model
    if not ref:
        raise ConfigError(f"{role}: required; pass --{role} DIR (a Hugging Face model directory or hub id)")
    if ref.startswith("prune:"):
        _, count, *base = ref.split(":", 2)
        if not count.isdigit():
            raise ConfigError(f"--{role} {ref}: expected prune:K or prune:K:REF with K a number of layers")
        source = load_model(base[0], role, dtype) if base else teacher
        if source is None:
            raise ConfigError(f"--{role} {ref}: prune:K needs a teacher to derive from")
        return prune_layers(source, int(count), encoder_layers).to(dtype)
    builtin = load_builtin_model(ref, dtype)
    if builtin is not None:
        return builtin
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = Path(ref).expanduser()
    if _looks_local(ref):
        if not path.exists():
            raise ConfigError(f"--{role} {ref}: no such directory")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--{role} {ref}: not a model directory (no config.json)")
    where, seq2seq = str(path) if path.exists() else ref, False
    try:
        # an encoder-decoder (T5, BART, Marian) is loaded whole: a causal-LM class would keep its decoder alone
        seq2seq = bool(getattr(AutoConfig.from_pretrained(where), "is_encoder_decoder", False))
        kind = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        return kind.from_pretrained(where, dtype=dtype)
    except (OSError, ValueError) as error:
        what = "a sequence-to-sequence" if seq2seq else "a causal"
        raise ConfigError(f"--{role} {ref}: cannot load {what} language model ({str(error).splitlines()[0]})") from None


def is_encoder_decoder(model) -> bool:
    """Whether ``model`` (wrapped or not) is an encoder-decoder: the prompt is its encoder's input."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)
    return bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))


def decoder_start(model) -> int | None:
    """The id an encoder-decoder's decoder starts from (None for a decoder-only model)."""
    if not is_encoder_decoder(model):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "module", base).config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(base, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise ConfigError("the encoder-decoder model's config has no decoder_start_token_id; set it in config.json")
    return int(start)


def _concrete_dtype(dtype: str, role: str) -> str:
    """A spec's dtype with ``auto`` resolved for the ``auto`` precision (a run resolves its config
    before loading, with ``distill.hardware.resolve_precision``; this serves direct calls)."""
    from distill.hardware import auto_precision, weights_dtype

    if dtype != "auto":
        return dtype
    return weights_dtype(dtype, role, auto_precision()[0])


def contiguous_head_input(model) -> None:
    """Make the output head's input contiguous before it multiplies it (idempotent).

    With ``logits_to_keep`` (and in generation) transformers slices the last positions out of the
    hidden states, ``[B, T, H] -> [B, K, H]``: a strided view. oneDNN runs a native bf16 matmul on a
    strided input on a slow path: for the embedded default's head ([8, 129, 576] x [576, 49152], one
    thread of a 2-core AMD EPYC with AVX512-BF16) 1.2-2.8 s instead of 0.4 s once copied; float32
    gains less (1.0 s against 0.8 s, also under the AVX2 emulation). This made our teacher forward
    slower than TRL's, which projects every position. The copy is [B, K, H], small beside the
    [B, K, V] logits.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_distill_contiguous", False):
        return
    head.register_forward_pre_hook(_contiguous_first_argument)
    head._distill_contiguous = True


def _contiguous_first_argument(module, args):
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def freeze(model, patterns: list[str]) -> int:
    """Stop gradients for the parameters ``patterns`` select: ``embeddings`` (the input and output
    embeddings, one tensor when tied) or ``fnmatch`` globs over names (``model.layers.0.*``).
    Returns how many weights stay trainable; a pattern that selects nothing is a ``ConfigError``."""
    named = dict(model.named_parameters())
    for pattern in patterns:
        if pattern == "embeddings":
            modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
            chosen = [p for m in modules for p in m.parameters()]
        else:
            chosen = [p for name, p in named.items() if fnmatch.fnmatchcase(name, pattern)]
        if not chosen:
            example = next(iter(named), "")
            raise ConfigError(
                f"student.freeze {pattern!r}: matches no parameter (names look like {example!r}; or use 'embeddings')"
            )
        for parameter in chosen:
            parameter.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if patterns and trainable == 0:
        raise ConfigError(f"student.freeze {patterns}: freezes every parameter; nothing would train")
    return trainable


def _peft(setting: str):
    try:
        import peft
    except ImportError:
        raise ConfigError(
            f"{setting} needs the peft package: pip install 'distill[lora]' (or pip install peft)"
        ) from None
    return peft


def merge_adapter(model, adapter: str | Path, role: str):
    """``model`` with the PEFT adapter saved in folder ``adapter`` merged into its weights (a plain
    ``transformers`` model again: no adapter layers, no extra cost per forward)."""
    peft = _peft(f"{role}.adapter")
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{role}.adapter {adapter}: not a PEFT adapter folder (no adapter_config.json)")
    try:
        return peft.PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as error:
        raise ConfigError(
            f"{role}.adapter {adapter}: does not fit the {role} ({str(error).strip().splitlines()[0]})"
        ) from None


def add_lora(model, lora, adapter_dir: str | Path | None = None):
    """``model`` wrapped by ``peft`` with trainable LoRA adapters as ``lora`` (a ``LoraSpec``) says,
    every base weight frozen; ``adapter_dir``: continue from adapters saved there (a checkpoint)."""
    peft = _peft("student.lora")
    if adapter_dir is not None:
        return peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:
        raise ConfigError(f"student.lora.target_modules: {str(error).strip().splitlines()[0]}") from None


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


def check_vocabularies(teacher, student, tokenizer, student_tokenizer=None) -> int:
    """The number of logits teacher and student are compared over: the tokenizers' shared ids (one
    tokenizer: its ``len``), the first rows of both heads. Heads may have more rows than their
    tokenizer has tokens (padded to a multiple of 64 or 128, as Qwen2.5's are), and differ in that
    padding; a head smaller than its tokenizer is an error. ``teacher`` None (a run on a teacher
    cache that never loads it): the student alone is checked."""
    student_tokenizer = student_tokenizer or tokenizer
    for role, model, its_tokenizer in (("teacher", teacher, tokenizer), ("student", student, student_tokenizer)):
        if model is None:
            continue
        n, rows = len(its_tokenizer), vocab_size(model)
        if rows < n:
            raise ConfigError(
                f"the tokenizer has {n} tokens but the {role}'s output head only {rows} rows; use the tokenizer "
                f"the {role} was trained with (set {'tokenizer' if role == 'teacher' else 'student.tokenizer'}=DIR)"
            )
    return min(len(tokenizer), len(student_tokenizer))


def share_vocabulary(teacher, student, tokenizer, student_tokenizer=None, *, shared: bool = True) -> int:
    """``check_vocabularies``, then both models give logits over the shared ids only (``trim_head``).
    Returns that number of logits. ``shared=False`` (tokenizers that differ: text in between): each
    model's logits are its own tokenizer's ids; returns the student's number."""
    n = check_vocabularies(teacher, student, tokenizer, student_tokenizer)
    if not shared:
        if teacher is not None:
            trim_head(teacher, len(tokenizer))
        trim_head(student, len(student_tokenizer))
        return len(student_tokenizer)
    for model in (teacher, student):
        if model is not None:
            trim_head(model, n)
    return n


def trim_head(model, n: int) -> None:
    """Make ``model``'s logits the first ``n`` of its output head's rows (idempotent; a no-op when the
    head has ``n`` rows). Rows past the tokenizer stand for no token: left in, they would take
    probability mass in every softmax (the divergence, the cross-entropy, generation). The slice is
    a view of the full projection: the padded rows are still computed (a few per mille of the head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or vocab_size(model) <= n:
        return
    registered = getattr(head, "_distill_trim", None) is not None
    head._distill_trim = n
    if not registered:
        head.register_forward_hook(_trimmed_output)


def _trimmed_output(module, args, output):
    n = module._distill_trim
    return output[..., :n] if isinstance(output, torch.Tensor) and output.shape[-1] > n else None


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a response ``model`` generates: every id of its ``generation_config.eos_token_id``
    (an int or a list: Llama-3 instruct models end a turn on several) and the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def check_stop_ids(teacher, student, tokenizer, n_logits: int, student_tokenizer=None) -> str | None:
    """A stop id the model cannot emit is a ``ConfigError``; returns a warning when the teacher's and
    the student's stop ids differ (each model's own end its generated responses). ``n_logits``: the
    logits both share; with a ``student_tokenizer`` that differs (text in between), each model's own
    tokenizer's size, and no warning (their ids mean different tokens)."""
    apart = student_tokenizer is not None and student_tokenizer is not tokenizer
    found, limits = {}, {}
    for role, model, its_tokenizer in (
        ("teacher", teacher, tokenizer),
        ("student", student, student_tokenizer or tokenizer),
    ):
        if model is None:  # a teacher a cache stands in for: it generates nothing
            continue
        found[role] = stop_ids(model, its_tokenizer)
        limits[role] = len(its_tokenizer) if apart else n_logits
    for role, ids in found.items():
        outside = [i for i in ids if not 0 <= i < limits[role]]
        if outside:
            raise ConfigError(
                f"the {role}'s stop id {outside[0]} (generation_config.eos_token_id) lies "
                f"outside the {limits[role]} logits it is trained on (the tokenizer's "
                f"tokens); fix the {role}'s generation_config.json or use its own tokenizer"
            )
    if not apart and "teacher" in found and set(found["teacher"]) != set(found["student"]):
        return (
            f"teacher and student end responses on different ids (teacher {_shown(found['teacher'])}, "
            f"student {_shown(found['student'])}); each model's own ids end the responses it generates"
        )
    return None


def _shown(ids: list[int], most: int = 8) -> str:
    return str(ids) if len(ids) <= most else f"[{', '.join(map(str, ids[:most]))}, ... ({len(ids)} ids)]"


def derives_from_teacher(spec) -> bool:
    """Whether a student reference is cut from the run's teacher (``prune:K``, not ``prune:K:REF``)."""
    ref = spec.ref or ""
    return ref.startswith("prune:") and ref.count(":") == 1
