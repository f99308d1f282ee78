"""Two real CPU processes (gloo) under `accelerate launch`: the adaptive recipe end to end, the same
branch on every rank, files written once, metrics over all ranks, and the same training as one
process with the same global batch. Each launch has a timeout, so a deadlock fails instead of hanging."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cli_runs import pair_args, read_jsonl, sets
from distill.cli import app

runner = CliRunner()
TIMEOUT = 240
SMALL = sets("eval.batch_size=8", "generation.max_new_tokens=12", "eval.every=2")
ADAPTIVE = ["--recipe", "distillm", "-P", "init_prob=1", "-P", "capacity=8", "--seed", "3", "--max-steps", "6"]
ADAPTIVE += ["--set", "train.batch_size=4", *SMALL]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_marked(marker: str, signum: int, pause: float = 0.0, *, skip: int | None = None) -> None:
    """Send ``signum`` to every process whose environment holds ``DISTILL_TEST_LAUNCH=marker`` but
    ``skip`` (the launcher's pid: then only its training processes), ``pause`` seconds apart."""
    needle = f"DISTILL_TEST_LAUNCH={marker}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != skip:
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signum)
                    time.sleep(pause)
            except (OSError, ProcessLookupError):
                pass


def launch_command(script: list[str], processes: int = 2) -> list[str]:
    """``accelerate launch`` of ``script`` with ``processes`` CPU processes (gloo).

    On a machine without GPUs ``accelerate launch --cpu --num_processes 2`` starts one process (it
    forks CPU processes only through mpirun), so this uses the torchrun launcher; the processes need
    ``ACCELERATE_USE_CPU=1`` in their environment, as README's "Scaling out" documents."""
    return [
        str(Path(sys.executable).with_name("accelerate")),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *script,
    ]


def start(script: list[str], *, processes: int = 2, env: dict[str, str] | None = None):
    """``launch_command`` started; returns the launcher process and the marker in its processes'
    environment (see ``launch``)."""
    command = launch_command(script, processes)
    marker = f"{os.getpid()}-{free_port()}"
    # PYTHONFAULTHANDLER: on SIGABRT every process prints where each of its threads is
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",
        "DISTILL_TEST_LAUNCH": marker,
        **(env or {}),
    }
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    return process, marker


def finish(process, marker: str, *, check: bool = True) -> str:
    """The launch's output once it ended; fails after ``TIMEOUT`` seconds (killing every process of
    the launch), or on an error if ``check``."""
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # first the stacks of the stuck processes (into the output), then kill them all: torchrun
        # starts its workers in sessions of their own, so the process group is not enough
        _signal_marked(marker, signal.SIGABRT, pause=1.0)  # one at a time: the stacks do not interleave
        time.sleep(2)
        os.killpg(process.pid, signal.SIGKILL)
        _signal_marked(marker, signal.SIGKILL)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            output = ""
        pytest.fail(f"no result within {TIMEOUT} s (a deadlock?):\n{output[-8000:]}")
    if check:
        assert process.returncode == 0, output[-5000:]
    return output


def launch(script: list[str], *, processes: int = 2, env: dict[str, str] | None = None) -> str:
    """``accelerate launch`` with ``processes`` CPU processes; returns the output, fails on an error or
    after ``TIMEOUT`` seconds (killing every process of the launch)."""
    return finish(*start(script, processes=processes, env=env))


