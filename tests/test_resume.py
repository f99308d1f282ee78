"""Exact resume after a real SIGKILL, a clean stop on SIGTERM, non-finite losses, and what a
checkpoint holds. Tiny models; the killed and stopped runs are real `python -m distill` processes."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli_runs
import distill.session
from cli_runs import read_jsonl, sets
from distill.checkpoint import checkpoints, latest_checkpoint
from distill.cli import app

runner = CliRunner()
MAX_STEPS = 12
# the adaptive recipe with phi = 1 and a buffer of two batches: every step generates or replays, so
# the generation RNG, the replay buffer and the policy's draw generator all decide the losses
ADAPTIVE = ["--recipe", "distillm", "-P", "init_prob=1", "-P", "capacity=8", "--seed", "3"]
ADAPTIVE += sets("train.batch_size=4", "train.lr=3e-3", "eval.batch_size=8", "generation.max_new_tokens=12")
ADAPTIVE += [*sets("eval.every=2", "checkpoint.every=2"), "--max-steps", str(MAX_STEPS)]


@pytest.fixture(scope="module")
def tiny(padded) -> dict[str, Path]:
    """Heads padded differently past the tokenizer: resume holds with them too."""
    return padded


def run_args(tiny, out: Path, *extra: str) -> list[str]:
    return cli_runs.run_args(tiny, out, *ADAPTIVE, *extra)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """An uninterrupted run with the same seed."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = runner.invoke(app, run_args(tiny, out))
    assert result.exit_code == 0, result.output
    return out


def start_subprocess(tiny, out: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "distill", *run_args(tiny, out)], stdout=handle, stderr=subprocess.STDOUT
        )


def wait_for_step(process: subprocess.Popen, metrics: Path, step: int, timeout: float = 120.0) -> int:
    """Poll metrics.jsonl until it shows ``step`` or later; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]
            if steps and steps[-1] >= step:
                return steps[-1]
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit code {process.returncode}) before step {step}")
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"no step {step} within {timeout} s")


def assert_same_as_reference(out: Path, reference: Path) -> None:
    """One line per step and per evaluation, with the reference run's losses and sources."""
    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, MAX_STEPS + 1))
    for a, b in zip(ours, theirs):
        assert (a["source"], a["sgo_prob"], a["tokens"], a["lr"]) == (
            b["source"],
            b["sgo_prob"],
            b["tokens"],
            b["lr"],
        ), a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-6), a["step"]
    ours, theirs = read_jsonl(out / "eval.jsonl"), read_jsonl(reference / "eval.jsonl")
    assert [e["step"] for e in ours] == [e["step"] for e in theirs] == list(range(0, MAX_STEPS + 1, 2))
    for a, b in zip(ours, theirs):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=0, abs=1e-6), a["step"]


