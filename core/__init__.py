"""distill: pluggable knowledge distillation for language models.

Public API (flat re-exports)::

    distill.get_divergence(name, temperature=1.0, **params) -> divergence d; d(student [N,V], teacher [N,V]) -> [N]
    distill.divergence_loss(d, student_logits, teacher_logits, mask=None, *, chunk_size=None, n_tokens=None)
    distill.get_policy(name, **params), distill.get_recipe(name)
    distill.hookimpl, distill.Params, distill.Divergence, distill.SamplingPolicy, distill.Recipe
    distill.RandomPolicy, distill.SamplingContext, distill.Example   (for writing a sampling policy)
    distill.testing.check_divergence, distill.testing.check_policy   (conformance kit; needs hypothesis)

A run from Python: ``distill.resolve.resolve_config(*layers)`` -> ``plan_run(config)`` ->
``distill.engine.train(plan)`` (imported on demand: they load torch models and Accelerate).
"""

from __future__ import annotations

from typing import Any

from distill.data import Example
from distill.divergence import ConfiguredDivergence
from distill.errors import ConfigError, DistillError, PluginError, RunStopped, UnknownPluginError
from distill.hookspecs import hookimpl
from distill.interfaces import Divergence, Recipe, SamplingPolicy, Source
from distill.loss import default_chunk_size, divergence_loss
from distill.params import Params
from distill.policy import RandomPolicy, SamplingContext
from distill.registry import Registry, default_registry, reset_default_registry

__version__ = "0.1.0"


def get_divergence(name: str, *, temperature: float = 1.0, **params: Any) -> ConfiguredDivergence:
    """The divergence ``name`` (or an alias) with ``params``; ``temperature`` divides both logits."""
    return default_registry().get_divergence(name, temperature=temperature, **params)


def get_policy(name: str, **params: Any) -> SamplingPolicy:
    """A new instance of the sampling policy ``name`` with ``params``."""
    return default_registry().get_policy(name, **params)


def get_recipe(name: str) -> Recipe:
    """The recipe (preset) ``name``."""
    return default_registry().get_recipe(name)


__all__ = [
    "ConfigError",
    "ConfiguredDivergence",
    "DistillError",
    "Divergence",
    "Example",
    "Params",
    "PluginError",
    "RandomPolicy",
    "Recipe",
    "Registry",
    "RunStopped",
    "SamplingContext",
    "SamplingPolicy",
    "Source",
    "UnknownPluginError",
    "__version__",
    "default_chunk_size",
    "default_registry",
    "divergence_loss",
    "get_divergence",
    "get_policy",
    "get_recipe",
    "hookimpl",
    "reset_default_registry",
]
