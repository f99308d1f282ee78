"""The package layout of DESIGN.md section 3: folders mapped to `distill`, one-way imports, entry points."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import distill

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR = SETUPTOOLS["package-dir"]
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "runs"}
BARE = {"core", "plugins", "cli"}


def python_files() -> list[Path]:
    """Every .py file of the repository, outside virtual environments and build outputs."""
    found = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(root) / f for f in files if f.endswith(".py")]
    return sorted(found)


def module_name(path: Path) -> str | None:
    """The import name of a file under a mapped folder (``core/loss.py`` -> ``distill.loss``)."""
    for package, folder in PACKAGE_DIR.items():
        try:
            parts = path.relative_to(REPO / folder).with_suffix("").parts
        except ValueError:
            continue
        if parts and parts[-1] == "__init__":
            parts = parts[:-1]
        return ".".join((package, *parts))
    return None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else (name or "").rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_package_dir_maps_the_three_folders():
    assert PACKAGE_DIR == {"distill": "core", "distill.plugins": "plugins", "distill.cli": "cli"}


def test_packages_list_equals_folders_with_init():
    derived = set()
    for package, folder in PACKAGE_DIR.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            derived.add(".".join((package, *init.parent.relative_to(root).parts)))
    assert sorted(SETUPTOOLS["packages"]) == sorted(derived)


def test_no_module_folder_lacks_init():
    """A folder of modules without __init__.py under a mapped folder would silently not be installed."""
    for folder in PACKAGE_DIR.values():
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                assert (path.parent / "__init__.py").exists(), f"{path.parent.relative_to(REPO)} has no __init__.py"


def test_python_files_are_found():
    names = {p.relative_to(REPO).as_posix() for p in python_files()}
    assert {"core/registry.py", "plugins/divergences.py", "cli/app.py", "tests/test_layout.py"} <= names
    assert not any(n.startswith(".venv/") for n in names)


def bare_import_offenders(paths: list[Path]) -> list[str]:
    offenders = [
        f"{path.relative_to(REPO).as_posix()}:{line}: {module}"
        for path in paths
        for line, module in imported_modules(path)
        if module.split(".")[0] in BARE
    ]
    return first_per_line(offenders)


def first_per_line(offenders: list[str]) -> list[str]:
    """``from a import b`` yields both ``a`` and ``a.b``; report each offending line once."""
    seen, kept = set(), []
    for offender in offenders:
        where = offender.split(": ", 1)[0]
        if where not in seen:
            seen.add(where)
            kept.append(offender)
    return kept


def direction_offenders(paths: list[Path]) -> list[str]:
    """Imports against cli -> plugins -> core (core/__main__.py, the `python -m distill` entry, may import cli)."""
    offenders = []
    for path in paths:
        name = module_name(path)
        if name is None:
            continue
        rel = path.relative_to(REPO).as_posix()
        in_plugins, in_cli = name.startswith("distill.plugins"), name.startswith("distill.cli")
        for line, module in imported_modules(path):
            to_plugins = module == "distill.plugins" or module.startswith("distill.plugins.")
            to_cli = module == "distill.cli" or module.startswith("distill.cli.")
            if not (in_plugins or in_cli) and (to_plugins or to_cli) and rel != "core/__main__.py":
                offenders.append(f"{rel}:{line}: {module}")
            if in_plugins and to_cli:
                offenders.append(f"{rel}:{line}: {module}")
    return first_per_line(offenders)


def test_nothing_imports_bare_folder_names():
    assert bare_import_offenders(python_files()) == []


def test_dependencies_point_from_cli_to_plugins_to_core():
    assert direction_offenders(python_files()) == []


def test_import_checks_can_fail(tmp_path, monkeypatch):
    """Feed the checks a fake repository whose modules break every rule."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for folder in ("core", "plugins", "cli", "tests"):
        (tmp_path / folder).mkdir()
    files = {
        "core/engine.py": (
            "import importlib\n"
            "from .plugins import divergences\n"  # resolves to distill.plugins
            "def later():\n    from distill.cli import app\n"
            "importlib.import_module('distill.plugins.divergences')\n"
        ),
        "core/__main__.py": "from distill.cli import main\n",
        "plugins/policies.py": "from ..cli.app import console\nimport distill.cli\n",
        "cli/app.py": "from distill.plugins import divergences\n",
        "tests/test_x.py": "import core\nfrom plugins import divergences\nfrom cli.app import app\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    paths = [tmp_path / rel for rel in files]
    assert bare_import_offenders(paths) == [
        "tests/test_x.py:1: core",
        "tests/test_x.py:2: plugins",
        "tests/test_x.py:3: cli.app",
    ]
    assert direction_offenders(paths) == [
        "core/engine.py:2: distill.plugins",
        "core/engine.py:4: distill.cli",
        "core/engine.py:5: distill.plugins.divergences",
        "plugins/policies.py:1: distill.cli.app",
        "plugins/policies.py:2: distill.cli",
    ]


LIBRARY_FOLDERS = ("core", "plugins", "benchmarks", "scripts", "examples")
"""Folders whose code must not import the command line (the library, and what is built on it)."""
RUNS_THE_CLI = {"core/__main__.py"}
"""``python -m distill``: the one file outside ``cli/`` that imports ``distill.cli`` (to run it)."""


def cli_import_offenders(paths: list[Path]) -> list[str]:
    """``file:line: module`` for each import of ``distill.cli`` outside ``cli/`` and ``tests/``."""
    offenders = []
    for path in paths:
        rel = path.relative_to(REPO).as_posix()
        if rel.split("/")[0] not in LIBRARY_FOLDERS or rel in RUNS_THE_CLI:
            continue
        offenders += [
            f"{rel}:{line}: {module}"
            for line, module in imported_modules(path)
            if module == "distill.cli" or module.startswith("distill.cli.")
        ]
    return first_per_line(offenders)


def test_only_the_command_line_imports_distill_cli():
    """Evaluation, config resolution and the rest live in the library; benchmarks and scripts use it."""
    offenders = cli_import_offenders(python_files())
    assert offenders == [], "import distill.cli outside cli/ (use distill.resolve, distill.evaluation):\n" + "\n".join(
        offenders
    )


def test_cli_import_check_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    files = {
        "benchmarks/bench.py": "import json\ndef later():\n    from distill.cli.run_cmd import flag_layer\n",
        "scripts/tool.py": "import distill.cli\n",
        "examples/ex.py": "import importlib\nimportlib.import_module('distill.cli.app')\n",
        "core/__main__.py": "from distill.cli import main\n",
        "cli/app.py": "from distill.cli.listing import render_listing\n",
        "tests/test_x.py": "from distill.cli import app\n",
        "benchmarks/fine.py": "from distill.resolve import flag_layer\nimport distill.client\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert cli_import_offenders([tmp_path / rel for rel in files]) == [
        "benchmarks/bench.py:3: distill.cli.run_cmd",
        "scripts/tool.py:1: distill.cli",
        "examples/ex.py:2: distill.cli.app",
    ]


def test_builtin_plugins_are_named_in_the_plugins_package():
    from distill.registry import BUILTIN_PLUGINS

    assert BUILTIN_PLUGINS and all(name.startswith("distill.plugins.") for name in BUILTIN_PLUGINS)


# --- the two ways to start the command line
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PYTHONPATH")}
    return {**env, "NO_COLOR": "1", "COLUMNS": "200"}


def test_python_m_distill_version():
    result = subprocess.run(
        [sys.executable, "-m", "distill", "--version"], capture_output=True, text=True, timeout=120, env=_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"distill {distill.__version__}"


def test_console_script_version():
    script = Path(sys.executable).parent / ("distill.exe" if os.name == "nt" else "distill")
    if not script.exists():
        pytest.fail(f"console script not found next to {sys.executable}; install the project (scripts/setup.sh)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"distill {distill.__version__}"


def test_version_matches_package_metadata():
    from importlib.metadata import version

    assert distill.__version__ == version("distill") == PYPROJECT["project"]["version"]
