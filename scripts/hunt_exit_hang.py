"""Launch the 2-process CPU run of `tests/test_multiprocess.py` again and again, and catch where a
stuck process waits.

Issue #12 saw it once: one process of `test_two_processes_take_the_same_branches_and_write_once`
finished training, then never exited (a futex wait). The test's timeout prints only Python stacks.
This script runs that launch up to ``--launches`` times, ``--parallel`` at a time, to load the
machine as a test run does. On a timeout it records, for every process of the launch:
- its state and kernel wait channel (`/proc`);
- gdb's native backtrace of every thread, with the Python frames where gdb can read them.
It then kills the launch. Each launch is one line of `launches.jsonl` under ``--out``, so a
stopped hunt continues where it stopped. Stacks go to `hang-<n>.txt`.

    .venv/bin/python scripts/hunt_exit_hang.py --out /tmp/hunt --launches 200 --parallel 2   # test extra installed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def marked(marker: str) -> list[int]:
    """The processes whose environment holds ``DISTILL_HUNT=marker`` (torchrun's workers run in
    sessions of their own, so the launch's process group does not reach them)."""
    needle, found = f"DISTILL_HUNT={marker}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def describe(pid: int) -> str:
    """What ``pid`` is and where it waits: command line, state, kernel wait channel per thread, gdb's
    backtraces."""
    proc = Path(f"/proc/{pid}")
    try:
        command = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        state = next(line for line in proc.joinpath("status").read_text().splitlines() if line.startswith("State"))
        waits = {t.name: (t / "wchan").read_text() for t in proc.joinpath("task").iterdir()}
    except (OSError, StopIteration) as error:
        return f"== pid {pid}: gone ({error})\n"
    text = f"== pid {pid}: {command}\n{state}\nthreads and wait channels: {waits}\n"
    gdb = shutil.which("gdb")
    if gdb:
        batch = [gdb, "-p", str(pid), "-batch", "-iex", "set auto-load safe-path /"]
        batch += ["-ex", "thread apply all bt 40", "-ex", "thread apply all py-bt"]
        run = subprocess.run(batch, capture_output=True, text=True, timeout=120)
        text += run.stdout + run.stderr[-2000:]
    else:
        text += "(gdb not installed: no native stacks)\n"
    return text


def start(n: int, out: Path, tiny: dict[str, Path]):
    from cli_runs import pair_args
    from test_multiprocess import ADAPTIVE, launch_command  # the test's launch, exactly

    run_dir = out / "runs" / f"launch-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    marker = f"{os.getpid()}-{n}"
    command = launch_command(["-m", "distill", "run", *pair_args(tiny, run_dir), *ADAPTIVE])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "DISTILL_HUNT": marker}
    log = open(out / "runs" / f"launch-{n}.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return {"n": n, "process": process, "marker": marker, "started": time.monotonic(), "log": log, "dir": run_dir}


def finish(launch: dict, out: Path, timeout: float) -> dict | None:
    """The launch's record once it ended or timed out, else None (still running)."""
    process, seconds = launch["process"], time.monotonic() - launch["started"]
    code = process.poll()
    if code is None and seconds < timeout:
        return None
    record = {"launch": launch["n"], "seconds": round(seconds, 1), "returncode": code, "hang": code is None}
    if code is None:  # stuck: where does every process wait?
        pids = marked(launch["marker"])
        report = out / f"hang-{launch['n']}.txt"
        report.write_text("".join(describe(pid) for pid in pids))
        record.update(processes=len(pids), report=str(report), final_written=(launch["dir"] / "final").is_dir())
        os.killpg(process.pid, signal.SIGKILL)
        for pid in marked(launch["marker"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
    launch["log"].close()
    if code == 0:  # keep the disk small; failures and hangs keep their folders and logs
        shutil.rmtree(launch["dir"], ignore_errors=True)
        (out / "runs" / f"launch-{launch['n']}.log").unlink()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--launches", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2, help="launches at a time (each is 2 processes)")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds before a launch counts as stuck")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_pair

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    tiny_dir = args.out / "tiny"
    tiny = {"teacher": tiny_dir / "teacher", "student": tiny_dir / "student", "data": tiny_dir / "data.jsonl"}
    if not tiny["data"].exists():
        tiny = make_pair(tiny_dir)
    records_path = args.out / "launches.jsonl"
    done = len(records_path.read_text().splitlines()) if records_path.exists() else 0
    running: list[dict] = []
    n = done
    while n < args.launches or running:
        while n < args.launches and len(running) < args.parallel:
            running.append(start(n, args.out, tiny))
            n += 1
        time.sleep(0.5)
        for launch in list(running):
            record = finish(launch, args.out, args.timeout)
            if record is not None:
                running.remove(launch)
                with records_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    hangs = [r for r in records if r["hang"]]
    failed = [r for r in records if not r["hang"] and r["returncode"] != 0]
    seconds = sorted(r["seconds"] for r in records if r["returncode"] == 0)
    median = seconds[len(seconds) // 2] if seconds else None
    print(f"{len(records)} launches: {len(hangs)} stuck, {len(failed)} failed, median {median} s per passing launch")
    return 1 if hangs or failed else 0


if __name__ == "__main__":
    sys.exit(main())
