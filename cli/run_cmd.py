"""``distill run``: flags -> config layers -> the engine, with a rich progress bar and a summary."""

from __future__ import annotations

import time
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import distill
from distill.builtin import DEFAULT_RUN
from distill.config import build_config, merge_layer, parse_assignments, read_config_file, recipe_layer, set_dotted

DEFAULT_RECIPE = "distillm"


def flag_layer(
    *, recipe: Optional[str], divergence: Optional[str], divergence_params: list[str], policy: Optional[str],
    policy_params: list[str], teacher: Optional[str], student: Optional[str], data: Optional[str],
    output_dir: Optional[str], max_steps: Optional[int], seed: Optional[int], settings: list[str],
) -> dict[str, Any]:
    """The command-line flags as a config layer (highest precedence)."""
    layer: dict[str, Any] = {}
    for dotted, value in (
        ("recipe", recipe), ("divergence.name", divergence), ("policy.name", policy), ("teacher.ref", teacher),
        ("student.ref", student), ("data.path", data), ("output_dir", output_dir), ("train.max_steps", max_steps),
        ("train.seed", seed),
    ):
        if value is not None:
            set_dotted(layer, dotted, value)
    for key, value in parse_assignments(divergence_params, "-D").items():
        set_dotted(layer, f"divergence.params.{key}", value)
    for key, value in parse_assignments(policy_params, "-P").items():
        set_dotted(layer, f"policy.params.{key}", value)
    for key, value in parse_assignments(settings, "--set").items():
        set_dotted(layer, key, value)
    return layer


def resolve_config(config_file: Optional[str], flags: dict[str, Any], registry=None) -> distill.config.RunConfig:
    """recipe defaults < config file < flags. Without a recipe anywhere, ``distillm`` is the base;
    without a teacher anywhere, the embedded default (built-in teacher, pruned student, built-in
    data) sits between the recipe and the file."""
    registry = registry or distill.default_registry()
    file_layer = read_config_file(config_file) if config_file else {}
    recipe_name = flags.get("recipe") or file_layer.get("recipe") or DEFAULT_RECIPE
    recipe = registry.get_recipe(recipe_name)
    layers = [recipe_layer(recipe)]
    if not (_names_model(flags.get("teacher")) or _names_model(file_layer.get("teacher"))):
        layers.append(DEFAULT_RUN)
    if not (flags.get("output_dir") or file_layer.get("output_dir")):  # never reuse a folder by accident
        layers.append({"output_dir": f"runs/{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"})
    config = build_config([*layers, file_layer, flags])
    # fail on unknown names or bad params now, with the flag in the message
    registry.get_divergence(config.divergence.name, temperature=config.divergence.temperature, **config.divergence.params)
    registry.get_policy(config.policy.name, **config.policy.params)
    return config


def resolve_resume_config(config_file: Optional[str], flags: dict[str, Any], overwrite: bool = False) -> distill.config.RunConfig:
    """``--resume``: the config saved in ``--output-dir``; the file and flags may only change the
    fields in ``distill.checkpoint.RESUMABLE_FIELDS`` (or repeat the saved values)."""
    from distill.checkpoint import resume_config

    if overwrite:
        raise distill.ConfigError("--resume continues the run in --output-dir, --overwrite replaces it; pass one of them")
    file_layer = read_config_file(config_file) if config_file else {}
    out = flags.get("output_dir") or file_layer.get("output_dir")
    if not out:
        raise distill.ConfigError("--resume needs --output-dir DIR: the folder of the run to continue")
    return resume_config(out, merge_layer(file_layer, flags))


def _names_model(value: Any) -> bool:
    """Whether a layer's ``teacher`` entry (a string or a mapping) names a model."""
    return bool(value.get("ref") if isinstance(value, dict) else value)


class RichReporter:
    """Progress bar (step, loss, source, phi, tokens/s, ETA) and evaluation lines."""

    def __init__(self, console: Console, total_steps: int) -> None:
        self.console = console
        self.total = total_steps
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None
        self.tokens = 0
        self.started = time.perf_counter()

    def __call__(self, kind: str, record: dict[str, Any]) -> None:
        if kind == "start":
            dropped = ", ".join(f"{n} dropped ({why})" for why, n in record["dropped"].items() if n)
            self.console.print(
                f"[bold]distill[/] {record['train_examples']} training / {record['val_examples']} validation examples"
                + (f"; {dropped}" if dropped else "")
                + (f"; {record['processes']} processes" if record["processes"] > 1 else "") + f" -> {record['output_dir']}"
            )
            if record.get("precision"):
                self.console.print(f"  {record['precision']}", highlight=False, soft_wrap=True)
            if record.get("mode"):
                self.console.print(f"  {record['mode']}", highlight=False, soft_wrap=True)
        elif kind == "warning":
            self.console.print(f"[bold yellow]warning:[/] {record['message']}", highlight=False, soft_wrap=True)
        elif kind == "eval":
            shown = "  ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
            self.console.print(f"  eval @ step {record['step']}: {shown}")
            self._start_progress(record["step"])
        elif kind == "resume":
            self.console.print(f"  resuming after step {record['step']} from {record['path']}", soft_wrap=True)
            self._start_progress(record["step"])
        elif kind == "checkpoint":
            size = record["bytes"]
            self.console.print(f"  checkpoint @ step {record['step']}: {record['path']} ({size / 1e6:,.1f} MB, {size} bytes)", soft_wrap=True)
        elif kind == "step":
            self.tokens += record["tokens"]
            rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
            info = f"loss {record['loss']:.4f}" if record["loss"] is not None else "loss not finite, step skipped"
            info += f"  {record['source']:<7}"
            if "sgo_prob" in record:
                info += f"  sgo_prob {record['sgo_prob']:.2f}"
            info += f"  {rate:,.0f} tok/s"
            self.progress.update(self.task, completed=record["step"], info=info)
        elif kind == "end":
            self.progress.stop()

    def _start_progress(self, step: int) -> None:
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=step, info="")


def summary_table(result, wall_seconds: float | None = None) -> Table:
    """Before/after numbers of a finished run; ``wall_seconds``: the whole command, loading included."""
    table = Table(title="distill run summary", title_justify="left")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    names = {"val_loss": "validation loss (student CE)", "val_divergence": "validation divergence (training loss)",
             "val_kl": "KL(teacher || student) per token"}
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
        table.add_row(f"ROUGE-L vs reference answers, first {before.get('rouge_prompts', '?')} prompts", shown_before, f"{after['rouge_l_subset']:.4f}")
        table.add_row(f"ROUGE-L vs reference answers, all {after['rouge_prompts']} prompts", "", f"{after['rouge_l']:.4f}")
    else:
        prompts = after.get("rouge_prompts", before.get("rouge_prompts"))
        table.add_row(f"ROUGE-L vs reference answers ({prompts} prompts)", shown_before, f"{after['rouge_l']:.4f}" if "rouge_l" in after else "")
