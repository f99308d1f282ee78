"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class DistillError(Exception):
    """A mistake in input, config or environment that the user can fix; the message says how."""


class ConfigError(DistillError, ValueError):
    """A configuration value or parameter is invalid."""


class UnknownPluginError(DistillError, KeyError):
    """A divergence, policy or recipe name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(DistillError):
    """A plugin is broken or conflicts with another plugin (e.g. two plugins register one name)."""
