"""End-to-end runs of every recipe on tiny models, and the engine's contracts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cli_runs
from cli_runs import read_jsonl, sets
from tiny_models import make_pair

SMALL = sets("train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=12", "eval.every=2")


def run_cli(tiny, out: Path, *args: str):
    return cli_runs.run_cli(tiny, out, *SMALL, *args)


EXPECTED_SOURCES = {
    "kd": {"dataset"},
    "seqkd": {"teacher"},
    "imitkd": {"replay"},
    "gkd": {"dataset", "student"},
    "minillm": {"mixed"},
    "rkl_onpolicy": {"student"},
}


@pytest.mark.parametrize("recipe", ["kd", "seqkd", "imitkd", "gkd", "minillm", "rkl_onpolicy", "distillm"])
def test_every_recipe_trains_evaluates_and_saves(padded, tmp_path, recipe):
    # on a pair whose heads are padded differently past the tokenizer (the logits compared: its 300)
    extra = ["-P", "init_prob=1", "-P", "capacity=8"] if recipe == "distillm" else []
    result = run_cli(
        padded, tmp_path / "run", "--recipe", recipe, "--max-steps", "4", "--set", "checkpoint.every=2", *extra
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all({"step", "loss", "source", "tokens", "seconds"} <= m.keys() for m in metrics)
    sources = [m["source"] for m in metrics]
    for m in metrics:  # generated responses: the share cut at generation.max_new_tokens
        assert ("truncated" in m) == (m["source"] != "dataset") and 0.0 <= m.get("truncated", 0.0) <= 1.0
    if recipe == "distillm":
        # phi = 1: fresh student outputs until the buffer (8 = 2 steps x 4) is full, then fresh or replay
        assert sources[:2] == ["student", "student"]
        assert set(sources[2:]) <= {"student", "replay"}
        assert all(m["sgo_prob"] == 1.0 for m in metrics)
    else:
        assert set(sources) <= EXPECTED_SOURCES[recipe]
        assert "sgo_prob" not in metrics[0]
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all("val_loss" in e and "val_divergence" in e for e in evals)
    assert (out / "checkpoints" / "step-2" / "trainer_state.pt").is_file()
    config = (out / "config.yaml").read_text()
    assert f"recipe: {recipe}" in config
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    generated = model.generate(
        torch.tensor([tokenizer("What is 1 plus 2?").input_ids]), max_new_tokens=3, do_sample=False
    )
    assert generated.shape[1] > 0


def test_time_budget_ends_the_run_with_the_final_evaluation_and_save(tiny, tmp_path):
    out = tmp_path / "run"
    overrides = sets("train.max_seconds=1e-9", "eval.every=0", "eval.rouge_samples=2")
    result = run_cli(tiny, out, "--recipe", "kd", "--max-steps", "50", *overrides)
    assert result.exit_code == 0, result.output
    # any step takes longer than the budget, so the first one is the last
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1]
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1] and "rouge_l" in evals[-1]
    assert (out / "checkpoints" / "step-1" / "trainer_state.pt").is_file()
    assert (out / "final" / "config.json").is_file()


def test_divergence_and_policy_flags_as_the_user_wrote_them(tiny, tmp_path):
    result = run_cli(
        tiny,
        tmp_path / "run",
        "--divergence",
        "skew_kl",
        "--policy",
        "adaptive_offpolicy",
        "-D",
        "alpha=0.2",
        "--max-steps",
        "3",
        "--set",
        "eval.rouge_samples=2",
    )
    assert result.exit_code == 0, result.output
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: skew_kl" in config and "alpha: 0.2" in config and "name: adaptive_offpolicy" in config
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    # ROUGE-L needs generation, so it is measured before and after training only
    assert [e["step"] for e in evals if "rouge_l" in e] == [0, 3]
    assert all(0.0 <= e["rouge_l"] <= 100.0 for e in evals if "rouge_l" in e)
    assert "distill run summary" in result.output


def test_loss_decreases_with_a_few_steps_of_kd(tiny, tmp_path):
    result = run_cli(
        tiny, tmp_path / "run", "--recipe", "kd", "--max-steps", "8", "--set", "train.lr=3e-3", "--set", "eval.every=0"
    )
    assert result.exit_code == 0, result.output
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert evals[-1]["val_divergence"] < evals[0]["val_divergence"]


def test_ce_weight_and_auxiliary_lm_loss(tiny, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one two three four five six seven eight nine ten. " * 40)
    overrides = sets(
        "train.ce_weight=0.5",
        f"data.lm_path={corpus}",
        "train.lm_weight=1.0",
        "data.max_prompt_tokens=24",
        "data.max_response_tokens=24",
    )
    result = run_cli(tiny, tmp_path / "run", "--recipe", "kd", "--max-steps", "2", *overrides)
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_chat_messages_data(tiny, tmp_path):
    data = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}."}]}
        for w in "one two three four five six seven eight nine ten".split()
    ] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli_runs.run_cli(tiny, tmp_path / "run", "--recipe", "kd", "--max-steps", "2", *SMALL, data=data)
    assert result.exit_code == 0, result.output


def test_a_head_smaller_than_the_tokenizer_fails_before_training_with_both_sizes(tmp_path):
    paths = make_pair(tmp_path, student_vocab=250)
    result = cli_runs.run_cli(paths, tmp_path / "run", "--max-steps", "2")
    assert result.exit_code == 2
    assert "the tokenizer has 300 tokens but the student's output head only 250 rows" in result.output
    assert not (tmp_path / "run").exists()


def test_unknown_divergence_is_one_line_with_suggestion(tiny, tmp_path):
    result = run_cli(tiny, tmp_path / "run", "--divergence", "skew_kll")
    assert result.exit_code == 2
    assert "did you mean skew_kl?" in result.output
    assert "Traceback" not in result.output


def test_previous_run_is_not_overwritten_without_flag(tiny, tmp_path):
    out = tmp_path / "run"
    assert run_cli(tiny, out, "--recipe", "kd", "--max-steps", "1").exit_code == 0
    before = (out / "metrics.jsonl").read_text()
    result = run_cli(tiny, out, "--recipe", "kd", "--max-steps", "2")
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "metrics.jsonl").read_text() == before
    assert run_cli(tiny, out, "--recipe", "kd", "--max-steps", "2", "--overwrite").exit_code == 0
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


def test_frozen_embeddings_stay_as_they_were_and_the_rest_trains(tiny, tmp_path):
    overrides = sets("train.lr=1e-2", "student.freeze=[embeddings, 'model.layers.0.*']")
    result = run_cli(tiny, tmp_path / "run", "--recipe", "kd", "--max-steps", "2", *overrides)
    assert result.exit_code == 0, result.output
    before = AutoModelForCausalLM.from_pretrained(tiny["student"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    frozen = {k for k in before if k.startswith(("model.embed_tokens.", "lm_head.", "model.layers.0."))}
    assert frozen and len(frozen) < len(before)
    for key in before:
        assert torch.equal(before[key], after[key]) == (key in frozen), key
    assert "freeze:\n  - embeddings\n  - model.layers.0.*" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("student.freeze=['no.such.*']", "student.freeze 'no.such.*': matches no parameter"),
        ("student.freeze=['*']", "freezes every parameter"),
        ("teacher.freeze=[embeddings]", "teacher.freeze: the teacher is always frozen"),
    ],
)
def test_bad_freeze_settings_are_one_line_errors(tiny, tmp_path, setting, message):
    result = run_cli(tiny, tmp_path / "run", "--max-steps", "1", "--set", setting)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, (
        result.output
    )
    assert not (tmp_path / "run").exists()


def test_every_step_logs_its_padding_share_and_grouping_cuts_it(tiny, tmp_path):
    shares = {}
    for grouped in ("true", "false"):
        overrides = sets(f"data.group_by_length={grouped}", "eval.every=0")
        result = run_cli(tiny, tmp_path / grouped, "--recipe", "kd", "--max-steps", "8", *overrides)
        assert result.exit_code == 0, result.output
        metrics = read_jsonl(tmp_path / grouped / "metrics.jsonl")
        assert all(0.0 <= m["padding"] < 1.0 for m in metrics)
        shares[grouped] = sum(m["padding"] for m in metrics) / len(metrics)
    assert shares["true"] < shares["false"]


def test_the_pass_before_training_answers_fewer_prompts_and_after_compares_the_same_ones(tiny, tmp_path):
    overrides = sets("eval.rouge_samples=8", "eval.rouge_before=1", "eval.every=0")
    result = run_cli(tiny, tmp_path / "run", "--recipe", "kd", "--max-steps", "2", *overrides)  # 2 validation examples
    assert result.exit_code == 0, result.output
    before, after = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert before["rouge_prompts"] == 1 and "rouge_l_subset" not in before
    assert after["rouge_prompts"] == 2 and 0.0 <= after["rouge_l_subset"] <= 100.0
    assert "first 1 prompts" in result.output and "all 2 prompts" in result.output


def test_no_pass_before_training_leaves_no_subset_to_compare(tiny, tmp_path):
    overrides = sets("eval.rouge_samples=8", "eval.rouge_before=0", "eval.every=0")
    result = run_cli(tiny, tmp_path / "run", "--recipe", "kd", "--max-steps", "1", *overrides)
    assert result.exit_code == 0, result.output
    before, after = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert "rouge_l" not in before and after["rouge_prompts"] == 2 and "rouge_l_subset" not in after
    assert "first" not in result.output and "?" not in result.output  # no "first ? prompts" row


def test_rouge_on_the_same_prompts_before_and_after(tmp_path):
    """The subset score is the mean over exactly the first rouge_before prompts."""
    from distill.data import Example
    from distill.evaluation import Evaluator

    class Echo:  # "generates" each prompt's reference for even prompts, nothing for odd ones
        def __call__(self, model, examples, **kwargs):
            return [
                Example(e.prompt_ids, [1] if e.prompt_ids[0] % 2 == 0 else [0], reference=e.reference) for e in examples
            ]

    class Tokenizer:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return "alpha beta" if ids == [1] else "zzz"

    examples = [Example([i], [1], reference="alpha beta") for i in range(6)]
    evaluator = Evaluator(examples, Tokenizer(), None, Echo(), 4, rouge_samples=6, rouge_before=3)
    scores = evaluator._rouge("all")
    assert scores == {"rouge_l": 50.0, "rouge_prompts": 6, "rouge_l_subset": 100.0 * 2 / 3}
    assert evaluator._rouge("before") == {"rouge_l": 100.0 * 2 / 3, "rouge_prompts": 3}


def test_step_weight_tokens_scales_each_clipped_step_by_its_share_of_the_tokens(tiny, tmp_path, monkeypatch):
    # plain SGD: a step moves the weights by lr x the gradient it is given, so the two modes' second
    # steps differ exactly by the logged weight (the first step weighs 1 in both)
    import importlib

    session = importlib.import_module("distill.session")
    monkeypatch.setattr(session, "_adamw", lambda params, lr, weight_decay: torch.optim.SGD(params, lr=lr))
    weights = {}
    for mode, steps in (("equal", 1), ("equal", 2), ("tokens", 2)):
        out = tmp_path / f"{mode}-{steps}"
        overrides = sets(
            f"train.step_weight={mode}",
            "eval.every=0",
            "eval.rouge_samples=0",
            "train.lr=0.1",
            "train.schedule=constant",
        )
        result = run_cli(tiny, out, "--recipe", "kd", "--max-steps", str(steps), *overrides)
        assert result.exit_code == 0, result.output
        weights[mode, steps] = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
        metrics = read_jsonl(out / "metrics.jsonl")
    first, second = metrics
    assert first["step_weight"] == 1.0 and "grad_norm" in first
    expected = second["tokens"] * 2 / (first["tokens"] + second["tokens"])
    assert second["step_weight"] == pytest.approx(expected, abs=1e-4) and abs(expected - 1.0) > 0.05, (
        first["tokens"],
        second["tokens"],
    )
    start = weights["equal", 1]
    for key, value in start.items():
        equal_move = weights["equal", 2][key] - value
        tokens_move = weights["tokens", 2][key] - value
        torch.testing.assert_close(tokens_move, equal_move * second["step_weight"], atol=1e-6, rtol=1e-3)


def test_stop_ids_of_each_model_end_its_responses_and_a_difference_is_a_warning(tiny, tmp_path):
    """The student ends on ids its generation_config lists (Llama-3 style, several) that the teacher's
    does not: a one-line warning at start, and the student's responses end on them."""
    import shutil

    student = tmp_path / "student"
    shutil.copytree(tiny["student"], student)
    config = json.loads((student / "generation_config.json").read_text())
    (student / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": list(range(3, 300))}))
    pair = {**tiny, "student": student}
    overrides = sets("eval.every=0", "eval.rouge_samples=0", "generation.max_new_tokens=40")
    result = run_cli(
        pair, tmp_path / "run", "--recipe", "distillm", "--max-steps", "2", "-P", "init_prob=1", *overrides
    )
    assert result.exit_code == 0, result.output
    warning = [line for line in result.output.splitlines() if "end responses on different ids" in line]
    assert (
        len(warning) == 1
        and "student [3, 4, 5, 6, 7, 8, 9, 10, ... (298 ids)]" in warning[0]
        and "teacher [2, 1]" in warning[0]
    ), result.output
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # almost every id ends a student response now; with the tokenizer's and the teacher's ids only, all reach the cap
    assert [m["source"] for m in metrics] == ["student", "student"] and all(m["truncated"] == 0.0 for m in metrics)


def test_a_step_generates_its_micro_batches_together(tiny, tmp_path, monkeypatch):
    import importlib

    generation = importlib.import_module("distill.generation")
    sizes, original = [], generation.decode
    monkeypatch.setattr(
        generation, "decode", lambda model, ids, *rest: sizes.append(ids.shape[0]) or original(model, ids, *rest)
    )
    overrides = sets("train.batch_size=2", "train.grad_accum=2", "eval.every=0", "eval.rouge_samples=0")
    result = run_cli(tiny, tmp_path / "run", "--recipe", "gkd", "-P", "prob=1", "--max-steps", "2", *overrides)
    assert result.exit_code == 0, result.output
    assert sizes == [4, 4]  # one call of 2 x 2 per step, not two of 2


def test_sft_trains_on_cross_entropy_alone_and_never_runs_the_teacher_in_a_step(tiny, tmp_path, monkeypatch):
    import distill.session
    import distill.teacher

    in_step, seen = {"on": False}, []
    real_loss, real_logits = distill.session.micro_loss, distill.teacher.response_logits

    def step_loss(*args, **kwargs):  # only training steps are counted, not evaluation
        in_step["on"] = True
        try:
            return real_loss(*args, **kwargs)
        finally:
            in_step["on"] = False

    def counted(model, batch, unwrap=lambda m: m):
        if in_step["on"]:
            seen.append(unwrap(model).config.num_hidden_layers)
        return real_logits(model, batch, unwrap)

    def no_teacher(*args, **kwargs):
        if in_step["on"]:
            pytest.fail("sft asked for the teacher's rows in a training step")
        return real_rows(*args, **kwargs)

    real_rows = distill.teacher.LiveTeacher.teacher_rows
    monkeypatch.setattr(distill.session, "micro_loss", step_loss)
    monkeypatch.setattr(distill.teacher, "response_logits", counted)
    monkeypatch.setattr(distill.teacher.LiveTeacher, "teacher_rows", no_teacher)
    # full logits, whose forwards response_logits counts (the fused heads' kd_weight 0: tests/test_fused.py)
    result = run_cli(tiny, tmp_path / "run", "--recipe", "sft", "--max-steps", "2", "--set", "train.fused_head=false")
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {1}  # the 1-layer student only: the 2-layer teacher never ran in a step
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "kd_weight: 0.0" in config and "ce_weight: 1.0" in config
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert "val_kl" in evals[-1]  # validation still measures the distance to the teacher
    # with kd_weight 0 the step's loss is ce_weight x cross-entropy
    half = run_cli(tiny, tmp_path / "half", "--recipe", "sft", "--max-steps", "1", "--set", "train.ce_weight=0.5")
    assert half.exit_code == 0, half.output
    whole = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["loss"]
    assert read_jsonl(tmp_path / "half" / "metrics.jsonl")[0]["loss"] == pytest.approx(whole / 2, rel=1e-5)


def test_nothing_to_train_and_a_bad_eval_cadence_are_one_line_errors(tiny, tmp_path):
    for setting, message in (("train.ce_weight=0", "nothing to train"), ("eval.every=weekly", "or `epoch`")):
        extra = ["--recipe", "sft"] if "ce_weight" in setting else []
        result = run_cli(tiny, tmp_path / "run", *extra, "--set", setting)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()


def test_eval_every_epoch_evaluates_where_each_pass_over_the_training_set_ends(tiny, tmp_path):
    import importlib

    session = importlib.import_module("distill.session")
    ends = session.eval_schedule("epoch", 5, 2)  # 5 micro-batches an epoch, 2 a step: epochs end in steps 3, 5, 8, 10
    assert [s for s in range(1, 11) if ends(s)] == [3, 5, 8, 10]
    assert [s for s in range(1, 7) if session.eval_schedule(3, 5, 2)(s)] == [3, 6]
    assert not any(session.eval_schedule(0, 5, 2)(s) for s in range(1, 7))
    # 48 examples, 2-3 held out: 5 micro-batches of 8 an epoch, 2 micro-batches a step
    out = tmp_path / "run"
    overrides = sets("eval.every=epoch", "eval.rouge_samples=0", "train.batch_size=8", "train.grad_accum=2")
    result = run_cli(tiny, out, "--recipe", "kd", "--max-steps", "9", *overrides)
    assert result.exit_code == 0, result.output
    assert [e["step"] for e in read_jsonl(out / "eval.jsonl")] == [0, 3, 5, 8, 9]


def test_sampled_rouge_draws_are_averaged_seeded_and_leave_the_training_generators_alone():
    from distill.data import Example
    from distill.evaluation import Evaluator

    class Coin:  # greedy: the reference; sampled: the reference or not, by the torch generator
        def __call__(self, model, examples, greedy=False, **kwargs):
            right = [greedy or bool(torch.rand(()) < 0.5) for _ in examples]
            return [Example(e.prompt_ids, [1] if ok else [0], reference=e.reference) for e, ok in zip(examples, right)]

    class Tokenizer:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return "alpha beta" if ids == [1] else "zzz"

    examples = [Example([i], [1], reference="alpha beta") for i in range(40)]
    evaluator = Evaluator(examples, Tokenizer(), None, Coin(), 8, rouge_samples=40, rouge_draws=3, seed=5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = evaluator._rouge("all")
    assert torch.equal(torch.get_rng_state(), state)
    assert first["rouge_l"] == 100.0
    assert (
        10.0 < first["rouge_l_sampled"] < 90.0 and (first["rouge_l_sampled"] * 120 / 100) % 1 < 1e-6
    )  # a mean of 120 scores of 0 or 100
    torch.manual_seed(1)
    assert evaluator._rouge("all") == first  # seeded by (seed, draw, rank), not by the training's state
    other = Evaluator(examples, Tokenizer(), None, Coin(), 8, rouge_samples=40, rouge_draws=3, seed=7)._rouge("all")
    assert other["rouge_l_sampled"] != first["rouge_l_sampled"]
    assert "rouge_l_sampled" not in evaluator._rouge("before")  # draws only in the final, full pass


def test_the_python_path_resolves_plans_and_trains_with_the_plans_plugins(tiny, tmp_path):
    """README's Python path: resolve_config -> plan_run -> train(plan); the run uses the plan's
    divergence and a fresh policy of the plan's class."""
    from distill.engine import train
    from distill.resolve import plan_run, resolve_config

    layer = {
        "teacher": str(tiny["teacher"]),
        "student": str(tiny["student"]),
        "data": {"path": str(tiny["data"])},
        "output_dir": str(tmp_path / "run"),
        "train": {"max_steps": 2, "batch_size": 4},
        "eval": {"every": 0, "rouge_samples": 0},
    }
    plan = plan_run(resolve_config(layer, {"divergence": {"name": "skew_rkl", "params": {"alpha": 0.2}}}, recipe="kd"))
    assert plan.objective.default.name == "skew_rkl" and plan.objective.default.params.alpha == 0.2
    result = train(plan)
    assert result.steps == 2 and result.sources == {"dataset": 2}
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "skew_rkl" in saved and "alpha: 0.2" in saved
