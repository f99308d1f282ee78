"""The README and the documentation site (docs/) work as written.

Every python block of README.md and of every docs/ page runs; every command of a bash block, every
``distill`` line of a command synopsis (a ``text`` block) and every ``distill ...`` in running text is
parsed against the real command line, and a ``distill run`` or ``cache-teacher`` command's config is
resolved and its plugins' parameters checked (nothing trains); every config key the pages name exists;
YAML and TOML blocks parse, and config-shaped YAML validates; every relative link and anchor of the
README resolves (MkDocs checks the site's own in strict mode). docs/plugins.md is checked further
against the real thing (the fixture package, the config loader, the real error texts, the real
commands, run with its plugin installed), and the config reference page is rendered from the models.

Each python block runs in a fresh namespace, so a block must bring its own imports. A block that opens
with ``# NAME.py`` is a module file: the blocks after it can ``import NAME``. A ``print(...)`` with a
trailing comment must print exactly that comment. In a quoted error text, ``...`` stands for anything.
In a command, ``...`` and upper-case words (``T``, ``DIR``, ``RUN/final``) are placeholders.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import re
import shlex
import subprocess
import sys
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import distill
from distill import registry as registry_module
from distill.resolve import resolve_run as resolve_config  # `distill run`'s config: (config file, flags)
from distill.config import RunConfig
from distill.registry import AUTOLOAD_ENV, Registry
from distill.testing import check_divergence

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "plugins.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FIXTURE = ROOT / "tests" / "plugin_pkgs" / "distill-hellinger"


@dataclass
class Block:
    lang: str
    text: str
    line: int  # of the opening fence
    page: Path = PAGE

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(fence.group(1), "\n".join(lines[i + 1 : end]) + "\n", i + 1, path))
            i = end
        i += 1
    return blocks


BLOCKS = code_blocks(PAGE)
PYTHON = [b for b in BLOCKS if b.lang == "python"]
ALL_BLOCKS = [block for page in PAGES for block in code_blocks(page)]
ALL_PYTHON = [b for b in ALL_BLOCKS if b.lang == "python"]


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


@pytest.mark.parametrize("block", ALL_PYTHON, ids=[b.where for b in ALL_PYTHON])
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
        words = shlex.split(code.replace("$(which distill)", "distill"), comments=True)
        env = {}
        while words and re.match(r"^[A-Z][A-Z0-9_]*=", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        if words:
            commands.append((env, words, comment or ""))
    return commands


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "bash"], ids=lambda b: b.where)
def test_shell_block_commands_run(block, doc_modules, monkeypatch):
    cli_app = importlib.import_module("distill.cli.app")
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


# --- every page: README.md and docs/


def load_script(name: str) -> types.ModuleType:
    """A module of scripts/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG_REFERENCE = load_script("config_reference")
LANGS = {"python", "bash", "yaml", "toml", "text", ""}  # "" (and "text"): quoted output, errors, a synopsis
PLACEHOLDER = re.compile(r"^(\.\.\.|[A-Z][A-Z0-9_]*(/[\w.]+)?)$")
SHELL_STOP = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1"}


def prose(page: Path) -> str:
    """The page without its fenced code blocks."""
    return re.sub(r"^```.*?^```[^\n]*$", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def inline_code(page: Path) -> list[str]:
    """Every `code span` of the page's running text (a span may wrap onto the next line)."""
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose(page))]


