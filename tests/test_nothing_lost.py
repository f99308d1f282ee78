"""Nothing lost: every command keeps the user's files, and a damaged or mismatched artifact is
refused in one line. Each case is driven through the CLI as a user would meet it, and checks that the
folder is as it was before a refused command."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import cli_runs
import distill.checkpoint
import distill.session
from cli_runs import cache_cli, read_jsonl, sets
from distill.checkpoint import checkpoints
from distill.cli import app
from distill.outputs import MARKER
from tiny_models import make_model

runner = CliRunner()
SMALL = [
    *sets("train.batch_size=4", "eval.batch_size=8", "eval.rouge_samples=0", "generation.max_new_tokens=8"),
    "--recipe",
    "kd",
]


def run_cli(tiny, out: Path, *args: str, teacher: Path | None = None):
    return cli_runs.run_cli(tiny, out, *SMALL, *args, teacher=teacher)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below ``folder`` with a hash of its contents."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def refused(result, *words: str) -> str:
    """The one line of a refused command (exit code 2, no traceback), which must hold ``words``."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error:") and all(w in result.output for w in words), result.output
    return line


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(tiny, out, "--max-steps", "4", "--set", "checkpoint.every=2")
    assert result.exit_code == 0, result.output
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# --- run folders


def test_a_run_folder_is_marked_first_with_its_kind_version_and_command(finished):
    marker = json.loads((finished / MARKER).read_text())
    assert marker["kind"] == "run" and marker["distill"] and "command" in marker


def test_overwrite_of_a_run_removes_only_the_runs_own_files(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"png")
    result = run_cli(tiny, out, "--max-steps", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "loss.png").read_bytes() == b"png"
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_project_folder_is_refused_and_left_as_it_was(tiny, tmp_path, overwrite):
    # a project folder with its own config.yaml (even a distill config) and final/: never distill's to remove
    project = tmp_path / "project"
    (project / "final").mkdir(parents=True)
    (project / "final" / "model.bin").write_bytes(b"weights")
    (project / "config.yaml").write_text("train:\n  max_steps: 3\nteacher: x\nstudent: y\n")
    (project / "app.py").write_text("print('hello')\n")
    before = snapshot(project)
    line = refused(run_cli(tiny, project, "--max-steps", "2", *(["--overwrite"] if overwrite else [])))
    assert "did not write (first: 'app.py')" in line
    assert snapshot(project) == before


def test_resume_of_a_finished_run_without_checkpoints_refuses_instead_of_starting_over(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")  # deleted to save space
    before = snapshot(out)
    line = refused(run_cli(tiny, out, "--max-steps", "8", "--resume"), "4 step(s) in metrics.jsonl", "final/")
    assert "--overwrite" in line
    assert snapshot(out) == before


def test_resume_of_a_run_stopped_before_its_first_step_starts_over_and_says_so(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"kind": "run"}))
    (out / "config.yaml").write_text("")  # replaced below by the saved config of a real run
    assert run_cli(tiny, tmp_path / "model", "--max-steps", "1").exit_code == 0
    shutil.copy(tmp_path / "model" / "config.yaml", out / "config.yaml")
    text = (out / "config.yaml").read_text().replace(str(tmp_path / "model"), str(out))
    (out / "config.yaml").write_text(text)
    result = run_cli(tiny, out, "--max-steps", "1", "--resume")
    assert result.exit_code == 0, result.output
    assert "starts over" in result.output
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]


def test_folders_in_checkpoints_that_are_not_checkpoints_are_left_alone(tiny, tmp_path):
    out = tmp_path / "run"
    keep_one = ["--set", "checkpoint.every=1", "--set", "checkpoint.keep=1"]
    assert run_cli(tiny, out, "--max-steps", "1", *keep_one).exit_code == 0
    backup = out / "checkpoints" / "step-999-backup"
    shutil.copytree(out / "checkpoints" / "step-1", backup)  # the user's copy, named like no checkpoint
    (out / "checkpoints" / "step-best").mkdir()
    result = run_cli(tiny, out, "--max-steps", "3", *keep_one, "--resume")
    assert result.exit_code == 0, result.output
    assert [c.step for c in checkpoints(out)] == [3]  # the newest real checkpoint is kept
    assert (backup / "trainer_state.pt").is_file() and (out / "checkpoints" / "step-best").is_dir()
    # --overwrite removes the run's checkpoints, not the user's folders beside them
    assert run_cli(tiny, out, "--max-steps", "1", "--overwrite").exit_code == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-999-backup", "step-best"]


