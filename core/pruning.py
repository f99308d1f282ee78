"""Derive a student from a teacher by keeping K evenly spaced decoder layers (a layer-pruned copy).

Works for Llama-, Qwen-, Mistral- (``model.layers``) and GPT-2-style (``transformer.h``) models:
the student shares the teacher's tokenizer and vocabulary and starts from copies of its embeddings,
final norm, output head and the kept layers.
"""

from __future__ import annotations

import re

from distill.errors import ConfigError

_LAYER_KEYS = (("model.layers.", "num_hidden_layers"), ("transformer.h.", "n_layer"))


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


def prune_layers(teacher, keep: int):
    """A new model of the teacher's class with ``keep`` of its decoder layers (weights copied)."""
    from transformers import AutoModelForCausalLM

    state = teacher.state_dict()
    prefix = attr = None
    for candidate, config_attr in _LAYER_KEYS:
        if any(k.startswith(candidate) for k in state) and hasattr(teacher.config, config_attr):
            prefix, attr = candidate, config_attr
            break
    if prefix is None:
        raise ConfigError(f"cannot prune {type(teacher).__name__}: only Llama/Qwen/Mistral- and GPT-2-style models are supported")
    total = getattr(teacher.config, attr)
    layers = kept_layers(total, keep)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    setattr(config, attr, len(layers))
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

