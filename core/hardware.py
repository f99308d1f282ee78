"""Precision chosen by the hardware: ``train.precision: auto`` and model ``dtype: auto``.

bf16 pays only where the device computes it natively: a CUDA device with bf16 support, or a CPU with
AVX512-BF16 or AMX instructions that torch's oneDNN uses. Elsewhere bf16 is emulated: a bf16 matmul
of the embedded default's shapes was reported 7.5x slower than float32 on an AVX2-only AMD EPYC
(issue 11), and measured 32x slower under ``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX512-BF16 EPYC.
``auto`` therefore resolves to bf16 there and to fp32 everywhere else; it never chooses fp16 (it
needs loss scaling, and on a CPU it does not run).

``DISTILL_NATIVE_BF16=1`` / ``=0`` forces the answer (tests; measuring the other path on one machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""The weights' dtype that goes with each compute precision."""


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    why: str
    """One clause for the start line: what was detected."""


def device_type() -> str:
    """The device Accelerate will put this process on: ``cuda`` (also ROCm), ``xpu``, ``mps`` or ``cpu``."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def bf16_support(device: str | None = None) -> Bf16Support:
    """Whether ``device`` (default: this process's) computes bf16 natively, and what says so."""
    forced = os.environ.get("DISTILL_NATIVE_BF16", "").strip().lower()
    if forced in ("0", "1", "true", "false", "yes", "no"):
        native = forced in ("1", "true", "yes")
        return Bf16Support(native, f"native bf16 forced {'on' if native else 'off'} by DISTILL_NATIVE_BF16")
    device = device or device_type()
    if device == "cuda":
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Bf16Support(True, f"{name} computes bf16 natively")
        return Bf16Support(False, f"{name} has no native bf16")
    if device == "xpu":
        return Bf16Support(True, "the XPU computes bf16 natively")
    if device == "cpu":
        return _cpu_bf16()
    return Bf16Support(False, f"no native bf16 known for {device}")


def _cpu_bf16() -> Bf16Support:
    # oneDNN's own check honours ONEDNN_MAX_CPU_ISA; the instruction check tells native from the
    # AVX512 emulation that oneDNN also accepts
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    instructions = [
        name
        for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
        if getattr(torch.cpu, check, lambda: False)()
    ]
    capability = torch.backends.cpu.get_cpu_capability()
    if onednn and instructions and capability not in ("DEFAULT", "AVX2"):
        return Bf16Support(True, f"this CPU has {' and '.join(instructions)}")
    return Bf16Support(
        False, f"this CPU ({capability}) has no native bf16: emulated bf16 is several times slower than float32"
    )


def auto_precision() -> tuple[str, str]:
    """``(precision, why)`` for ``train.precision: auto``. Under ``accelerate launch`` the mixed
    precision chosen there (``ACCELERATE_MIXED_PRECISION``: ``no``, ``bf16``, ``fp16``) decides."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched:
        chosen = {"no": "fp32"}.get(launched, launched)
        return chosen, f"set by accelerate launch --mixed_precision {launched}"
    support = bf16_support()
    return ("bf16" if support.native else "fp32"), support.why


def weights_dtype(dtype: str, role: str, precision: str) -> str:
    """A model's weights dtype for its spec's ``dtype``: as given, or for ``auto`` the dtype of
    ``precision`` for the teacher (it computes in it) and float32 for the student (master weights
    under autocast)."""
    if dtype != "auto":
        return dtype
    return PRECISION_DTYPE[precision] if role == "teacher" else "float32"


def resolve_precision(config):
    """``config`` with ``auto`` replaced: ``train.precision`` by the hardware's answer, a model's
    ``dtype`` by ``weights_dtype``. Returns ``(resolved config, start-line text, warning or None)``."""
    train = config.train
    if train.precision == "auto":
        precision, why = auto_precision()
        text = f"precision {precision} (auto: {why})"
    else:
        precision = train.precision
        text = f"precision {precision} (train.precision)"
    teacher_dtype = weights_dtype(config.teacher.dtype, "teacher", precision)
    student_dtype = weights_dtype(config.student.dtype, "student", precision)
    text += f"; weights: teacher {teacher_dtype}, student {student_dtype}"
    warning = None
    uses_bf16 = precision == "bf16" or "bfloat16" in (teacher_dtype, student_dtype)
    if uses_bf16 and device_type() == "cpu":
        support = bf16_support("cpu")
        if not support.native:
            warning = (
                "bf16 on a CPU without native bf16 is emulated, several times slower than float32; "
                "set train.precision=auto (or fp32) and teacher.dtype=auto (or float32)"
            )
    resolved = config.model_copy(deep=True)
    resolved.train.precision = precision
    resolved.teacher.dtype = teacher_dtype
    resolved.student.dtype = student_dtype
    return resolved, text, warning


__all__ = [
    "Bf16Support",
    "PRECISION_DTYPE",
    "auto_precision",
    "bf16_support",
    "device_type",
    "resolve_precision",
    "weights_dtype",
]
