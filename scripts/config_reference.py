"""The config reference page (``reference/config.md`` of the docs site), rendered from the pydantic models.

Every key of ``distill.config.RunConfig`` and its sections, with its type, range, default and description,
then the parameters of the built-in divergences and policies and what each built-in recipe sets. Nothing
on the page is typed by hand: a key that exists is a key documented.

As an MkDocs hook (``hooks:`` in ``mkdocs.yml``) it adds the page to the site at build time, so it is
never out of date and never committed. ``python scripts/config_reference.py`` prints it (``-o FILE``
writes it).
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

PAGE = "reference/config.md"
"""Where the page sits in the site (the path ``mkdocs.yml``'s ``nav`` names)."""

INTRO = """\
# Config reference

Generated from the pydantic models in `core/config.py` (`distill.config.RunConfig`) and from the
built-in plugins' `Params` when this site was built: every key a config file (YAML, TOML or JSON),
`--set dotted.key=value` or a recipe can set, with its type, range, default and description. Unknown
keys are refused, with one line naming the key. Precedence: recipe < config file < flags (see
[the command line](../cli.md)).
"""

_BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def field_key(name: str, field: FieldInfo) -> str:
    """The key as a config file spells it (``log.with``, not the attribute ``with_``)."""
    return field.alias or name


def bounds(field: FieldInfo) -> str:
    """``> 0, ≤ 1`` from the field's ``Field(gt=..., le=...)``."""
    parts = []
    for item in field.metadata:
        for attr, symbol in _BOUNDS.items():
            value = getattr(item, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section key (``ModelSpec``, also inside ``LoraSpec | None``)."""
    candidates = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return models[0] if len(models) == 1 else None


def mapping_model(annotation: Any) -> type[BaseModel] | None:
    """``TermSpec`` for ``dict[str, TermSpec]``."""
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
    return None


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_text(annotation: Any) -> str:
    """A type as the page writes it: ``int``, ``float``, one of ``a``, ``b``; ``or`` between choices."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if _is_union(annotation):
        return " or ".join(type_text(arg) for arg in args)
    if origin is Literal:
        values = ", ".join(f"`{value}`" for value in args)
        return values if len(args) == 1 else f"one of {values}"
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        model = mapping_model(annotation)
        return f"mapping of name to {model.__name__} (below)" if model else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section (below)"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(its section's defaults)"
    value = to_jsonable_python(value)
    return f"`{value}`" if isinstance(value, str) else f"`{json.dumps(value)}`"


def prose(text: str) -> str:
    """Docstring or description text as Markdown: one line, reST ````code```` as ``code``, and outside code
    ``*``, ``<``, ``>`` and ``|`` escaped (``beta*KL(p||m)`` is no emphasis, ``<source>`` no HTML tag)."""
    parts = re.split(r"(`[^`]*`)", " ".join(text.split()).replace("``", "`"))
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("*", "\\*").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "".join(parts)


def cell(text: str) -> str:
    """Table-safe text: prose on one line (a pipe inside a code span does not split a table's cell)."""
    return prose(text)


def rows(model: type[BaseModel], prefix: str) -> list[str]:
    """One table row per key of ``model``, keys dotted under ``prefix``."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field_key(name, field)}"
        kind = type_text(field.annotation)
        if bounds(field):
            kind += f", {bounds(field)}"
        description = cell(field.description or "")
        if not description and section_model(field.annotation) is not None:  # its table follows
            description = f"the section [below](#{key.replace('.', '')})"
        out.append(f"| `{key}` | {kind} | {default_text(field)} | {description or '—'} |")
    return out


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel], str]]:
    """``(dotted prefix, model, where it comes from)`` for ``model`` and every section below it, depth first."""
    found = [(prefix, model, "")]
    for name, field in model.model_fields.items():
        key = f"{prefix}{field_key(name, field)}"
        sub = section_model(field.annotation)
        if sub is not None:
            found += [(p, m, w or (field.description or "")) for p, m, w in sections(sub, f"{key}.")]
        elif (value := mapping_model(field.annotation)) is not None:
            found += [(p, m, w or (field.description or "")) for p, m, w in sections(value, f"{key}.<name>.")]
    return found


TABLE_HEAD = ["| key | type | default | description |", "|---|---|---|---|"]


def config_tables() -> list[str]:
    from distill.config import RunConfig

    lines = []
    for prefix, model, where in sections(RunConfig):
        title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
        lines += ["", f"## {title}", ""]
        doc = " ".join((model.__doc__ or "").split()) if model.__doc__ != BaseModel.__doc__ else ""
        for text in dict.fromkeys(t for t in (where, doc) if t):
            lines += [prose(_sentence(text)), ""]
        lines += TABLE_HEAD + rows(model, prefix)
    return lines


def _sentence(text: str) -> str:
    text = text.strip()
    return text[0].upper() + text[1:] + ("" if text.endswith(".") else ".")


def plugin_tables() -> list[str]:
    from distill import Registry

    registry = Registry.build(autoload=False)
    lines = [
        "",
        "## Built-in plugins",
        "",
        "`divergence.params` (and `objective.terms.<name>.params`) take the chosen divergence's parameters,",
        "`policy.params` the chosen policy's (`-D key=value` and `-P key=value` on the command line).",
        "Every divergence also takes `divergence.temperature`. Plugins from other packages:",
        "`distill list --json`.",
    ]
    for kind, label in (("divergence", "Divergence"), ("policy", "Policy")):
        for entry in registry.entries(kind):
            aliases = f" (aliases: {', '.join(f'`{a}`' for a in entry.aliases)})" if entry.aliases else ""
            doc = prose(entry.obj.__doc__ or "")
            lines += ["", f"### {label} `{entry.name}`", "", f"{doc}{aliases}".strip() or "—", ""]
            params = entry.obj.Params
            if params.model_fields:
                lines += TABLE_HEAD + rows(params, f"{kind}.params.")
            else:
                lines.append("No parameters.")
    lines += ["", "### Recipes", "", "| recipe | divergence | policy | sets | description |", "|---|---|---|---|---|"]
    for entry in registry.entries("recipe"):
        recipe = entry.obj
        divergence = _with_params(recipe.divergence, recipe.divergence_params)
        policy = _with_params(recipe.policy, recipe.policy_params)
        sets = ", ".join(f"`{k}: {json.dumps(to_jsonable_python(v))}`" for k, v in dict(recipe.config).items())
        text = " ".join(_sentence(t) for t in (recipe.description, f"note: {recipe.note}" if recipe.note else "") if t)
        lines.append(f"| `{entry.name}` | {cell(divergence)} | {cell(policy)} | {cell(sets) or '—'} | {cell(text)} |")
    return lines


def _with_params(name: str, params: Any) -> str:
    params = dict(params)
    if not params:
        return f"`{name}`"
    return f"`{name}` (" + ", ".join(f"`{k}={json.dumps(to_jsonable_python(v))}`" for k, v in params.items()) + ")"


def render() -> str:
    """The whole page, Markdown."""
    return "\n".join([INTRO.rstrip(), *config_tables(), *plugin_tables()]) + "\n"


# --- MkDocs hook


def on_files(files, config):
    """Add the generated page to the site before the navigation is built."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, help="write the page here instead of printing it")
    args = parser.parse_args(argv)
    if args.output:
        args.output.write_text(render(), encoding="utf-8")
    else:
        print(render(), end="")


if __name__ == "__main__":
    main()
