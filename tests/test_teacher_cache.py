"""The teacher cache: coarse divergences (the math), distill cache-teacher (files, resume, two
processes), distill run --teacher-cache (no teacher forward, no teacher at all for off-policy runs),
and mismatched caches refused in one line."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cli_runs
import distill
import distill.session
import distill.teacher_cache as teacher_cache
from cli_runs import cache_args, cache_cli, read_jsonl, run_args, sets
from distill.cli import app
from distill.teacher_cache import TeacherCache, coarse_divergence_loss, coarse_log_probs, pack_targets, top_k_targets
from test_multiprocess import launch
from tiny_models import make_tokenizer

runner = CliRunner()
BUILTIN = ["kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"]
SMALL = sets("train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=8", "eval.every=2")


# --- the math


def coarse_value(d, student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """d on the coarse pair over the teacher's top-k ids and the rest, from full logits."""
    log_p, ids, rest = top_k_targets(teacher, k)
    return (
        coarse_divergence_loss(d, student.unsqueeze(0), pack_targets(log_p, ids, rest).unsqueeze(0)) * student.shape[0]
    )


logit_rows = st.integers(2, 40).flatmap(
    lambda v: st.tuples(
        st.lists(st.lists(st.floats(-12, 12), min_size=v, max_size=v), min_size=1, max_size=3),
        st.lists(st.lists(st.floats(-12, 12), min_size=v, max_size=v), min_size=1, max_size=3),
        st.integers(1, v),
    )
)


@pytest.mark.parametrize("name", BUILTIN)
@settings(max_examples=40)
@given(rows=logit_rows, scale=st.sampled_from([0.3, 1.0, 4.0]))
def test_coarse_divergence_is_at_most_the_full_one_and_equal_at_k_equal_v(name, rows, scale, single_thread):
    # data-processing inequality: both distributions mapped through one partition of the vocabulary
    student_rows, teacher_rows, k = rows
    n = min(len(student_rows), len(teacher_rows))
    student = torch.tensor(student_rows[:n], dtype=torch.float64).float() * scale
    teacher = torch.tensor(teacher_rows[:n], dtype=torch.float64).float()
    d = distill.get_divergence(name)
    full = d(student, teacher)
    v = student.shape[-1]
    for kk in (k, v):
        coarse = torch.stack([coarse_value(d, student[i : i + 1], teacher[i : i + 1], kk) for i in range(n)])
        assert (coarse <= full + 1e-5 + 1e-5 * full.abs()).all(), (name, kk, coarse, full)
    assert torch.allclose(coarse, full, atol=1e-5, rtol=1e-4), (name, coarse, full)  # K = V: nothing merged


def test_coarse_kl_matches_a_hand_computed_reference():
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    student = torch.tensor([[0.5, 1.5, -0.5, 0.0, 1.0]])
    p, q = (
        np.exp(teacher.numpy()[0]) / np.exp(teacher.numpy()[0]).sum(),
        np.exp(student.numpy()[0]) / np.exp(student.numpy()[0]).sum(),
    )
    # teacher's top 2: ids 0 and 1; the rest merges ids 2, 3, 4
    p2, q2 = np.array([p[0], p[1], p[2:].sum()]), np.array([q[0], q[1], q[2:].sum()])
    expected = float((p2 * np.log(p2 / q2)).sum())
    assert float(coarse_value(distill.get_divergence("kl"), student, teacher, 2)) == pytest.approx(expected, rel=1e-5)