def test_resume_skips_a_damaged_checkpoint_with_a_notice_and_continues_from_an_older_one(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    state = out / "checkpoints" / "step-4" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    result = run_cli(tiny, out, "--max-steps", "6", "--resume", "--set", "checkpoint.every=2")
    assert result.exit_code == 0, result.output
    assert "checkpoint" in result.output and "is damaged" in result.output and "resuming after step 2" in result.output
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, 7))
    assert (out / "checkpoints" / "step-4.damaged").is_dir()  # set aside, not deleted
    assert [c.step for c in checkpoints(out)] == [4, 6]


def test_resume_with_every_checkpoint_damaged_stops_in_one_line(tiny, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    for checkpoint in checkpoints(out):
        (checkpoint.path / "trainer_state.pt").write_bytes(b"garbage")
    before = snapshot(out)
    refused(run_cli(tiny, out, "--max-steps", "6", "--resume"), "every checkpoint", "is damaged", "--overwrite")
    assert snapshot(out) == before


def test_a_legacy_checkpoint_without_checksums_resumes_unless_it_does_not_load(tiny, finished, tmp_path):
    # a run from before the marker and the checksums: recognised by config.yaml beside metrics.jsonl
    out = copy_run(finished, tmp_path)
    (out / MARKER).unlink()
    for checkpoint in checkpoints(out):
        (checkpoint.path / "complete.json").unlink()
    assert [c.step for c in checkpoints(out)] == [2, 4]
    assert checkpoints(out)[-1].damage() is None
    state = out / "checkpoints" / "step-4" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert "does not load" in checkpoints(out)[-1].damage()
    result = run_cli(tiny, out, "--max-steps", "6", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming after step 2" in result.output and (out / MARKER).is_file()


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint_as_it_was(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = torch.save
    calls = {"n": 0}

    def full_disk(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half a file, then the disk is full
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(distill.checkpoint.torch, "save", full_disk)
    result = run_cli(tiny, out, "--max-steps", "4", "--set", "checkpoint.every=2")
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("stopped: step 4: the checkpoint could not be written (No space left on device)"), line
    assert "step-2" in line and "--resume" in line
    assert [c.step for c in checkpoints(out)] == [2] and checkpoints(out)[0].damage() is None
    monkeypatch.setattr(distill.checkpoint.torch, "save", original)
    result = run_cli(tiny, out, "--max-steps", "4", "--set", "checkpoint.every=2", "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming after step 2" in result.output
    assert not list((out / "checkpoints").glob(".*"))  # the half-written folder was cleared


# --- gradients are checked like the loss


@pytest.fixture
def nan_gradients_at_step_2(monkeypatch):
    """Step 2's loss is finite but its gradients are NaN (sqrt at 0 times 0)."""
    calls = {"n": 0}
    original = distill.session.Session.micro_loss

    def poisoned(self, *args, **kwargs):
        loss, parts = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            weight = next(p for p in self.student.parameters() if p.requires_grad)
            loss = loss + torch.sqrt((weight * 0).sum())
        return loss, parts

    monkeypatch.setattr(distill.session.Session, "micro_loss", poisoned)


@pytest.mark.parametrize("max_grad_norm", ["0", "1.0"])
def test_nan_gradients_behind_a_finite_loss_never_reach_the_optimizer(
    tiny, tmp_path, nan_gradients_at_step_2, max_grad_norm
):
    out = tmp_path / "run"
    result = run_cli(tiny, out, "--max-steps", "3", "--set", f"train.max_grad_norm={max_grad_norm}")
    assert result.exit_code == 3, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("stopped: step 2: the gradient norm is nan"), line
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1]
    assert ("grad_norm" in metrics[0]) == (max_grad_norm != "0")  # logged where it clips, as before


# --- teacher caches


@pytest.fixture(scope="module")
def cache(cache_k8) -> Path:
    """A finished top-8 cache (conftest.py)."""
    return cache_k8


def copy_cache(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(cache, out)
    return out


def first_part(cache: Path) -> Path:
    return sorted((cache / "parts").iterdir())[0]


def test_cache_teacher_overwrite_never_removes_another_programs_folder(tiny, tmp_path):
    other = tmp_path / "webapp"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my web app"}')
    (other / "settings.json").write_text('{"theme": "dark"}')
    (other / "index.html").write_text("<html></html>")
    before = snapshot(other)
    for extra in ([], ["--overwrite"]):
        refused(cache_cli(tiny, other, "--top-k", "4", *extra), "did not write (first: 'index.html')")
        assert snapshot(other) == before


def test_cache_teacher_overwrite_replaces_the_cache_and_keeps_the_users_files(tiny, cache, tmp_path):
    out = copy_cache(cache, tmp_path)
    (out / "README.txt").write_text("made for the study")
    assert cache_cli(tiny, out, "--top-k", "4", "--overwrite").exit_code == 0
    assert (out / "README.txt").read_text() == "made for the study"
    assert json.loads((out / "manifest.json").read_text())["top_k"] == 4


def test_a_truncated_part_is_one_line_naming_it_and_the_same_command_rebuilds_it(tiny, cache, tmp_path):
    out = copy_cache(cache, tmp_path)
    part = first_part(out)
    data = part / "logprobs.npy"
    data.write_bytes(data.read_bytes()[:-64])
    line = refused(run_cli(tiny, tmp_path / "run", "--max-steps", "1", "--teacher-cache", str(out)), str(part))
    assert "delete that folder" in line and "cache-teacher" in line
    assert not (tmp_path / "run").exists()
    verify = runner.invoke(app, ["cache-teacher", "--verify", str(out)])
    assert verify.exit_code == 1 and str(part) in verify.output and verify.output.count("damaged:") == 1
    shutil.rmtree(part)
    assert cache_cli(tiny, out, "--top-k", "8").exit_code == 0  # continues: only the deleted part is made again
    verify = runner.invoke(app, ["cache-teacher", "--verify", str(out)])
    assert verify.exit_code == 0, verify.output
    assert run_cli(tiny, tmp_path / "run", "--max-steps", "1", "--teacher-cache", str(out)).exit_code == 0


def test_a_part_whose_bytes_changed_fails_its_checksum_on_first_read(tiny, cache, tmp_path):
    out = copy_cache(cache, tmp_path)
    part = first_part(out)
    data = bytearray((part / "rest.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, one byte differs
    (part / "rest.npy").write_bytes(bytes(data))
    verify = runner.invoke(app, ["cache-teacher", "--verify", str(out)])
    assert verify.exit_code == 1 and "rest.npy does not match its checksum" in verify.output
    line = refused(run_cli(tiny, tmp_path / "run", "--max-steps", "2", "--teacher-cache", str(out)), str(part))
    assert "checksum" in line


def test_a_cache_from_before_the_checks_is_refused_as_such(tiny, cache, tmp_path):
    out = copy_cache(cache, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    refused(run_cli(tiny, tmp_path / "run", "--max-steps", "1", "--teacher-cache", str(out)), "was made before")


def test_a_cache_of_other_teacher_weights_of_the_same_shapes_is_refused(tiny, cache, tmp_path):
    other = tmp_path / "teacher"
    shutil.copytree(tiny["teacher"], other)
    make_model(other, 300, layers=2, seed=7)  # the same config, other weights
    refused(
        run_cli(tiny, tmp_path / "run", "--max-steps", "1", "--teacher-cache", str(cache), teacher=other), "teacher"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "setting",
    ["divergence.temperature=1", "objective.terms.dataset.temperature=1"],
)
def test_a_cache_at_another_temperature_than_a_term_that_reads_it_is_refused(tiny, tmp_path, setting):
    out = tmp_path / "t2"
    assert cache_cli(tiny, out, "--top-k", "8", "--temperature", "2").exit_code == 0
    args = ["--max-steps", "1", "--teacher-cache", str(out), "--set", "divergence.temperature=2", "--set", setting]
    refused(run_cli(tiny, tmp_path / "run", *args), setting.split("=")[0], "temperature 2")
    assert not (tmp_path / "run").exists()


def test_val_kl_with_a_cache_is_at_the_caches_temperature_and_says_so(tiny, tmp_path):
    out = tmp_path / "t2"
    assert cache_cli(tiny, out, "--top-k", "300", "--temperature", "2").exit_code == 0
    common = ["--max-steps", "1", "--set", "divergence.temperature=2", "--set", "eval.every=1"]
    cached = run_cli(tiny, tmp_path / "cached", *common, "--teacher-cache", str(out))
    assert cached.exit_code == 0, cached.output
    assert "val_kl is at the cache's temperature 2" in " ".join(cached.output.split())
    live = run_cli(tiny, tmp_path / "live", *common, "--set", "divergence.name=rkl")
    assert live.exit_code == 0, live.output
    # the live run's val_kl is at temperature 1; the cached one at 2 (K = V: nothing merged)
    cached_kl = read_jsonl(tmp_path / "cached" / "eval.jsonl")[0]["val_kl"]
    live_kl = read_jsonl(tmp_path / "live" / "eval.jsonl")[0]["val_kl"]
    assert math.isfinite(cached_kl) and cached_kl != pytest.approx(live_kl, rel=1e-2)


def test_a_cache_from_before_the_marker_is_still_recognised(tiny, cache, tmp_path):
    out = copy_cache(cache, tmp_path)
    (out / MARKER).unlink()
    (out / "manifest.json").unlink()  # unfinished: the same command continues it
    result = cache_cli(tiny, out, "--top-k", "8")
    assert result.exit_code == 0, result.output
    assert json.loads((out / MARKER).read_text())["kind"] == "teacher-cache"
