"""The pydantic base for every plugin's parameters, and one-line rendering of validation errors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from distill.errors import ConfigError


class Params(BaseModel):
    """Base class of a plugin's ``Params``: unknown keys are rejected and instances are frozen.

    Declare fields with ``pydantic.Field`` ranges and descriptions; ``distill list`` shows them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


def describe_validation_error(error: ValidationError, prefix: str = "", extra: str = "unknown key") -> str:
    """One line per failing field: ``prefix.field: message (got value)``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ()))
        where = f"{prefix}.{where}" if prefix and where else (prefix or where)
        message = item.get("msg", "invalid").removeprefix("Value error, ")
        if item.get("type") == "extra_forbidden":
            message = extra
        got = item.get("input")
        suffix = "" if item.get("type") in ("missing", "extra_forbidden") else f" (got {got!r})"
        lines.append(f"{where}: {message}{suffix}")
    return "; ".join(lines)


def validate_params(params_cls: type[Params], values: dict[str, Any], prefix: str) -> Params:
    """Build ``params_cls(**values)``; a bad value raises ConfigError naming ``prefix.field``."""
    try:
        return params_cls(**values)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, prefix, "unknown parameter")) from None