def test_two_processes_take_the_same_branches_and_write_once(tiny, tmp_path):
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    output = launch(["-m", "distill", "run", *pair_args(tiny, out), *ADAPTIVE], env={"DISTILL_RANK_LOG": str(ranks)})
    single = tmp_path / "single"
    result = runner.invoke(app, ["run", *pair_args(tiny, single), *ADAPTIVE])
    assert result.exit_code == 0, result.output

    # one console: the start line and the summary come from the main process only
    assert output.count("2 processes") == 1 and output.count("distill run summary") == 1, output
    # every process logged its own branch at every step: the same ones, in the same order
    metrics = read_jsonl(out / "metrics.jsonl")
    rank0, rank1 = read_jsonl(ranks / "rank-0.jsonl"), read_jsonl(ranks / "rank-1.jsonl")
    steps = list(range(1, 7))
    assert [m["step"] for m in metrics] == [r["step"] for r in rank0] == [r["step"] for r in rank1] == steps
    sources = [m["source"] for m in metrics]
    assert [r["source"] for r in rank0] == [r["source"] for r in rank1] == sources
    assert {"student", "replay"} <= set(sources)  # both branches, so agreeing is not trivial
    # the draws come from the seed alone: one process with the same seed draws the same branches
    assert sources == [m["source"] for m in read_jsonl(single / "metrics.jsonl")]
    # `tokens` counts both processes' response tokens
    assert [m["tokens"] for m in metrics] == [a["tokens"] + b["tokens"] for a, b in zip(rank0, rank1)]
    # evaluation sums over both halves of the validation set: before training it equals one process's
    evals, single_evals = read_jsonl(out / "eval.jsonl"), read_jsonl(single / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4, 6]
    assert evals[0]["val_loss"] == pytest.approx(single_evals[0]["val_loss"], rel=1e-5)
    assert evals[0]["val_divergence"] == pytest.approx(single_evals[0]["val_divergence"], rel=1e-5)
    # written once: one checkpoint with both processes' states, one final model that loads
    state = torch.load(out / "checkpoints" / "step-6" / "trainer_state.pt", weights_only=True)
    assert len(state["ranks"]) == 2
    assert state["ranks"][0]["policy"]["generator"].equal(state["ranks"][1]["policy"]["generator"])
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 1


def test_two_processes_train_like_one_process_with_the_same_global_batch(tiny, tmp_path):
    """2 processes x 2 micro-batches x 2 sequences against 1 process x 1 micro-batch x 8 sequences:
    the same 8 sequences per step, so the same losses step after step (the gradients are equal)."""
    kd = ["--recipe", "kd", "--max-steps", "3", "--set", "train.lr=3e-3", *SMALL, "--set", "eval.every=0"]
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    distill_script = str(Path(sys.executable).with_name("distill"))  # `accelerate launch $(which distill) run ...`
    launch(
        [distill_script, "run", *pair_args(tiny, out), *kd, *sets("train.batch_size=2", "train.grad_accum=2")],
        env={"DISTILL_RANK_LOG": str(ranks)},
    )
    single = tmp_path / "single"
    result = runner.invoke(app, ["run", *pair_args(tiny, single), *kd, "--set", "train.batch_size=8"])
    assert result.exit_code == 0, result.output

    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")
    assert [m["tokens"] for m in ours] == [m["tokens"] for m in theirs]
    assert [m["lr"] for m in ours] == pytest.approx([m["lr"] for m in theirs])  # one schedule step per optimizer step
    rank0, rank1 = read_jsonl(ranks / "rank-0.jsonl"), read_jsonl(ranks / "rank-1.jsonl")
    assert any(
        a["tokens"] != b["tokens"] for a, b in zip(rank0, rank1)
    )  # unequal shares: a per-rank mean would be wrong
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    after, single_after = read_jsonl(out / "eval.jsonl")[-1], read_jsonl(single / "eval.jsonl")[-1]
    assert after["val_loss"] == pytest.approx(single_after["val_loss"], rel=1e-5)
    assert after["val_divergence"] == pytest.approx(single_after["val_divergence"], rel=1e-4)