def test_the_pages_are_the_ones_the_site_lists():
    """Each docs page is in mkdocs.yml's navigation and each navigation entry is a page (or the generated
    config reference); the README links to every page."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = [next(iter(entry.values())) for entry in config["nav"]]
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in PAGES if p.is_relative_to(ROOT / "docs"))
    assert sorted(set(nav) - {CONFIG_REFERENCE.PAGE}) == pages
    assert config["hooks"] == ["scripts/config_reference.py"] and config["strict"] is True
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [page for page in pages if f"(docs/{page}" not in readme] == []


def test_every_block_has_a_language_these_tests_check():
    odd = [f"{b.where} ({b.lang})" for b in ALL_BLOCKS if b.lang not in LANGS]
    assert odd == [], "label each block python, bash, yaml, toml or text"
    assert len(ALL_PYTHON) > len(PYTHON) and any(b.lang == "bash" and b.page.name == "README.md" for b in ALL_BLOCKS)


# --- commands: parsed against the real command line, configs resolved


@functools.cache
def distill_commands():
    import typer.main

    from distill.cli.app import app

    return typer.main.get_command(app)


def parse_distill(args: list[str], where: str, *, complete: bool = True) -> tuple[str, dict, bool]:
    """``distill ARGS`` parsed as the CLI parses it (unknown options, missing values, extra arguments
    and values of the wrong type fail; with ``complete``, a missing required option too); returns the
    command's name, its options, and whether they are whole (no placeholder where a number goes)."""
    group = distill_commands()
    if args in (["--version"], ["--help"]) or (args and PLACEHOLDER.match(args[0])):  # `distill COMMAND --help`
        return "", {}, False
    assert args and args[0] in group.commands, f"{where}: distill {' '.join(args)}: no such command"
    name, command = args[0], group.commands[args[0]]
    if not complete and args[-1].startswith("-"):  # running text may name an option without its value
        args = [*args, "..."]
    context = command.context_class(command, info_name=name)
    whole = True
    try:
        options, extra, order = command.make_parser(context).parse_args(list(args[1:]))
        assert not [a for a in extra if a != "..."], f"unexpected arguments {extra}"
        for param in order:
            values = options[param.name] if isinstance(options[param.name], list) else [options[param.name]]
            if not any(isinstance(v, str) and PLACEHOLDER.match(v) for v in values):
                options[param.name] = param.process_value(context, options[param.name])
            else:  # `--teacher T` is a string all the same; `--max-steps N` is not a number
                with contextlib.suppress(Exception):
                    param.process_value(context, options[param.name])
                    continue
                whole = False
        missing = [p.opts[0] for p in command.params if p.required and p.name not in options]
        assert not (complete and missing), f"missing {missing}"
    except Exception as error:  # the CLI's own click copy: its exceptions are not click's
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        pytest.fail(f"{where}: distill {' '.join(args)}: {message}")
    return name, options, whole


def check_distill(args: list[str], where: str, *, resolve: bool = True) -> None:
    """Parse ``distill ARGS``; for ``run`` (not ``--resume``) and ``cache-teacher`` (not ``--verify``)
    also resolve the config the command would train with and check its plugins' parameters, and run
    ``list`` for real. A ``--config`` file that does not exist is a placeholder (``my-run.yaml``)."""
    from distill.resolve import flag_layer, plan_run, resolve_cache, resolve_run

    name, options, whole = parse_distill(args, where, complete=resolve)
    if not (resolve and whole):
        return
    config = options.get("config")
    config = str(ROOT / config) if config and (ROOT / config).is_file() else None
    try:
        if name == "run" and not options.get("resume"):
            keys = inspect.signature(flag_layer).parameters
            plan_run(resolve_run(config, flag_layer(**{k: v for k, v in options.items() if k in keys})))
        elif name == "cache-teacher" and not options.get("verify"):
            keys = ("teacher", "data", "seed", "settings")
            resolve_cache(config, flag_layer(**{k: options[k] for k in keys if k in options}))
    except distill.DistillError as error:
        pytest.fail(f"{where}: distill {' '.join(args)}: {error}")
    if name == "list":
        result = CliRunner().invoke(importlib.import_module("distill.cli.app").app, args)
        assert result.exit_code == 0, (where, args, result.output)


