"""The plugin-author contract (DESIGN.md section 4): a real package, installed, found through its entry point.

The fixture packages in ``tests/plugin_pkgs/`` are built and installed once per session with
``pip install --target`` (offline: no index, no build isolation, the environment's setuptools), each into
its own folder; a test puts the folders it wants on ``PYTHONPATH`` of a fresh process, which is exactly
how an installed distribution is seen (``importlib.metadata`` scans ``sys.path``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import distill
from distill.registry import AUTOLOAD_ENV, BUILTIN_PROVIDER, Registry
from tiny_models import table_rows as rows

PACKAGES = Path(__file__).resolve().parent / "plugin_pkgs"
FIXTURES = {"hellinger": "distill-hellinger", "kl_clash": "distill-kl-clash", "fork": "distill-hellinger-fork"}
SCRIPT = Path(sys.executable).parent / "distill"
DISTILL = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "distill"]  # test_layout checks the script


def _write_dist_info(source: Path, target: Path) -> None:
    """Install a one-module project by hand: the module plus a .dist-info with its entry points.

    Used only where pip cannot build (no setuptools in this environment). ``importlib.metadata``
    reads exactly these files, so discovery is the same as after ``pip install``.
    """
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    project, (module,) = pyproject["project"], pyproject["tool"]["setuptools"]["py-modules"]
    target.mkdir(parents=True)
    shutil.copy(source / f"{module}.py", target)
    info = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = [f"{name} = {value}" for name, value in project["entry-points"]["distill"].items()]
    (info / "entry_points.txt").write_text("\n".join(["[distill]", *entry_points]) + "\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> dict[str, Path]:
    """Each fixture package installed into its own folder: {"hellinger": folder, ...}."""
    root = tmp_path_factory.mktemp("plugins")
    targets = {key: root / key for key in FIXTURES}
    can_build = all(importlib.util.find_spec(m) is not None for m in ("pip", "setuptools"))
    jobs = []
    for key, folder in FIXTURES.items():
        source = root / f"src-{folder}"  # build a copy: pip leaves build/ and *.egg-info behind
        shutil.copytree(PACKAGES / folder, source)
        if not can_build:
            _write_dist_info(source, targets[key])
            continue
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(targets[key]),
            str(source),
        ]
        jobs.append((folder, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for folder, job in jobs:
        output, _ = job.communicate(timeout=300)
        assert job.returncode == 0, f"pip could not install {folder}:\n{output}"
    return targets


def run(args: list[str], *folders: Path, disable_autoload: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", AUTOLOAD_ENV)}
    env.update({"PYTHONPATH": os.pathsep.join(map(str, folders)), "COLUMNS": "250", "NO_COLOR": "1"})
    if disable_autoload:
        env[AUTOLOAD_ENV] = "1"
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def squared_hellinger(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Independent reference: H^2(p, q) = 1 - sum_i sqrt(p_i q_i), in float64."""
    log_p = teacher_logits.double().log_softmax(-1)
    log_q = student_logits.double().log_softmax(-1)
    return 1.0 - (0.5 * (log_p + log_q)).exp().sum(-1)


# --- the installed plugin, seen from a fresh process
def test_distill_list_shows_the_plugin_and_its_distribution(installed):
    result = run([*DISTILL, "list", "divergences"], installed["hellinger"])
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)  # piped: one line per divergence
    assert table["hellinger"].startswith(
        "hellinger  aliases: -  params: temperature=1.0 [>0]"
    )  # no parameters of its own
    assert table["hellinger"].endswith("distill-hellinger 0.1.0")
    assert table["kl"].endswith(BUILTIN_PROVIDER)
    result = run([*DISTILL, "list", "divergences", "--json"], installed["hellinger"])
    (hellinger,) = [item for item in json.loads(result.stdout)["divergences"] if item["name"] == "hellinger"]
    assert hellinger["provider"] == "distill-hellinger 0.1.0" and hellinger["aliases"] == []
    assert hellinger["description"].startswith("Squared Hellinger distance")
    assert [p["name"] for p in hellinger["parameters"]] == ["temperature"]


