"""Mixed precision: a bf16 student (autocast) and a bf16 teacher, divergence math in float32."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from distill.cli import app
from distill.cli.run_cmd import flag_layer, resolve_config
from tiny_models import make_pair

runner = CliRunner()


def test_teacher_flag_and_dtype_setting_combine():
    flags = flag_layer(recipe="kd", divergence=None, divergence_params=[], policy=None, policy_params=[], teacher="t",
                       student="s", data=None, output_dir="o", max_steps=None, seed=None,
                       settings=["teacher.dtype=bfloat16", "train.precision=bf16"])
    config = resolve_config(None, flags)
    assert (config.teacher.ref, config.teacher.dtype, config.student.dtype) == ("t", "bfloat16", "float32")
    assert config.train.precision == "bf16"


@pytest.mark.parametrize("inference_copy", [True, False])
def test_bf16_student_and_teacher_train_and_save_float32(tmp_path, inference_copy):
    paths = make_pair(tmp_path)
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "run", "--recipe", "minillm", "--set", f"generation.inference_copy={str(inference_copy).lower()}", "--teacher", str(paths["teacher"]), "--student", str(paths["student"]),
        "--data", str(paths["data"]), "--output-dir", str(out), "--max-steps", "3", "--set", "train.batch_size=4",
        "--set", "train.precision=bf16", "--set", "teacher.dtype=bfloat16", "--set", "generation.max_new_tokens=8",
    ])
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
    result = runner.invoke(app, [
        "run", "--recipe", "kd", "--teacher", str(paths["teacher"]), "--student", str(paths["student"]),
        "--data", str(paths["data"]), "--output-dir", str(out), "--max-steps", "1", "--set", "train.precision=fp16",
    ])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.precision fp16: needs a GPU"), result.output
    assert not out.exists()


def test_a_launch_precision_other_than_train_precision_is_one_line(tmp_path, monkeypatch):
    paths = make_pair(tmp_path)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "run", "--recipe", "kd", "--teacher", str(paths["teacher"]), "--student", str(paths["student"]),
        "--data", str(paths["data"]), "--output-dir", str(out), "--max-steps", "1",
    ])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: accelerate launch asks for mixed precision bf16 but train.precision is fp32; distill's setting decides: "
        "pass --set train.precision=bf16, or launch with --mixed_precision no"
    )
    assert not out.exists()