def test_coarse_log_probs_are_normalised_and_stable_when_the_top_k_hold_almost_everything():
    logits = torch.tensor([[40.0, 0.0, -5.0, -6.0], [1.0, 1.0, 1.0, 1.0]], requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 0]])
    coarse = coarse_log_probs(logits, ids)
    assert torch.allclose(coarse.logsumexp(-1), torch.zeros(2), atol=1e-6)
    # the rest of row 0 is e^-45-ish: log(1 - sum) would give -inf or 0 in float32, the logsumexp does not
    expected_rest = float(
        torch.tensor([-5.0, -6.0], dtype=torch.float64).logsumexp(0)
        - torch.tensor([40.0, 0.0, -5.0, -6.0], dtype=torch.float64).logsumexp(0)
    )
    assert float(coarse[0, 2].detach()) == pytest.approx(expected_rest, rel=1e-5)
    coarse[:, -1].sum().backward()
    assert torch.isfinite(logits.grad).all()
    # all ids in the top-K: the rest is empty, values and gradients stay finite
    full = torch.randn(3, 6, requires_grad=True)
    log_p, ids, rest = top_k_targets(full.detach(), 6)
    assert torch.isinf(rest).all()
    loss = coarse_divergence_loss(
        distill.get_divergence("rkl"), full.unsqueeze(0), pack_targets(log_p, ids, rest).unsqueeze(0)
    )
    loss.backward()
    assert math.isfinite(float(loss)) and torch.isfinite(full.grad).all()


def test_coarse_loss_gradient_matches_autograd_and_honours_mask_and_temperature():
    torch.manual_seed(0)
    student = torch.randn(2, 5, 30, requires_grad=True)
    teacher = torch.randn(2, 5, 30)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    d = distill.get_divergence("skew_kl", alpha=0.2, temperature=2.0)
    log_p, ids, rest = top_k_targets(teacher.reshape(-1, 30), 7, temperature=2.0)
    packed = pack_targets(log_p, ids, rest).reshape(2, 5, -1)
    loss = coarse_divergence_loss(d, student, packed, mask, n_tokens=4.0)
    loss.backward()
    # the reference: the plugin on coarse log-probs built by plain autograd, masked positions only
    reference_input = student.detach().clone().requires_grad_(True)
    s = coarse_log_probs(reference_input.reshape(-1, 30) / 2.0, ids)
    t = torch.cat([log_p, rest.unsqueeze(-1)], -1)
    values = distill.get_divergence("skew_kl", alpha=0.2)(s, t).reshape(2, 5)
    expected = values[mask].sum() / 4.0
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(student.grad, reference_input.grad, atol=1e-6)
    assert (student.grad[0, 3:] == 0).all()


# --- cache-teacher and run --teacher-cache on tiny models


def run_cli(tiny, out: Path, *args: str, **models: Path):
    return cli_runs.run_cli(tiny, out, *SMALL, *args, **models)


def test_cache_teacher_writes_a_manifest_that_describes_the_cache(tiny, cache_k8):
    manifest = json.loads((cache_k8 / "manifest.json").read_text())
    assert manifest["teacher"] == str(tiny["teacher"]) and manifest["tokenizer"] == str(tiny["teacher"])
    assert manifest["top_k"] == 8 and manifest["vocabulary"] == 300
    assert manifest["train_examples"] + manifest["validation_examples"] == 48
    cache = TeacherCache(cache_k8)
    assert manifest["examples"] == len(cache.index) > 0
    assert manifest["tokens"] == sum(n for _, _, n in cache.index.values())
    files = [f for part in (cache_k8 / "parts").iterdir() for f in part.iterdir()]
    assert manifest["bytes"] == sum(f.stat().st_size for f in files)
    # payload: float16 log-probs + uint16 ids (300 < 65536) + float32 rest = 8*2 + 8*2 + 4 bytes per token
    assert sum(np.load(f).nbytes for f in files if f.suffix == ".npy") == manifest["tokens"] * 36
    assert len(manifest["fingerprint"]) == 32 and manifest["storage"] == {
        "logprobs": "float16",
        "ids": "uint16",
        "rest": "float32",
    }


