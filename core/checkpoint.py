"""Checkpoints a run resumes from exactly, the config a resumed run may change, and stopping on a signal.

A checkpoint ``checkpoints/step-N/`` holds ``student/`` (weights and tokenizer; ``from_pretrained``
loads it), ``trainer_state.pt``: the step, optimizer, scheduler, data position and the run's
counters (evaluations so far, steps by source, skipped steps), and for every process its sampling
policy state (draw generator, phi, reference loss, replay buffer as token ids) and every random
generator (Python, NumPy, torch, CUDA, the LM-corpus sampler), and, written last, ``complete.json``:
every file's size and SHA-256. The folder is written under a temporary name and renamed, so an
interrupted write (a kill, a full disk) leaves the previous checkpoints as they were.

One reading of ``checkpoints/`` (``checkpoints``) serves the pruner, the reader and ``--resume``: a
checkpoint is a folder ``step-<digits>`` with a complete state; anything else there is left alone.
``--resume`` checks the newest one's sizes and checksums and, if they fail, says so and takes the next
older one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from distill.config import RunConfig, read_config_file
from distill.errors import ConfigError, RunStopped
from distill.outputs import MARKER, RUN, RunFiles, file_sha256, folder_kind

STATE_FILE = "trainer_state.pt"
COMPLETE_FILE = "complete.json"
"""Written last in a checkpoint: ``{"files": {relative path: {"bytes", "sha256"}}}``."""
CHECKPOINT_NAME = re.compile(r"step-(\d+)")

RESUMABLE_FIELDS = (
    "train.max_steps",
    "train.max_seconds",
    "train.skip_nonfinite",
    "eval.every",
    "eval.batch_size",
    "eval.rouge_samples",
    "eval.rouge_before",
    "eval.rouge_draws",
    "checkpoint.every",
    "checkpoint.keep",
    "log.with",
    "log.project",
)
"""Config fields ``--resume`` may change; every other field must repeat the saved value. What they
change from the checkpoint on:

- ``train.max_steps``: the learning-rate schedule and the adaptive policy's replay schedule
  (s = phi * (1 - t/T)) follow the new T from the checkpoint's step on (``reapply_schedule``), so the
  resumed steps differ from an uninterrupted run with the old T; a finished run can be extended;
- ``eval.every``: when evaluations happen, and so when ``adaptive_offpolicy`` may raise phi (it
  changes only at an evaluation): later steps' sources can differ;
- ``train.max_seconds``, ``train.skip_nonfinite``: when the run ends, and whether a non-finite step
  is skipped or stops it;
- the rest: what is reported and kept, not what a step computes."""


@dataclass
class RunState:
    """The run's counters that a resumed run continues from (saved in every checkpoint)."""

    step: int = 0
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    """Optimizer steps skipped because the loss or the gradients were not finite."""
    last_loss: float = float("nan")
    tokens_seen: float = 0.0
    """Response tokens of all optimizer steps so far (all processes), for ``train.step_weight: tokens``."""
    token_steps: int = 0

    def token_weight(self, tokens: float) -> float:
        """Records this step's response tokens and returns them over the mean per step so far (this
        step included): 1 for the first step, and about 1 for every step when batches mix lengths."""
        self.tokens_seen += tokens
        self.token_steps += 1
        return tokens * self.token_steps / max(self.tokens_seen, 1.0)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "RunState":
        return cls(**state)


# --- finding and reading checkpoints


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder ``checkpoints/step-N``."""

    path: Path
    step: int

    @property
    def student_dir(self) -> Path:
        return self.path / "student"

    def student_ref(self, configured: Any) -> Any:
        """The configured student (a reference, or a spec with a dtype) pointed at these weights."""
        path = str(self.student_dir)
        return configured.model_copy(update={"ref": path}) if hasattr(configured, "model_copy") else path

    def load(self) -> dict[str, Any]:
        # weights_only: the file holds tensors and plain Python values only (no pickled objects)
        return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)

    def damage(self) -> str | None:
        """What is wrong with this checkpoint's files (None: nothing): a file missing, of another size
        or checksum than ``complete.json`` says; a checkpoint from before that file must load."""
        complete = self.path / COMPLETE_FILE
        if not complete.is_file():
            try:
                self.load()
            except Exception as error:  # a truncated or garbled file: any error of the unpickler
                return f"{STATE_FILE} does not load ({type(error).__name__})"
            return None
        try:
            files = json.loads(complete.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{COMPLETE_FILE} is unreadable"
        for name, expected in files.items():
            file = self.path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != expected["bytes"]:
                return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
            if file_sha256(file) != expected["sha256"]:
                return f"{name} does not match its checksum"
        return None


def checkpoints(out: str | Path) -> list[Checkpoint]:
    """The complete checkpoints in a run folder, oldest first: folders ``step-<digits>`` with
    ``complete.json`` (or, from before that file, ``trainer_state.pt``). Anything else is not one."""
    found = []
    folder = Path(out) / "checkpoints"
    for path in folder.iterdir() if folder.is_dir() else ():
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir() and ((path / COMPLETE_FILE).is_file() or (path / STATE_FILE).is_file()):
            found.append(Checkpoint(path, int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(out: str | Path) -> Checkpoint | None:
    found = checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Remove all but the newest ``keep`` (at least 1) checkpoints; nothing else in ``checkpoints/``."""
    for old in checkpoints(out)[: -max(keep, 1)]:
        shutil.rmtree(old.path, ignore_errors=True)


