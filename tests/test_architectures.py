"""The architecture matrix: every decoder family in ``tiny_models.ARCHITECTURES`` trains end to end.

Per architecture two short ``distill run``s (DistiLLM with every step on fresh student outputs, so the
decode loop drives each model in training): one with heads padded differently past the tokenizer
(teacher 320 rows, student 304, tokenizer 300), one with a ``prune:1`` student (the 2-layer teacher
cut to 1 layer); each ``final/`` is reloaded with ``AutoModelForCausalLM`` and generates. Cheaper
checks pin what a finished run cannot show: the decode loop gives what transformers' ``generate``
gives, and a pruned model computes what its teacher computes without the dropped layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill
from cli_runs import read_jsonl, run_cli, sets
from distill.data import Example, collate_prompts
from distill.generation import TokenPicker, decodable, decode
from distill.models import load_model
from distill.pruning import decoder_layers
from tiny_models import ARCHITECTURES, greedy_generate, make_config, make_pair

TEACHER_ROWS, STUDENT_ROWS = 320, 304
every_architecture = pytest.mark.parametrize("architecture", list(ARCHITECTURES))


def run_distillm_on_student_outputs(pair: dict[str, Path], out: Path, student: str):
    overrides = sets(
        "train.batch_size=4", "eval.batch_size=8", "eval.every=0", "eval.rouge_samples=2", "generation.max_new_tokens=8"
    )
    return run_cli(
        pair, out, "--recipe", "distillm", "-P", "init_prob=1", "--max-steps", "2", *overrides, student=student
    )


def check_run_and_final(out: Path, architecture: str, head_rows: int) -> None:
    """Both steps trained on student outputs, evaluation before and after, and ``final/`` is a
    1-layer model of the architecture with ``head_rows`` rows that loads and generates."""
    assert [m["source"] for m in read_jsonl(out / "metrics.jsonl")] == ["student", "student"]
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2] and all(math.isfinite(e["val_loss"]) and "rouge_l" in e for e in evals)
    student = AutoModelForCausalLM.from_pretrained(out / "final")
    assert student.config.model_type == make_config(architecture, head_rows, 1).model_type
    assert student.config.num_hidden_layers == 1 and student.get_output_embeddings().weight.shape[0] == head_rows
    prompt = AutoTokenizer.from_pretrained(out / "final")("What is 1 plus 2?", return_tensors="pt")
    generated = student.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert generated.shape[1] > prompt.input_ids.shape[1]


@every_architecture
def test_heads_padded_differently_train_on_student_outputs_and_reload(architecture, tmp_path):
    pair = make_pair(tmp_path, teacher_vocab=TEACHER_ROWS, student_vocab=STUDENT_ROWS, architecture=architecture)
    result = run_distillm_on_student_outputs(pair, tmp_path / "run", str(pair["student"]))
    assert result.exit_code == 0, result.output
    check_run_and_final(tmp_path / "run", architecture, STUDENT_ROWS)


@every_architecture
def test_a_pruned_teacher_trains_on_its_own_outputs_and_reloads(architecture, tmp_path):
    pair = make_pair(tmp_path, teacher_vocab=TEACHER_ROWS, architecture=architecture)
    result = run_distillm_on_student_outputs(pair, tmp_path / "run", "prune:1")
    assert result.exit_code == 0, result.output
    check_run_and_final(tmp_path / "run", architecture, TEACHER_ROWS)


@every_architecture
def test_pruning_keeps_the_first_layer_and_computes_the_teacher_without_the_last(architecture):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(make_config(architecture, 300, 2)).eval()
    student = load_model("prune:1", "student", teacher=teacher).eval()
    layers = decoder_layers(teacher)
    assert decoder_layers(student) == layers and student.config.num_hidden_layers == 1
    tied = teacher.get_output_embeddings().weight is teacher.get_input_embeddings().weight
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) == tied

    def skip(module, args, kwargs, output):  # the dropped layer passes its input on
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    teacher.get_submodule(layers)[1].register_forward_hook(skip, with_kwargs=True)
    ids = torch.randint(2, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


@every_architecture
def test_decode_gives_what_generate_gives_past_the_sliding_window(architecture):
    """Greedy, on left-padded prompts longer than the 8-position sliding windows, with an EOS that
    ends one row early while another reaches the cap."""
    config = make_config(architecture, 300, 2)
    # tiny models easily repeat one token, and then the comparison means little: a wide init (0.02
    # repeats), and an untied head (Gemma's scaled embeddings through a tied head echo the last token)
    config.initializer_range = 0.5
    if hasattr(config, "init_std"):
        config.init_std = 0.5  # OPT's name for it
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert decodable(model)
    prompts = [[5 + i for i in range(n)] for n in (12, 3, 10, 1)]
    ids, attention = collate_prompts([Example(p, []) for p in prompts], 0)
    new = 12

    def ours(eos):
        with torch.no_grad():
            return decode(model, ids, attention, TokenPicker.greedy(), new, eos, 0)

    def theirs(eos):
        return greedy_generate(model, ids, attention, new, eos, pad_token_id=0)

    free = ours(None)
    assert torch.equal(free, theirs(None)) and len(set(free.flatten().tolist())) > 4
    rows = free.tolist()
    # an id that row 0 first emits at step 2 or later, before the cap, and some other row never does
    step, eos = next(
        (s, t)
        for s, t in enumerate(rows[0][: new - 1])
        if s >= 2 and t != 0 and t not in rows[0][:s] and any(t not in row for row in rows)
    )
    ended = ours(eos)
    assert torch.equal(
        ended[:, : theirs(eos).shape[1]], theirs(eos)
    )  # generate stops when every row has; ours pads to the cap
    assert ended[0, step] == eos and (ended[0, step + 1 :] == 0).all() and any(eos not in row for row in ended.tolist())


def test_an_unclear_layer_list_is_a_one_line_error_naming_the_architecture():
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(make_config("opt", 300, 2))
    layers = decoder_layers(teacher)
    teacher.extra = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])  # a second list of two
    with pytest.raises(distill.ConfigError) as error:
        load_model("prune:1", "student", teacher=teacher)
    message = str(error.value)
    assert (
        f"cannot prune {type(teacher).__name__} ({teacher.config.model_type})" in message
        and layers in message
        and "\n" not in message
    )
