"""The one config path: every run's config is merged here, in one order, and its plugins checked once.

    recipe < embedded default < the layers given, lowest first (the CLI's: config file < flags)

- ``resolve_config`` merges the layers into a ``RunConfig`` (its own fields validated by pydantic).
  The CLI, the benchmarks and ``resume_config`` all come through it.
- ``plan_run`` validates the plugins' params against the registry, once: the run's divergence, each
  ``objective.terms`` entry, the policy and the sources the terms name. The ``RunPlan`` it returns
  holds what it built, and ``distill.train`` runs with it (handed a bare ``RunConfig``, ``train``
  plans it first).
- ``resume_config``: ``--resume``'s config, the saved ``config.yaml`` with the layers on top, where
  only ``distill.checkpoint.RESUMABLE_FIELDS`` may change.

A command's config, from a config file and its flags (``flag_layer``), one function per command, each
``(config_file, flags, registry=None) -> RunConfig`` on top of the two above:

- ``resolve_run``: ``distill run`` (recipe < embedded default < file < flags, a new ``runs/`` folder);
- ``resolve_resume``: ``distill run --resume`` (the run in the output folder, its saved config);
- ``resolve_cache``: ``distill cache-teacher`` (no recipe: the data settings a run with the same file
  and flags uses).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from distill.builtin import DEFAULT_RUN
from distill.checkpoint import RESUMABLE_FIELDS, flatten_config, saved_config
from distill.config import (
    RunConfig,
    build_config,
    merge_layer,
    parse_assignments,
    read_config_file,
    recipe_layer,
    set_dotted,
)
from distill.errors import ConfigError
from distill.objective import Objective
from distill.params import Params, validate_params
from distill.registry import Registry, default_registry

DEFAULT_RECIPE = "distillm"
"""The recipe of a run whose layers name none."""


def resolve_config(
    *layers: Mapping[str, Any],
    recipe: str | bool | None = None,
    embedded: bool | None = None,
    stamp_output: bool = False,
    registry: Registry | None = None,
) -> RunConfig:
    """Merge ``layers`` (lowest precedence first) over the recipe and the embedded default.

    ``recipe``: the recipe under everything; default: the one the topmost layer names, else
    ``DEFAULT_RECIPE``; False: none (the layers are a whole config, like a saved ``config.yaml``, or
    need no plugins, like a teacher cache's). ``embedded``: put ``distill.builtin.DEFAULT_RUN``
    (built-in teacher, pruned student, built-in data) between the recipe and the layers; default:
    when no layer names a teacher. ``stamp_output``: without an ``output_dir`` anywhere, a new
    ``runs/<recipe>-<time>`` (the CLI never reuses a folder by accident).
    """
    bottom: list[Mapping[str, Any]] = []
    name = (
        recipe
        if isinstance(recipe, str)
        else next((layer["recipe"] for layer in reversed(layers) if layer.get("recipe")), None) or DEFAULT_RECIPE
    )
    if recipe is not False:
        bottom.append(recipe_layer((registry or default_registry()).get_recipe(name)))
    if embedded if embedded is not None else not any(_names_model(layer.get("teacher")) for layer in layers):
        bottom.append(DEFAULT_RUN)
    if stamp_output and not any(layer.get("output_dir") for layer in layers):
        bottom.append({"output_dir": f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"})
    return build_config([*bottom, *layers])


@dataclass(frozen=True)
class RunPlan:
    """A config whose plugins are checked: the objective (each source's divergence, built) and the
    policy's class with its validated params. ``make_policy()`` builds a fresh policy (a policy has
    state: one per run). The objective is shared by every run of the plan: divergences hold their
    params and nothing else (a plugin with state of its own would need a plan per run)."""

    config: RunConfig
    objective: Objective
    policy_cls: type
    policy_params: Params

    def make_policy(self):
        return self.policy_cls(self.policy_params)


def plan_run(config: RunConfig, registry: Registry | None = None) -> RunPlan:
    """Validate every plugin's params against ``registry`` (one line naming the field on bad input)."""
    registry = registry or default_registry()
    objective = Objective(config, registry)  # the run's divergence, and one per objective.terms source
    registration = registry.lookup("policy", config.policy.name)
    params = validate_params(registration.obj.Params, dict(config.policy.params), f"policy {registration.name}")
    # on an instance: a policy may set its `sources` in __init__
    policy = registration.obj(params)
    objective.check_sources(policy, config.policy.name)
    objective.check_sequence_terms(policy, config.policy.name)
    return RunPlan(config, objective, registration.obj, params)


def resume_config(out: str | Path, *layers: Mapping[str, Any], registry: Registry | None = None) -> RunConfig:
    """The saved config of the run in ``out`` with ``layers`` on top.

    A layer's field outside ``RESUMABLE_FIELDS`` is refused unless it repeats the saved value, so
    the command line that started a run, plus ``--resume``, continues it.
    """
    saved = saved_config(out)
    overrides = functools.reduce(
        merge_layer, layers, {}
    )  # the spelling a saved config uses (e.g. `teacher: DIR` -> teacher.ref)
    flat_saved = flatten_config(saved)
    changed = [
        key
        for key, value in flatten_config(overrides).items()
        if key != "output_dir" and key not in RESUMABLE_FIELDS and flat_saved.get(key, object()) != value
    ]
    if changed:
        raise ConfigError(
            f"--resume continues the run with its saved config; cannot change {', '.join(changed)} "
            f"(allowed: {', '.join(RESUMABLE_FIELDS)}); start a new run with another --output-dir instead"
        )
    return resolve_config(saved, {**overrides, "output_dir": str(out)}, recipe=False, embedded=False, registry=registry)


def flag_layer(
    *,
    recipe: str | None = None,
    divergence: str | None = None,
    divergence_params: Iterable[str] = (),
    policy: str | None = None,
    policy_params: Iterable[str] = (),
    teacher: str | None = None,
    teacher_cache: str | None = None,
    student: str | None = None,
    data: str | None = None,
    output_dir: str | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    settings: Iterable[str] = (),
) -> dict[str, Any]:
    """Command-line flags as a config layer (the topmost). ``None`` and empty: not given.

    ``divergence_params`` (``-D``), ``policy_params`` (``-P``) and ``settings`` (``--set``) are
    ``key=value`` items; a malformed one is a one-line error naming its flag. ``teacher_cache``
    (``--teacher-cache``) goes in last, over a ``--set teacher.cache=...``.
    """
    layer: dict[str, Any] = {}
    for dotted, value in (
        ("recipe", recipe),
        ("divergence.name", divergence),
        ("policy.name", policy),
        ("teacher.ref", teacher),
        ("student.ref", student),
        ("data.path", data),
        ("output_dir", output_dir),
        ("train.max_steps", max_steps),
        ("train.seed", seed),
    ):
        if value is not None:
            set_dotted(layer, dotted, value)
    for key, value in parse_assignments(list(divergence_params), "-D").items():
        set_dotted(layer, f"divergence.params.{key}", value)
    for key, value in parse_assignments(list(policy_params), "-P").items():
        set_dotted(layer, f"policy.params.{key}", value)
    for key, value in parse_assignments(list(settings), "--set").items():
        set_dotted(layer, key, value)
    if teacher_cache is not None:
        set_dotted(layer, "teacher.cache", teacher_cache)
    return layer


def resolve_run(
    config_file: str | Path | None, flags: Mapping[str, Any], registry: Registry | None = None
) -> RunConfig:
    """``distill run``'s config: recipe < embedded default < ``config_file`` < ``flags``. Without a
    recipe anywhere, ``DEFAULT_RECIPE``; without a teacher anywhere, the embedded default (built-in
    teacher, pruned student, built-in data); without an output folder, a new one under ``runs/``.
    Checks the config's own fields only: ``plan_run`` checks the plugins' params."""
    return resolve_config(_file_layer(config_file), flags, stamp_output=True, registry=registry)


def resolve_resume(
    config_file: str | Path | None, flags: Mapping[str, Any], registry: Registry | None = None
) -> RunConfig:
    """``distill run --resume``'s config: the one saved in the output folder (``flags`` first, then
    ``config_file``); the file and flags may only change ``RESUMABLE_FIELDS`` (``resume_config``)."""
    file_layer = _file_layer(config_file)
    out = flags.get("output_dir") or file_layer.get("output_dir")
    if not out:
        raise ConfigError("--resume needs --output-dir DIR: the folder of the run to continue")
    return resume_config(out, file_layer, flags, registry=registry)


def resolve_cache(
    config_file: str | Path | None, flags: Mapping[str, Any], registry: Registry | None = None
) -> RunConfig:
    """``distill cache-teacher``'s config: ``config_file`` < ``flags`` without a recipe, so the same
    file and flags give the data settings and split ``distill run`` uses; without a teacher anywhere,
    the embedded default's teacher and data."""
    return resolve_config(_file_layer(config_file), flags, recipe=False, registry=registry)


def _file_layer(config_file: str | Path | None) -> dict[str, Any]:
    """``--config FILE`` as a layer (none given: empty)."""
    return read_config_file(config_file) if config_file else {}


def _names_model(value: Any) -> bool:
    """Whether a layer's ``teacher`` entry (a string or a mapping) names a model."""
    return bool(value.get("ref") if isinstance(value, Mapping) else value)


__all__ = [
    "DEFAULT_RECIPE",
    "RunPlan",
    "flag_layer",
    "plan_run",
    "resolve_cache",
    "resolve_config",
    "resolve_resume",
    "resolve_run",
    "resume_config",
]
