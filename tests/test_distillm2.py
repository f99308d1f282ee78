"""DistiLLM-2: several groups per step, one term each (objective.terms), per-group normalisation,
skew_rkl's detach_mixture, the contrastive policy and the distillm2 recipe."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli_runs
import distill
from cli_runs import flags, read_jsonl, run_script, sets
from distill.cli import app
from distill.resolve import resolve_run as resolve_config  # `distill run`'s config: (config file, flags)
from distill.data import Example
from distill.errors import ConfigError, DistillError
from distill.objective import Objective, group_denominator, sequence_weights
from distill.policy import SamplingContext, as_groups
from distill.registry import default_registry
from tiny_models import make_pair, write_data

runner = CliRunner()


# --- the loss on fixed logits against a float64 re-computation of the official formula


def official_distillm2(chosen, rejected, alpha_1: float, alpha_2: float, beta: float) -> torch.Tensor:
    """jongwooko/distillm-2 ``loss_type: distillm_v2``, re-written here in float64: per token skew KL
    on the teacher's (chosen) responses, skew reverse KL with the student's share of the mixture
    detached on the student's (rejected) ones; each sequence's token mean; (2 - beta) x chosen +
    beta x rejected, averaged over pairs."""

    def sequence_means(per_token, mask):
        return (per_token * mask).sum(-1) / mask.sum(-1)

    s, t, m = chosen
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    mix = torch.logaddexp(math.log(alpha_1) + lp, math.log(1 - alpha_1) + lq)
    chosen_kl = sequence_means((lp.exp() * (lp - mix)).sum(-1), m)
    s, t, m = rejected
    lq, lp = s.log_softmax(-1), t.log_softmax(-1)
    mix = torch.logaddexp(math.log(1 - alpha_2) + lp, math.log(alpha_2) + lq.detach())
    rejected_kl = sequence_means((lq.exp() * (lq - mix)).sum(-1), m)
    return ((2 - beta) * chosen_kl + beta * rejected_kl).mean()


def fixed_group(seed: int, lengths: list[int], width: int = 7, vocab: int = 11):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(len(lengths), width, vocab, generator=generator, dtype=torch.float64) * 2
    teacher = torch.randn(len(lengths), width, vocab, generator=generator, dtype=torch.float64) * 2
    mask = torch.tensor([[i < n for i in range(width)] for n in lengths])
    return student, teacher, mask


def our_step_loss(objective: Objective, groups: dict, step: int, total: int, micro: int) -> torch.Tensor:
    """What the engine sums for one step: each group in micro-batches of ``micro`` rows, each normalised
    by its group's sequence count, each token weighted 1 / its sequence's length, times the term weight."""
    loss = torch.zeros((), dtype=torch.float32)
    for source, (student, teacher, mask) in groups.items():
        term = objective.term(source)
        denominator = group_denominator((float(mask.sum()), float(mask.any(-1).sum())), "sequence")
        for rows in torch.arange(len(mask)).split(micro):
            loss = loss + term.weight(step, total, objective.curriculum) * distill.divergence_loss(
                term.divergence,
                student[rows].float(),
                teacher[rows].float(),
                mask[rows],
                n_tokens=denominator,
                weights=sequence_weights(mask[rows]),
            )
    return loss


@pytest.mark.parametrize("step", [1, 3, 9])
def test_step_loss_and_student_gradient_equal_the_official_formula_in_float64(step):
    config = resolve_config(None, flags(recipe="distillm2", max_steps=10, settings=["objective.curriculum=true"]))
    objective = Objective(config, default_registry())
    chosen, rejected = fixed_group(0, [7, 3, 5, 1]), fixed_group(1, [2, 7, 6, 4])
    leaves = [chosen[0].float().requires_grad_(), rejected[0].float().requires_grad_()]
    ours = our_step_loss(
        objective, {"dataset": (leaves[0], *chosen[1:]), "student": (leaves[1], *rejected[1:])}, step, 10, micro=3
    )
    ours.backward()

    reference_leaves = [chosen[0].clone().requires_grad_(), rejected[0].clone().requires_grad_()]
    beta = 1.0 + 0.5 * min(1.0, 2 * (step - 1) / 10)  # the official curriculum at global_step = step - 1
    reference = official_distillm2(
        (reference_leaves[0], *chosen[1:]), (reference_leaves[1], *rejected[1:]), 0.1, 0.1, beta
    )
    reference.backward()
    assert float(ours.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for leaf, expected in zip(leaves, reference_leaves):
        torch.testing.assert_close(leaf.grad.double(), expected.grad, rtol=1e-4, atol=1e-7)

    # the detach matters: without it the student's gradient on its own responses differs
    plain = rejected[0].clone().requires_grad_()
    lq, lp = plain.log_softmax(-1), rejected[1].log_softmax(-1)
    mix = torch.logaddexp(math.log(0.9) + lp, math.log(0.1) + lq)
    (beta * (((lq.exp() * (lq - mix)).sum(-1) * rejected[2]).sum(-1) / rejected[2].sum(-1)).mean()).backward()
    assert not torch.allclose(plain.grad, reference_leaves[1].grad, atol=1e-6)


def test_token_normalisation_divides_each_group_by_its_own_tokens():
    config = resolve_config(None, flags(recipe="distillm2", settings=["train.normalize=token"]))
    objective = Objective(config, default_registry())
    student, teacher, mask = fixed_group(2, [7, 1, 4])
    term = objective.term("student")
    ours = distill.divergence_loss(
        term.divergence,
        student.float(),
        teacher.float(),
        mask,
        n_tokens=group_denominator((float(mask.sum()), 3.0), "token"),
    )
    lq, lp = student.log_softmax(-1), teacher.log_softmax(-1)
    values = (lq.exp() * (lq - torch.logaddexp(math.log(0.9) + lp, math.log(0.1) + lq))).sum(-1)
    assert float(ours.detach()) == pytest.approx(float(values[mask].mean()), rel=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.01, 0.99))
def test_detach_mixture_leaves_the_values_unchanged(seed, alpha):
    generator = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(5, 13, generator=generator) * 3, torch.randn(5, 13, generator=generator) * 3
    plain = distill.get_divergence("skew_rkl", alpha=alpha)(student, teacher)
    detached = distill.get_divergence("skew_rkl", alpha=alpha, detach_mixture=True)(student, teacher)
    torch.testing.assert_close(plain, detached)


# --- the policy's answer, the contrastive policy


def test_as_groups_reads_both_forms_and_names_a_broken_policy():
    examples = [Example([1], [2])]
    assert as_groups((examples, "dataset")) == {"dataset": examples}
    assert list(as_groups({"teacher": examples, "student": examples})) == ["teacher", "student"]
    for wrong in ([examples], {"a+b": examples}, {"student": []}, {}):
        with pytest.raises(TypeError, match="policy mine"):
            as_groups(wrong, "mine")


def counting_context(calls: list[tuple[str, int]]) -> SamplingContext:
    def student(examples):
        calls.append(("student", len(examples)))
        return [Example(e.prompt_ids, [100 + len(calls), 1]) for e in examples]

    def teacher(examples):
        calls.append(("teacher", len(examples)))
        return [Example(e.prompt_ids, [9, 1]) for e in examples]

    return SamplingContext(student, teacher)


def prompts(*ids: int) -> list[Example]:
    return [Example([3, i], [5, 1], reference=f"r{i}") for i in ids]


@pytest.mark.parametrize("teacher, source", [("dataset", "dataset"), ("generate", "teacher")])
def test_contrastive_returns_the_teacher_side_and_fresh_student_responses(teacher, source):
    calls: list = []
    policy = distill.get_policy("contrastive", teacher=teacher)
    groups = policy.sample(1, 10, prompts(1, 2), counting_context(calls))
    assert list(groups) == [source, "student"]
    assert [e.prompt_ids for e in groups["student"]] == [e.prompt_ids for e in groups[source]] == [[3, 1], [3, 2]]
    assert [e.response_ids for e in groups[source]] == ([[5, 1]] * 2 if teacher == "dataset" else [[9, 1]] * 2)
    policy.sample(2, 10, prompts(1, 2), counting_context(calls))
    assert calls.count(("student", 2)) == 2  # refresh_every 1: fresh every step


def test_refresh_every_reuses_a_prompts_response_until_it_is_stale_and_survives_a_checkpoint():
    calls: list = []
    context = counting_context(calls)
    policy = distill.get_policy("contrastive", refresh_every=3)
    first = policy.sample(1, 10, prompts(1, 2), context)["student"]
    again = policy.sample(2, 10, prompts(2, 3), context)["student"]  # prompt 2 kept, prompt 3 new
    assert calls == [("student", 2), ("student", 1)]
    assert again[0].response_ids == first[1].response_ids and again[0].reference == "r2"
    state = torch.load(_saved(policy.state_dict()), weights_only=True)  # as a checkpoint stores it
    restored = distill.get_policy("contrastive", refresh_every=3)
    restored.load_state_dict(state)
    for p in (policy, restored):
        calls.clear()
        out = p.sample(4, 10, prompts(1, 3), context)["student"]  # prompt 1 (step 1) is stale, 3 (step 2) is not
        assert calls == [("student", 1)] and out[1].response_ids == again[1].response_ids
    calls.clear()
    policy.sample(5, 10, prompts(1), context)  # generated at step 4
    assert calls == [("student", 0)]  # nothing to generate: it still calls (every rank enters generation together)


def _saved(state) -> Path:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


# --- configuration


def test_recipe_terms_curriculum_and_one_line_errors():
    config = resolve_config(None, flags(recipe="distillm2", max_steps=10))
    assert (config.divergence.name, config.policy.name, config.train.normalize) == (
        "skew_kl",
        "contrastive",
        "sequence",
    )
    objective = Objective(config, default_registry())
    assert objective.term("student").divergence.params.detach_mixture is True
    assert (
        objective.term("dataset").divergence.name == "skew_kl"
        and objective.term("dataset").divergence.params.alpha == 0.1
    )
    assert not objective.scheduled and objective.term("student").weight(10, 10, objective.curriculum) == 1.0
    curriculum = Objective(
        resolve_config(None, flags(recipe="distillm2", settings=["objective.curriculum=true"])), default_registry()
    )
    weights = [(curriculum.term("teacher").weight(s, 10), curriculum.term("student").weight(s, 10)) for s in (1, 6, 10)]
    assert weights == [(1.0, 1.0), (0.5, 1.5), (0.5, 1.5)]
    # a name alone replaces a term's divergence and drops its old params
    config = resolve_config(None, flags(recipe="distillm2", settings=["objective.terms.student=rkl"]))
    assert config.objective.terms["student"].divergence == "rkl" and config.objective.terms["student"].params == {}
    with pytest.raises(
        DistillError, match=r"^objective\.terms\.student: divergence 'skew_rkll': unknown; did you mean skew_rkl\?"
    ):
        Objective(
            resolve_config(None, flags(recipe="distillm2", settings=["objective.terms.student.divergence=skew_rkll"])),
            default_registry(),
        )
    with pytest.raises(ConfigError, match=r"objective\.terms\.student\.ramp"):
        resolve_config(None, flags(recipe="distillm2", settings=["objective.terms.student.ramp=0"]))
    with pytest.raises(ConfigError, match=r"train\.normalize"):
        resolve_config(None, flags(settings=["train.normalize=pairs"]))


# --- end to end on tiny models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    paths = make_pair(tmp_path_factory.mktemp("tiny"))
    paths["small"] = write_data(
        paths["data"].with_name("small.jsonl"), n=14
    )  # 13 to train on: prompts come back every 4 steps
    return paths


def run_args(tiny, out: Path, *extra: str, data: str = "data") -> list[str]:
    overrides = sets("train.batch_size=4", "train.lr=3e-3", "eval.batch_size=8", "generation.max_new_tokens=10")
    return cli_runs.run_args(tiny, out, "--recipe", "distillm2", "--seed", "1", *overrides, *extra, data=tiny[data])


def test_distillm2_run_logs_joined_sources_terms_and_the_configs_divergence(tiny, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app, run_args(tiny, out, "--max-steps", "3", "--set", "eval.every=0", "--set", "objective.curriculum=true")
    )
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["source"] for m in metrics] == ["teacher+student"] * 3  # the recipe samples the teacher side
    for m in metrics:
        assert set(m["terms"]) == {"teacher", "student"} and all(v > 0 for v in m["terms"].values())
        weights = m["term_weights"]
        assert m["loss"] == pytest.approx(
            weights["teacher"] * m["terms"]["teacher"] + weights["student"] * m["terms"]["student"], rel=1e-5
        )
    assert [m["term_weights"]["student"] for m in metrics] == pytest.approx(
        [1.0, 1.0 + 0.5 / 1.5, 1.5]
    )  # ramp: half of 3 steps
    evals = read_jsonl(out / "eval.jsonl")
    assert all({"val_loss", "val_divergence"} <= e.keys() for e in evals)
    assert "divergence:\n  name: skew_kl" in (out / "config.yaml").read_text()


def test_single_group_policies_log_as_before(tiny, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, run_args(tiny, out, "--recipe", "kd", "--max-steps", "1", "--set", "eval.every=0"))
    assert result.exit_code == 0, result.output
    (record,) = read_jsonl(out / "metrics.jsonl")
    assert record["source"] == "dataset" and "terms" not in record


def test_a_term_for_a_source_no_policy_returns_is_one_line_and_exit_2(tiny, tmp_path):
    result = runner.invoke(
        app, run_args(tiny, tmp_path / "run", "--max-steps", "1", "--set", "objective.terms.studnet.weight=2")
    )
    assert result.exit_code == 2
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(
            "error: objective.terms.studnet: no such source; policy contrastive returns dataset, teacher, student"
        )
    )


def test_resume_is_exact_with_kept_student_responses(tiny, tmp_path):
    """Prompts come back within refresh_every steps, so the kept responses decide later steps' losses."""
    extra = [
        "--max-steps",
        "6",
        "--set",
        "checkpoint.every=3",
        "--set",
        "eval.every=3",
        "-P",
        "refresh_every=5",
        "-P",
        "teacher=generate",
    ]
    reference = tmp_path / "reference"
    result = runner.invoke(app, run_args(tiny, reference, *extra, data="small"))
    assert result.exit_code == 0, result.output
    state = torch.load(reference / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=True)
    kept = state["ranks"][0]["policy"]["responses"]
    assert kept and all(type(t) is int for prompt, response, made in kept for t in [*prompt, *response, made])
    counts = [m["kept_responses"] for m in read_jsonl(reference / "metrics.jsonl")]
    assert (
        counts[3] == counts[2] and counts[5] < counts[4]
    )  # step 4 reused its prompts' responses; at step 6 step 1's are stale

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step-6")
    shutil.rmtree(out / "final")
    result = runner.invoke(app, run_args(tiny, out, *extra, "--resume", data="small"))
    assert result.exit_code == 0, result.output
    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert [m["step"] for m in ours] == list(range(1, 7))
    for a, b in zip(ours, theirs):
        assert (a["source"], a["tokens"], a["kept_responses"]) == (b["source"], b["tokens"], b["kept_responses"])
        assert a["loss"] == pytest.approx(b["loss"], rel=0, abs=1e-6) and a["terms"] == pytest.approx(
            b["terms"], rel=0, abs=1e-6
        )


