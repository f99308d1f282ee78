"""`distill list`: names, aliases, parameter ranges and providers of what is installed."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from pydantic import Field
from rich.console import Console
from typer.testing import CliRunner

import distill
from distill import registry as registry_module
from distill.policy import RandomPolicy
from distill.cli.listing import render_listing
from distill.registry import AUTOLOAD_ENV, BUILTIN_PROVIDER, Registry
from tiny_models import table_rows as rows

cli_app = importlib.import_module("distill.cli.app")  # the module (distill.cli.app is also the Typer object)
runner = CliRunner()


def fake_plugin() -> types.ModuleType:
    """A plugin module with one divergence, one policy and one recipe whose texts contain brackets."""

    class Bracketed:
        """Weights [teacher] first; closes [/bold] nothing."""

        name = "bracketed"
        aliases = ("brk",)

        class Params(distill.Params):
            weights: list[float] = Field(default_factory=lambda: [0.25, 0.75], description="one of [low|high]")
            floor: float = Field(..., gt=0.0, description="required, positive")

        def __init__(self, params) -> None:
            self.params = params

        def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
            return torch.zeros(student_logits.shape[0])

    class Always(RandomPolicy):
        """Always the dataset."""

        name = "always"

        class Params(distill.Params):
            schedule: str = Field("constant", description="[decreasing|increasing|constant]")

        def sample(self, step: int, total_steps: int, examples: list, context) -> tuple[list, str]:
            return examples, "dataset"

    recipe = distill.Recipe(
        name="bracket_kd",
        description="test",
        divergence="bracketed",
        policy="always",
        divergence_params={"floor": 0.5},
        policy_params={"schedule": "constant"},
        config={"train.lr": 0.001},
        note="see [docs]",
    )
    module = types.ModuleType("acme_distill")
    module.register_divergences = distill.hookimpl(lambda register: register(Bracketed))
    module.register_policies = distill.hookimpl(lambda register: register(Always))
    module.register_recipes = distill.hookimpl(lambda register: register(recipe))
    return module


@pytest.fixture
def wide(monkeypatch):
    """A wide terminal for the app (tables), so that table cells are not wrapped mid-text."""
    monkeypatch.setattr(cli_app, "console", Console(width=250, color_system=None, force_terminal=True))


@pytest.fixture
def builtins_only(monkeypatch, wide):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    monkeypatch.setattr(registry_module, "_default", None)


@pytest.fixture
def with_fake_plugin(monkeypatch, wide):
    monkeypatch.setattr(registry_module, "_default", Registry.build(plugins=[fake_plugin()], autoload=False))


def test_list_divergences_shows_names_aliases_ranges_and_provider(builtins_only):
    result = runner.invoke(cli_app.app, ["list", "divergences"])
    assert result.exit_code == 0, result.output
    out = result.output
    table = rows(out)
    for name in ("kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"):
        assert name in table, out
        assert table[name].endswith(BUILTIN_PROVIDER)
    assert "fkl" in table["kl"]
    assert "skl, sfkl" in table["skew_kl"]
    assert "srkl" in table["skew_rkl"]
    assert "alpha=0.1 [>=0.0, <=1.0]" in out
    assert "beta=0.5 [>0.0, <1.0]" in out
    assert "temperature=1.0 [>0]" in out
    assert "policies" not in out and "recipes" not in out


def test_list_everything_shows_four_tables(builtins_only):
    result = runner.invoke(cli_app.app, ["list"])
    assert result.exit_code == 0, result.output
    kinds = ("divergences", "policies", "sequence-terms", "recipes")
    titles = [line.strip() for line in result.output.splitlines() if line.strip() in kinds]
    assert titles == list(kinds)
    assert "minillm_pg" in result.output
    assert "skew_rkl" in result.output


@pytest.mark.parametrize("kind", ["divergence", "models", "DIVERGENCES"])
def test_invalid_kind_exits_nonzero(builtins_only, kind):
    result = runner.invoke(cli_app.app, ["list", kind])
    assert result.exit_code == 2
    assert "divergences" in result.output  # the usage error lists the valid choices


def test_third_party_plugin_rows_with_brackets_and_factories(with_fake_plugin):
    result = runner.invoke(cli_app.app, ["list"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "weights=[0.25, 0.75]: one of [low|high]" in out  # default_factory shown, brackets kept
    assert "floor (required) [>0.0]: required, positive" in out
    assert "Weights [teacher] first; closes [/bold] nothing." in out  # docstrings are not rich markup
    assert "schedule='constant': [decreasing|increasing|constant]" in out
    table = rows(out)
    assert table["bracketed"].endswith("acme_distill") and "brk" in table["bracketed"]
    assert table["always"].endswith("acme_distill")
    assert table["bracket_kd"].startswith("bracket_kd | bracketed (floor=0.5) | always (schedule=constant)")
    assert "train.lr=0.001" in out and "note: see [docs]" in out


def test_render_listing_of_each_kind():
    registry = Registry.build(plugins=[fake_plugin()], autoload=False)
    for kind, name in (("divergences", "bracketed"), ("policies", "always"), ("recipes", "bracket_kd")):
        buffer = io.StringIO()
        Console(file=buffer, width=250, color_system=None).print(render_listing(registry, kind))
        assert buffer.getvalue().splitlines()[0].strip() == kind
        assert name in rows(buffer.getvalue())


def test_plugin_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    def broken() -> Registry:
        raise distill.PluginError("divergence name 'kl' is registered twice: by a (kl) and by b (kl)")

    monkeypatch.setattr(distill, "default_registry", broken)
    with pytest.raises(SystemExit) as info:
        distill.cli.main(["list"])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: divergence name 'kl' is registered twice: by a (kl) and by b (kl)"
    assert "Traceback" not in captured.err


def test_console_script_lists_divergences():
    """The installed `distill` command, end to end (built-ins only)."""
    script = Path(sys.executable).parent / "distill"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PYTHONPATH")}
    env.update({AUTOLOAD_ENV: "1", "COLUMNS": "200", "NO_COLOR": "1"})
    result = subprocess.run([str(script), "list", "divergences"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)  # piped: one line per divergence
    assert {"kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"} <= set(table)
    assert re.search(r"skl, sfkl", table["skew_kl"])
    assert len(result.stdout.splitlines()) == len(table)
    policies = subprocess.run(
        [str(script), "list", "policies"], capture_output=True, text=True, env=env, timeout=120
    ).stdout
    assert [line.split()[0] for line in policies.splitlines() if "adaptive_offpolicy" in line] == [
        "adaptive_offpolicy"
    ]  # | grep


# --- names are never cut: tables, narrow terminals, pipes, JSON


def long_named_plugin() -> types.ModuleType:
    class LongNamed(RandomPolicy):
        """A policy whose name is longer than most."""

        name = "adaptive_offpolicy_with_warmup"
        aliases = ("adaptive_offpolicy_warm",)

        class Params(distill.Params):
            warmup_steps: int = Field(100, ge=0, description="steps on the dataset before any generation")

        def sample(self, step, total_steps, examples, context):
            return examples, "dataset"

    module = types.ModuleType("acme_long")
    module.register_policies = distill.hookimpl(lambda register: register(LongNamed))
    return module


@pytest.mark.parametrize("width", [40, 80, 99, 100, 250])
def test_names_are_never_cut_at_any_terminal_width(monkeypatch, width):
    registry = Registry.build(plugins=[fake_plugin(), long_named_plugin()], autoload=False)
    monkeypatch.setattr(registry_module, "_default", registry)
    monkeypatch.setattr(cli_app, "console", Console(width=width, color_system=None, force_terminal=True))
    result = runner.invoke(cli_app.app, ["list"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= width
    for kind in ("divergence", "policy", "recipe"):
        for name in registry.names(kind):
            assert re.search(rf"(^|[^\w-]){re.escape(name)}($|[^\w-])", out, re.M), (width, name, out)
    assert ("┏" in out) == (width >= 100)  # a table where five columns fit, else one block per plugin


def test_piped_output_is_one_line_per_plugin(monkeypatch):
    """CliRunner's output is not a terminal: what `distill list policies | grep NAME` sees."""
    monkeypatch.setattr(
        registry_module, "_default", Registry.build(plugins=[fake_plugin(), long_named_plugin()], autoload=False)
    )
    result = runner.invoke(cli_app.app, ["list", "policies"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == [
        "adaptive_offpolicy",
        "adaptive_offpolicy_with_warmup",
        "always",
        "contrastive",
        "mixed",
        "offpolicy",
        "onpolicy",
        "teacher",
        "teacher_mixed",
    ]
    (adaptive,) = [line for line in lines if line.startswith("adaptive_offpolicy ")]
    assert "init_prob=0.0 [>=0, <=1]" in adaptive and adaptive.endswith(f"provider: {BUILTIN_PROVIDER}")
    (long,) = [line for line in lines if "adaptive_offpolicy_with_warmup" in line]
    assert (
        "aliases: adaptive_offpolicy_warm" in long
        and "warmup_steps=100 [>=0]" in long
        and long.endswith("provider: acme_long")
    )
    everything = runner.invoke(cli_app.app, ["list"]).output.splitlines()
    assert [line for line in everything if line.startswith("#")] == [
        "# divergences",
        "# policies",
        "# sequence-terms",
        "# recipes",
    ]
    assert any(
        line.startswith("bracket_kd  divergence: bracketed (floor=0.5)  policy: always (schedule=constant)")
        for line in everything
    )


def test_json_lists_names_parameters_ranges_aliases_and_providers(with_fake_plugin):
    result = runner.invoke(cli_app.app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert list(data) == ["divergences", "policies", "sequence-terms", "recipes"]
    divergences = {item["name"]: item for item in data["divergences"]}
    bracketed = divergences["bracketed"]
    assert set(bracketed) == {"name", "aliases", "provider", "description", "parameters"}
    assert bracketed["aliases"] == ["brk"] and bracketed["provider"] == "acme_distill"
    assert bracketed["description"] == "Weights [teacher] first; closes [/bold] nothing."
    weights, floor, temperature = bracketed["parameters"]
    assert weights == {
        "name": "weights",
        "type": "list[float]",
        "required": False,
        "default": [0.25, 0.75],
        "range": {},
        "description": "one of [low|high]",
        "core": False,
    }
    assert floor == {
        "name": "floor",
        "type": "float",
        "required": True,
        "default": None,
        "range": {"gt": 0.0},
        "description": "required, positive",
        "core": False,
    }
    assert temperature["name"] == "temperature" and temperature["core"] and temperature["range"] == {"gt": 0}
    skew = {p["name"]: p for p in divergences["skew_kl"]["parameters"]}
    assert skew["alpha"]["default"] == 0.1 and skew["alpha"]["range"] == {"ge": 0.0, "le": 1.0}
    assert (
        divergences["skew_kl"]["aliases"] == ["skl", "sfkl"] and divergences["skew_kl"]["provider"] == BUILTIN_PROVIDER
    )
    policies = {item["name"]: item for item in data["policies"]}
    schedule = {p["name"]: p for p in policies["adaptive_offpolicy"]["parameters"]}["replay_schedule"]
    assert schedule["default"] == "decreasing" and schedule["choices"] == ["decreasing", "increasing", "constant"]
    (recipe,) = [item for item in data["recipes"] if item["name"] == "bracket_kd"]
    assert recipe == {
        "name": "bracket_kd",
        "aliases": [],
        "provider": "acme_distill",
        "description": "test",
        "divergence": {"name": "bracketed", "params": {"floor": 0.5}},
        "policy": {"name": "always", "params": {"schedule": "constant"}},
        "config": {"train.lr": 0.001},
        "note": "see [docs]",
    }
    only = json.loads(runner.invoke(cli_app.app, ["list", "policies", "--json"]).output)
    assert list(only) == ["policies"] and only["policies"] == data["policies"]