def test_get_divergence_from_python(installed):
    code = (
        "import json, torch, distill, distill_hellinger\n"
        "print(distill.get_divergence('hellinger'))\n"
        "torch.manual_seed(0)\n"
        "s, t = torch.randn(16, 50) * 3, torch.randn(16, 50) * 3\n"
        "d = distill.get_divergence('hellinger')\n"
        "print(json.dumps({'file': distill_hellinger.__file__, 's': s.tolist(), 't': t.tolist(),"
        " 'values': d(s, t).tolist()}))\n"
    )
    result = run([sys.executable, "-c", code], installed["hellinger"])
    assert result.returncode == 0, result.stderr
    first, payload = result.stdout.splitlines()
    assert first == "hellinger(temperature=1.0)"
    data = json.loads(payload)
    assert Path(data["file"]).parent == installed["hellinger"]  # the installed copy, not tests/plugin_pkgs
    expected = squared_hellinger(torch.tensor(data["s"]), torch.tensor(data["t"]))
    torch.testing.assert_close(torch.tensor(data["values"], dtype=torch.float64), expected, rtol=1e-4, atol=1e-6)


def test_autoload_switch_hides_plugins_but_not_the_builtins(installed):
    """With the switch on, neither the plugin nor a clashing package is loaded: the way out of a clash."""
    result = run(
        [*DISTILL, "list", "divergences"], installed["hellinger"], installed["kl_clash"], disable_autoload=True
    )
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert "hellinger" not in table
    assert {"kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"} <= set(table)
    assert table["kl"].endswith(BUILTIN_PROVIDER)


# --- name clashes between installed packages
@pytest.mark.parametrize(
    "keys, name, providers",
    [
        (("kl_clash",), "kl", (BUILTIN_PROVIDER, "distill-kl-clash 0.2.0")),
        (("hellinger", "fork"), "hellinger", ("distill-hellinger 0.1.0", "distill-hellinger-fork 0.3.0")),
    ],
)
def test_duplicate_names_are_one_line_errors_naming_both(installed, keys, name, providers):
    result = run([*DISTILL, "list"], *(installed[k] for k in keys))
    assert result.returncode == 2, result.stdout + result.stderr
    error = result.stderr.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert error.startswith("error: ") and f"'{name}'" in error
    for provider in providers:
        assert provider in error


# --- the installed plugin in this process, through the core's loss helper
@pytest.fixture
def hellinger_registry(installed, monkeypatch) -> Registry:
    monkeypatch.syspath_prepend(str(installed["hellinger"]))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    monkeypatch.delitem(sys.modules, "distill_hellinger", raising=False)
    registry = Registry.build()
    yield registry
    sys.modules.pop("distill_hellinger", None)


def test_divergence_loss_with_the_plugin(hellinger_registry):
    assert hellinger_registry.lookup("divergence", "hellinger").provider == "distill-hellinger 0.1.0"
    d = hellinger_registry.get_divergence("hellinger")
    generator = torch.Generator().manual_seed(1)
    student = (torch.randn(2, 7, 33, generator=generator) * 2).requires_grad_()
    teacher = torch.randn(2, 7, 33, generator=generator) * 2
    teacher[..., 5] = float("-inf")  # a vocabulary entry the teacher rules out
    mask = torch.rand(2, 7, generator=generator) < 0.6
    mask[0, 0] = True
    loss = distill.divergence_loss(d, student, teacher, mask, chunk_size=3)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert (student.grad[~mask] == 0).all()  # positions that do not count get no gradient
    expected = squared_hellinger(student.detach()[mask], teacher[mask]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)

    reference = student.detach().double().requires_grad_()
    squared_hellinger(reference[mask], teacher[mask]).mean().backward()
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-3, atol=1e-6)


def test_temperature_and_params_are_the_cores_business(hellinger_registry):
    d = hellinger_registry.get_divergence("hellinger", temperature=2.0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    torch.testing.assert_close(
        d(student, teacher).double(), squared_hellinger(student / 2, teacher / 2), rtol=1e-4, atol=1e-6
    )
    with pytest.raises(distill.ConfigError, match=r"hellinger\.alpha: unknown parameter"):
        hellinger_registry.get_divergence("hellinger", alpha=0.1)