def test_synced_generation_pads_the_ranks_with_fewer_prompts(tmp_path):
    """2 CPU processes; a deadlock fails after the timeout instead of hanging."""
    deadlock = "synced generation with 3 prompts on one rank and none on the other did not finish (a deadlock)"
    run_script("synced_generation.py", str(tmp_path), timeout=120, deadlock=deadlock)
    assert json.loads((tmp_path / "rank-0.json").read_text()) == [[5, 6, 0], [5, 6, 1], [5, 6, 2]]
    assert json.loads((tmp_path / "rank-1.json").read_text()) == []


def test_micro_batch_loss_with_sequence_normalisation_is_the_mean_of_sequence_means(tiny):
    """On the tiny models, in two micro-batches of a group: kd_weight x per-sequence KL means averaged
    over the group's sequences, plus ce_weight x the cross-entropy averaged the same way."""
    from transformers import AutoModelForCausalLM

    from distill.data import collate
    from distill.objective import micro_batch_loss

    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny["student"])
    examples = [Example([3, 4, 5], [8, 9, 1]), Example([3, 4], [10, 11, 12, 13, 14, 1]), Example([6], [7, 1])]
    divergence = distill.get_divergence("kl")
    ours = sum(
        float(
            micro_batch_loss(
                student, teacher, collate(part, 0), divergence, 3.0, 0.5, kd_weight=2.0, normalize="sequence"
            )[0].detach()
        )
        for part in (examples[:2], examples[2:])
    )
    reference = 0.0
    for example in examples:
        ids = torch.tensor([example.prompt_ids + example.response_ids])
        n = len(example.response_ids)
        with torch.no_grad():
            s = student(input_ids=ids).logits[0, -n - 1 : -1].double()
            t = teacher(input_ids=ids).logits[0, -n - 1 : -1].double()
        kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
        ce = torch.nn.functional.cross_entropy(s, torch.tensor(example.response_ids)).double()
        reference += (2.0 * kl + 0.5 * ce) / 3
    assert ours == pytest.approx(float(reference), rel=1e-4)
