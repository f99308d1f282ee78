"""`scripts/hunt_exit_hang.py`, the hunt for #12's exit hang: a launch that outlives its timeout is
recorded as stuck, with every process's state and stacks, and is killed; the hunt continues
where it stopped."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from tiny_models import make_pair

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "hunt_exit_hang.py"


def load():
    spec = importlib.util.spec_from_file_location("hunt_exit_hang", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hunt_exit_hang"] = module
    spec.loader.exec_module(module)
    return module


def test_a_stuck_launch_is_recorded_with_its_stacks_and_killed(tmp_path):
    hunt = load()
    out = tmp_path / "hunt"
    make_pair(out / "tiny")
    # a timeout far shorter than the launch: it counts as stuck while its processes start up
    assert hunt.main(["--out", str(out), "--launches", "1", "--parallel", "1", "--timeout", "4"]) == 1
    (record,) = [json.loads(line) for line in (out / "launches.jsonl").read_text().splitlines()]
    assert record["hang"] and record["returncode"] is None and record["processes"] >= 1
    report = Path(record["report"]).read_text()
    assert "accelerate launch" in report and "State:" in report and "wait channels" in report
    if shutil.which("gdb"):
        assert "Thread 1" in report  # gdb's native backtraces
    else:
        assert "gdb not installed" in report
    assert hunt.marked(f"{os.getpid()}-0") == []  # nothing of the launch is left running

    # resumable: the recorded launch is not run again
    assert hunt.main(["--out", str(out), "--launches", "1", "--timeout", "4"]) == 1
    assert len((out / "launches.jsonl").read_text().splitlines()) == 1
