"""The command lines the end-to-end tests type: ``distill run`` and ``distill cache-teacher`` on the
tiny pair (``tiny_models.make_pair``, the ``tiny`` fixture of conftest.py), what a run writes, and the
multi-process scripts next to this file run as their own processes.

A test builds its own argument list from these pieces, in the order it passes them::

    result = run_cli(tiny, tmp_path / "run", "--recipe", "kd", *sets("train.batch_size=4"))
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.resolve import flag_layer

runner = CliRunner()


def sets(*assignments: str) -> list[str]:
    """``--set key=value`` flags, one per assignment, in order."""
    return [word for assignment in assignments for word in ("--set", assignment)]


def pair_args(
    pair: dict[str, Path],
    out: Path | None = None,
    *,
    teacher: Path | str | None = None,
    student: Path | str | None = None,
    data: Path | str | None = None,
) -> list[str]:
    """``--teacher T --student S --data D`` of ``pair``, then ``--output-dir out`` when given; a keyword
    passes another teacher, student or data file instead of the pair's."""
    args = ["--teacher", str(teacher or pair["teacher"]), "--student", str(student or pair["student"])]
    args += ["--data", str(data or pair["data"])]
    return args + (["--output-dir", str(out)] if out is not None else [])


def run_args(pair: dict[str, Path], out: Path, *args: str, **models: Path | str | None) -> list[str]:
    """``distill run`` on ``pair`` into ``out``, then ``args``; ``models``: as ``pair_args``."""
    return ["run", *pair_args(pair, out, **models), *args]


def run_cli(pair: dict[str, Path], out: Path, *args: str, **models: Path | str | None):
    """``run_args`` through the CLI in this process; the click ``Result``."""
    return runner.invoke(app, run_args(pair, out, *args, **models))


def cache_args(pair: dict[str, Path], out: Path, *args: str, teacher: Path | str | None = None) -> list[str]:
    """``distill cache-teacher`` of the pair's teacher (or ``teacher``) on its data into ``out``, then ``args``."""
    teacher = str(teacher or pair["teacher"])
    return ["cache-teacher", "--teacher", teacher, "--data", str(pair["data"]), "-o", str(out), *args]


def cache_cli(pair: dict[str, Path], out: Path, *args: str, teacher: Path | str | None = None):
    """``cache_args`` through the CLI in this process; the click ``Result``."""
    return runner.invoke(app, cache_args(pair, out, *args, teacher=teacher))


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, eval.jsonl, a data file)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def flags(**given):
    """The flag layer of ``distill run`` with nothing on the command line but ``given``."""
    unset = dict(recipe=None, divergence=None, policy=None, teacher=None, student=None, data=None)
    unset |= dict(divergence_params=[], policy_params=[], output_dir=None, max_steps=None, seed=None, settings=[])
    return flag_layer(**(unset | given))


def run_script(script: str, *args: str, timeout: float, deadlock: str, show_output: bool = False) -> str:
    """``python tests/<script> args`` with one intra-op thread, in a session of its own; its output.

    A run past ``timeout`` seconds is killed with its process group (a launcher forks its workers into
    it) and fails the test with ``deadlock``, followed by the end of its output if ``show_output``; a
    run that exits with an error fails it with the end of its output."""
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name(script)), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        if not show_output:
            pytest.fail(deadlock)
        output, _ = process.communicate(timeout=30)
        pytest.fail(f"{deadlock}:\n{output[-3000:]}")
    assert process.returncode == 0, output[-5000:]
    return output
