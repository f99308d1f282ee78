"""``distill list``: a table on a wide terminal, one block per plugin on a narrow one, one line per
plugin when the output is not a terminal, and JSON (``--json``). A name is never cut."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python
from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from distill import Registry

_KIND = {"divergences": "divergence", "policies": "policy", "sequence-terms": "sequence_term", "recipes": "recipe"}
TABLE_MIN_WIDTH = 100
"""Narrower terminals get one block per plugin: five table columns would leave each a few characters."""
TEMPERATURE = "temperature=1.0 [>0]: divides both logits (core)"


def field_bounds(field: FieldInfo) -> dict[str, Any]:
    """The field's range: ``{"gt": 0.0, "le": 1.0}`` (pydantic ``Field`` gt/ge/lt/le)."""
    bounds = {}
    for item in field.metadata:
        for attr in ("gt", "ge", "lt", "le"):
            value = getattr(item, attr, None)
            if value is not None:
                bounds[attr] = value
    return bounds


def describe_field(name: str, field: FieldInfo, *, description: bool = True) -> str:
    """``name=default [range]: description`` for one pydantic field."""
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = [f"{symbols[attr]}{value}" for attr, value in field_bounds(field).items()]
    if field.is_required():
        text = f"{name} (required)"
    else:  # a default_factory field has no `default`; show what the factory makes
        text = f"{name}={field.get_default(call_default_factory=True)!r}"
    if bounds:
        text += f" [{', '.join(bounds)}]"
    if field.description and description:
        text += f": {field.description}"
    return text


def describe_params(params_cls: type[BaseModel]) -> str:
    fields = params_cls.model_fields
    return "\n".join(describe_field(n, f) for n, f in fields.items()) or "-"


def _parameters(entry, kind: str) -> str:
    params = describe_params(entry.obj.Params)
    if kind == "divergences":
        params += "\n" + TEMPERATURE
    return params.strip()


def _summary(entry) -> str:
    doc = (entry.obj.__doc__ or "").strip().splitlines()
    return doc[0] if doc else "-"


def _recipe_cells(recipe) -> tuple[str, str, str]:
    """divergence, policy and what the recipe sets, as text."""
    divergence = recipe.divergence + (f" ({_mapping(recipe.divergence_params)})" if recipe.divergence_params else "")
    policy = recipe.policy + (f" ({_mapping(recipe.policy_params)})" if recipe.policy_params else "")
    return divergence, policy, _mapping(recipe.config) or "-"


def _mapping(values: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in dict(values).items())


def _row(table: Table, *cells: str) -> None:
    # plain Text: plugin docstrings and descriptions such as "[decreasing|constant]" are not rich markup
    table.add_row(*(Text(cell) for cell in cells))


def render_listing(registry: Registry, kind: str) -> Table:
    """One table of every registration of ``kind`` ("divergences", "policies" or "recipes").

    The name column never wraps and is as wide as the longest name; the other columns fold."""
    entries = registry.entries(_KIND[kind])
    table = Table(title=kind, show_lines=True, title_justify="left")
    width = max((len(entry.name) for entry in entries), default=4)
    table.add_column("name", no_wrap=True, min_width=width)
    if kind == "recipes":
        for column in ("divergence", "policy", "sets", "provided by"):
            table.add_column(column, overflow="fold")
        for entry in entries:
            recipe = entry.obj
            divergence, policy, sets = _recipe_cells(recipe)
            if recipe.note:
                sets += f"\nnote: {recipe.note}"
            _row(table, entry.name, divergence, policy, sets, entry.provider)
        return table
    for column in ("parameters", "aliases", "description", "provided by"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        _row(
            table,
            entry.name,
            _parameters(entry, kind),
            ", ".join(entry.aliases) or "-",
            _summary(entry),
            entry.provider,
        )
    return table


def render_blocks(registry: Registry, kind: str) -> Group:
    """For a narrow terminal: the plugin's name on a line of its own, then its details indented."""
    parts: list[Any] = [Text(kind, style="bold")]
    for entry in registry.entries(_KIND[kind]):
        parts.append(Text.assemble((entry.name, "bold cyan"), f"  {entry.provider}", overflow="fold"))
        if kind == "recipes":
            divergence, policy, sets = _recipe_cells(entry.obj)
            lines = [f"divergence: {divergence}", f"policy: {policy}", f"sets: {sets}"]
            if entry.obj.note:
                lines.append(f"note: {entry.obj.note}")
        else:
            lines = [
                _summary(entry),
                f"aliases: {', '.join(entry.aliases) or '-'}",
                *_parameters(entry, kind).splitlines(),
            ]
        parts.append(Padding(Text("\n".join(lines), overflow="fold"), (0, 0, 0, 2)))
    return Group(*parts)


def plain_lines(registry: Registry, kind: str) -> list[str]:
    """When the output is not a terminal: one line per plugin, its name first, then briefly the rest."""
    lines = []
    for entry in registry.entries(_KIND[kind]):
        if kind == "recipes":
            divergence, policy, sets = _recipe_cells(entry.obj)
            fields = [f"divergence: {divergence}", f"policy: {policy}", f"sets: {sets}"]
        else:
            params = [describe_field(n, f, description=False) for n, f in entry.obj.Params.model_fields.items()]
            if kind == "divergences":
                params.append("temperature=1.0 [>0]")
            fields = [f"aliases: {', '.join(entry.aliases) or '-'}", f"params: {', '.join(params) or '-'}"]
        lines.append("  ".join([entry.name, *fields, f"provider: {entry.provider}"]))
    return lines


def listing_json(registry: Registry, kinds: list[str]) -> dict[str, list[dict[str, Any]]]:
    """``{kind: [plugin, ...]}`` for ``distill list --json``: names, aliases, providers, and the
    parameters with their types, defaults, ranges and descriptions (a recipe: what it selects and sets)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        items = []
        for entry in registry.entries(_KIND[kind]):
            item: dict[str, Any] = {"name": entry.name, "aliases": list(entry.aliases), "provider": entry.provider}
            if kind == "recipes":
                recipe = entry.obj
                item.update(
                    description=recipe.description,
                    divergence={"name": recipe.divergence, "params": _jsonable(dict(recipe.divergence_params))},
                    policy={"name": recipe.policy, "params": _jsonable(dict(recipe.policy_params))},
                    config=_jsonable(dict(recipe.config)),
                    note=recipe.note,
                )
            else:
                item["description"] = _summary(entry)
                item["parameters"] = [_parameter_json(n, f) for n, f in entry.obj.Params.model_fields.items()]
                if kind == "divergences":
                    item["parameters"].append(
                        {
                            "name": "temperature",
                            "type": "float",
                            "required": False,
                            "default": 1.0,
                            "range": {"gt": 0},
                            "description": "divides both logits",
                            "core": True,
                        }
                    )
            items.append(item)
        out[kind] = items
    return out


def _parameter_json(name: str, field: FieldInfo) -> dict[str, Any]:
    required = field.is_required()
    item: dict[str, Any] = {
        "name": name,
        "type": _type_name(field.annotation),
        "required": required,
        "default": None if required else _jsonable(field.get_default(call_default_factory=True)),
        "range": _jsonable(field_bounds(field)),
        "description": field.description or "",
        "core": False,
    }
    if typing.get_origin(field.annotation) is typing.Literal:
        item["choices"] = _jsonable(list(typing.get_args(field.annotation)))
    return item


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    return to_jsonable_python(value, fallback=repr)
