"""Evaluation over processes whose shards differ in size: every rank runs the same number of
forwards and generation calls (under FSDP / ZeRO-3 each is a collective), and the metrics are one
process's over the same examples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from cli_runs import run_script  # noqa: E402
from sharded_eval import BATCH_SIZE, PASSES, ROUGE_BEFORE, VAL_EXAMPLES, setup  # noqa: E402
from tiny_models import make_pair  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_pair(tmp_path_factory.mktemp("tiny"))["teacher"].parent


@pytest.fixture(scope="module")
def ranks(tiny, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    deadlock = f"the 2-process evaluation did not finish within {TIMEOUT} s (a deadlock?)"
    # debug_launcher forks its workers into the script's process group, which a timeout kills
    run_script("sharded_eval.py", str(tiny), str(out), timeout=TIMEOUT, deadlock=deadlock, show_output=True)
    return [json.loads((out / f"rank-{i}.json").read_text()) for i in range(2)]


def test_the_shards_are_uneven(ranks):
    assert all(r["val_examples"] == VAL_EXAMPLES for r in ranks)
    assert [r["shard"] for r in ranks] == [3, 2]  # 2 batches of BATCH_SIZE on rank 0, 1 on rank 1
    assert (
        BATCH_SIZE == 2 and ROUGE_BEFORE == 1
    )  # the first prompt, rank 0's: rank 1 has none to answer before training


@pytest.mark.parametrize("name", list(PASSES))
def test_every_rank_runs_the_same_forwards_and_generation_calls(ranks, name):
    counts = [r["passes"][name]["counts"] for r in ranks]
    assert counts[0] == counts[1]
    assert counts[0]["student"] >= 2 and counts[0]["teacher"] == (0 if name == "no_teacher" else 2)
    assert counts[0]["generate"] == {"all": 2, "before": 1, "no_teacher": 0}[name]


def test_the_metrics_are_one_process_s_over_the_same_examples(ranks, tiny):
    val, student, teacher, evaluator = setup(tiny)
    for name, options in PASSES.items():
        single = evaluator(student, teacher, **options)
        for rank in ranks:
            assert rank["passes"][name]["metrics"] == pytest.approx(single, rel=1e-5), name
    assert {"val_loss", "val_divergence", "val_kl", "rouge_l", "rouge_prompts", "rouge_l_subset"} <= set(
        ranks[0]["passes"]["all"]["metrics"]
    )
    all_prompts, before = ranks[0]["passes"]["all"]["metrics"], ranks[0]["passes"]["before"]["metrics"]
    assert all_prompts["rouge_prompts"] == VAL_EXAMPLES and before["rouge_prompts"] == ROUGE_BEFORE
    assert 0 < all_prompts["rouge_l"] < 100  # prompts score differently, so a prompt counted twice or lost would show
