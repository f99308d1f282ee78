"""``distill`` commands. User errors become one line on stderr and exit code 2."""

from __future__ import annotations

import sys
from enum import Enum
from typing import Optional

import typer
from rich.console import Console

import distill
from distill.cli.listing import render_listing

app = typer.Typer(
    name="distill",
    help="Knowledge distillation for language models: divergences x sampling policies (DistiLLM and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    """Knowledge distillation for language models."""
    if version:
        console.print(f"distill {distill.__version__}")
        raise typer.Exit()


class Kind(str, Enum):
    divergences = "divergences"
    policies = "policies"
    recipes = "recipes"


@app.command("list")
def list_plugins(
    kind: Optional[Kind] = typer.Argument(None, help="Show only divergences, policies or recipes."),
) -> None:
    """Show installed divergences, sampling policies and recipes, with parameters and providers."""
    registry = distill.default_registry()
    kinds = [kind.value] if kind else [k.value for k in Kind]
    for name in kinds:
        console.print(render_listing(registry, name))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, standalone_mode=True)
    except distill.DistillError as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
