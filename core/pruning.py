"""Derive a student from a teacher by keeping K evenly spaced decoder layers (a layer-pruned copy).

Works for any causal LM whose decoder layers are one ``ModuleList`` of ``config.num_hidden_layers``
blocks, wherever the architecture keeps it (``model.layers`` in Llama, Qwen, Mistral, Gemma, Phi-3;
``transformer.h`` in GPT-2; ``model.decoder.layers`` in OPT): the student shares the teacher's
tokenizer and vocabulary and starts from copies of its embeddings, final norm, output head and the
kept layers.
"""

from __future__ import annotations

import re

import torch

from distill.errors import ConfigError


def _no_init_weights():
    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _get(settings, key: str):
    return settings.get(key) if isinstance(settings, dict) else getattr(settings, key, None)


def kept_layers(total: int, keep: int) -> list[int]:
    """``keep`` evenly spaced indices in ``range(total)``, first and last included."""
    if not 1 <= keep <= total:
        raise ConfigError(f"student layers: keep must be between 1 and {total} (the teacher's layers), got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def decoder_layers(model) -> str:
    """The name of ``model``'s list of decoder layers (``model.layers``, ``transformer.h``, ...): the
    one ``ModuleList`` of ``config.num_hidden_layers`` modules (GPT-2's config maps the name to ``n_layer``)."""
    total = getattr(model.config, "num_hidden_layers", None)
    found = (
        [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList) and len(module) == total
        ]
        if total
        else []
    )
    if len(found) == 1:
        return found[0]
    if not total:
        why = "its config has no num_hidden_layers"
    elif not found:
        why = f"no list of its {total} decoder layers"
    else:
        why = f"{len(found)} lists of {total} modules ({', '.join(found[:3])}), which is the decoder's is unclear"
    raise ConfigError(
        f"cannot prune {type(model).__name__} ({model.config.model_type}): "
        f"{why}; pass a student directory instead of prune:K"
    )


STACK_COUNTS = {"encoder": ("encoder_layers", "num_layers"), "decoder": ("decoder_layers", "num_decoder_layers")}
"""The config keys of an encoder-decoder's layer counts: BART / Marian's, then T5's."""


def stack_layers(model) -> dict[str, tuple[str, str, int]]:
    """An encoder-decoder's two layer lists: ``{stack: (module name, config key, layers)}`` (T5's
    ``encoder.block`` and ``decoder.block``, BART's ``model.encoder.layers`` and ``model.decoder.layers``)."""
    found = {}
    for stack, keys in STACK_COUNTS.items():
        key = next((k for k in keys if isinstance(getattr(model.config, k, None), int)), None)
        total = getattr(model.config, key, None) if key else None
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.ModuleList)
            and len(module) == total
            and stack in name.split(".")
            and name.split(".").index(stack) == len(name.split(".")) - 2  # <...>.encoder.<list>
        ]
        if key is None or len(names) != 1:
            raise ConfigError(
                f"cannot prune {type(model).__name__} ({model.config.model_type}): its {stack}'s layer list is "
                "not found; pass a student directory instead of prune:K"
            )
        found[stack] = (names[0], key, total)
    return found


def prune_layers(teacher, keep: int, encoder_keep: int | None = None):
    """A new model of the teacher's class with ``keep`` of its decoder layers (weights copied); an
    encoder-decoder keeps ``keep`` of its decoder's and ``encoder_keep`` (default ``keep``) of its encoder's."""
    if getattr(teacher.config, "is_encoder_decoder", False):
        return _prune_stacks(teacher, {"decoder": keep, "encoder": encoder_keep or keep})
    if encoder_keep is not None:
        raise ConfigError("student.encoder_layers: the teacher is decoder-only (it has no encoder to prune)")
    from transformers import AutoModelForCausalLM

    state = teacher.state_dict()
    prefix = decoder_layers(teacher) + "."
    total = teacher.config.num_hidden_layers
    layers = kept_layers(total, keep)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    config.num_hidden_layers = len(layers)
    for name in ("layer_types",):  # per-layer settings (sliding windows) follow their layers
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == total:
            setattr(config, name, [values[i] for i in layers])
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None and str(_get(quantization, "quant_method")).lower().endswith("gguf"):
        # a GGUF-loaded teacher's state holds de-quantized tensors: the copy is a plain model (saved
        # and reloaded without the GGUF file, and not flagged as quantized)
        del config.quantization_config
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, len(layers))
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.*)")
    new_index = {old: new for new, old in enumerate(layers)}
    pruned_state = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match is None:
            pruned_state[key] = value.clone()
        elif int(match.group(1)) in new_index:
            pruned_state[f"{prefix}{new_index[int(match.group(1))]}.{match.group(2)}"] = value.clone()
    with _no_init_weights():  # every weight is overwritten below; random init of 100M+ weights takes long
        student = AutoModelForCausalLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    missing, unexpected = student.load_state_dict(pruned_state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"pruning left missing={missing[:3]} unexpected={unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    return student.eval()  # like from_pretrained; the engine switches to train mode


def _prune_stacks(teacher, keep: dict[str, int]):
    """An encoder-decoder with ``keep[stack]`` of each stack's layers, evenly spaced (first and last kept)."""
    from transformers import AutoModelForSeq2SeqLM

    stacks = stack_layers(teacher)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    renames: list[tuple[re.Pattern, dict[int, int], str]] = []
    for stack, (name, key, total) in stacks.items():
        try:
            layers = kept_layers(total, keep[stack])
        except ConfigError as error:
            raise ConfigError(f"{stack} layers: {str(error).split(': ', 1)[1]}") from None
        setattr(config, key, len(layers))
        renames.append((re.compile(re.escape(name + ".") + r"(\d+)\.(.*)"), {o: n for n, o in enumerate(layers)}, name))
    pruned_state = {}
    for key, value in teacher.state_dict().items():
        for pattern, new_index, name in renames:
            match = pattern.match(key)
            if match is not None:
                if int(match.group(1)) in new_index:
                    pruned_state[f"{name}.{new_index[int(match.group(1))]}.{match.group(2)}"] = value.clone()
                break
        else:
            pruned_state[key] = value.clone()
    with _no_init_weights():
        student = AutoModelForSeq2SeqLM.from_config(config, dtype=next(teacher.parameters()).dtype)
    missing, unexpected = student.load_state_dict(pruned_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"pruning left missing={missing[:3]} unexpected={unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    student.generation_config = teacher.generation_config
    return student.eval()
