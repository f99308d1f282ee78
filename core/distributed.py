"""Distill on Accelerate: the Accelerator a run uses, the frozen teacher under sharding, gradient
accumulation, and the few collectives the loop needs so that every process takes the same decision.

The engine's private Accelerate calls live here and nowhere else in the package (``_reset_state``,
``_set_sync_gradients``, ``fsdp2_prepare_model``): a new Accelerate release is checked in this one
file (``benchmarks/step_cost.py`` resets Accelerate's state too, for TRL's trainers).
"""

from __future__ import annotations

import gc
import json
import os
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from distill.config import RunConfig
from distill.errors import ConfigError


def make_accelerator(cfg: RunConfig):
    """An Accelerator with the student's autocast precision and the trackers of ``log.with``.

    User errors, one line each: ``accelerate launch --mixed_precision`` other than
    ``train.precision``, fp16 without a GPU (Accelerate would silently run float32), a tracker whose
    package is missing, a launch config this machine cannot run (FSDP without a GPU).
    """
    import accelerate.utils
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision, trackers = cfg.train.precision, cfg.log.with_
    mixed_precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", mixed_precision)  # set by `accelerate launch`
    if launched != mixed_precision:
        asked = {"no": "fp32"}.get(launched, launched)
        raise ConfigError(
            f"accelerate launch asks for mixed precision {launched} but train.precision is {precision}; distill's "
            f"setting decides: pass --set train.precision={asked}, or launch with --mixed_precision {mixed_precision}"
        )
    for name in trackers:
        installed = getattr(accelerate.utils, f"is_{name}_available", lambda: True)
        if not installed():
            raise ConfigError(
                f"log.with {name}: the {name} package is not installed; pip install {name}, or drop it from log.with"
            )
    options = {"log_with": trackers, "project_dir": str(Path(cfg.output_dir) / "trackers")} if trackers else {}
    AcceleratorState._reset_state()  # another run in this process (tests, a notebook) may use another precision
    try:
        # step_scheduler_with_optimizer=False: the schedule counts optimizer steps; Accelerate would
        # otherwise step it once per process at each optimizer step (its data loaders scale with them)
        accelerator = Accelerator(mixed_precision=mixed_precision, step_scheduler_with_optimizer=False, **options)
    except ValueError as error:
        raise ConfigError(f"train.precision {precision}: {str(error).splitlines()[0]}") from None
    except RuntimeError as error:
        raise ConfigError(
            f"Accelerate cannot start with this launch config here: {str(error).splitlines()[0]}"
        ) from None
    if precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError(
            "train.precision fp16: needs a GPU (on CPU Accelerate "
            "ignores it and the run would be float32); use bf16 or fp32"
        )
    if accelerator.distributed_type.name == "DEEPSPEED":  # it wants the micro-batch size; we prepare no data loader
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    return accelerator


def synced_generation(accelerator) -> bool:
    """Whether generation needs ``synced_gpus``: the weights are sharded over processes (FSDP, or
    DeepSpeed ZeRO-3), so every forward is a collective that every rank must enter, until the
    longest sequence of any rank is done. DDP and ZeRO-1/2 keep whole weights on every rank."""
    if accelerator.num_processes < 2:
        return False
    kind = accelerator.distributed_type.name
    if kind == "FSDP":
        return True
    if kind == "DEEPSPEED":
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def prepare_teacher(accelerator, teacher):
    """The frozen teacher for inference only: no gradients, no optimizer state, no DDP wrapper.

    Under FSDP it is sharded like the student (Accelerate's evaluation mode would neither shard it
    nor move it to the GPU); its forwards are then collectives, which every rank enters together.
    Elsewhere (DDP, DeepSpeed) every process holds a whole copy.
    """
    teacher.eval().requires_grad_(False)
    if accelerator.distributed_type.name != "FSDP":
        return accelerator.prepare_model(teacher, evaluation_mode=True)
    if getattr(accelerator, "is_fsdp2", False):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, teacher)
    return accelerator.prepare_model(teacher)


