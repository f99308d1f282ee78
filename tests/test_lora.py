"""LoRA through peft: adapters on the student (base frozen, final/ holds the adapter, final/merged/ on
request, resume), and a LoRA-tuned teacher merged at load (`teacher.adapter`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cli_runs import pair_args, sets
from distill.cli import app
from distill.config import LoraSpec, ModelSpec, build_config
from distill.errors import ConfigError
from distill.models import add_lora, load_model

peft = pytest.importorskip("peft")
runner = CliRunner()
LORA = sets("student.lora.rank=4", "student.lora.save_merged=true")


@pytest.fixture(scope="module")
def tiny(padded) -> dict[str, Path]:
    """Heads padded differently past the 300-token tokenizer (LoRA and resume with padded heads)."""
    return padded


def run_args(tiny, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--recipe",
        "kd",
        *pair_args(tiny, out),
        "--max-steps",
        "3",
        *sets("train.batch_size=4", "train.lr=1e-2", "eval.every=0"),
        *LORA,
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    result = runner.invoke(app, run_args(tiny, out))
    assert result.exit_code == 0, result.output
    return out


def batch_ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 42, 8, 99, 3], [7, 7, 120, 64, 1, 250]])


def test_lora_setting_as_a_flag_and_its_defaults():
    config = build_config([{"student": {"ref": "s", "lora": True}}])
    assert config.student.lora == LoraSpec() and config.student.lora.rank == 8
    assert build_config([{"student": "s"}]).student.lora is None  # a plain string still names the model


def test_only_the_adapters_are_trainable(tiny):
    student = add_lora(load_model(str(tiny["student"]), "student"), LoraSpec(rank=4))
    trainable = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert sum(p.numel() for p in student.parameters() if not p.requires_grad) > 10 * sum(
        p.numel() for p in student.parameters() if p.requires_grad
    )


def test_final_holds_the_adapter_which_loads_with_peft(tiny, lora_run):
    final = lora_run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter only, not a copy of the base
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["student"]), final)
    assert model.peft_config["default"].r == 4


def test_merged_copy_loads_and_matches_the_adapter_model(tiny, lora_run):
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "final" / "merged").eval()
    with_adapter = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny["student"]), lora_run / "final"
    ).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(batch_ids()).logits, with_adapter(batch_ids()).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged(batch_ids()).logits, base(batch_ids()).logits, atol=1e-4)  # it trained
    # the base stayed frozen: only the adapted projections (peft's default for Llama: q_proj, v_proj) moved
    before, after = base.state_dict(), merged.state_dict()
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in moved), moved


def test_a_lora_run_resumes_from_its_checkpoint(tiny, lora_run, tmp_path):
    out = tmp_path / "run"
    first = runner.invoke(app, run_args(tiny, out, "--max-steps", "2"))
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, run_args(tiny, out, "--max-steps", "3", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line)["loss"] for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert losses[:2] == pytest.approx(reference[:2], abs=1e-7)
    assert len(losses) == 3  # step 3 follows another schedule (max_steps 2 -> 3), so its loss is not compared


def test_lora_on_a_padded_output_head_trains_over_the_tokenizers_ids(tiny, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        run_args(
            tiny,
            out,
            "--max-steps",
            "2",
            "--set",
            "student.lora.target_modules=[q_proj,lm_head]",
            "--set",
            "student.lora.save_merged=false",
        ),
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "lm_head"}
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["student"]), out / "final")
    assert model(batch_ids()).logits.shape[-1] == 304  # the saved model keeps its own head; the trim was the run's


def make_teacher_adapter(tiny, folder: Path) -> Path:
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"])
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )  # random B: not a no-op
    peft.get_peft_model(teacher, config).save_pretrained(folder)
    return folder


def test_teacher_adapter_is_merged_at_load(tiny, tmp_path):
    adapter = make_teacher_adapter(tiny, tmp_path / "adapter")
    teacher = load_model(ModelSpec(ref=str(tiny["teacher"]), adapter=str(adapter)), "teacher").eval()
    assert not isinstance(teacher, peft.PeftModel) and not any(
        "lora_" in name for name, _ in teacher.named_parameters()
    )
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["teacher"]), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(batch_ids()).logits, reference(batch_ids()).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(teacher(batch_ids()).logits, base(batch_ids()).logits, atol=1e-3)


def test_teacher_adapter_through_the_command_line(tiny, tmp_path):
    adapter = make_teacher_adapter(tiny, tmp_path / "adapter")
    out = tmp_path / "run"
    overrides = sets("train.batch_size=4", f"teacher.adapter={adapter}")
    result = runner.invoke(app, ["run", "--recipe", "kd", *pair_args(tiny, out), "--max-steps", "1", *overrides])
    assert result.exit_code == 0, result.output
    assert f"adapter: {adapter}" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "teacher.lora.rank=4",
            "teacher.lora: the teacher is frozen; to load a LoRA-tuned teacher set teacher.adapter=PATH",
        ),
        (
            "teacher.adapter=/nonexistent/adapter",
            "teacher.adapter /nonexistent/adapter: not a PEFT adapter folder (no adapter_config.json)",
        ),
        ("student.lora.target_modules=[nonexistent_proj]", "student.lora.target_modules: "),
    ],
)
def test_lora_mistakes_are_one_line(tiny, tmp_path, setting, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--recipe", "kd", *pair_args(tiny, out), "--max-steps", "1", "--set", setting])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.output
    assert not out.exists()


def test_missing_peft_is_one_line(monkeypatch, tiny):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft":
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(ConfigError, match=r"student.lora needs the peft package: pip install 'distill\[lora\]'"):
        add_lora(load_model(str(tiny["student"]), "student"), LoraSpec())
