"""``distill run``'s console side: progress (a rich bar on a terminal, plain lines elsewhere) and the
summary. Flags become a config in ``distill.resolve`` (``flag_layer``, ``resolve_run``, ``resolve_resume``)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import distill


PROGRESS_ENV = "DISTILL_PROGRESS_SECONDS"
"""Off a terminal, at most one progress line per this many seconds (default 30; 0 = every step and batch)."""


def progress_interval() -> float:
    """``DISTILL_PROGRESS_SECONDS`` as seconds; a bad value is a one-line error."""
    raw = os.environ.get(PROGRESS_ENV, "").strip()
    if not raw:
        return 30.0
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise distill.ConfigError(
            f"{PROGRESS_ENV}={raw!r}: expected seconds between progress lines, a number >= 0 (0 = every step)"
        )
    return seconds


def make_reporter(console: Console, total_steps: int) -> "ConsoleReporter":
    """A rich progress bar on a terminal; plain progress lines elsewhere (a file, a pipe, nohup, CI)."""
    if console.is_terminal:
        return RichReporter(console, total_steps)
    return PlainReporter(console, total_steps, interval=progress_interval())


def duration(seconds: float) -> str:
    """``42s``, ``5m07s``, ``2h03m``."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ConsoleReporter:
    """The run's events as console lines (start, warnings, evaluations, checkpoints); subclasses show
    the steps and the long passes (``progress`` events: validation, generation)."""

    def __init__(self, console: Console, total_steps: int, clock=time.perf_counter) -> None:
        self.console = console
        self.total = total_steps
        self.clock = clock
        self.tokens = 0
        self.step_seconds = 0.0  # the optimizer steps' own time: tokens/s
        self.first_step: tuple[int, float] | None = None  # (step, when it began): the wall time per step, for the ETA

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        if kind == "start":
            dropped = ", ".join(f"{n} dropped ({why})" for why, n in record["dropped"].items() if n)
            self.console.print(
                f"[bold]distill[/] {record['train_examples']} training / {record['val_examples']} validation examples"
                + (f"; {dropped}" if dropped else "")
                + (f"; {record['processes']} processes" if record["processes"] > 1 else "")
                + f" -> {record['output_dir']}"
            )
            if record.get("precision"):
                self.console.print(f"  {record['precision']}", highlight=False, soft_wrap=True)
            if record.get("mode"):
                self.console.print(f"  {record['mode']}", highlight=False, soft_wrap=True)
            if record.get("head"):
                self.console.print(f"  {record['head']}", highlight=False, soft_wrap=True)
        elif kind == "warning":
            self.console.print(f"[bold yellow]warning:[/] {record['message']}", highlight=False, soft_wrap=True)
        elif kind == "eval":
            shown = "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
            self.console.print(f"  eval @ step {record['step']}: {shown}")
            self.training(record["step"])
        elif kind == "resume":
            self.console.print(f"  resuming after step {record['step']} from {record['path']}", soft_wrap=True)
            self.training(record["step"])
        elif kind == "checkpoint":
            size = record["bytes"]
            self.console.print(
                f"  checkpoint @ step {record['step']}: {record['path']} ({size / 1e6:,.1f} MB, {size} bytes)",
                soft_wrap=True,
            )
        elif kind == "step":
            self.tokens += record["tokens"]
            self.step_seconds += record["seconds"]
            if self.first_step is None:
                self.first_step = (record["step"], self.clock() - record["seconds"])
            self.step(record)
        elif kind == "progress":
            self.phase(record["phase"], record["done"], record["total"])
        elif kind == "end":
            self.close()

    def step_info(self, record: dict[str, Any]) -> str:
        """``loss 1.2345  source dataset  sgo_prob 0.10  1,234 tok/s``."""
        info = f"loss {record['loss']:.4f}" if record["loss"] is not None else "loss not finite, step skipped"
        info += f"  source {record['source']:<7}"
        if "sgo_prob" in record:
            info += f"  sgo_prob {record['sgo_prob']:.2f}"
        return info + f"  {self.tokens / max(self.step_seconds, 1e-9):,.0f} tok/s"

    def eta(self, step: int) -> float:
        """Seconds to the last step at the wall time per step so far (evaluations included)."""
        first, began = self.first_step
        return (self.clock() - began) / (step - first + 1) * (self.total - step)

    def training(self, step: int) -> None:
        """Training starts (or goes on) after ``step``."""

    def step(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def phase(self, phase: str, done: int, total: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RichReporter(ConsoleReporter):
    """A progress bar for the steps (step, loss, source, phi, tokens/s, ETA), one for each long pass."""

    def __init__(self, console: Console, total_steps: int, clock=time.perf_counter) -> None:
        super().__init__(console, total_steps, clock)
        self.progress = Progress(
            TextColumn("{task.description} {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.phases: dict[str, Any] = {}
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True

    def training(self, step: int) -> None:
        for task in self.phases.values():
            self.progress.remove_task(task)
        self.phases.clear()
        if self.task is None:
            self._start()
            self.task = self.progress.add_task("step", total=self.total, completed=step, info="")

    def step(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, completed=record["step"], info=self.step_info(record))

    def phase(self, phase: str, done: int, total: int) -> None:
        self._start()
        if phase not in self.phases:
            self.phases[phase] = self.progress.add_task(phase, total=total, info="")
        self.progress.update(self.phases[phase], completed=done, total=total)
        if done >= total:  # the bar of a finished pass goes away
            self.progress.remove_task(self.phases.pop(phase))

    def close(self) -> None:
        self.progress.stop()


class PlainReporter(ConsoleReporter):
    """Off a terminal: a plain line for the first and the last step and at most one per ``interval``
    seconds between them (``step 12/100  loss ...  source ...  tok/s  elapsed  ETA``), and for a long
    pass one line per ``interval`` once it has run that long."""

    def __init__(self, console: Console, total_steps: int, interval: float = 30.0, clock=time.perf_counter) -> None:
        super().__init__(console, total_steps, clock)
        self.interval = interval
        self.last_line = -math.inf
        self.phases: dict[str, float] = {}  # when each running pass was first reported

    def _line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
        self.last_line = self.clock()

    def step(self, record: dict[str, Any]) -> None:
        step, now = record["step"], self.clock()
        if step == self.first_step[0] or step == self.total or now - self.last_line >= self.interval:
            elapsed = now - self.first_step[1]
            self._line(
                f"step {step}/{self.total}  {self.step_info(record)}  "
                f"elapsed {duration(elapsed)}  ETA {duration(self.eta(step))}"
            )

    def phase(self, phase: str, done: int, total: int) -> None:
        now = self.clock()
        began = self.phases.setdefault(phase, now)
        if now - max(began, self.last_line) >= self.interval:
            self._line(f"  {phase} {done}/{total}  elapsed {duration(now - began)}")
        if done >= total:
            del self.phases[phase]


def summary_table(result, wall_seconds: float | None = None) -> Table:
    """Before/after numbers of a finished run; ``wall_seconds``: the whole command, loading included."""
    table = Table(title="distill run summary", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    names = {
        "val_loss": "validation loss (student CE)",
        "val_divergence": "validation divergence (training loss)",
        "val_kl": "KL(teacher || student) per token",
    }
    for key in result.before:
        if key.startswith("rouge"):
            continue
        table.add_row(names.get(key, key), f"{result.before[key]:.4f}", f"{result.after.get(key, float('nan')):.4f}")
    _rouge_rows(table, result.before, result.after)
    sources = ", ".join(f"{k} {v}" for k, v in sorted(result.sources.items()))
    table.add_row("steps by source", "", sources)
    table.add_row("student-output share", "", f"{100 * result.student_share:.0f}%")
    if result.skipped:
        table.add_row("steps skipped (loss not finite)", "", str(result.skipped))
    table.add_row("training time", "", f"{result.seconds:.1f} s")
    if wall_seconds is not None:
        table.add_row("wall time", "", f"{wall_seconds:.1f} s")
    table.add_row("output", "", str(result.output_dir))
    return table


def _rouge_rows(table: Table, before: dict[str, float], after: dict[str, float]) -> None:
    """ROUGE-L before and after on the same prompts; the after pass over more prompts on a row of its own."""
    if "rouge_l" not in after and "rouge_l" not in before:
        return
    shown_before = f"{before['rouge_l']:.4f}" if "rouge_l" in before else ""
    if "rouge_l_subset" in after:
        table.add_row(
            f"ROUGE-L vs reference answers, first {before.get('rouge_prompts', '?')} prompts",
            shown_before,
            f"{after['rouge_l_subset']:.4f}",
        )
        table.add_row(
            f"ROUGE-L vs reference answers, all {after['rouge_prompts']} prompts", "", f"{after['rouge_l']:.4f}"
        )
    else:
        prompts = after.get("rouge_prompts", before.get("rouge_prompts"))
        table.add_row(
            f"ROUGE-L vs reference answers ({prompts} prompts)",
            shown_before,
            f"{after['rouge_l']:.4f}" if "rouge_l" in after else "",
        )
