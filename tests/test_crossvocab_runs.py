"""Logit-level KD across tokenizers (#30): runs whose divergences compare two vocabularies (``uld``,
``uld_hybrid``) read each sequence through the teacher's own tokens (``CrossVocabTeacher``)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from cli_runs import read_jsonl, run_cli, sets
from distill import default_registry
from distill.config import DataConfig
from distill.crossvocab import CrossBridge, check_round_trip, decoded_ends, token_ends
from distill.data import collate, load_examples
from distill.errors import ConfigError
from distill.models import load_model, load_tokenizer, stop_ids
from distill.objective import micro_loss
from distill.teacher import CrossVocabTeacher, LiveTeacher
from test_multiprocess import launch
from tiny_models import make_model, make_other_tokenizer, make_pair

SMALL = sets("train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=8", "eval.rouge_samples=2")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """The tiny pair, and a student of another family (its own 280-token tokenizer and chat template)."""
    root = tmp_path_factory.mktemp("crossvocab")
    paths = make_pair(root)
    tokenizer = make_other_tokenizer(root / "other")
    make_model(root / "other", len(tokenizer), layers=1, seed=3)
    return {**paths, "other": root / "other"}


@pytest.mark.parametrize("name", ["uld", "uld_hybrid"])
def test_the_cross_vocabulary_side_with_one_tokenizer_gives_the_same_loss_as_the_live_side(pairs, name):
    """With the teacher's tokenizer on both sides every group is one token, and the teacher reads the
    very sequence: the loss and its gradient equal the ordinary path's."""
    tokenizer = load_tokenizer(str(pairs["teacher"]))
    teacher = load_model(str(pairs["teacher"]), "teacher").eval()
    student = load_model(str(pairs["student"]), "student")
    train, _, _ = load_examples(DataConfig(path=str(pairs["data"])), tokenizer, 0)
    examples = train[:6]
    bridge = CrossBridge(tokenizer, tokenizer, train, DataConfig(), stop_ids(student, tokenizer))
    for example in examples:  # the teacher reads the very sequence, one group per token
        view = bridge.view(example)
        assert view.example.prompt_ids == example.prompt_ids and view.example.response_ids == example.response_ids
        assert view.starts == tuple((k, k) for k in range(len(example.response_ids)))
    batch = collate(examples, tokenizer.pad_token_id)
    divergence = default_registry().get_divergence(name)
    results = []
    for side in (LiveTeacher(teacher), CrossVocabTeacher(teacher, bridge, tokenizer.pad_token_id)):
        student.zero_grad()
        loss, _ = micro_loss(
            side,
            student,
            batch,
            divergence,
            batch.n_tokens,
            0.5,
            prepared=side.prepare([("dataset", batch, examples)])[0],
        )
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (ours, our_grads), (theirs, their_grads) = results[1], results[0]
    assert ours == pytest.approx(theirs, rel=1e-5)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_bridge_aligns_a_student_response_with_the_teachers_tokens(pairs):
    teacher_tokenizer = load_tokenizer(str(pairs["teacher"]))
    student_tokenizer = load_tokenizer(str(pairs["other"]))
    train, _, _ = load_examples(DataConfig(path=str(pairs["data"])), student_tokenizer, 0)
    eos = student_tokenizer.eos_token_id
    bridge = CrossBridge(student_tokenizer, teacher_tokenizer, train, DataConfig(), [eos])
    for example in train[:10]:
        view = bridge.view(example)
        body = example.response_ids[:-1]
        text = student_tokenizer.decode(body)
        assert teacher_tokenizer.decode(view.example.response_ids[:-1]) == text  # the same text in its tokens
        assert view.example.response_ids[-1] == teacher_tokenizer.eos_token_id and view.starts[-1] == (
            len(body),
            len(view.example.response_ids) - 1,
        )
        students, teachers = zip(*view.starts)
        assert list(students) == sorted(set(students)) and list(teachers) == sorted(set(teachers))
        assert students[0] == teachers[0] == 0
        # a group begins where both sides begin a token: the tokens before it end at the same character
        _, student_ends = decoded_ends(student_tokenizer, body)
        _, teacher_ends = token_ends(teacher_tokenizer, text)
        for s, t in view.starts[1:-1]:
            assert student_ends[s - 1] == teacher_ends[t - 1]


