"""``train.fused_head``: the output heads fused into the loss give today's losses and gradients.

The reference is today's path, written out: the full logits from the head (``F.linear``, the
padded rows sliced off, soft-capped), then ``distill.divergence_loss`` and the token cross-entropy,
by ordinary autograd back to the hidden states, head weight and bias.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typer.testing import CliRunner

import distill
from cli_runs import pair_args, sets
from distill.cli import app
from distill.data import Example, collate
from distill.errors import ConfigError
from distill.evaluation import Evaluator
from distill.fused import Head, fused_loss, plan_fused_head
from distill.models import load_model, load_tokenizer, trim_head
from distill.loss import token_cross_entropy
from distill.objective import micro_batch_loss
from tiny_models import make_pair

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"]


def head(weight: torch.Tensor, bias: torch.Tensor | None, n: int, softcap: float | None) -> Head:
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    module.weight = torch.nn.Parameter(weight.clone())
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.clone())
    return Head(module, n, softcap)


def full_logits(h: Head, hidden: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, h.weight[: h.n], None if h.bias is None else h.bias[: h.n])
    return logits if h.softcap is None else torch.tanh(logits / h.softcap) * h.softcap


@st.composite
def problems(draw):
    """Hidden states ``[B, T, H]`` of both models, heads of V rows (n of them used), mask, labels."""
    b, t, hidden, vocab = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 6)),
        draw(st.integers(2, 12)),
    )
    n = draw(st.integers(2, vocab))
    floats = st.floats(-3, 3, width=32)

    def arrays(shape):
        return torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=floats)))

    return {
        "hidden": arrays((b, t, hidden)),
        "teacher_hidden": arrays((b, t, hidden)),
        "weight": arrays((vocab, hidden)),
        "teacher_weight": arrays((vocab, hidden)),
        "bias": arrays((vocab,)) if draw(st.booleans()) else None,
        "teacher_bias": arrays((vocab,)) if draw(st.booleans()) else None,
        "n": n,
        "softcap": draw(st.sampled_from([None, 2.0])),
        "teacher_softcap": draw(st.sampled_from([None, 3.0])),
        "mask": torch.from_numpy(draw(hnp.arrays(np.bool_, (b, t)))),
        "labels": torch.from_numpy(draw(hnp.arrays(np.int64, (b, t), elements=st.integers(0, n - 1)))),
        "temperature": draw(st.sampled_from([1.0, 0.7, 2.0])),
        "ce_weight": draw(st.sampled_from([0.0, 0.5])),
        "chunk": draw(st.integers(1, 4)),
        "block": draw(st.integers(1, 9)),
        "n_tokens": draw(st.sampled_from([None, 7.0])),
    }


def run(problem: dict, name: str, fused: bool):
    """Loss, parts and gradients (hidden, weight, bias) of one problem, fused or today's way."""
    d = distill.get_divergence(name, temperature=problem["temperature"])
    student = head(problem["weight"], problem["bias"], problem["n"], problem["softcap"])
    teacher = head(problem["teacher_weight"], problem["teacher_bias"], problem["n"], problem["teacher_softcap"])
    teacher.module.requires_grad_(False)
    hidden = problem["hidden"].clone().requires_grad_()
    mask, labels, n_tokens, ce_weight = problem["mask"], problem["labels"], problem["n_tokens"], problem["ce_weight"]
    if fused:
        loss, parts = fused_loss(
            student,
            hidden,
            teacher,
            problem["teacher_hidden"],
            d,
            mask,
            labels,
            ce_weight=ce_weight,
            n_tokens=n_tokens,
            chunk_size=problem["chunk"],
            block_size=problem["block"],
        )
    else:
        logits = full_logits(student, hidden)
        with torch.no_grad():
            teacher_logits = full_logits(teacher, problem["teacher_hidden"])
        loss = distill.divergence_loss(d, logits, teacher_logits, mask, n_tokens=n_tokens)
        parts = {"divergence": float(loss)}
        if ce_weight > 0:
            ce = token_cross_entropy(logits, labels, mask, n_tokens=n_tokens)
            parts["ce"] = float(ce)
            loss = loss + ce_weight * ce
    loss.backward()
    grads = [hidden.grad, student.weight.grad, None if student.bias is None else student.bias.grad]
    return float(loss.detach()), parts, grads


