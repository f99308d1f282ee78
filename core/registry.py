"""The plugin registry: built-ins and third-party plugins registered through the same pluggy hooks.

Built-in plugin modules are imported by name (as pytest loads its own plugins) and registered exactly
like third-party ones; third-party modules come from the ``distill`` entry-point group unless
``DISTILL_DISABLE_PLUGIN_AUTOLOAD`` is set. Nothing is built at import time: ``default_registry()``
builds one on first use, and tests build their own with ``Registry.build``.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any, Iterable

import pluggy
from pydantic import BaseModel

from distill import hookspecs
from distill.errors import PluginError, UnknownPluginError
from distill.interfaces import Recipe

AUTOLOAD_ENV = "DISTILL_DISABLE_PLUGIN_AUTOLOAD"
"""Set to 1/true/yes to skip third-party entry points; built-ins always load."""

BUILTIN_PLUGINS = (
    "distill.plugins.divergences",
    "distill.plugins.cross_divergences",
    "distill.plugins.policies",
    "distill.plugins.sequence_terms",
    "distill.plugins.recipes",
)
BUILTIN_PROVIDER = "distill (built-in)"

KINDS = {
    "divergence": "register_divergences",
    "policy": "register_policies",
    "sequence_term": "register_sequence_terms",
    "recipe": "register_recipes",
}
_NAME = re.compile(r"^[a-z][a-z0-9_\-]*$")
_METHODS = {
    "policy": ("sample", "observe_eval", "reseed", "metrics", "state_dict", "load_state_dict"),
    "sequence_term": ("advantages", "surrogate"),
}


@dataclass(frozen=True)
class Registration:
    """One registered divergence class, policy class, sequence term class or recipe, with who provided it."""

    kind: str
    name: str
    obj: Any
    aliases: tuple[str, ...]
    provider: str


class Registry:
    """Divergences, policies and recipes by name (and alias), each with its provider."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self._lookup: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}

    # --- building
    @classmethod
    def build(
        cls,
        plugins: Iterable[ModuleType | object] = (),
        *,
        autoload: bool | None = None,
        builtins: bool = True,
    ) -> "Registry":
        """A fresh registry from the built-ins, entry points (if ``autoload``) and ``plugins``.

        ``autoload`` defaults to on unless the ``DISTILL_DISABLE_PLUGIN_AUTOLOAD`` variable is set.
        """
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        providers: dict[str, str] = {}

        def add(plugin: object, name: str, provider: str) -> None:
            if pm.is_registered(plugin):
                return
            try:
                pm.register(plugin, name=name)
            except (ValueError, pluggy.PluginValidationError) as error:
                raise PluginError(f"plugin {name} ({provider}) cannot be registered: {error}") from None
            providers[name] = provider

        if builtins:
            for module_name in BUILTIN_PLUGINS:
                add(importlib.import_module(module_name), module_name, BUILTIN_PROVIDER)
        if autoload:
            for entry_point in metadata.entry_points(group=hookspecs.PROJECT):
                dist = entry_point.dist
                provider = f"{dist.name} {dist.version}" if dist is not None else entry_point.value
                try:
                    plugin = entry_point.load()
                except Exception as error:  # a broken third-party plugin must say who it is
                    raise PluginError(
                        f"plugin {entry_point.name!r} from {provider} failed to load ({error}); "
                        f"fix or uninstall it, or set {AUTOLOAD_ENV}=1"
                    ) from None
                add(plugin, f"{entry_point.name} ({entry_point.value})", provider)
        for plugin in plugins:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            add(plugin, name, getattr(plugin, "__name__", name))

        try:  # a misspelt hook (`register_divergence`) would otherwise be silently ignored
            pm.check_pending()
        except pluggy.PluginValidationError as error:
            name = pm.get_name(error.plugin) or ""
            raise PluginError(f"plugin {name} ({providers.get(name, name)}): {error}") from None

        registry = cls()
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():  # registration order: built-ins first
                label = providers.get(impl.plugin_name, impl.plugin_name)
                register = functools.partial(registry.add, kind, provider=label)
                # pluggy lets an implementation declare fewer arguments than the spec
                impl.function(**{arg: register for arg in impl.argnames})
        return registry

    def add(self, kind: str, obj: Any, provider: str) -> Registration:
        """Validate and record one registration; duplicate names or aliases are refused."""
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"{provider}: a {kind} needs a lowercase string `name`, got {name!r}")
        if kind == "recipe":
            if not isinstance(obj, Recipe):
                raise PluginError(f"{provider}: recipe {name!r} must be a distill.Recipe")
        else:
            if not inspect.isclass(obj):
                raise PluginError(f"{provider}: register the {kind} class {name!r}, not an instance")
            params = getattr(obj, "Params", None)
            if not (inspect.isclass(params) and issubclass(params, BaseModel)):
                raise PluginError(
                    f"{provider}: {kind} {name!r} needs a pydantic `Params` class (subclass distill.Params)"
                )
            if params.model_config.get("extra") != "forbid":  # else a misspelt parameter is silently dropped
                raise PluginError(
                    f"{provider}: {kind} {name!r}: its `Params` must reject unknown keys "
                    f"(subclass distill.Params, or set extra='forbid')"
                )
            # every class is callable (type.__call__ builds instances), so look for the method itself
            if kind == "divergence" and not any("__call__" in vars(base) for base in obj.__mro__):
                raise PluginError(f"{provider}: divergence {name!r} must define __call__")
            missing = [m for m in _METHODS.get(kind, ()) if not callable(getattr(obj, m, None))]
            if missing:
                hint = " (distill.policy.RandomPolicy gives defaults)" if kind == "policy" else ""
                raise PluginError(f"{provider}: {kind.replace('_', ' ')} {name!r} lacks {', '.join(missing)}{hint}")
        aliases = getattr(obj, "aliases", ()) or ()
        if not isinstance(aliases, (tuple, list)) or not all(isinstance(a, str) and _NAME.match(a) for a in aliases):
            raise PluginError(
                f"{provider}: {kind} {name!r}: `aliases` must be a tuple of lowercase names, got {aliases!r}"
            )
        aliases = tuple(aliases)
        registration = Registration(kind, name, obj, aliases, provider)
        for key in (name, *aliases):
            other = self._lookup[kind].get(key)
            if other is not None:
                raise PluginError(
                    f"{kind} name {key!r} is registered twice: by {other.provider} "
                    f"({other.name}) and by {provider} ({name}); uninstall one of them"
                )
        self._entries[kind][name] = registration
        for key in (name, *aliases):
            self._lookup[kind][key] = registration
        return registration

    # --- queries
    def entries(self, kind: str) -> list[Registration]:
        """All registrations of ``kind``, sorted by name."""
        return sorted(self._entries[kind].values(), key=lambda r: r.name)

    def names(self, kind: str) -> list[str]:
        return [r.name for r in self.entries(kind)]

    def lookup(self, kind: str, name: str) -> Registration:
        """The registration for ``name`` or one of its aliases; else one line naming what exists."""
        found = self._lookup[kind].get(name)
        if found is not None:
            return found
        message = f"{kind} {name!r}: unknown;"
        close = difflib.get_close_matches(name, list(self._lookup[kind]), n=1, cutoff=0.5)
        if close:
            message += f" did you mean {self._lookup[kind][close[0]].name}?"
        raise UnknownPluginError(f"{message} installed: {', '.join(self.names(kind)) or 'none'}")

    def get_divergence(self, name: str, *, temperature: float = 1.0, **params: Any):
        """The divergence ``name`` built with ``params``, applying ``temperature`` to both logits."""
        from distill.divergence import ConfiguredDivergence

        registration = self.lookup("divergence", name)
        return ConfiguredDivergence.create(registration.obj, params, temperature=temperature)

    def get_policy(self, name: str, **params: Any):
        """An instance of the sampling policy ``name`` built with ``params``."""
        from distill.params import validate_params

        registration = self.lookup("policy", name)
        cls = registration.obj
        return cls(validate_params(cls.Params, params, f"policy {registration.name}"))

    def get_sequence_term(self, name: str, **params: Any):
        """An instance of the sequence-level term ``name`` built with ``params`` (``distill.sequence``)."""
        from distill.params import validate_params

        registration = self.lookup("sequence_term", name)
        cls = registration.obj
        return cls(validate_params(cls.Params, params, f"sequence term {registration.name}"))

    def get_recipe(self, name: str) -> Recipe:
        return self.lookup("recipe", name).obj


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        _default = Registry.build()
    return _default


def reset_default_registry() -> None:
    """Forget the process-wide registry (after installing a plugin, or in tests)."""
    global _default
    _default = None
