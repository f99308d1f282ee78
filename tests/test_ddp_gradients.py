"""Loss normalisation across processes and micro-batches: the gradients of a global batch split over
2 DDP processes (x 2 micro-batches each, unequal token counts) equal one process's gradients of the
mean over every response token of that batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import distill
from distill.data import collate

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import run_script  # noqa: E402
from ddp_gradients import CE_WEIGHT, global_batch, models  # noqa: E402

TIMEOUT = 180


def reference_gradients() -> dict[str, torch.Tensor]:
    """One process, the whole global batch at once, plain torch: (sum of skew KL + CE_WEIGHT x CE
    over every response token) / their number."""
    teacher, student = models()
    batch = collate(global_batch(), pad_id=0)
    r = batch.response_mask.shape[1]
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits[:, -(r + 1) : -1][batch.response_mask]
    student_logits = student(**inputs).logits[:, -(r + 1) : -1][batch.response_mask]
    divergence = distill.get_divergence("skew_kl", alpha=0.1)
    per_token = divergence(student_logits, teacher_logits) + CE_WEIGHT * F.cross_entropy(
        student_logits, batch.labels[batch.response_mask], reduction="none"
    )
    per_token.mean().backward()
    return {name: p.grad for name, p in student.named_parameters()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    deadlock = f"the 2-process run did not finish within {TIMEOUT} s (a deadlock?)"
    run_script("ddp_gradients.py", str(out), timeout=TIMEOUT, deadlock=deadlock)
    return [torch.load(out / f"rank-{i}.pt", weights_only=True) for i in range(2)]


def assert_close(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-7, msg=name)


def test_the_split_is_uneven_and_the_denominator_is_global(ranks):
    counts = [r["counts"] for r in ranks]
    assert counts[0] == [21, 18] and counts[1] == [3, 8]  # ranks and micro-batches hold different token counts
    total = sum(map(sum, counts))
    assert [r["denominator"] for r in ranks] == [total / 2, total / 2]  # DDP averages over 2 processes


def test_two_processes_give_the_single_process_gradients_of_the_global_mean(ranks):
    reference = reference_gradients()
    assert_close(ranks[0]["global"], reference)
    assert_close(ranks[1]["global"], reference)  # DDP left every rank with the same gradients


def test_the_fused_heads_give_the_same_gradients_under_ddp(ranks):
    reference = reference_gradients()
    assert_close(ranks[0]["fused"], reference)
    assert_close(ranks[1]["fused"], reference)


def test_a_per_micro_batch_mean_would_not(ranks):
    """The control: normalising each micro-batch by its own tokens gives other gradients here, so the
    test above can fail."""
    reference = reference_gradients()
    with pytest.raises(AssertionError):
        assert_close(ranks[0]["per_micro_batch_mean"], reference)