def at_tvd_kink(problem: dict) -> bool:
    """Whether some counted position has a token whose student and teacher probabilities are (all but)
    equal, e.g. both heads uniform: TVD's |p - q| has no gradient there."""
    with torch.no_grad():
        student = head(problem["weight"], problem["bias"], problem["n"], problem["softcap"])
        teacher = head(problem["teacher_weight"], problem["teacher_bias"], problem["n"], problem["teacher_softcap"])
        q = (full_logits(student, problem["hidden"]) / problem["temperature"]).softmax(-1)
        p = (full_logits(teacher, problem["teacher_hidden"]) / problem["temperature"]).softmax(-1)
    return bool(((p - q).abs() <= 1e-6)[problem["mask"]].any())


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25)
@given(problem=problems())
def test_fused_loss_and_gradients_equal_todays_path(name, problem):
    loss, parts, grads = run(problem, name, fused=True)
    expected_loss, expected_parts, expected_grads = run(problem, name, fused=False)
    assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-5)
    for key, value in expected_parts.items():
        assert parts[key] == pytest.approx(value, rel=1e-5, abs=1e-5)
    if name == "tvd" and at_tvd_kink(problem):
        return  # |p - q| is not differentiable where p_i = q_i: each path's rounding picks its own subgradient there
    for got, expected in zip(grads, expected_grads):
        if expected is None:
            assert got is None
            continue
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    rows = problem["weight"].shape[0]
    if problem["n"] < rows:  # the padded rows take no probability mass and get no gradient
        assert not grads[1][problem["n"] :].any()


def test_no_counted_position_gives_a_zero_loss_and_real_zero_gradients():
    student = head(torch.randn(5, 3), torch.randn(5), 5, None)
    teacher = head(torch.randn(5, 3), None, 5, None)
    hidden = torch.randn(2, 3, 3, requires_grad=True)
    loss, _ = fused_loss(
        student,
        hidden,
        teacher,
        torch.randn(2, 3, 3),
        distill.get_divergence("kl"),
        torch.zeros(2, 3, dtype=torch.bool),
        n_tokens=4.0,
    )
    loss.backward()
    assert (
        float(loss) == 0.0 and not hidden.grad.any() and not student.weight.grad.any() and not student.bias.grad.any()
    )


def test_a_third_party_divergence_runs_unchanged_through_the_fused_heads():
    class Hellinger:
        name = "hellinger"

        class Params(distill.Params):
            pass

        def __call__(self, student_logits, teacher_logits):
            p, q = teacher_logits.float().softmax(-1), student_logits.float().softmax(-1)
            return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)

    torch.manual_seed(0)
    weight, teacher_weight, hidden, teacher_hidden = (
        torch.randn(40, 6),
        torch.randn(40, 6),
        torch.randn(2, 9, 6),
        torch.randn(2, 9, 6),
    )
    student, teacher = head(weight, None, 40, None), head(teacher_weight, None, 40, None)
    x = hidden.clone().requires_grad_()
    loss, _ = fused_loss(student, x, teacher, teacher_hidden, Hellinger(), chunk_size=2, block_size=5)
    loss.backward()
    w = weight.clone().requires_grad_()
    y = hidden.clone().requires_grad_()
    expected = distill.divergence_loss(Hellinger(), F.linear(y, w), F.linear(teacher_hidden, teacher_weight))
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    torch.testing.assert_close(x.grad, y.grad)
    torch.testing.assert_close(student.weight.grad, w.grad)


def zero_share(*grads: torch.Tensor) -> float:
    """Percentage of the entries of ``grads`` that are exactly zero."""
    return 100 * sum(int((g == 0).sum()) for g in grads) / sum(g.numel() for g in grads)


@pytest.mark.parametrize("autocast", [False, True], ids=["float16-weights", "float16-autocast"])
def test_float16_heads_keep_the_small_gradients_a_grad_scaler_lifts(autocast):
    # float16 flushes values below ~6e-8 to zero: a rare token's (q - p) / n_tokens must meet the
    # GradScaler's factor in float32 first, as it does on the float32 full-logits path
    rows, width, vocab, grad_scale = 256, 64, 2048, 2.0**16
    generator = torch.Generator().manual_seed(0)
    weight, teacher_weight = (torch.randn(vocab, width, generator=generator) / width**0.5 for _ in range(2))
    hidden, teacher_hidden = (torch.randn(rows, width, generator=generator) for _ in range(2))
    # a language model's prior over its vocabulary: a constant feature of the hidden states times a
    # per-token rarity puts the rarest token e^-12 below the commonest at every position
    hidden[:, 0] = teacher_hidden[:, 0] = 1.0
    weight[:, 0] = teacher_weight[:, 0] = -torch.linspace(0, 12, vocab)
    weight, teacher_weight, hidden, teacher_hidden = (
        x.half() for x in (weight, teacher_weight, hidden, teacher_hidden)
    )
    if autocast:  # float32 parameters and hidden states, the head multiplying in float16
        weight, hidden = weight.float(), hidden.float()
    student, teacher = head(weight, None, vocab, None), head(teacher_weight, None, vocab, None)
    student.dtype = torch.float16
    teacher.module.requires_grad_(False)
    divergence = distill.get_divergence("kl")
    x = hidden.clone().requires_grad_()
    loss, _ = fused_loss(student, x, teacher, teacher_hidden, divergence, n_tokens=float(rows))
    loss.backward(torch.tensor(grad_scale))

    w32, x32 = weight.float().requires_grad_(), hidden.float().requires_grad_()
    expected = distill.divergence_loss(
        divergence, F.linear(x32, w32), F.linear(teacher_hidden.float(), teacher_weight.float()), n_tokens=float(rows)
    )
    expected.backward(torch.tensor(grad_scale))

    fused_grads, float32_grads = (x.grad, student.weight.grad), (x32.grad, w32.grad)
    assert all(got.dtype == weight.dtype and got.isfinite().all() for got in fused_grads)
    assert zero_share(*fused_grads) <= zero_share(*float32_grads) + 0.1
    for got, expected_grad in zip(fused_grads, float32_grads):
        assert float((got.float() - expected_grad).norm() / expected_grad.norm()) < 1e-2


