"""What the per-recipe benchmarks share: the run settings, the machine record, and a step-time breakdown.

``step_cost.py`` and ``quality_budget.py`` train through ``distill.train`` on the embedded default
(``distill.builtin.DEFAULT_RUN``: teacher, student, data, batch size, generation length, precision),
unless ``--teacher``/``--student``/``--data`` (and ``--set key=value``) say otherwise. They import
this module from the same folder.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from distill.builtin import DEFAULT_RUN
from distill.config import RunConfig, set_dotted
from distill.resolve import flag_layer, resolve_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


# --- the settings every case starts from


def count_sources(metrics: list[dict[str, Any]]) -> dict[str, int]:
    """How many of a run's steps (``metrics.jsonl`` rows) trained on each source; a step of several
    sources (``teacher+student``) counts for each."""
    sources: dict[str, int] = {}
    for m in metrics:
        for source in m["source"].split("+"):
            sources[source] = sources.get(source, 0) + 1
    return sources


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Flags for the models, data and shared settings (default: the embedded default's)."""
    group = parser.add_argument_group("settings (default: the embedded default, distill.builtin.DEFAULT_RUN)")
    group.add_argument("--teacher", help="teacher model reference (a folder, hub id or built-in name)")
    group.add_argument("--student", help="student model reference (a folder, prune:K, ...)")
    group.add_argument("--data", help="training data (JSON Lines); its validation split is held out of it")
    group.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    group.add_argument("--max-new-tokens", type=int, help="generation length cap")
    group.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any distill config key, for every case (repeatable)",
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")


def base_layers(args) -> list[dict[str, Any]]:
    """Config layers under every case: the embedded default, then the flags."""
    flags: dict[str, Any] = {}
    if args.teacher:
        set_dotted(flags, "teacher.ref", args.teacher)
    if args.student:
        set_dotted(flags, "student.ref", args.student)
    if args.data:
        flags["data"] = {"path": args.data, "validation": None}
    if args.batch_size:
        set_dotted(flags, "train.batch_size", args.batch_size)
    if args.max_new_tokens:
        set_dotted(flags, "generation.max_new_tokens", args.max_new_tokens)
    set_dotted(flags, "train.seed", args.seed)
    return [copy.deepcopy(DEFAULT_RUN), flags]


def overrides(args) -> dict[str, Any]:
    """The ``--set`` flags as a layer (they win over everything the benchmark chooses), as ``distill run``
    reads them."""
    return flag_layer(settings=args.settings)


def bench_layer(args, out: Path) -> dict[str, Any]:
    """A timing benchmark's own layer: warm-up + timed steps, no evaluation between, a small validation
    set (the evaluations before and after training are not timed, but they take time), one checkpoint
    at most, no trackers."""
    return {
        "output_dir": str(out),
        "train": {"max_steps": args.warmup + args.steps},
        "eval": {"every": 0, "rouge_samples": 0},
        "data": {"val_max": 8},
        "checkpoint": {"every": 0, "keep": 1},
        "log": {"with": []},
    }


def case_config(
    args,
    registry,
    *,
    recipe: str | None = None,
    case: dict[str, Any] | None = None,
    bench: dict[str, Any] | None = None,
) -> RunConfig:
    """One case's config: recipe < embedded default < flags < the case < the benchmark's own < ``--set``."""
    return resolve_config(
        *base_layers(args),
        case or {},
        bench or {},
        overrides(args),
        recipe=recipe or False,
        embedded=False,
        registry=registry,
    )


def resolve_auto(cfg: RunConfig) -> tuple[RunConfig, str]:
    """``cfg`` with ``train.precision: auto`` and model ``dtype: auto`` replaced by what a run on this
    machine resolves them to (``distill.hardware.resolve_precision``, as ``distill.train`` does), and
    the start line's text saying how."""
    from distill.hardware import resolve_precision

    resolved, text, _ = resolve_precision(cfg)
    return resolved, text


def settings_record(cfg: RunConfig) -> dict[str, Any]:
    """What makes step times comparable between benchmarks: models, data, batch, generation, precision
    (``auto`` resolved as a run on this machine resolves it)."""
    cfg, _ = resolve_auto(cfg)
    return {
        "teacher": cfg.teacher.ref,
        "teacher_dtype": cfg.teacher.dtype,
        "student": cfg.student.ref,
        "student_dtype": cfg.student.dtype,
        "data": cfg.data.path,
        "validation": cfg.data.validation,
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
        "max_response_tokens": cfg.data.max_response_tokens,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "max_new_tokens": cfg.generation.max_new_tokens,
        "precision": cfg.train.precision,
    }


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 120 dpi) and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    partial = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    partial.replace(path)  # whole, whichever process writes the same plot last
    return path


def set_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


# --- the machine and the code a result came from


