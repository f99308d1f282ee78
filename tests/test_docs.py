"""docs/plugins.md works as written: every python block runs, and every other block is checked against
the real thing (the fixture package, the config loader, the real error texts, the real commands).

Each python block runs in a fresh namespace, so a block must bring its own imports. A block that opens
with ``# NAME.py`` is a module file: the blocks after it can ``import NAME``. A ``print(...)`` with a
trailing comment must print exactly that comment. In a quoted error text, ``...`` stands for anything.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import distill
from distill import registry as registry_module
from distill.cli.run_cmd import resolve_config
from distill.registry import AUTOLOAD_ENV, Registry
from distill.testing import check_divergence

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "plugins.md"
FIXTURE = ROOT / "tests" / "plugin_pkgs" / "distill-hellinger"


@dataclass
class Block:
    lang: str
    text: str
    line: int  # of the opening fence

    @property
    def where(self) -> str:
        return f"docs/plugins.md:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1))
            i = end
        i += 1
    return blocks


BLOCKS = code_blocks(PAGE)
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def block_with(text: str, lang: str | None = None) -> Block:
    """The one block of the page that contains ``text``."""
    found = [b for b in BLOCKS if text in b.text and (lang is None or b.lang == lang)]
    assert len(found) == 1, f"docs/plugins.md: expected one block with {text!r}, found {len(found)}"
    return found[0]


def module_file(block: Block) -> str | None:
    """``NAME`` for a block that opens with ``# NAME.py``."""
    first = re.match(r"#\s*(\w+)\.py\b", block.text)
    return first.group(1) if first else None


def as_module(name: str, block: Block) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = block.where
    exec(compile(block.text, block.where, "exec"), module.__dict__)
    return module


@pytest.fixture
def doc_modules(monkeypatch) -> dict[str, types.ModuleType]:
    """The page's module files, importable by their names."""
    modules = {}
    for block in PYTHON:
        name = module_file(block)
        if name:
            modules[name] = as_module(name, block)
            monkeypatch.setitem(sys.modules, name, modules[name])
    return modules


def run_block(block: Block) -> dict:
    """Run ``block`` in a fresh namespace; its commented prints must print their comments."""
    namespace = {"__name__": f"docs_block_{block.line}"}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block.text, block.where, "exec"), namespace)
    expected = re.findall(r"^\s*print\(.*\)\s+#\s*(.+?)\s*$", block.text, re.M)
    if expected:
        assert printed.getvalue().splitlines() == expected, block.where
    return namespace


def plugin(namespace: dict, name: str = "doc_plugin") -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(namespace)
    return module


def matches(quoted: str, real: str) -> bool:
    """Whether a quoted text equals ``real``, ``...`` standing for anything."""
    return re.fullmatch(".*".join(re.escape(part) for part in quoted.split("...")), real) is not None


# --- every python block runs


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_runs(block, doc_modules):
    run_block(block)


def test_the_page_has_the_blocks_these_tests_check():
    assert len(PYTHON) >= 6 and {"python", "toml", "yaml", "bash", ""} <= {b.lang for b in BLOCKS}


# --- the Hellinger plugin: the fixture package, values, gradients


def test_the_hellinger_example_is_the_fixture_package():
    module = block_with("class Hellinger", "python")
    assert module_file(module) == "distill_hellinger"
    assert module.text == (FIXTURE / "distill_hellinger.py").read_text()
    pyproject = block_with("[project.entry-points.distill]", "toml")
    assert tomllib.loads(pyproject.text) == tomllib.loads((FIXTURE / "pyproject.toml").read_text())


def test_hellinger_values_and_finite_gradients_where_the_student_probability_is_zero(doc_modules):
    registry = Registry.build(plugins=[doc_modules["distill_hellinger"]], autoload=False)
    d = registry.get_divergence("hellinger")
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(6, 17, generator=generator) * 3).requires_grad_()
    teacher = torch.randn(6, 17, generator=generator) * 3
    with torch.no_grad():
        student[:, 3] = -200.0  # a student probability of exactly 0 in float32
    assert (student.softmax(-1)[:, 3] == 0).all()
    values = d(student, teacher)
    reference = 1.0 - (0.5 * (student.double().log_softmax(-1) + teacher.double().log_softmax(-1))).exp().sum(-1)
    torch.testing.assert_close(values.double(), reference, rtol=1e-4, atol=1e-6)
    values.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# --- parameters: the power divergence, its config block, its error texts


