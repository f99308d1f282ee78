"""The hooks a distill plugin implements. Each hands the plugin a ``register`` callback.

A plugin module decorates functions with ``distill.hookimpl`` and calls ``register(cls)`` for each
class it provides; the host validates every registration and rejects duplicate names.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "distill"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_divergences(register: Callable[[type], None]) -> None:
    """Register Divergence classes: call ``register(cls)`` once per class."""


@hookspec
def register_policies(register: Callable[[type], None]) -> None:
    """Register SamplingPolicy classes: call ``register(cls)`` once per class."""


@hookspec
def register_sequence_terms(register: Callable[[type], None]) -> None:
    """Register SequenceTerm classes (loss terms over whole sampled responses): ``register(cls)``."""


@hookspec
def register_recipes(register: Callable[[object], None]) -> None:
    """Register Recipe objects (named presets of a divergence and a policy): ``register(recipe)``."""
