"""Rich tables for ``distill list``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.table import Table
from rich.text import Text

from distill import Registry

_KIND = {"divergences": "divergence", "policies": "policy", "recipes": "recipe"}


def describe_field(name: str, field: FieldInfo) -> str:
    """``name=default [range]: description`` for one pydantic field."""
    bounds = []
    for item in field.metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{symbol}{value}")
    if field.is_required():
        text = f"{name} (required)"
    else:  # a default_factory field has no `default`; show what the factory makes
        text = f"{name}={field.get_default(call_default_factory=True)!r}"
    if bounds:
        text += f" [{', '.join(bounds)}]"
    if field.description:
        text += f": {field.description}"
    return text


def describe_params(params_cls: type[BaseModel]) -> str:
    fields = params_cls.model_fields
    return "\n".join(describe_field(n, f) for n, f in fields.items()) or "-"


def _mapping(values: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in dict(values).items())


def _row(table: Table, *cells: str) -> None:
    # plain Text: plugin docstrings and descriptions such as "[decreasing|constant]" are not rich markup
    table.add_row(*(Text(cell) for cell in cells))


def render_listing(registry: Registry, kind: str) -> Table:
    """One table of every registration of ``kind`` ("divergences", "policies" or "recipes")."""
    entries = registry.entries(_KIND[kind])
    table = Table(title=kind, show_lines=True, title_justify="left")
    if kind == "recipes":
        for column in ("name", "divergence", "policy", "sets", "provided by"):
            table.add_column(column)
        for entry in entries:
            recipe = entry.obj
            divergence = recipe.divergence + (f" ({_mapping(recipe.divergence_params)})" if recipe.divergence_params else "")
            policy = recipe.policy + (f" ({_mapping(recipe.policy_params)})" if recipe.policy_params else "")
            sets = _mapping(recipe.config) or "-"
            if recipe.note:
                sets += f"\nnote: {recipe.note}"
            _row(table, entry.name, divergence, policy, sets, entry.provider)
        return table
    for column in ("name", "parameters", "aliases", "description", "provided by"):
        table.add_column(column)
    for entry in entries:
        params = describe_params(entry.obj.Params)
        if kind == "divergences":
            params += "\ntemperature=1.0 [>0]: divides both logits (core)"
        doc = (entry.obj.__doc__ or "").strip().splitlines()
        _row(table, entry.name, params.strip(), ", ".join(entry.aliases) or "-", doc[0] if doc else "-", entry.provider)
    return table