# --- on tiny models: the engine's micro-batch loss and the evaluation, fused and not


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("fused")
    found = {}
    for name, options in {
        "padded": dict(student_vocab=320, teacher_vocab=304),
        "tied": dict(architecture="qwen2"),
        "softcap": dict(architecture="gemma2"),
        "gpt2": dict(architecture="gpt2"),
    }.items():
        (root / name).mkdir()
        found[name] = make_pair(root / name, **options)
    return found


def load_pair(paths: dict[str, Path]):
    tokenizer = load_tokenizer(str(paths["teacher"]))
    teacher, student = load_model(str(paths["teacher"]), "teacher"), load_model(str(paths["student"]), "student")
    teacher.requires_grad_(False)
    for model in (teacher, student):
        trim_head(model, len(tokenizer))
    examples = [Example([5, 6, 7, 8][: 2 + i % 3], [9 + i, 10, 11, 1][: 1 + i % 4]) for i in range(4)]
    return teacher, student, collate(examples, tokenizer.pad_token_id)


@pytest.mark.parametrize("pair", ["padded", "tied", "softcap", "gpt2"])
def test_micro_batch_loss_through_the_fused_heads_equals_full_logits(pairs, pair):
    teacher, student, batch = load_pair(pairs[pair])
    fused, line = plan_fused_head("auto", student, teacher, batch)
    assert fused is not None and line.startswith("fused head: on")
    if pair == "softcap":
        assert fused.student.softcap == student.config.final_logit_softcapping > 0
    if pair == "tied":
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    divergence = distill.get_divergence("skew_kl", alpha=0.1, temperature=2.0)
    results = []
    for path in (None, fused):
        student.zero_grad(set_to_none=True)
        loss, parts = micro_batch_loss(student, teacher, batch, divergence, 9.0, 0.5, fused=path)
        loss.backward()
        results.append(
            (float(loss), parts, {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None})
        )
    (fused_value, fused_parts, fused_grads), (value, parts, grads) = results[1], results[0]
    assert fused_value == pytest.approx(value, rel=1e-5) and fused_parts == pytest.approx(parts, rel=1e-5)
    assert set(fused_grads) == set(grads) and "lm_head.weight" in grads or student.config.tie_word_embeddings
    for key in grads:
        torch.testing.assert_close(fused_grads[key], grads[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kd_weight, normalize", [(0.5, "sequence"), (0.0, "sequence"), (2.0, "token")])
def test_weights_and_per_sequence_means_through_the_fused_heads_equal_full_logits(pairs, kd_weight, normalize):
    # train.kd_weight, train.normalize: sequence (DistiLLM-2) and skew_rkl with the mixture detached
    teacher, student, batch = load_pair(pairs["padded"])
    fused, _ = plan_fused_head("auto", student, teacher, batch)
    divergence = distill.get_divergence("skew_rkl", alpha=0.1, detach_mixture=True)
    results = []
    for path in (None, fused):
        student.zero_grad(set_to_none=True)
        loss, parts = micro_batch_loss(
            student, teacher, batch, divergence, 3.0, 0.3, kd_weight=kd_weight, normalize=normalize, fused=path
        )
        loss.backward()
        results.append(
            (float(loss), parts, {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None})
        )
    (value, parts, grads), (fused_value, fused_parts, fused_grads) = results
    assert fused_value == pytest.approx(value, rel=1e-5) and fused_parts == pytest.approx(parts, rel=1e-5)
    assert set(fused_grads) == set(grads)
    for key in grads:
        torch.testing.assert_close(fused_grads[key], grads[key], rtol=1e-4, atol=1e-6)


def test_mixed_precision_matches_the_full_logits_under_autocast(pairs):
    teacher, student, batch = load_pair(pairs["padded"])
    teacher = teacher.to(torch.bfloat16)
    fused, _ = plan_fused_head("auto", student, teacher, batch)
    divergence = distill.get_divergence("kl")
    results = []
    for path in (None, fused):
        student.zero_grad(set_to_none=True)
        forward = student.forward
        student.forward = torch.autocast("cpu", dtype=torch.bfloat16)(forward)  # what Accelerate does to the student
        try:
            loss, _ = micro_batch_loss(student, teacher, batch, divergence, 9.0, 0.0, fused=path)
        finally:
            del student.forward
        loss.backward()
        results.append((float(loss), student.lm_head.weight.grad.clone(), student.model.norm.weight.grad.clone()))
    assert fused.student.dtype == torch.bfloat16 and fused.teacher.dtype == torch.bfloat16
    assert results[1][0] == pytest.approx(results[0][0], rel=2e-3)
    for got, expected in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-3)


def test_evaluation_through_the_fused_heads_equals_full_logits(pairs):
    teacher, student, batch = load_pair(pairs["softcap"])
    examples = [Example([5, 6, 7][: 1 + i % 3], [9 + i, 10, 11, 1][: 1 + i % 4]) for i in range(5)]
    tokenizer = load_tokenizer(str(pairs["softcap"]["teacher"]))
    fused, _ = plan_fused_head("auto", student, teacher, batch)
    metrics = [
        Evaluator(
            examples, tokenizer, distill.get_divergence("jsd"), None, 2, 0, kl=distill.get_divergence("kl"), fused=f
        )(student, teacher)
        for f in (None, fused)
    ]
    assert metrics[1] == pytest.approx(metrics[0], rel=1e-5)
    assert set(metrics[0]) == {"val_loss", "val_divergence", "val_kl"}


# --- heads the fused path cannot serve


def test_a_lora_head_falls_back_with_a_line_or_is_an_error_when_required(pairs):
    import peft

    teacher, student, batch = load_pair(pairs["padded"])
    student = peft.get_peft_model(
        student, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM")
    )
    fused, line = plan_fused_head("auto", student, teacher, batch)
    assert (
        fused is None
        and line.startswith("fused head: off (the student's output head is a peft.")
        and "not a plain torch.nn.Linear" in line
    )
    with pytest.raises(
        ConfigError, match="train.fused_head true: the student's output head is a peft.*set train.fused_head=auto"
    ):
        plan_fused_head(True, student, teacher, batch)
    assert plan_fused_head(False, student, teacher, batch)[0] is None


def test_lora_elsewhere_keeps_the_fused_head_and_trains_the_adapters_alike(pairs):
    import peft

    teacher, student, batch = load_pair(pairs["padded"])
    student = peft.get_peft_model(
        student, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    fused, _ = plan_fused_head("auto", student, teacher, batch)
    assert fused is not None
    results = []
    for path in (None, fused):
        student.zero_grad(set_to_none=True)
        loss, _ = micro_batch_loss(student, teacher, batch, distill.get_divergence("rkl"), 9.0, 0.0, fused=path)
        loss.backward()
        results.append({k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None})
    assert results[0] and set(results[0]) == set(results[1]) and all("lora_" in k for k in results[0])
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-4, atol=1e-6)


def test_a_model_that_rescales_its_logits_falls_back(pairs):
    teacher, student, batch = load_pair(pairs["padded"])
    forward = student.forward

    def scaled(*args, **kwargs):  # as Cohere (logit_scale) and Granite (logits_scaling) do after the head
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.25
        return out

    student.forward = scaled
    fused, line = plan_fused_head("auto", student, teacher, batch)
    assert fused is None and line.startswith(
        "fused head: off (the student's logits are not its head's linear output (largest difference"
    )


runner = CliRunner()


def test_a_run_says_which_path_it_takes_and_both_paths_train_alike(pairs, tmp_path):
    paths = pairs["padded"]
    overrides = sets("train.batch_size=4", "eval.batch_size=8", "train.ce_weight=0.5")
    args = ["run", *pair_args(paths), "--max-steps", "2", *overrides]
    losses = {}
    for setting in ("auto", "false"):
        out = tmp_path / setting
        result = runner.invoke(app, [*args, "--output-dir", str(out), "--set", f"train.fused_head={setting}"])
        assert result.exit_code == 0, result.output
        expected = (
            "fused head: on (logits" if setting == "auto" else "fused head: off (train.fused_head=false): full logits"
        )
        assert expected in result.output
        losses[setting] = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    import json

    for fused_line, full_line in zip(losses["auto"], losses["false"]):
        assert json.loads(fused_line)["loss"] == pytest.approx(json.loads(full_line)["loss"], rel=1e-4)


def test_fused_head_setting_is_validated(pairs, tmp_path):
    paths = pairs["padded"]
    result = runner.invoke(app, ["run", *pair_args(paths, tmp_path / "x"), "--set", "train.fused_head=sometimes"])
    assert result.exit_code == 2 and "train.fused_head" in result.output