def environment() -> dict[str, Any]:
    """Date, machine, threads and package versions, for the JSON and RESULTS.md."""
    import accelerate
    import transformers

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "trl": _version("trl"),
        "cpu_path": cpu_path(),
    }
    try:
        git = ["git", "-C", str(REPO)]
        info["commit"] = subprocess.run(
            git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        # the code's changes only: the results being written (benchmarks/results/) are not code
        info["uncommitted_changes"] = bool(
            subprocess.run(
                git + ["status", "--porcelain", "core", "plugins", "benchmarks", ":(exclude)benchmarks/results"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def cpu_path() -> str:
    """Which CPU path this process computes on: native bf16, or not (an AVX2-only CPU, or this one
    under the ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` emulation)."""
    from distill.hardware import bf16_support

    support = bf16_support("cpu")
    emulated = os.environ.get("ONEDNN_MAX_CPU_ISA")
    path = "native bf16" if support.native else "no native bf16"
    return (
        f"{path} ({support.why}"
        + (
            f"; ONEDNN_MAX_CPU_ISA={emulated}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')}"
            if emulated
            else ""
        )
        + ")"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def trl_trainers() -> set[str]:
    """TRL's trainers the benchmarks compare against that the installed trl has: ``GKDTrainer``
    (``trl.experimental.gkd``), ``DistillationTrainer`` (``trl``, stable); empty without trl."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental, on purpose
    found = set()
    try:
        from trl.experimental.gkd import GKDTrainer  # noqa: F401

        found.add("GKDTrainer")
    except ImportError:
        pass
    try:
        from trl import DistillationConfig, DistillationTrainer  # noqa: F401

        found.add("DistillationTrainer")
    except ImportError:
        pass
    return found


# --- files


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write atomically (a temporary file renamed into place; its name is this process's, so that
    processes writing the same file, such as study.py's, never rename each other's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".json.{os.getpid()}.tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --- where a step's time goes


class Breakdown:
    """Seconds spent in named parts of a step: generation, teacher forward, student forward, optimizer.

    Timers nest: only the outermost one counts (the student's forward calls inside generation are
    generation). ``take()`` returns the parts since the last ``take()`` and starts again. Parts are
    found by wrapping functions and by module and optimizer hooks while ``active()`` is entered.
    """

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._open: list[tuple[str, float]] = []

    def start(self, name: str) -> None:
        self._open.append((name, _now()))

    def stop(self) -> None:
        name, began = self._open.pop()
        if not self._open:
            self.parts[name] = self.parts.get(name, 0.0) + _now() - began

    def take(self) -> dict[str, float]:
        parts, self.parts = self.parts, {}
        return parts

    @contextmanager
    def timing(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop()

    def wrap(self, function: Callable, name: str | Callable[..., str]) -> Callable:
        """``function`` timed as ``name`` (or as ``name(*args)``)."""

        def timed(*args, **kwargs):
            with self.timing(name(*args, **kwargs) if callable(name) else name):
                return function(*args, **kwargs)

        return timed

    def outermost(self) -> str | None:
        """The part being timed now (the outermost open timer), or None between parts."""
        return self._open[0][0] if self._open else None

    @contextmanager
    def active(
        self,
        patches: list[tuple[object, str, str | Callable[..., str]]] = (),
        modules: dict[str, torch.nn.Module] | None = None,
    ) -> Iterator[Breakdown]:
        """Within: ``owner.attribute`` replaced by a timed wrapper for each patch, the forward of each
        named module timed, and every optimizer's ``step`` timed as "optimizer"."""
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        handles = [
            register_optimizer_step_pre_hook(lambda *_: self.start("optimizer")),
            register_optimizer_step_post_hook(lambda *_: self.stop()),
        ]
        for name, module in (modules or {}).items():
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.start(n)))
            handles.append(module.register_forward_hook(lambda *_: self.stop()))
        try:
            with patched([(owner, attribute, lambda f, n=name: self.wrap(f, n)) for owner, attribute, name in patches]):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._open.clear()
            self.parts = {}


@contextmanager
def patched(patches: list[tuple[object, str, Callable[[Callable], Callable]]]) -> Iterator[None]:
    """Within: each ``owner.attribute`` (a function, method or staticmethod of a class or module)
    replaced by ``decorate(original)``; restored on exit, last patch first."""
    saved = []
    try:
        for owner, attribute, decorate in patches:
            original = owner.__dict__[attribute] if isinstance(owner, type) else getattr(owner, attribute)
            saved.append((owner, attribute, original))
            if isinstance(original, staticmethod):
                setattr(owner, attribute, staticmethod(decorate(original.__func__)))
            else:
                setattr(owner, attribute, decorate(original))
        yield
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


def _now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def distill_patches() -> list[tuple[object, str, str | Callable[..., str]]]:
    """What to wrap to see inside a ``distill.train`` step: generation (teacher or student) and the
    forward passes that compute the training logits (the teacher's under ``no_grad``). Evaluation
    imports its own reference to ``response_logits``, so it is not counted."""
    import distill.objective
    import distill.teacher
    from distill.generation import ResponseGenerator

    def forward(*args, **kwargs) -> str:
        return "student_forward" if torch.is_grad_enabled() else "teacher_forward"

    # the full-logits teacher side (distill.teacher) and the fused heads' capture (through
    # distill.objective) both call response_logits; teacher-mixed sampling is generation too
    return [
        (ResponseGenerator, "__call__", "generation"),
        (ResponseGenerator, "mixed", "generation"),
        (distill.objective, "response_logits", forward),
        (distill.teacher, "response_logits", forward),
    ]


BREAKDOWN_PARTS = ("generation", "teacher_forward", "student_forward", "optimizer")
"""The named parts; the rest of a step ("other") is the loss, the backward pass, clipping, batching."""


def summarise_parts(per_step: list[dict[str, float]], seconds: list[float]) -> dict[str, float]:
    """Mean seconds per step of each part, and "other" = step time minus the parts."""
    if not seconds:
        return {}
    out = {part: sum(p.get(part, 0.0) for p in per_step) / len(seconds) for part in BREAKDOWN_PARTS}
    out["other"] = sum(seconds) / len(seconds) - sum(out.values())
    return out
