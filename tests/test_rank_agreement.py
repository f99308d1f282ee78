"""Every process of a launch makes the same collective calls, and samples its own responses: two
real CPU processes (gloo) under ``accelerate launch`` running ``tests/rank_probe.py``.

Under DDP on a CPU a teacher forward is no collective, so a disagreement cannot hang here; the
probes count each process's teacher forwards instead (under FSDP / ZeRO-3 every one is a collective)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from test_multiprocess import launch
from tiny_models import make_pair

runner = CliRunner()
PROBE = str(Path(__file__).with_name("rank_probe.py"))
QUIET = ["--set", "eval.every=0", "--set", "eval.rouge_samples=0", "--set", "eval.batch_size=8"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return make_pair(tmp_path_factory.mktemp("tiny"))


def models(tiny, data: Path | None = None) -> list[str]:
    return ["--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data", str(data or tiny["data"])]


def probes(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank-{i}.json").read_text()) for i in range(2)]


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "k8"
    data = ["--teacher", str(tiny["teacher"]), "--data", str(tiny["data"])]
    result = runner.invoke(app, ["cache-teacher", *data, "--top-k", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_cache_that_one_process_lacks_sends_every_process_to_the_live_teacher(tiny, cache, tmp_path):
    # the adaptive policy at phi = 0: dataset steps only, but it may generate, so the teacher is loaded
    args = [*models(tiny), "--recipe", "distillm", "-P", "init_prob=0", "--max-steps", "3", *QUIET]
    args += ["--set", "train.batch_size=4", "--teacher-cache", str(cache), "-o", str(tmp_path / "run")]
    launch([PROBE, str(tmp_path / "probe"), "--miss-on-rank", "1", "--", "run", *args])
    counts = [p["teacher_forwards"] for p in probes(tmp_path / "probe")]
    assert counts[0] == counts[1] == 1, counts  # step 1 on the live teacher everywhere; steps 2-3 from the cache


def test_the_same_prompt_on_two_processes_draws_different_samples(tiny, tmp_path):
    same_prompt = tmp_path / "same_prompt.jsonl"
    records = [{"prompt": "Count from 1 to 4.", "response": f"one two three four{'.' * i}"} for i in range(24)]
    same_prompt.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = [*models(tiny, same_prompt), "--divergence", "kl", "--policy", "onpolicy", "--max-steps", "1", *QUIET]
    args += ["--set", "train.batch_size=2", "--set", "generation.max_new_tokens=12", "-o", str(tmp_path / "run")]
    launch([PROBE, str(tmp_path / "probe"), "--", "run", *args])
    first, second = (p["generated"] for p in probes(tmp_path / "probe"))
    assert len(first) == len(second) == 2
    assert first != second  # the same seed on both processes drew the same responses to the same prompt
