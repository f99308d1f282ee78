"""Experiment trackers through Accelerate (`log.with`): every step's and every evaluation's numbers
reach the tracker; metrics.jsonl and eval.jsonl stay the record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from tiny_models import make_pair

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_pair(tmp_path_factory.mktemp("tiny"))


def run(tiny, out: Path, *extra: str):
    return runner.invoke(
        app,
        [
            "run",
            "--recipe",
            "distillm",
            "--teacher",
            str(tiny["teacher"]),
            "--student",
            str(tiny["student"]),
            "--data",
            str(tiny["data"]),
            "--output-dir",
            str(out),
            "--max-steps",
            "3",
            "--set",
            "train.batch_size=4",
            "--set",
            "eval.every=2",
            "--set",
            "generation.max_new_tokens=8",
            *extra,
        ],
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_gets_every_step_and_evaluation(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = run(tiny, out, "--set", "log.with=tensorboard", "--set", "log.project=tiny-distill")
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(out / "trackers" / "tiny-distill")).Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    metrics, evals = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "eval.jsonl")
    for name in ("loss", "tokens", "lr", "sgo_prob"):
        assert [s for s, _ in scalars[f"train/{name}"]] == [1, 2, 3]
        assert [v for _, v in scalars[f"train/{name}"]] == pytest.approx([m[name] for m in metrics], rel=1e-6)
    assert [s for s, _ in scalars["eval/val_loss"]] == [e["step"] for e in evals] == [0, 2, 3]
    assert [v for _, v in scalars["eval/val_loss"]] == pytest.approx([e["val_loss"] for e in evals], rel=1e-6)
    assert "log:\n  with:\n  - tensorboard\n  project: tiny-distill" in (out / "config.yaml").read_text()


def test_no_tracker_by_default(tiny, tmp_path):
    out = tmp_path / "run"
    assert run(tiny, out).exit_code == 0
    assert not (out / "trackers").exists()


@pytest.mark.parametrize(
    "value, message",
    [
        ("tensorbord", "error: log.with: unknown tracker tensorbord; choose none or from tensorboard, wandb,"),
        ("[tensorboard, mlflw]", "error: log.with: unknown tracker mlflw;"),
    ],
)
def test_unknown_tracker_is_one_line(tiny, tmp_path, value, message):
    result = run(tiny, tmp_path / "run", "--set", f"log.with={value}")
    assert result.exit_code == 2
    assert result.output.strip().startswith(message) and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("aim") is not None, reason="aim is installed here")
def test_tracker_without_its_package_is_one_line(tiny, tmp_path):
    result = run(tiny, tmp_path / "run", "--set", "log.with=aim")
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == "error: log.with aim: the aim package is not installed; pip install aim, or drop it from log.with"
    )
    assert not (tmp_path / "run").exists()
