"""Teacher and student tokenizers: one vocabulary for logit-level KD, text in between otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli_runs import run_cli, sets
from distill.config import DataConfig
from distill.data import Example, encode_records, read_records
from distill.vocabulary import TextBridge, mismatch, student_tokenizer_ref
from tiny_models import make_model, make_other_tokenizer, make_pair

SMALL = sets(
    "train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=12", "eval.every=0", "eval.rouge_samples=2"
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """The tiny pair, and a student of another family: its own 280-token tokenizer and chat template."""
    root = tmp_path_factory.mktemp("vocabulary")
    paths = make_pair(root)
    other = root / "other"
    tokenizer = make_other_tokenizer(other)
    make_model(other, len(tokenizer), layers=1, seed=3)
    return {**paths, "other": other}


def run(pairs, out: Path, *args: str, student: str = "other"):
    return run_cli(pairs, out, "--max-steps", "2", *SMALL, *args, student=pairs[student])


def chat_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)


def test_the_same_tokenizer_twice_matches_and_another_is_named_by_its_first_difference(pairs):
    teacher, same, other = (AutoTokenizer.from_pretrained(pairs[k]) for k in ("teacher", "student", "other"))
    assert mismatch(teacher, same) is None
    difference = mismatch(teacher, other)
    assert (
        difference.startswith("id 0 is '<|im_start|>' in the teacher's tokenizer and '<unk>' in the student's")
        and "(300 and 280 tokens)" in difference
    )


@pytest.mark.parametrize("recipe", ["kd", "distillm"])
def test_a_logit_level_recipe_across_tokenizers_is_one_line_that_names_the_options(pairs, tmp_path, recipe):
    result = run(pairs, tmp_path / "run", "--recipe", recipe)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: teacher and student tokenizers differ: id 0 is"), (
        result.output
    )
    assert "use --divergence uld or uld_hybrid" in lines[0] and "or --recipe seqkd" in lines[0]
    assert not (tmp_path / "run").exists()


def test_seqkd_across_tokenizers_trains_the_student_on_the_teachers_text_in_its_own_tokens(pairs, tmp_path):
    out = tmp_path / "run"
    result = run(pairs, out, "--recipe", "seqkd", "--set", "eval.rouge_before=2")
    assert result.exit_code == 0, result.output
    assert "sequence-level KD" in result.output and "no logit-level term" in result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["source"] for m in metrics] == ["teacher", "teacher"] and all(
        0.0 <= m["truncated"] <= 1.0 for m in metrics
    )
    assert all(m["loss"] is not None and m["loss"] > 0 for m in metrics)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for record in evals:  # CE and ROUGE-L against the teacher's answers; nothing logit-level
        assert (
            "val_loss" in record and "rouge_l" in record and "val_kl" not in record and "val_divergence" not in record
        )
    final = AutoTokenizer.from_pretrained(out / "final")
    assert len(final) == 280 and final.eos_token == "</s>"  # the student's own tokenizer goes with it
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = chat_ids(final, [{"role": "user", "content": "What is 1 plus 2?"}])
    assert (
        model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, eos_token_id=None).shape[1]
        == len(ids) + 3
    )


def test_the_bridge_re_encodes_the_teachers_answer_and_ends_it_only_where_the_teacher_ended(pairs):
    teacher, student = AutoTokenizer.from_pretrained(pairs["teacher"]), AutoTokenizer.from_pretrained(pairs["other"])
    data = DataConfig(path=str(pairs["data"]), max_response_tokens=64)
    examples, _ = encode_records(read_records(str(pairs["data"]))[:2], student, data, "data")
    bridge = TextBridge(teacher, student, data, teacher_stops=[teacher.eos_token_id])
    prompts = bridge.teacher_prompts(examples)
    assert (
        prompts[0].prompt_ids
        == chat_ids(teacher, examples[0].messages)
        != examples[0].prompt_ids
        == chat_ids(student, examples[0].messages)
    )
    words = teacher("two plus three is five.", add_special_tokens=False).input_ids
    ended = bridge.to_student(examples[0], Example(prompts[0].prompt_ids, words + [teacher.eos_token_id]))
    cut = bridge.to_student(examples[0], Example(prompts[0].prompt_ids, words))
    expected = student("two plus three is five.", add_special_tokens=False).input_ids
    assert ended.prompt_ids == examples[0].prompt_ids and ended.reference == "two plus three is five."
    assert ended.response_ids == expected + [student.eos_token_id]
    assert cut.response_ids == expected  # cut at the cap by the teacher: the student does not learn to stop there
    assert max(ended.response_ids) < len(student) and expected != words


def test_student_tokenizer_setting_is_the_students_own(pairs, tmp_path):
    result = run(
        pairs, tmp_path / "run", "--recipe", "kd", "--set", f"student.tokenizer={pairs['other']}", student="student"
    )
    assert result.exit_code == 2 and "tokenizers differ" in result.output, result.output
    result = run(
        pairs, tmp_path / "run", "--recipe", "kd", "--set", f"teacher.tokenizer={pairs['other']}", student="student"
    )
    assert (
        result.exit_code == 2 and "teacher.tokenizer: the teacher's tokenizer is set by tokenizer=DIR" in result.output
    ), result.output


def test_where_the_students_own_tokenizer_is_looked_for(pairs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert student_tokenizer_ref("prune:4", None) is None  # the teacher's layers: the teacher's tokenizer
    assert student_tokenizer_ref(str(pairs["other"]), None) == str(pairs["other"])
    assert student_tokenizer_ref(str(bare), None) is None  # no tokenizer files: the teacher's serves
    assert (
        student_tokenizer_ref("Qwen/Qwen2.5-0.5B-Instruct", None) == "Qwen/Qwen2.5-0.5B-Instruct"
    )  # a hub id: its own
    assert student_tokenizer_ref("prune:4", str(pairs["other"])) == str(pairs["other"])  # student.tokenizer wins


def test_a_student_folder_without_a_tokenizer_and_another_head_size_is_warned_about(pairs, tmp_path):
    bare = tmp_path / "bare"
    make_model(bare, 320, layers=1)  # no tokenizer files: the teacher's is assumed
    result = run(pairs, tmp_path / "run", "--recipe", "kd", "--set", f"student.ref={bare}", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert (
        "the student's folder has no tokenizer, so the teacher's is assumed; their heads differ (300 and 320 rows)"
        in " ".join(result.output.split())
    )
