"""Progress everywhere: plain lines off a terminal (nohup, CI, a file), a rich bar on one, and progress
of the validation and generation passes."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cli_runs import run_args, sets
from distill.cli import app
from distill.cli.run_cmd import PROGRESS_ENV, PlainReporter, RichReporter, duration, make_reporter

runner = CliRunner()
STEP_LINE = re.compile(
    r"^step (\d+)/(\d+)  loss \d+\.\d{4}  source (dataset|teacher|student|replay)\s*  "
    r"[\d,]+ tok/s  elapsed \d[\dhms]*  ETA \d[\dhms]*$"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def step(n: int, seconds: float = 5.0) -> dict:
    return {"step": n, "loss": 1.5, "source": "dataset", "tokens": 500, "seconds": seconds}


def plain(interval: float = 30.0):
    out, clock = io.StringIO(), Clock()
    console = Console(file=out, width=200, color_system=None)
    assert not console.is_terminal
    return PlainReporter(console, 20, interval=interval, clock=clock), out, clock


def test_plain_step_lines_first_last_and_at_most_one_per_interval():
    reporter, out, clock = plain()
    for n in range(1, 21):  # 5 s a step
        clock.now += 5.0
        reporter("step", step(n))
    lines = out.getvalue().splitlines()
    assert [int(STEP_LINE.match(line).group(1)) for line in lines] == [1, 7, 13, 19, 20], lines
    assert lines[0] == "step 1/20  loss 1.5000  source dataset  100 tok/s  elapsed 5s  ETA 1m35s"
    assert lines[-1].endswith("elapsed 1m40s  ETA 0s")


def test_plain_pass_progress_only_for_long_passes():
    reporter, out, clock = plain()
    reporter("progress", {"phase": "validation examples", "done": 0, "total": 64})
    for done in range(8, 65, 8):  # a pass of 8 batches, 1 s each: too short to report
        clock.now += 1.0
        reporter("progress", {"phase": "validation examples", "done": done, "total": 64})
    assert out.getvalue() == ""
    for done in range(0, 11):  # 10 answers, 20 s each
        clock.now += 20.0 if done else 0.0
        reporter("progress", {"phase": "ROUGE-L answers", "done": done, "total": 10})
    assert out.getvalue().splitlines() == [
        "  ROUGE-L answers 2/10  elapsed 40s",
        "  ROUGE-L answers 4/10  elapsed 1m20s",
        "  ROUGE-L answers 6/10  elapsed 2m00s",
        "  ROUGE-L answers 8/10  elapsed 2m40s",
        "  ROUGE-L answers 10/10  elapsed 3m20s",
    ]


def test_rich_reporter_shows_a_bar_per_long_pass_and_for_the_steps():
    out = io.StringIO()
    reporter = make_reporter(Console(file=out, width=120, force_terminal=True, color_system=None), 4)
    assert isinstance(reporter, RichReporter)
    reporter("progress", {"phase": "validation examples", "done": 8, "total": 16})
    reporter.progress.refresh()
    assert "validation examples 8/16" in out.getvalue()
    reporter("progress", {"phase": "validation examples", "done": 16, "total": 16})
    assert not reporter.phases and not reporter.progress.tasks  # a finished pass leaves no bar behind
    reporter("eval", {"step": 0, "val_loss": 2.0})
    reporter("step", step(1))
    reporter.progress.refresh()
    reporter("end", {})
    assert "step 1/4" in out.getvalue() and "loss 1.5000  source dataset" in out.getvalue()


def test_duration():
    assert [duration(s) for s in (0, 42.4, 61, 3599, 3600, 7385)] == ["0s", "42s", "1m01s", "59m59s", "1h00m", "2h03m"]


def run_off_a_terminal(tiny, out: Path, env: dict[str, str]):
    """CliRunner's output is not a terminal: what nohup, CI and a redirected log see."""
    overrides = sets(
        "train.batch_size=4", "eval.batch_size=1", "eval.every=0", "eval.rouge_samples=4", "generation.max_new_tokens=4"
    )
    return runner.invoke(app, run_args(tiny, out, "--recipe", "kd", "--max-steps", "3", *overrides), env=env)


def test_run_off_a_terminal_prints_steps_and_evaluation_progress(tiny, tmp_path):
    result = run_off_a_terminal(tiny, tmp_path / "run", {PROGRESS_ENV: "0"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ")]
    assert [(m.group(1), m.group(2)) for m in steps if m] == [("1", "3"), ("2", "3"), ("3", "3")], result.output
    validation = [line for line in lines if line.startswith("  validation examples ")]
    answers = [line for line in lines if line.startswith("  ROUGE-L answers ")]
    assert len(validation) >= 4 and validation[-1].startswith("  validation examples 2/2"), (
        result.output
    )  # before and after training
    assert answers and re.match(r"  ROUGE-L answers 2/2  elapsed \d+s$", answers[-1]), result.output
    assert lines.index(validation[0]) < lines.index(next(line for line in lines if "eval @ step 0" in line))


def test_run_off_a_terminal_is_quiet_between_intervals(tiny, tmp_path):
    result = run_off_a_terminal(tiny, tmp_path / "run", {PROGRESS_ENV: "600"})
    assert result.exit_code == 0, result.output
    steps = [line.split()[1] for line in result.output.splitlines() if line.startswith("step ")]
    assert steps == ["1/3", "3/3"], result.output  # the first and the last step; the second within the interval
    assert "  validation examples " not in result.output and "ROUGE-L answers" not in result.output


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_progress_interval_is_a_one_line_error(tiny, tmp_path, value):
    result = run_off_a_terminal(tiny, tmp_path / "run", {PROGRESS_ENV: value})
    assert result.exit_code == 2
    assert (
        result.output.strip()
        == f"error: {PROGRESS_ENV}={value!r}: expected seconds between progress lines, a number >= 0 (0 = every step)"
    )
