"""Mixed precision: a bf16 student (autocast) and a bf16 teacher, divergence math in float32."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cli_runs import flags, pair_args, sets
from distill.cli import app
from distill.resolve import resolve_run as resolve_config  # `distill run`'s config: (config file, flags)
from tiny_models import make_pair

runner = CliRunner()


def test_teacher_flag_and_dtype_setting_combine():
    settings = ["teacher.dtype=bfloat16", "train.precision=bf16"]
    config = resolve_config(None, flags(recipe="kd", teacher="t", student="s", output_dir="o", settings=settings))
    assert (config.teacher.ref, config.teacher.dtype, config.student.dtype) == ("t", "bfloat16", "auto")
    assert config.train.precision == "bf16"


@pytest.mark.parametrize("inference_copy", [True, False])
def test_bf16_student_and_teacher_train_and_save_float32(tmp_path, inference_copy):
    paths = make_pair(tmp_path)
    out = tmp_path / "run"
    copy = f"generation.inference_copy={str(inference_copy).lower()}"
    overrides = sets(
        "train.batch_size=4", "train.precision=bf16", "teacher.dtype=bfloat16", "generation.max_new_tokens=8"
    )
    result = runner.invoke(
        app, ["run", "--recipe", "rkl_onpolicy", "--set", copy, *pair_args(paths, out), "--max-steps", "3", *overrides]
    )
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["source"] for m in metrics] == ["student"] * 3  # generated in bf16, by a copy or through autocast
    assert all(torch.isfinite(torch.tensor([m["loss"] for m in metrics])))
    student = AutoModelForCausalLM.from_pretrained(out / "final")
    assert next(student.parameters()).dtype == torch.float32  # master weights stay float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 needs a GPU; this checks the message without one")
def test_fp16_without_a_gpu_is_one_line_before_anything_is_written(tmp_path):
    paths = make_pair(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["run", "--recipe", "kd", *pair_args(paths, out), "--max-steps", "1", "--set", "train.precision=fp16"]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.precision fp16: needs a GPU"), result.output
    assert not out.exists()


def test_a_launch_precision_other_than_train_precision_is_one_line(tmp_path, monkeypatch):
    paths = make_pair(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["run", "--recipe", "kd", *pair_args(paths, out), "--max-steps", "1", "--set", "train.precision=fp32"]
    )
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: accelerate launch asks for mixed precision bf16 but train.precision is fp32; distill's "
        "setting decides: pass --set train.precision=bf16, or launch with --mixed_precision no"
    )
    assert not out.exists()


# --- precision `auto`: chosen by the hardware, recorded resolved


def _resolved(monkeypatch, native: str, **settings):
    from distill.config import build_config
    from distill.hardware import resolve_precision

    monkeypatch.setenv("DISTILL_NATIVE_BF16", native)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    layer: dict = {"teacher": {"ref": "t"}, "student": {"ref": "s"}}
    for dotted, value in settings.items():
        section, key = dotted.split("__")
        layer.setdefault(section, {})[key] = value
    return resolve_precision(build_config([layer]))


def test_auto_is_the_default_everywhere_the_embedded_default_included():
    from distill.builtin import DEFAULT_RUN
    from distill.config import RunConfig, build_config

    config = RunConfig()
    assert (config.train.precision, config.teacher.dtype, config.student.dtype) == ("auto", "auto", "auto")
    default = build_config([DEFAULT_RUN])
    assert (default.train.precision, default.teacher.dtype, default.student.dtype) == ("auto", "auto", "auto")


def test_auto_chooses_bf16_where_it_is_native(monkeypatch):
    config, text, warning = _resolved(monkeypatch, "1")
    assert (config.train.precision, config.teacher.dtype, config.student.dtype) == ("bf16", "bfloat16", "float32")
    assert text.startswith("precision bf16 (auto: native bf16 forced on by DISTILL_NATIVE_BF16)") and warning is None


def test_auto_chooses_fp32_elsewhere_and_never_fp16(monkeypatch):
    config, text, warning = _resolved(monkeypatch, "0")
    assert (config.train.precision, config.teacher.dtype, config.student.dtype) == ("fp32", "float32", "float32")
    assert text.startswith("precision fp32 (auto: native bf16 forced off") and warning is None


def test_explicit_settings_are_kept(monkeypatch):
    config, text, _ = _resolved(
        monkeypatch, "1", train__precision="fp32", teacher__dtype="bfloat16", student__dtype="float32"
    )
    assert (config.train.precision, config.teacher.dtype, config.student.dtype) == ("fp32", "bfloat16", "float32")
    assert text.startswith("precision fp32 (train.precision)")


def test_auto_follows_the_precision_accelerate_launch_set(monkeypatch):
    from distill.config import build_config
    from distill.hardware import resolve_precision

    monkeypatch.setenv("DISTILL_NATIVE_BF16", "1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    config, text, _ = resolve_precision(build_config([{"teacher": "t"}]))
    assert (config.train.precision, config.teacher.dtype) == ("fp32", "float32")
    assert "accelerate launch --mixed_precision no" in text


@pytest.mark.parametrize("native", [True, False])
def test_bf16_forced_on_a_cpu_warns_only_without_native_bf16(monkeypatch, native):
    _, _, warning = _resolved(monkeypatch, "1" if native else "0", train__precision="bf16")
    if native:
        assert warning is None
    else:
        assert warning.startswith("bf16 on a CPU without native bf16 is emulated") and "train.precision=auto" in warning
    _, _, warning = _resolved(monkeypatch, "0", teacher__dtype="bfloat16")  # bf16 weights alone are just as slow
    assert warning is not None


def test_the_cpu_detection_says_no_under_the_avx2_emulation():
    """What a user's AVX2-only CPU looks like to torch: oneDNN limited to AVX2 (no override)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "DISTILL_NATIVE_BF16"}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    code = (
        "from distill.hardware import bf16_support, auto_precision; "
        "s = bf16_support('cpu'); print(s.native, auto_precision()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "fp32"]


@pytest.mark.parametrize("native", ["1", "0"])
def test_a_run_records_the_resolved_precision_and_says_why(tmp_path, monkeypatch, native):
    import yaml

    monkeypatch.setenv("DISTILL_NATIVE_BF16", native)
    paths = make_pair(tmp_path)
    out = tmp_path / "run"
    args = ["run", "--recipe", "kd", *pair_args(paths, out), "--max-steps", "1", "--set", "train.batch_size=4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    precision, dtype = ("bf16", "bfloat16") if native == "1" else ("fp32", "float32")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["train"]["precision"], saved["teacher"]["dtype"], saved["student"]["dtype"]) == (
        precision,
        dtype,
        "float32",
    )
    assert f"precision {precision} (auto: native bf16 forced" in result.output
    # the saved config reproduces the run's precision on any machine: nothing `auto` is left in it
    monkeypatch.setenv("DISTILL_NATIVE_BF16", "0" if native == "1" else "1")
    again = runner.invoke(app, ["run", "--config", str(out / "config.yaml"), "--output-dir", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    assert f"precision {precision} (train.precision)" in again.output


def test_bf16_forced_without_native_bf16_trains_with_a_one_line_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_NATIVE_BF16", "0")
    paths = make_pair(tmp_path)
    overrides = sets("train.batch_size=4", "train.precision=bf16")
    result = runner.invoke(
        app, ["run", "--recipe", "kd", *pair_args(paths, tmp_path / "run"), "--max-steps", "1", *overrides]
    )
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "emulated" in warnings[0] and "train.precision=auto" in warnings[0]