def full_params(accelerator):
    """For generation under FSDP1: gather the root module's own parameters (embeddings, head); the
    wrapped layers inside gather theirs in their forward. ``None``: nothing to gather."""
    if accelerator.distributed_type.name != "FSDP" or getattr(accelerator, "is_fsdp2", False):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return lambda model: (
        FSDP.summon_full_params(model, writeback=False, recurse=False) if isinstance(model, FSDP) else nullcontext()
    )


@contextmanager
def accumulating(accelerator, student, *, last: bool):
    """One micro-batch's backward: before the last one, gradients only add up locally (no DDP
    all-reduce, and no DeepSpeed optimizer step, which Accelerate's backward takes when
    ``sync_gradients``)."""
    accelerator.gradient_state._set_sync_gradients(last)  # what Accelerate's own accumulate() sets
    with nullcontext() if last else accelerator.no_sync(student):
        yield


def share(part: float, whole: float, accelerator) -> float:
    """``part / whole`` summed over all processes, rounded to 4 places."""
    counts = torch.tensor([part, whole], dtype=torch.float64)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    part, whole = counts.tolist()
    return round(part / max(whole, 1.0), 4)


def budget_spent(max_seconds: float, seconds: float, accelerator) -> bool:
    """Whether ``train.max_seconds`` (0 = no limit) is reached. Processes decide on the mean of their
    clocks, so that all of them take the same last step."""
    if max_seconds <= 0:
        return False
    if accelerator.num_processes > 1:
        seconds = float(accelerator.reduce(torch.tensor(seconds, device=accelerator.device), reduction="mean"))
    return seconds >= max_seconds


class GroupKeeper:
    """Makes the end of a multi-process run destroy its process group where gloo's teardown does not
    deadlock.

    ``destroy_process_group`` (Accelerate's ``end_training``) only forgets the group: DDP's reducer
    still holds it, and frees it from C++, with the GIL held, when the DDP module is freed. The
    gloo group's destructor then joins its worker threads. A worker that is still freeing a
    finished collective whose tensors Python has already let go of must take the GIL to free them,
    and holds the group's work lock meanwhile: the two threads wait for each other forever, in futex
    waits (issue #12; `tests/exit_deadlock.py` forces it). Freed through a Python reference,
    a process group is destroyed with the GIL released, so the worker finishes first.

    ``hold`` keeps such a reference for the run; ``release``, after the run's objects are gone,
    frees what still holds the group (the DDP wrapper) and then drops the reference, the last one.
    """

    def __init__(self) -> None:
        self.group = None

    def hold(self) -> None:
        """Call once the run's process group exists (after the Accelerator is made)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # a launch of 1 process too: DDP wraps it
            self.group = dist.group.WORLD

    def release(self, error: BaseException | None = None) -> None:
        """Call after the run returned, or with the ``error`` it raised: the tracebacks of the error
        and of the ones it chains still hold the run's objects, so their frames' locals are cleared
        first (post-mortem debuggers then see empty locals in those frames; only where a process
        group exists)."""
        if self.group is None:
            return
        seen = set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            traceback.clear_frames(error.__traceback__)
            error = error.__cause__ or error.__context__
        gc.collect()  # the DDP wrapper, also where a reference cycle holds it
        self.group = None  # the group's last reference: it is destroyed here, without the GIL


def rank_log(accelerator) -> Callable[[dict[str, Any]], None]:
    """With ``DISTILL_RANK_LOG=DIR``, every process appends its own view of each step (source,
    local tokens) to ``DIR/rank-<i>.jsonl``: evidence that all ranks took the same branch."""
    folder = os.environ.get("DISTILL_RANK_LOG")
    if not folder:
        return lambda record: None
    path = Path(folder) / f"rank-{accelerator.process_index}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(record: dict[str, Any]) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    return write


__all__ = [
    "GroupKeeper",
    "accumulating",
    "budget_spent",
    "full_params",
    "make_accelerator",
    "prepare_teacher",
    "rank_log",
    "share",
    "synced_generation",
]
