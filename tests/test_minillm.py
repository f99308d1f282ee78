"""MiniLLM as its authors run it: teacher-mixed sampling (one decode loop over both models, each
token's log-probs and importance weight recorded), collections reused for inner epochs, the
long-term term beside the token-level reverse KL; end to end on tiny models, resumed exactly, on two
processes, and its bad input refused in one line. (The estimator's correctness: test_sequence_terms.py.)"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from cli_runs import pair_args, read_jsonl, run_cli, sets
from distill.data import collate_prompts, load_examples
from distill.config import DataConfig
from distill.generation import TokenPicker, decode_mixed
from distill.models import load_model, load_tokenizer
from test_multiprocess import launch

SMALL = sets("train.batch_size=4", "generation.max_new_tokens=10", "eval.rouge_samples=0", "eval.batch_size=8")


@pytest.fixture(scope="module")
def models(tiny):
    tokenizer = load_tokenizer(str(tiny["teacher"]))
    student, teacher = load_model(str(tiny["student"]), "student"), load_model(str(tiny["teacher"]), "teacher")
    train, _, _ = load_examples(DataConfig(path=str(tiny["data"])), tokenizer, 0)
    return tokenizer, student.eval(), teacher.eval(), train[:4]


@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_mixed_decoding_records_both_log_probs_and_the_importance_weight(models, alpha):
    tokenizer, student, teacher, examples = models
    ids, attention = collate_prompts(examples, tokenizer.pad_token_id)
    torch.manual_seed(0)
    pick = TokenPicker(1.0, 0, 1.0, len(tokenizer))
    with torch.no_grad():
        tokens, records = decode_mixed(student, teacher, ids, attention, alpha, pick, 8, [], tokenizer.pad_token_id)
    assert tokens.shape == (4, 8) and records.shape == (3, 4, 8)
    log_p, log_q, w = records
    # w = q / (alpha p + (1 - alpha) q), from the same two log-probabilities
    assert torch.allclose(w, log_q.exp() / (alpha * log_p.exp() + (1 - alpha) * log_q.exp()), rtol=1e-5)
    if alpha == 0.0:
        assert torch.allclose(w, torch.ones_like(w))
    # the recorded log-probabilities are the models' own at the sampled tokens (teacher forcing)
    full = torch.cat([ids, tokens], 1)
    mask = torch.cat([attention, torch.ones_like(tokens)], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    for model, recorded in ((student, log_q), (teacher, log_p)):
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=mask, position_ids=positions).logits
        own = logits[:, ids.shape[1] - 1 : -1, : len(tokenizer)].float().log_softmax(-1).gather(-1, tokens[..., None])
        assert torch.allclose(own.squeeze(-1), recorded, atol=1e-4)


def test_minillm_trains_on_mixed_samples_and_reuses_each_collection_for_its_inner_epochs(tiny, tmp_path):
    result = run_cli(tiny, tmp_path / "run", "--recipe", "minillm", "--max-steps", "6", *SMALL)
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["source"] for m in metrics] == ["mixed"] * 6 and all(math.isfinite(m["loss"]) for m in metrics)
    assert [m["collection_use"] for m in metrics] == [1, 2, 3, 4, 1, 2]  # inner_epochs 4
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "teacher_mixed" in config and "minillm_pg" in config


def test_minillm_resumes_exactly_inside_a_collection(tiny, tmp_path):
    # the checkpoint at step 3 holds the collection (used 3 times) and its old log-probs: the resumed
    # steps 4-7 (one more use of it, then a new one) repeat the uninterrupted run's
    common = ["--recipe", "minillm", "--max-steps", "7", *SMALL]
    common += sets("checkpoint.every=3", "checkpoint.keep=3", "eval.every=0", "train.lr=1e-3")
    assert run_cli(tiny, tmp_path / "straight", *common).exit_code == 0
    out = tmp_path / "resumed"
    assert run_cli(tiny, out, *common).exit_code == 0
    for later in ("checkpoints/step-6", "checkpoints/step-7", "final"):  # as if stopped after step 3
        shutil.rmtree(out / later)
    again = run_cli(tiny, out, *common, "--resume")
    assert again.exit_code == 0, again.output
    assert "resuming after step 3" in again.output
    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [m["collection_use"] for m in ours] == [m["collection_use"] for m in theirs] == [1, 2, 3, 4, 1, 2, 3]
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=0, abs=1e-6)


def test_minillm_runs_on_two_processes(tiny, tmp_path):
    out = tmp_path / "run"
    launch(["-m", "distill", "run", *pair_args(tiny, out), "--recipe", "minillm", "--max-steps", "3", *SMALL])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["source"] for m in metrics] == ["mixed"] * 3 and all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--recipe", "minillm", "-P", "alpha=1.5"], "alpha"),
        (["--recipe", "minillm", "-P", "inner_epochs=0"], "inner_epochs"),
        (["--recipe", "kd", *sets("objective.terms.dataset.sequence.name=minillm_pg")], "records none"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, words):
    result = run_cli(tiny, tmp_path / "run", *args, "--max-steps", "2", *SMALL)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_the_pre_training_term_mixes_cross_entropy_and_the_teachers_distribution(models):
    # MiniLLM's pt_loss: (1 - kd_ratio) x LM cross-entropy + kd_ratio x distillation on the corpus text
    import random

    import distill
    from distill.session import _lm_loss

    tokenizer, student, teacher, _ = models
    blocks = [list(range(5, 25)), list(range(30, 50))]
    accelerator = type("Accelerator", (), {"device": torch.device("cpu")})()
    ce = _lm_loss(student, blocks, random.Random(0), 2, accelerator)
    mixed = _lm_loss(student, blocks, random.Random(0), 2, accelerator, teacher, 0.5)
    ids = torch.tensor([blocks[random.Random(0).randrange(2)] for _ in range(2)])  # the same draws
    with torch.no_grad():
        s_logits = student(input_ids=ids).logits[:, :-1]
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    kl = distill.divergence_loss(distill.get_divergence("kl"), s_logits, t_logits)
    assert float(mixed) == pytest.approx(0.5 * float(ce) + 0.5 * float(kl), rel=1e-5)


def test_minillm_with_its_pre_training_term_runs(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three four five six seven eight nine ten. " * 40)
    lm = sets(f"data.lm_path={corpus}", "train.lm_weight=1.0", "train.lm_kd_ratio=0.5", "data.max_prompt_tokens=24")
    result = run_cli(tiny, tmp_path / "run", "--recipe", "minillm", "--max-steps", "2", *SMALL, *lm)
    assert result.exit_code == 0, result.output
    assert all(math.isfinite(m["loss"]) for m in read_jsonl(tmp_path / "run" / "metrics.jsonl"))