def power_registry() -> Registry:
    namespace = run_block(block_with("class PowerDivergence", "python"))
    return Registry.build(plugins=[plugin(namespace, "doc_power")], autoload=False)


@pytest.mark.parametrize("lam", [-0.5, 0.0, 0.5, 1.0, 1.9])
def test_power_divergence_against_the_cressie_read_formula(lam):
    d = power_registry().get_divergence("cressie_read", lam=lam)
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 13, generator=generator), torch.randn(5, 13, generator=generator)
    p, q = teacher.double().softmax(-1), student.double().softmax(-1)
    if lam == 0:
        reference = (p * (p / q).log()).sum(-1)
    else:
        reference = (p * ((p / q) ** lam - 1)).sum(-1) / (lam * (lam + 1))
    torch.testing.assert_close(d(student, teacher).double(), reference, rtol=1e-4, atol=1e-6)
    assert (d(student, student) >= 0).all() and d(student, student).max() < 1e-5


def test_the_yaml_block_is_a_config_the_loader_accepts(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(block_with("name: power", "yaml").text)
    resolved = resolve_config(str(config), {"output_dir": str(tmp_path / "run")}, power_registry())
    assert resolved.divergence.name == "power" and resolved.divergence.params == {"lam": 1.0}
    wrong = tmp_path / "wrong.yaml"  # the key an earlier version of the page named
    wrong.write_text("divergence: power\ndivergence_params:\n  lam: 1.0\n")
    with pytest.raises(distill.ConfigError, match="divergence_params"):
        resolve_config(str(wrong), {"output_dir": str(tmp_path / "run")}, power_registry())


def test_quoted_parameter_errors_are_the_real_ones():
    registry = power_registry()
    real = []
    for values in ({"lam": 3.0}, {"lmbda": 1.0}):
        with pytest.raises(distill.ConfigError) as error:
            registry.get_divergence("power", **values)
        real.append(str(error.value))
    assert block_with("power.lam:", "").text.splitlines() == real


def test_quoted_unknown_name_error_is_the_real_one(doc_modules):
    registry = Registry.build(plugins=[doc_modules["distill_hellinger"]], autoload=False)
    with pytest.raises(distill.UnknownPluginError) as error:
        registry.get_divergence("hellingr")
    (quoted,) = block_with("'hellingr'", "").text.splitlines()
    assert matches(quoted, str(error.value)), (quoted, str(error.value))


def test_quoted_name_clash_error_is_the_real_one():
    class Clash:
        name = "kl"

        class Params(distill.Params):
            pass

        def __call__(self, student_logits, teacher_logits):
            return student_logits.sum(-1) * 0

    registry = Registry.build(autoload=False)
    with pytest.raises(distill.PluginError) as error:
        registry.add("divergence", Clash, provider="distill-kl-clash 0.2.0")
    (quoted,) = block_with("registered twice", "").text.splitlines()
    assert quoted == f"error: {error.value}"


# --- the shell blocks, run in this process with the page's plugin installed


def shell_commands(block: Block) -> list[tuple[dict[str, str], list[str], str]]:
    """(environment, argv, trailing comment) of each command line."""
    commands = []
    for line in block.text.splitlines():
        code, comment = re.fullmatch(r"(.*?)(?:\s{2,}#\s*(.*))?", line).groups()
        words = shlex.split(code)
        env = {}
        while words and re.match(r"^[A-Z_]+=", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words:
            commands.append((env, words, comment or ""))
    return commands


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.where)
def test_shell_block_commands_run(block, doc_modules, monkeypatch):
    cli_app = sys.modules["distill.cli.app"]
    monkeypatch.setattr(cli_app, "console", cli_app.Console(width=200, color_system=None))
    for env, argv, comment in shell_commands(block):
        monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        installed = AUTOLOAD_ENV not in env  # "installed": the page's plugin comes with the registry
        monkeypatch.setattr(
            registry_module,
            "_default",
            Registry.build(plugins=[doc_modules["distill_hellinger"]], autoload=False) if installed else None,
        )
        if argv[0] == "distill":
            result = CliRunner().invoke(cli_app.app, argv[1:])
            assert result.exit_code == 0, (block.where, argv, result.output)
            if argv[1:3] == ["list", "divergences"] or argv[1:] == ["list"]:
                assert ("hellinger" in result.output) == installed, (argv, result.output)
        elif argv[:2] == ["python", "-c"]:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(argv[2], {"__name__": "__main__"})
            assert printed.getvalue().strip() == comment
        else:
            pytest.fail(f"{block.where}: no check for {argv[0]!r}")


# --- the conformance kit


def test_quoted_conformance_failure_is_the_real_one():
    class Hellinger:  # the form the page warns against: sqrt of probabilities
        name = "hellinger"

        class Params(distill.Params):
            pass

        def __init__(self, params) -> None:
            self.params = params

        def __call__(self, student_logits, teacher_logits):
            p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
            return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)

    with pytest.raises(AssertionError) as error:
        check_divergence(Hellinger, max_examples=20)
    (quoted,) = block_with("check_divergence(hellinger): ", "").text.splitlines()
    assert matches(quoted, str(error.value)), (quoted, str(error.value))