@dataclass(frozen=True)
class ResumePoint:
    """Where ``--resume`` continues: the checkpoint (None: the run never reached one and starts
    over), and the newer checkpoints that were damaged and skipped, with what is wrong."""

    checkpoint: Checkpoint | None
    damaged: tuple[tuple[Checkpoint, str], ...] = ()

    def notices(self) -> list[str]:
        if self.checkpoint is None:
            return ["the run holds no step yet: it starts over"]
        return [
            f"checkpoint {c.path} is damaged ({why}): set aside as {c.path.name}.damaged; "
            f"resuming from step {self.checkpoint.step}"
            for c, why in self.damaged
        ]

    def set_aside(self) -> None:
        """Rename the damaged checkpoints ``step-N.damaged``: kept for a look, no longer read or pruned
        as checkpoints (the pruner would keep a newer damaged one over the resumed run's new ones)."""
        for checkpoint, _ in self.damaged:
            os.replace(checkpoint.path, checkpoint.path.with_name(f"{checkpoint.path.name}.damaged"))


def resume_point(config: RunConfig) -> ResumePoint:
    """The newest undamaged checkpoint of the run in ``config.output_dir``. Refuses a finished run, a
    run whose checkpoints are all damaged, and a run that trained steps (or wrote ``final/``) but has no
    checkpoint left: only a run stopped before its first step starts over."""
    out = Path(config.output_dir)
    found = checkpoints(out)
    damaged: list[tuple[Checkpoint, str]] = []
    checkpoint = None
    for candidate in reversed(found):
        damage = candidate.damage()
        if damage is None:
            checkpoint = candidate
            break
        damaged.append((candidate, damage))
    if found and checkpoint is None:
        raise ConfigError(
            f"--resume: every checkpoint in {out / 'checkpoints'} is damaged "
            f"({'; '.join(f'{c.path.name}: {why}' for c, why in damaged)}); "
            "pass --overwrite instead of --resume to start the run again"
        )
    if checkpoint is None:
        trained = _steps_logged(out / "metrics.jsonl")
        there = [f"{trained} step(s) in metrics.jsonl"] if trained else []
        there += ["final/"] if (out / "final").is_dir() else []
        if there:
            raise ConfigError(
                f"--resume: {out} holds a run ({', '.join(there)}) but no checkpoint to continue from; "
                "pass --overwrite instead of --resume to start it again, or choose another --output-dir"
            )
        return ResumePoint(None)
    max_steps = config.train.max_steps
    if checkpoint.step > max_steps or (checkpoint.step == max_steps and (out / "final").is_dir()):
        raise ConfigError(
            f"--resume: the run in {out} already reached step {checkpoint.step} (train.max_steps={max_steps}); "
            f"pass --max-steps N with N > {checkpoint.step} to train further"
        )
    return ResumePoint(checkpoint, tuple(damaged))


def _steps_logged(metrics: Path) -> int:
    """The number of step records in a ``metrics.jsonl`` (a line cut short by a kill is not one)."""
    if not metrics.is_file():
        return 0
    count = 0
    for line in metrics.read_text().splitlines():
        try:
            count += isinstance(json.loads(line), dict)
        except ValueError:
            pass
    return count


