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


class RunStopped(DistillError):
    """Training stopped before ``train.max_steps`` (a signal, a non-finite loss); the message says
    where the last checkpoint is. ``exit_code`` is what the command line exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