def test_two_processes_run_distillm2_with_both_groups_generated_in_step(tiny, tmp_path):
    """The contrastive policy with generated teacher responses and kept student responses: every rank
    generates both groups at every step (a prompt's kept response may spare one rank and not the other)."""
    out, ranks = tmp_path / "run", tmp_path / "ranks"
    args = [
        "--recipe",
        "distillm2",
        "-P",
        "teacher=generate",
        "-P",
        "refresh_every=3",
        "--seed",
        "2",
        "--max-steps",
        "4",
        "--set",
        "train.batch_size=2",
        "--set",
        "objective.curriculum=true",
        "--set",
        "checkpoint.every=2",
        *SMALL,
    ]
    launch(["-m", "distill", "run", *pair_args(tiny, out), *args], env={"DISTILL_RANK_LOG": str(ranks)})
    metrics = read_jsonl(out / "metrics.jsonl")
    rank0, rank1 = read_jsonl(ranks / "rank-0.jsonl"), read_jsonl(ranks / "rank-1.jsonl")
    assert (
        [m["source"] for m in metrics]
        == [r["source"] for r in rank0]
        == [r["source"] for r in rank1]
        == ["teacher+student"] * 4
    )
    assert [m["tokens"] for m in metrics] == [a["tokens"] + b["tokens"] for a, b in zip(rank0, rank1)]
    for m in metrics:
        assert set(m["terms"]) == {"teacher", "student"}
        assert m["loss"] == pytest.approx(sum(m["term_weights"][s] * m["terms"][s] for s in m["terms"]), rel=1e-5)
    assert [m["term_weights"]["teacher"] for m in metrics] == pytest.approx([1.0, 0.75, 0.5, 0.5])
    evals = read_jsonl(out / "eval.jsonl")
    assert all({"val_loss", "val_divergence"} <= e.keys() for e in evals)
    state = torch.load(out / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)
    kept = [rank["policy"]["responses"] for rank in state["ranks"]]
    assert all(kept) and {tuple(p) for p, _, _ in kept[0]} != {
        tuple(p) for p, _, _ in kept[1]
    }  # each rank keeps its own prompts'


def test_the_end_of_a_run_cannot_deadlock_in_the_group_teardown(tiny, tmp_path):
    """Issue #12's exit hang, forced (``tests/exit_deadlock.py``): a gloo collective is still in
    flight on process 0 while the run's objects are freed. Both processes must get through the
    teardown; against the code that let DDP's reducer destroy the group with the GIL held, both hung."""
    out, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    script = str(Path(__file__).with_name("exit_deadlock.py"))
    kd = ["--recipe", "kd", "--max-steps", "2", *SMALL, "--set", "eval.every=0"]
    output = launch([script, "run", *pair_args(tiny, out), *kd], env={"DISTILL_TEST_SYNC": str(sync)})
    assert output.count("distill run summary") == 1, output
    assert (out / "final").is_dir()
    assert {p.name for p in sync.iterdir()} == {"ddp-freed-0", "exited-0", "exited-1"}


def test_two_processes_stop_together_on_sigterm_and_resume(tiny, tmp_path):
    """SIGTERM to both training processes: they finish the same step, save one checkpoint with both
    states, end the process group and exit, with a gloo collective in flight while the run's objects
    are freed (``tests/exit_deadlock.py``): no process hangs in the teardown. ``--resume`` then runs
    the remaining steps."""
    out, ranks, sync = tmp_path / "run", tmp_path / "ranks", tmp_path / "sync"
    sync.mkdir()
    script = str(Path(__file__).with_name("exit_deadlock.py"))
    kd = ["--recipe", "kd", "--max-steps", "40", *SMALL, "--set", "eval.every=0"]
    env = {"DISTILL_RANK_LOG": str(ranks), "DISTILL_TEST_SYNC": str(sync)}
    process, marker = start([script, "run", *pair_args(tiny, out), *kd], env=env)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and process.poll() is None and not (ranks / "rank-1.jsonl").exists():
        time.sleep(0.05)
    _signal_marked(marker, signal.SIGTERM, skip=process.pid)  # the training processes, not torchrun
    output = finish(process, marker, check=False)
    assert process.returncode != 0 and "SIGTERM after step" in output, output[-3000:]
    assert {p.name for p in sync.iterdir()} == {"ddp-freed-0", "exited-0", "exited-1"}, output[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    stopped = int(checkpoint.name.removeprefix("step-"))
    assert 1 <= stopped < 40
    assert len(torch.load(checkpoint / "trainer_state.pt", weights_only=True)["ranks"]) == 2
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, stopped + 1))
    assert not (out / "final").exists()

    launch(["-m", "distill", "run", "--resume", "--output-dir", str(out)])
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, 41))
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 1