def test_sigkill_at_any_moment_then_resume_matches_an_uninterrupted_run(tiny, tmp_path, reference):
    out = tmp_path / "run"
    process = start_subprocess(tiny, out, tmp_path / "log.txt")
    seen = wait_for_step(process, out / "metrics.jsonl", 3)  # past the first checkpoint (step 2)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    last = latest_checkpoint(out)
    assert last is not None and 2 <= last.step < MAX_STEPS
    assert len(read_jsonl(out / "metrics.jsonl")) >= seen > last.step  # lines past the checkpoint, to be cut

    result = runner.invoke(app, run_args(tiny, out, "--resume"))  # the same command line, plus --resume
    assert result.exit_code == 0, result.output
    assert f"resuming after step {last.step}" in result.output
    assert_same_as_reference(out, reference)
    assert [c.step for c in checkpoints(out)] == [MAX_STEPS - 2, MAX_STEPS]  # checkpoint.keep = 2
    assert not list((out / "checkpoints").glob(".*")), "a temporary folder was left behind"


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_matches(tiny, tmp_path, reference):
    out = tmp_path / "run"
    log = tmp_path / "log.txt"
    process = start_subprocess(tiny, out, log)
    wait_for_step(process, out / "metrics.jsonl", 1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    stopped = read_jsonl(out / "metrics.jsonl")[-1]["step"]
    assert stopped < MAX_STEPS
    message = [line for line in log.read_text().splitlines() if "stopped" in line]
    assert len(message) == 1 and message[0].startswith(
        f"stopped: SIGTERM after step {stopped}; checkpoint saved to {out / 'checkpoints' / f'step-{stopped}'}"
    )
    assert f"distill run --resume --output-dir {out}" in message[0]
    assert "Traceback" not in log.read_text()
    assert latest_checkpoint(out).step == stopped
    assert not (out / "final").exists()

    result = runner.invoke(app, run_args(tiny, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert_same_as_reference(out, reference)


def test_checkpoint_holds_every_state_and_a_token_id_replay_buffer(tiny, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, run_args(tiny, out, "--max-steps", "4", "--set", "checkpoint.keep=1"))
    assert result.exit_code == 0, result.output
    assert [c.step for c in checkpoints(out)] == [4]  # at most checkpoint.keep, and one at the end
    folder = out / "checkpoints" / "step-4"
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert f"checkpoint @ step 4: {folder} " in result.output and f"{size} bytes" in result.output
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert state["step"] == 4 and state["sampler"]["position"] > 0
    assert {"optimizer", "scheduler", "run"} <= state.keys()
    assert state["run"]["step"] == 4 and state["run"]["before"]["val_loss"] > 0
    (local,) = state["ranks"]
    assert {"python", "numpy", "torch"} <= local["rng"].keys() and local["lm_rng"]
    policy = local["policy"]
    assert policy["prob"] == 1.0 and policy["reference_loss"] is not None and "generator" in policy
    items = policy["buffer"]["items"]
    assert len(items) == 8  # capacity: bounded
    for prompt_ids, response_ids in items:  # token ids only, never logits
        assert all(type(t) is int for t in [*prompt_ids, *response_ids])
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder / "student").config.num_hidden_layers == 1


def test_resume_extends_a_finished_run_with_a_new_max_steps(tiny, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, run_args(tiny, out, "--max-steps", "4")).exit_code == 0
    result = runner.invoke(
        app, ["run", "--resume", "--output-dir", str(out), "--max-steps", "6", "--set", "eval.every=3"]
    )
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[4]["lr"] > 0  # the schedule is the new one: a 4-step cosine is at 0 after step 4
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 2, 4, 6]
    assert "max_steps: 6" in (out / "config.yaml").read_text()


def test_resume_without_a_checkpoint_refuses_a_run_with_steps_and_starts_over_one_without(tiny, tmp_path, reference):
    out = tmp_path / "run"
    assert runner.invoke(app, run_args(tiny, out, "--max-steps", "2", "--set", "checkpoint.every=0")).exit_code == 0
    for folder in (out / "checkpoints" / "step-2", out / "final"):  # as if killed at step 2
        shutil.rmtree(folder)
    result = runner.invoke(app, run_args(tiny, out, "--resume"))  # the flags repeat all but a safe field
    assert result.exit_code == 2 and "2 step(s) in metrics.jsonl" in result.output  # never starts over over steps
    (out / "metrics.jsonl").write_text("")  # as if killed before its first step
    (out / "eval.jsonl").unlink()
    result = runner.invoke(app, run_args(tiny, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert "starts over" in result.output
    assert_same_as_reference(out, reference)


# --- non-finite losses


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The training loss of step 3 (one micro-batch per step) is NaN, and so are its gradients."""
    calls = {"n": 0}
    original = distill.session.micro_loss

    def poisoned(*args, **kwargs):
        loss, parts = original(*args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan, parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(distill.session, "micro_loss", poisoned)


def test_nonfinite_loss_stops_with_one_line_naming_step_and_checkpoint(tiny, tmp_path, nan_at_step_3):
    out = tmp_path / "run"
    result = runner.invoke(app, run_args(tiny, out, "--max-steps", "4"))
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("stopped: step 3: the loss is nan") and "Traceback" not in result.output
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-2'}" in lines[-1]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert not (out / "final").exists()


def test_skip_nonfinite_skips_and_counts_without_touching_the_weights(tiny, tmp_path, nan_at_step_3):
    out = tmp_path / "run"
    result = runner.invoke(app, run_args(tiny, out, "--max-steps", "4", "--set", "train.skip_nonfinite=true"))
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[2]["loss"] is None and metrics[2]["skipped"] is True
    assert all(math.isfinite(m["loss"]) and "skipped" not in m for m in metrics[:2] + metrics[3:])
    assert "steps skipped (loss not finite)" in result.output
    from transformers import AutoModelForCausalLM

    # an optimizer step with NaN gradients would have made every weight NaN
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(out / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)["run"]["skipped"] == 1
