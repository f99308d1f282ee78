"""A divergence plugin bound to its parameters and a temperature: what ``get_divergence`` returns."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from distill.errors import ConfigError
from distill.params import Params, validate_params

NEG_LOGIT = -1e30
"""-inf logits (a vocabulary entry masked out) are raised to this: probability exactly 0, but every
log-probability, difference and gradient stays finite."""


def prepare_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[..., V]`` logits in any float dtype -> float32 logits divided by ``temperature``, finite below."""
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    return x.clamp_min(NEG_LOGIT)


def check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, cross: bool = False) -> None:
    """Raise a one-line error unless both logits have the same shape (and so the same vocabulary);
    ``cross`` (a divergence across vocabularies): the same rows, any two widths."""
    if cross:
        if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
            raise ConfigError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} must have the same rows"
            )
        return
    if student_logits.shape[-1:] != teacher_logits.shape[-1:]:
        raise ConfigError(
            f"student and teacher vocabularies differ: student logits have {student_logits.shape[-1]} "
            f"entries, teacher logits {teacher_logits.shape[-1]}; use models that share a tokenizer"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )


class ConfiguredDivergence:
    """A Divergence plugin instance plus the temperature the core applies before it.

    ``d(student_logits [N, V], teacher_logits [N, V]) -> [N]`` float32 per-token values of
    ``D(softmax(teacher / T), softmax(student / T))``, differentiable by ordinary autograd. For a
    masked, chunked, memory-lean mean use ``distill.divergence_loss(d, ...)``.
    """

    def __init__(self, plugin: Any, params: Params, temperature: float = 1.0) -> None:
        self.plugin = plugin
        self.params = params
        self.temperature = float(temperature)
        self.name: str = type(plugin).name
        self.Params: type[Params] = type(plugin).Params
        self.cross_vocabulary: bool = bool(getattr(type(plugin), "cross_vocabulary", False))
        """The plugin compares distributions over two vocabularies (``[N, Vs]`` and ``[N, Vt]``)."""

    @classmethod
    def create(cls, plugin_cls: type, values: Mapping[str, Any], *, temperature: float = 1.0) -> "ConfiguredDivergence":
        """Validate ``values`` against ``plugin_cls.Params`` and the temperature; build the plugin."""
        try:
            temperature = float(temperature)
        except (TypeError, ValueError):
            raise ConfigError(
                f"divergence {plugin_cls.name}.temperature: must be a number (got {temperature!r})"
            ) from None
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(
                f"divergence {plugin_cls.name}.temperature: must be a finite number > 0 (got {temperature!r})"
            )
        params = validate_params(plugin_cls.Params, dict(values), f"divergence {plugin_cls.name}")
        return cls(plugin_cls(params), params, temperature)

    @classmethod
    def wrap(cls, divergence: Any) -> "ConfiguredDivergence":
        """Accept a ConfiguredDivergence, or a bare plugin instance (temperature 1)."""
        if isinstance(divergence, cls):
            return divergence
        if not callable(divergence) or not hasattr(type(divergence), "name"):
            raise TypeError(f"expected a divergence (see distill.get_divergence), got {divergence!r}")
        return cls(divergence, getattr(divergence, "params", None), 1.0)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        check_logits(student_logits, teacher_logits, cross=self.cross_vocabulary)
        if student_logits.dim() != 2:
            raise ValueError(f"expected [N, V] logits, got shape {tuple(student_logits.shape)}")
        values = self.plugin(
            prepare_logits(student_logits, self.temperature), prepare_logits(teacher_logits, self.temperature)
        )
        if values.shape != student_logits.shape[:1]:
            raise ValueError(
                f"divergence {self.name} returned shape {tuple(values.shape)}; expected [{student_logits.shape[0]}]"
            )
        return values.float()

    def __repr__(self) -> str:
        params = self.params.model_dump() if isinstance(self.params, Params) else {}
        shown = ", ".join(f"{k}={v}" for k, v in {**params, "temperature": self.temperature}.items())
        return f"{self.name}({shown})"