def write_complete(folder: Path) -> None:
    """``complete.json``: every file's size and checksum, written last (a folder without it is not a checkpoint)."""
    files = {
        str(file.relative_to(folder)): {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        for file in sorted(folder.rglob("*"))
        if file.is_file()
    }
    (folder / COMPLETE_FILE).write_text(json.dumps({"files": files}, indent=1) + "\n")


# --- the config of a resumed run


def saved_config(out: str | Path) -> dict[str, Any]:
    """The resolved config a run saved in ``config.yaml``."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: {out} holds no run to continue (no config.yaml); check --output-dir")
    if folder_kind(out) is not RUN:
        raise ConfigError(
            f"--resume: {out} is not a folder distill wrote (no {MARKER}, and no metrics.jsonl beside its "
            "config.yaml); check --output-dir"
        )
    return read_config_file(path)


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (an empty section stays one key)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


# --- random generators


def capture_rng() -> dict[str, Any]:
    """Every global random generator of this process (plain values: ``torch.load(weights_only=True)``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reapply_schedule(scheduler) -> None:
    """Set the learning rate the (restored) schedule gives at its step: a resumed run with another
    ``train.max_steps`` follows its new schedule from the first step (unchanged otherwise)."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate wraps the scheduler
    if not hasattr(inner, "lr_lambdas"):
        return
    for group, base, factor in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["lr"] = base * factor(inner.last_epoch)


# --- writing


def save_checkpoint(
    files: RunFiles,
    accelerator,
    student,
    tokenizer,
    step: int,
    shared: dict[str, Any],
    local: dict[str, Any],
    keep: int,
) -> tuple[Path, int]:
    """Write ``checkpoints/step-{step}`` atomically; returns its path and size in bytes.

    ``shared``: state that is the same on every process (optimizer, scheduler, data position, run
    counters); ``local``: this process's own state (policy, random generators), gathered to the main
    process and saved per rank. Every process must call this together.
    """
    weights = accelerator.get_state_dict(student)  # a collective call under FSDP / ZeRO-3
    ranks = [local]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        ranks = gather_object([local])

    def fill(folder: Path) -> None:
        accelerator.unwrap_model(student).save_pretrained(folder / "student", state_dict=weights)
        tokenizer.save_pretrained(folder / "student")
        torch.save({"step": step, **shared, "ranks": ranks}, folder / STATE_FILE)
        write_complete(folder)

    failed: OSError | None = None
    try:
        path = files.write_folder(f"checkpoints/step-{step}", fill)
    except OSError as error:  # a full disk, a lost mount: the older checkpoints are as they were
        failed, path = error, files.out / "checkpoints" / f"step-{step}"
    if failed is None and files.main:
        prune_checkpoints(files.out, keep)
    if accelerator.num_processes > 1:  # every process stops together if the main process could not write
        flag = torch.tensor([float(failed is not None)], device=accelerator.device)
        failed = failed or (OSError("on the main process") if float(accelerator.reduce(flag, "sum")) else None)
    else:
        accelerator.wait_for_everyone()
    if failed is not None:
        last = latest_checkpoint(files.out)
        raise RunStopped(
            f"step {step}: the checkpoint could not be written ({failed.strerror or failed}); "
            f"{f'the last complete one, {last.path}, is as it was' if last else 'no checkpoint was written yet'}; "
            f"free the space and continue with: distill run --resume --output-dir {files.out}",
            1,
        )
    size = folder_bytes(path) if files.main else 0
    return path, size


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rank_state(state: Mapping[str, Any], accelerator) -> dict[str, Any]:
    """This process's part of a loaded checkpoint; the number of processes must not change."""
    ranks = state["ranks"]
    if len(ranks) != accelerator.num_processes:
        raise ConfigError(
            f"--resume: the checkpoint was written by {len(ranks)} process(es), this run has "
            f"{accelerator.num_processes}; launch it with {len(ranks)}"
        )
    return ranks[accelerator.process_index]


# --- stopping cleanly on Ctrl-C / SIGTERM


class StopSignals:
    """While active, SIGINT and SIGTERM only set ``signum``: the loop finishes the step, saves a
    checkpoint and stops. A second signal acts at once (the default handlers are back)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, accelerator) -> int | None:
        """The signal received by any process (all ranks must stop at the same step), else None."""
        signum = self.signum or 0
        if accelerator.num_processes > 1:
            signum = int(accelerator.gather(torch.tensor([signum], device=accelerator.device)).max())
        return signum or None


__all__ = [
    "Checkpoint",
    "RESUMABLE_FIELDS",
    "ResumePoint",
    "RunState",
    "StopSignals",
    "capture_rng",
    "checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "restore_rng",
    "resume_point",
    "save_checkpoint",
]