def test_cached_targets_are_the_teachers_top_k(tiny, cache_k8):
    from transformers import AutoModelForCausalLM

    from distill.config import DataConfig
    from distill.data import collate, load_examples
    from distill.models import load_tokenizer
    from distill.objective import response_logits

    tokenizer = load_tokenizer(str(tiny["teacher"]))
    train, val, _ = load_examples(DataConfig(path=str(tiny["data"])), tokenizer, 0)
    examples = (train + val)[:3]
    teacher = AutoModelForCausalLM.from_pretrained(tiny["teacher"]).eval()
    batch = collate(examples, tokenizer.pad_token_id)
    packed = TeacherCache(cache_k8).targets(examples, batch.response_mask.shape[1])
    with torch.no_grad():
        logits = response_logits(teacher, batch)
    for row, e in enumerate(examples):
        n = len(e.response_ids)
        log_p, ids, rest = top_k_targets(logits[row, :n], 8)
        assert torch.equal(packed[row, :n, 8:16].long(), ids)
        assert torch.allclose(packed[row, :n, :8], log_p, atol=2e-2)  # float16 log-probs
        assert torch.allclose(packed[row, :n, 16], rest, atol=1e-4)
        assert (packed[row, n:] == 0).all()
    assert (
        TeacherCache(cache_k8).targets([type(e)(e.prompt_ids, e.response_ids[:-1] + [5]) for e in examples[:1]], 10)
        is None
    )


def test_offpolicy_run_on_a_cache_never_loads_the_teacher_and_logs_coarse_validation(
    tiny, cache_k8, tmp_path, monkeypatch
):
    roles = []
    original = distill.session.load_model
    monkeypatch.setattr(
        distill.session, "load_model", lambda ref, role, *a, **k: roles.append(role) or original(ref, role, *a, **k)
    )
    result = run_cli(tiny, tmp_path / "run", "--recipe", "kd", "--max-steps", "4", "--teacher-cache", str(cache_k8))
    assert result.exit_code == 0, result.output
    assert roles == ["student"], roles
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["source"] for m in metrics] == ["dataset"] * 4 and all(math.isfinite(m["loss"]) for m in metrics)
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["val_kl"] > 0 for e in evals)
    assert "cache: " + str(cache_k8) in (tmp_path / "run" / "config.yaml").read_text()


def test_a_full_vocabulary_cache_trains_like_the_live_teacher(tiny, tmp_path):
    # K = V keeps everything: the losses match the live teacher's up to float16 log-probs
    assert cache_cli(tiny, tmp_path / "k300", "--top-k", "300").exit_code == 0
    common = ["--recipe", "kd", "--max-steps", "3", "--set", "train.lr=3e-3", "--set", "train.ce_weight=0.5"]
    assert run_cli(tiny, tmp_path / "cached", *common, "--teacher-cache", str(tmp_path / "k300")).exit_code == 0
    assert run_cli(tiny, tmp_path / "live", *common).exit_code == 0
    cached, live = read_jsonl(tmp_path / "cached" / "metrics.jsonl"), read_jsonl(tmp_path / "live" / "metrics.jsonl")
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in live], rel=1e-3)
    cached_eval, live_eval = (
        read_jsonl(tmp_path / "cached" / "eval.jsonl"),
        read_jsonl(tmp_path / "live" / "eval.jsonl"),
    )
    assert cached_eval[-1]["val_kl"] == pytest.approx(live_eval[-1]["val_kl"], rel=1e-2)


def count_teacher_rows(monkeypatch) -> dict[str, int]:
    """Training micro-batches whose teacher rows come from the cache, and from the live teacher."""
    import distill.teacher

    calls = {"cached": 0, "live": 0}
    real = distill.teacher.CacheOrLive.teacher_rows

    def counting(self, batch, index, prepared):
        calls["live" if prepared is None else "cached"] += 1
        return real(self, batch, index, prepared)

    monkeypatch.setattr(distill.teacher.CacheOrLive, "teacher_rows", counting)
    return calls