def script_options(path: Path) -> set[str]:
    """The option strings a script's argparse parser declares (``add_argument("--run", ...)``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        arg.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument"
        for arg in node.args
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-")
    }


def check_script(path: str, args: list[str], where: str) -> None:
    script = ROOT / path
    assert script.is_file(), f"{where}: {path}: no such file"
    known = script_options(script) | {"-h", "--help"}
    used = {a.split("=")[0] for a in args if a.startswith("-") and not re.fullmatch(r"-\d.*", a)}
    assert used <= known, f"{where}: {path} has no option {sorted(used - known)}"


@functools.cache
def ruff_help(subcommand: str) -> str:
    ruff = Path(sys.executable).with_name("ruff")
    return subprocess.run([str(ruff), subcommand, "--help"], capture_output=True, text=True, check=True).stdout


def check_mkdocs(args: list[str], where: str) -> None:
    assert (ROOT / "mkdocs.yml").is_file()
    try:
        from mkdocs.__main__ import cli
    except ImportError:  # the docs extra is not installed: the subcommand at least
        assert args[:1] in (["build"], ["serve"]), f"{where}: mkdocs {args}"
        return
    command = cli.commands[args[0]]
    command.make_context(args[0], list(args[1:]))  # raises on an unknown option or a bad value


def check_command(env: dict[str, str], argv: list[str], where: str) -> None:
    """One command line of a bash block (environment assignments, then the command)."""
    for key in env:
        if key.startswith("DISTILL_"):
            sources = "".join(p.read_text() for d in ("core", "cli", "plugins") for p in (ROOT / d).rglob("*.py"))
            assert key in sources, f"{where}: {key} is read nowhere in core/, cli/ or plugins/"
    stop = next((i for i, word in enumerate(argv) if word in SHELL_STOP or word.startswith((">", "2>"))), None)
    argv = argv[:stop]
    if argv[0] == "nohup":
        argv = argv[1:]
    program, args = Path(argv[0]).name, argv[1:]
    if argv[0] == "distill":
        check_distill(args, where)
    elif program == "python" and args[:1] == ["-c"]:
        compile(args[1], where, "exec")
    elif program == "python" and args[:2] == ["-m", "distill"]:
        check_distill(args[2:], where)
    elif program == "python":
        check_script(args[0], args[1:], where)
    elif program == "bash":
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: {args[0]}: no such script"
        if args[0] == "scripts/setup.sh" and len(args) > 1:
            extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
            assert set(args[1].split(",")) <= set(extras), f"{where}: no such extra in {args[1]}"
        elif args[0] == "scripts/run.sh" and len(args) > 1:
            check_distill(args[1:], where)
    elif program == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        assert args[0] == "launch", f"{where}: accelerate {args[0]}"
        try:
            launch = launch_command_parser().parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{where}: accelerate launch rejects {args[1:]}")
        assert not launch.config_file or (ROOT / launch.config_file).is_file(), f"{where}: {launch.config_file}"
        assert launch.training_script == "distill", f"{where}: launches {launch.training_script}"
        check_distill(launch.training_script_args, where)
    elif program == "ruff":
        flags = {a.split("=")[0] for a in args[1:] if a.startswith("-")}
        assert args[0] in ("check", "format") and all(flag in ruff_help(args[0]) for flag in flags), (where, args)
    elif program == "mkdocs":
        check_mkdocs(args, where)
    else:
        pytest.fail(f"{where}: no check for {argv[0]!r}")


SHELL = [b for b in ALL_BLOCKS if b.lang == "bash"]


@pytest.mark.parametrize("block", SHELL, ids=[b.where for b in SHELL])
def test_every_shell_command_parses(block):
    commands = shell_commands(block)
    assert commands, f"{block.where}: an empty bash block"
    for env, argv, _ in commands:
        check_command(env, argv, block.where)


def synopsis(block: Block) -> dict[str, list[list[str]]]:
    """The ``distill`` lines of a text block (continuation lines indented): command -> option lists."""
    usages: dict[str, list[list[str]]] = {}
    lines: list[str] = []
    for line in block.text.splitlines():
        if line.startswith("distill "):
            lines.append(line)
        elif line.startswith(" ") and lines:
            lines[-1] += " " + line.strip()
    for line in lines:
        name = line.split()[1]
        options = re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", line)
        usages.setdefault(name, []).append(options)
    return usages


def test_the_synopsis_names_every_command_and_option_and_nothing_else():
    (block,) = [b for b in ALL_BLOCKS if b.lang == "text" and b.page.name == "cli.md"]
    usages = synopsis(block)
    group = distill_commands()
    assert sorted(usages) == sorted(group.commands)
    for name, command in group.commands.items():
        documented = {option for options in usages[name] for option in options}
        real = {opt for p in command.params for opt in p.opts if opt.startswith("-")} - {"--help"}
        assert documented <= real, f"docs/cli.md: distill {name} has no {sorted(documented - real)}"
        longs = {next((o for o in p.opts if o.startswith("--")), p.opts[0]) for p in command.params}
        undocumented = {o for o in longs if o.startswith("-") and o != "--help" and o not in documented}
        assert not undocumented, f"docs/cli.md: the synopsis of distill {name} lacks {sorted(undocumented)}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_distill_commands_in_running_text_parse(page):
    where = str(page.relative_to(ROOT))
    for span in inline_code(page):
        if span.startswith("distill "):
            words = shlex.split(span)
            stop = next((i for i, word in enumerate(words) if word in SHELL_STOP), None)
            check_distill(words[1:stop], f"{where}: `{span}`", resolve=False)


# --- config keys, YAML and TOML


SECTIONS = "|".join(RunConfig.model_fields)
CONFIG_KEY = re.compile(rf"(?<![\w./-])((?:{SECTIONS})(?:\.[\w<>*-]+)+)")
NOT_KEYS = (".jsonl", ".json", ".yaml", ".py", ".md", ".txt")


def config_key_exists(dotted: str) -> bool:
    """Whether ``dotted`` names a key of ``RunConfig`` (``objective.terms.<source>.weight``: any source;
    under ``divergence.params`` and ``policy.params``, any parameter)."""
    model, parts = RunConfig, dotted.split(".")
    while parts:
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        field = fields.get(parts.pop(0))
        if field is None:
            return False
        if not parts:
            return True
        if (section := CONFIG_REFERENCE.section_model(field.annotation)) is not None:
            model = section
        elif (value := CONFIG_REFERENCE.mapping_model(field.annotation)) is not None:
            parts.pop(0)  # the mapping's own key: a source name
            model = value
        else:
            return "dict" in str(field.annotation)  # free-form parameters
    return True


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_config_key_named_in_running_text_exists(page):
    named = {key for span in inline_code(page) for key in CONFIG_KEY.findall(span)}
    named = {key.rstrip(".") for key in named if not key.endswith(NOT_KEYS)}
    assert [key for key in sorted(named) if not config_key_exists(key)] == [], page.name


def test_the_config_key_check_can_fail():
    assert config_key_exists("train.max_steps") and config_key_exists("objective.terms.<source>.ce_weight")
    assert config_key_exists("log.with") and config_key_exists("divergence.params.alpha")
    assert not config_key_exists("train.max_step") and not config_key_exists("train.lr.peak")
    assert CONFIG_KEY.findall("--set train.lr=1e-4 distill.generation.few_row_head") == ["train.lr"]


YAML = [b for b in ALL_BLOCKS if b.lang in ("yaml", "toml")]


@pytest.mark.parametrize("block", YAML, ids=[b.where for b in YAML])
def test_yaml_and_toml_blocks_parse_and_configs_validate(block):
    data = tomllib.loads(block.text) if block.lang == "toml" else yaml.safe_load(block.text)
    assert isinstance(data, dict), block.where
    if block.lang == "yaml" and set(data) <= set(RunConfig.model_fields):
        RunConfig.model_validate(data)  # unknown keys and bad values raise


# --- links, the recipe table, the config reference


def anchors(page: Path) -> set[str]:
    from markdown.extensions.toc import slugify

    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", prose(page), re.M)
    return {slugify(re.sub(r"[`*]", "", heading), "-") for heading in headings}


def test_every_readme_link_and_anchor_resolves():
    readme = ROOT / "README.md"
    links = re.findall(r"\]\(([^)\s]+)\)", prose(readme))
    assert links, "the README links to the docs"
    for link in links:
        if re.match(r"^[a-z]+:", link):
            continue
        path, _, anchor = link.partition("#")
        target = (ROOT / path) if path else readme
        assert target.exists(), f"README.md: {link}: no such file"
        if anchor:
            assert anchor in anchors(target), f"README.md: {link}: no such heading in {target.name}"


def recipe_table(page: Path) -> str:
    text = page.read_text(encoding="utf-8")
    start = text.index("| recipe | divergence | policy |\n")
    return text[start : text.index("\n\n", start)]


def test_the_recipe_table_is_the_same_in_the_readme_and_the_docs_and_names_every_recipe():
    table = recipe_table(ROOT / "README.md")
    assert table == recipe_table(ROOT / "docs" / "recipes.md")
    names = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert sorted(names) == sorted(Registry.build(autoload=False).names("recipe"))


def test_the_config_reference_documents_every_key_and_builtin_parameter():
    page = CONFIG_REFERENCE.render()
    rows = re.findall(r"^\| `([^`]+)` \|(.*)\|$", page, re.M)
    documented = {key for key, _ in rows}

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            key = f"{prefix}{field.alias or name}"
            yield key
            if (section := CONFIG_REFERENCE.section_model(field.annotation)) is not None:
                yield from keys(section, f"{key}.")
            elif (value := CONFIG_REFERENCE.mapping_model(field.annotation)) is not None:
                yield from keys(value, f"{key}.<name>.")

    assert set(keys(RunConfig)) <= documented
    assert {"log.with", "student.lora.rank", "objective.terms.<name>.weight_end", "train.fused_head"} <= documented
    registry = Registry.build(autoload=False)
    for kind in ("divergence", "policy"):
        for entry in registry.entries(kind):
            assert f"### {kind.capitalize()} `{entry.name}`" in page
            assert {f"{kind}.params.{name}" for name in entry.obj.Params.model_fields} <= documented
    assert all(f"| `{name}` |" in page for name in registry.names("recipe"))
    for key, cells in rows:  # type, default, description: three more cells, none empty
        if "." in key or key in RunConfig.model_fields:
            parts = re.split(r"(?<!\\)\|", cells)
            assert len(parts) >= 3 and all(part.strip() for part in parts[-3:]), key
    assert "<source>" not in re.sub(r"`[^`]*`", "", page), "raw HTML in the page"
    assert "| `train.max_steps` | int, > 0 | `100` | optimizer steps |" in page


def test_the_config_reference_hook_adds_the_page(tmp_path):
    mkdocs_config = pytest.importorskip("mkdocs.config")
    files_module = pytest.importorskip("mkdocs.structure.files")
    config = mkdocs_config.load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path))
    files = config.plugins.on_files(files_module.Files([]), config=config)  # the hook, as a build runs it
    (page,) = files
    assert page.src_uri == CONFIG_REFERENCE.PAGE and page.content_string == CONFIG_REFERENCE.render()