# --- the policy and the recipe


def test_the_warmup_policy_registers_and_follows_its_parameters():
    namespace = run_block(block_with("class Warmup", "python"))
    registry = Registry.build(plugins=[plugin(namespace, "doc_warmup")], autoload=False)
    policy = registry.get_policy("warmup", warmup_steps=2, prob=1.0)
    examples = [distill.Example([1, 2], [3, 4])]
    context = distill.SamplingContext(
        generate_student=lambda ex: [distill.Example(e.prompt_ids, [9]) for e in ex],
        generate_teacher=lambda ex: pytest.fail("the warm-up never asks the teacher"),
    )
    sources = [policy.sample(step, 10, examples, context)[1] for step in range(4)]
    assert sources == ["dataset", "dataset", "student", "student"]
    assert policy.sample(5, 10, examples, context)[0] == [distill.Example([1, 2], [9])]
    # a resumed policy draws what the uninterrupted one draws
    halfway = registry.get_policy("warmup", warmup_steps=0, prob=0.5)
    halfway.reseed(7)
    [halfway.draw() for _ in range(3)]
    resumed = registry.get_policy("warmup", warmup_steps=0, prob=0.5)
    resumed.load_state_dict(halfway.state_dict())
    assert [resumed.draw() for _ in range(5)] == [halfway.draw() for _ in range(5)]


def test_the_two_group_policy_returns_labelled_groups_with_their_own_terms():
    from distill.objective import Objective
    from distill.policy import as_groups

    namespace = run_block(block_with("class TwoViews", "python"))
    registry = Registry.build(plugins=[plugin(namespace, "doc_two_views")], autoload=False)
    policy = registry.get_policy("two_views", every=2)
    calls = []
    context = distill.SamplingContext(
        lambda ex: calls.append("student") or [distill.Example(e.prompt_ids, [7]) for e in ex],
        lambda ex: calls.append("teacher") or [distill.Example(e.prompt_ids, [8]) for e in ex],
    )
    examples = [distill.Example([1, 2], [9])]
    assert as_groups(policy.sample(1, 10, examples, context)) == {
        "teacher": [distill.Example([1, 2], [8])],
        "student": [distill.Example([1, 2], [7])],
    }
    assert list(as_groups(policy.sample(2, 10, examples, context))) == ["teacher"]
    assert calls == ["teacher", "student", "teacher"]
    config = resolve_config(
        None, {"policy": {"name": "two_views"}, "objective": {"terms": {"student": {"divergence": "rkl"}}}}, registry
    )
    objective = Objective(config, registry)
    assert (objective.term("student").divergence.name, objective.term("teacher").divergence.name) == (
        "rkl",
        config.divergence.name,
    )
    objective.check_sources(policy, "two_views")
    bad = resolve_config(None, {"policy": {"name": "two_views"}, "objective": {"terms": {"studnet": "rkl"}}}, registry)
    with pytest.raises(
        distill.ConfigError, match="objective.terms.studnet: no such source; policy two_views returns teacher, student"
    ):
        Objective(bad, registry).check_sources(policy, "two_views")


def test_the_recipe_block_resolves_with_the_warmup_policy(tmp_path):
    modules = [
        plugin(run_block(block_with(text, "python")), name)
        for text, name in (("class Warmup", "doc_warmup"), ("warm_gkd", "doc_recipe"))
    ]
    registry = Registry.build(plugins=modules, autoload=False)
    config = resolve_config(None, {"recipe": "warm_gkd", "output_dir": str(tmp_path / "run")}, registry)
    assert (config.divergence.name, config.divergence.params) == ("jsd", {"beta": 0.5})
    assert (config.policy.name, config.policy.params) == ("warmup", {"warmup_steps": 200, "prob": 0.5})