def test_generating_policy_with_a_cache_uses_the_live_teacher_for_generated_steps(
    tiny, cache_k8, tmp_path, monkeypatch
):
    calls = count_teacher_rows(monkeypatch)
    result = run_cli(
        tiny,
        tmp_path / "run",
        "--recipe",
        "gkd",
        "-P",
        "prob=0.5",
        "--max-steps",
        "6",
        "--seed",
        "1",
        "--teacher-cache",
        str(cache_k8),
    )
    assert result.exit_code == 0, result.output
    sources = [m["source"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert calls == {"cached": sources.count("dataset"), "live": sources.count("student")} and set(sources) == {
        "dataset",
        "student",
    }


def test_distillm2_with_a_cache_reads_it_for_the_dataset_group_and_runs_the_teacher_for_the_students(
    tiny, tmp_path, monkeypatch
):
    # two groups a step: the dataset's responses from the cache, the student's through the live teacher;
    # at K = V, with per-sequence means (train.normalize: sequence), the losses are the live run's
    assert cache_cli(tiny, tmp_path / "k300", "--top-k", "300").exit_code == 0
    calls = count_teacher_rows(monkeypatch)
    # the dataset's responses on the teacher side; greedy training samples (the recipe samples at 0.8 otherwise)
    common = [
        "--recipe",
        "distillm2",
        "-P",
        "teacher=dataset",
        "--max-steps",
        "2",
        "--set",
        "generation.train.temperature=0",
    ]
    assert run_cli(tiny, tmp_path / "cached", *common, "--teacher-cache", str(tmp_path / "k300")).exit_code == 0
    assert calls["cached"] == calls["live"] == 2  # one micro-batch of each group a step (train.batch_size 4, 4 prompts)
    assert run_cli(tiny, tmp_path / "live", *common).exit_code == 0
    cached, live = read_jsonl(tmp_path / "cached" / "metrics.jsonl"), read_jsonl(tmp_path / "live" / "metrics.jsonl")
    assert [m["source"] for m in cached] == ["dataset+student"] * 2
    assert [m["loss"] for m in cached] == pytest.approx([m["loss"] for m in live], rel=1e-3)
    assert [m["terms"]["dataset"] for m in cached] == pytest.approx([m["terms"]["dataset"] for m in live], rel=1e-3)


@pytest.mark.parametrize("case", ["data", "tokenization", "teacher", "tokenizer", "temperature"])
def test_a_mismatched_cache_is_one_line_exit_2_and_nothing_written(tiny, cache_k8, tmp_path, case):
    args = ["--recipe", "kd", "--max-steps", "2", "--teacher-cache", str(cache_k8)]
    if case == "data":
        other = tmp_path / "other.jsonl"
        other.write_text("".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}."}) + "\n" for i in range(20)))
        result = run_cli(tiny, tmp_path / "run", *args, data=other)
        expected = "other data or another tokenization"
    elif case == "tokenization":
        result = run_cli(tiny, tmp_path / "run", *args, "--set", "data.max_response_tokens=4")
        expected = "other data or another tokenization"
    elif case == "teacher":
        result = run_cli(tiny, tmp_path / "run", *args, teacher=tiny["student"])
        expected = "was made with teacher"
    elif case == "tokenizer":
        other = tmp_path / "other-tokenizer"
        make_tokenizer(other, pad_token="<pad>")  # one more special token: another token -> id map
        result = run_cli(
            tiny, tmp_path / "run", *args, "--set", f"tokenizer={other}", "--set", f"student.tokenizer={other}"
        )
        expected = "another tokenizer"
    else:
        result = run_cli(tiny, tmp_path / "run", *args, "--set", "divergence.temperature=2")
        expected = "temperature"
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()


def test_cache_teacher_refuses_bad_input_and_a_finished_cache_without_overwrite(tiny, cache_k8, tmp_path):
    for args, expected in ((["--top-k", "301"], "--top-k 301"), (["--top-k", "0"], "--top-k 0")):
        result = cache_cli(tiny, tmp_path / "bad", *args)
        assert result.exit_code == 2 and expected in result.output and len(result.output.strip().splitlines()) == 1, (
            result.output
        )
        assert not (tmp_path / "bad").exists()
    result = cache_cli(tiny, cache_k8, "--top-k", "8")
    assert result.exit_code == 2 and "finished teacher cache" in result.output, result.output
    result = runner.invoke(app, run_args(tiny, tmp_path / "run", "--teacher-cache", str(tmp_path / "nowhere")))
    assert result.exit_code == 2 and "not a teacher cache" in result.output and not (tmp_path / "run").exists(), (
        result.output
    )


def test_an_interrupted_cache_is_continued_by_the_same_command(tiny, cache_k8, tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_cache, "PART_EXAMPLES", 6)
    out = tmp_path / "cache"
    assert cache_cli(tiny, out, "--top-k", "8").exit_code == 0
    parts = sorted((out / "parts").iterdir())
    assert len(parts) >= 3
    # interrupted: the manifest and the last part never written, a half-written part left behind
    (out / "manifest.json").unlink()
    shutil.rmtree(parts[-1])
    (out / "parts" / ".r000-00099.tmp").mkdir()
    kept = {p.name: (p / "logprobs.npy").stat().st_mtime_ns for p in parts[:-1]}
    result = runner.invoke(app, run_args(tiny, tmp_path / "run", "--teacher-cache", str(out)))
    assert result.exit_code == 2 and "unfinished" in result.output, result.output
    result = cache_cli(tiny, out, "--top-k", "8")
    assert result.exit_code == 0 and "continuing" in result.output, result.output
    assert {p.name: (p / "logprobs.npy").stat().st_mtime_ns for p in parts[:-1]} == kept  # not recomputed
    assert not list((out / "parts").glob(".*"))
    resumed, whole = (
        json.loads((out / "manifest.json").read_text()),
        json.loads((cache_k8 / "manifest.json").read_text()),
    )
    assert {k: resumed[k] for k in ("examples", "tokens", "fingerprint")} == {
        k: whole[k] for k in ("examples", "tokens", "fingerprint")
    }
    # other settings on an unfinished cache: refused
    (out / "manifest.json").unlink()
    result = cache_cli(tiny, out, "--top-k", "4")
    assert result.exit_code == 2 and "top_k" in result.output, result.output


def test_two_processes_split_the_cache(tiny, cache_k8, tmp_path):
    out = tmp_path / "cache"
    # process 1 reads the folder late (tests/late_reader.py): still every sequence is cached once
    launch([str(Path(__file__).with_name("late_reader.py")), *cache_args(tiny, out, "--top-k", "8")])
    assert sorted(p.name.split("-")[0] for p in (out / "parts").iterdir()) == ["r000", "r001"]
    two, one = json.loads((out / "manifest.json").read_text()), json.loads((cache_k8 / "manifest.json").read_text())
    assert {k: two[k] for k in ("examples", "tokens", "fingerprint")} == {
        k: one[k] for k in ("examples", "tokens", "fingerprint")
    }
    two_processes, one_process = TeacherCache(out), TeacherCache(cache_k8)
    assert sorted(two_processes.index) == sorted(one_process.index)
    from distill.config import DataConfig
    from distill.data import load_examples
    from distill.models import load_tokenizer

    train, val, _ = load_examples(DataConfig(path=str(tiny["data"])), load_tokenizer(str(tiny["teacher"])), 0)
    width = max(len(e.response_ids) for e in train + val)
    a, b = two_processes.targets(train + val, width), one_process.targets(train + val, width)
    # other batches, other padding: the same values up to rounding (and ids up to near-ties)
    assert torch.allclose(a[..., :8], b[..., :8], atol=1e-2) and torch.allclose(a[..., 16], b[..., 16], atol=1e-3)
    assert (a[..., 8:16] == b[..., 8:16]).float().mean() > 0.95


def test_which_policies_need_the_live_teacher_with_a_cache():
    from distill.policy import policy_generates

    assert not policy_generates(distill.get_policy("offpolicy"))
    assert not policy_generates(distill.get_policy("mixed", prob=0.0))
    assert policy_generates(distill.get_policy("mixed", prob=0.5))
    assert policy_generates(distill.get_policy("adaptive_offpolicy"))  # phi may rise: it generates then
    assert policy_generates(object())  # a plugin that does not say: assumed to generate