def test_decoded_ends_follow_any_cut_of_a_text(pairs):
    tokenizer = load_tokenizer(str(pairs["teacher"]))
    canonical = tokenizer("Spell the number 12.", add_special_tokens=False).input_ids
    text, ends = decoded_ends(tokenizer, canonical)
    assert text == "Spell the number 12." and ends[-1] == len(text) and ends == sorted(ends)
    # a cut the tokenizer would not make (one token per byte): the same text, ends one character apart
    letters = [tokenizer.convert_tokens_to_ids(c) for c in "Spell"]
    assert decoded_ends(tokenizer, letters) == ("Spell", [1, 2, 3, 4, 5])


def test_a_text_that_does_not_round_trip_is_refused_in_one_line():
    class Lossy:
        def decode(self, ids, **_):
            return "hello"

        def __call__(self, text, **_):
            return type("Encoded", (), {"input_ids": [7]})()

    with pytest.raises(ConfigError, match="does not round-trip"):
        check_round_trip(Lossy(), [3, 4], "student")


@pytest.mark.parametrize(
    "args",
    [
        ["--recipe", "kd", "--divergence", "uld"],
        ["--recipe", "distillm", "--divergence", "uld_hybrid", "-P", "init_prob=0.5"],
        ["--recipe", "gkd", "--divergence", "uld_hybrid"],
    ],
    ids=["kd-uld", "distillm-hybrid", "gkd-hybrid"],
)
def test_logit_level_recipes_run_across_tokenizers(pairs, tmp_path, args):
    out = tmp_path / "run"
    result = run_cli(pairs, out, *args, "--max-steps", "3", *SMALL, student=pairs["other"])
    assert result.exit_code == 0, result.output
    assert "logit-level KD across vocabularies" in result.output and "fused head: off" in result.output
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) and m["loss"] > 0 for m in metrics)
    evals = read_jsonl(out / "eval.jsonl")
    assert all("val_loss" in e and "rouge_l" in e for e in evals)


def test_a_run_across_tokenizers_resumes_exactly(pairs, tmp_path):
    common = ["--recipe", "distillm", "--divergence", "uld_hybrid", "-P", "init_prob=0.5", "--max-steps", "6", *SMALL]
    common += sets("checkpoint.every=3", "checkpoint.keep=2", "eval.every=0", "train.lr=1e-3")
    assert run_cli(pairs, tmp_path / "straight", *common, student=pairs["other"]).exit_code == 0
    out = tmp_path / "resumed"
    assert run_cli(pairs, out, *common, student=pairs["other"]).exit_code == 0
    for later in ("checkpoints/step-6", "final"):
        shutil.rmtree(out / later)
    again = run_cli(pairs, out, *common, "--resume", student=pairs["other"])
    assert again.exit_code == 0, again.output
    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [m["source"] for m in ours] == [m["source"] for m in theirs]
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=0, abs=1e-6)


def test_a_run_across_tokenizers_on_two_processes(pairs, tmp_path):
    out = tmp_path / "run"
    args = ["--teacher", str(pairs["teacher"]), "--student", str(pairs["other"]), "--data", str(pairs["data"])]
    launch(
        [
            "-m",
            "distill",
            "run",
            *args,
            "-o",
            str(out),
            "--recipe",
            "gkd",
            "--divergence",
            "uld",
            "--max-steps",
            "3",
            *SMALL,
        ]
    )
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--recipe", "kd"], "use --divergence uld or uld_hybrid"),
        (["--recipe", "minillm", "--divergence", "uld"], "needs one vocabulary"),
        (
            ["--recipe", "kd", "--divergence", "uld", *sets("objective.terms.dataset.divergence=kl")],
            "uld or uld_hybrid",
        ),
    ],
)
def test_bad_input_across_tokenizers_is_one_line_and_writes_nothing(pairs, tmp_path, args, words):
    result = run_cli(pairs, tmp_path / "run", *args, "--max-steps", "1", *SMALL, student=pairs["other"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "run").exists()
