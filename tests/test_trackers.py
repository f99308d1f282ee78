"""Experiment trackers through Accelerate (`log.with`): every step's and every evaluation's numbers
reach the tracker; metrics.jsonl and eval.jsonl stay the record."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_runs import pair_args, read_jsonl, sets
from distill.cli import app

runner = CliRunner()


def run(tiny, out: Path, *extra: str):
    overrides = sets("train.batch_size=4", "eval.every=2", "generation.max_new_tokens=8")
    return runner.invoke(
        app, ["run", "--recipe", "distillm", *pair_args(tiny, out), "--max-steps", "3", *overrides, *extra]
    )


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
