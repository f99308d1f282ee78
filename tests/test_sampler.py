"""Batches: shuffled, rank-sharded, resumable; grouped by length so padding is a small share."""

from __future__ import annotations

import random
import types

import pytest
from hypothesis import given, strategies as st

from distill.data import BatchSampler, Example, collate


def _lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(5, 100), rng.randint(1, 128)) for _ in range(n)]


def _take(sampler: BatchSampler, count: int) -> list[list[int]]:
    batches = iter(sampler)
    return [next(batches) for _ in range(count)]


def _padding_share(batches: list[list[int]], lengths: list[tuple[int, int]]) -> float:
    computed = real = 0
    for batch in batches:
        prompts, responses = [lengths[i][0] for i in batch], [lengths[i][1] for i in batch]
        computed += len(batch) * (max(prompts) + max(responses))
        real += sum(prompts) + sum(responses)
    return 1 - real / computed


@given(
    n=st.integers(8, 300),
    batch_size=st.integers(1, 8),
    world=st.integers(1, 3),
    seed=st.integers(0, 5),
    grouping=st.sampled_from([None, "step", "groups"]),
    accum=st.integers(1, 3),
)
def test_each_epoch_visits_every_example_at_most_once_and_drops_less_than_a_step(
    n, batch_size, world, seed, grouping, accum
):
    if n < batch_size * world:
        return
    lengths = _lengths(n, seed) if grouping else None
    per_step = batch_size * world
    # an epoch: every micro-batch the order fills; grouped in groups, only whole optimizer steps
    steps = (n - n % (per_step * accum)) // per_step if grouping == "groups" else n // per_step
    ranks = [
        _take(BatchSampler(n, batch_size, seed, rank, world, lengths, accum, grouping or "groups"), steps)
        for rank in range(world)
    ]
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == steps * per_step
    assert all(len(batch) == batch_size for rank in ranks for batch in rank)


def test_ranks_share_one_order_and_take_their_own_slices():
    lengths = _lengths(200)
    ranks = [_take(BatchSampler(200, 4, 3, rank, 2, lengths), 30) for rank in range(2)]
    alone = _take(BatchSampler(200, 8, 3, 0, 1, lengths), 30)
    assert [a + b for a, b in zip(*ranks)] == alone  # the same global step, split between the ranks
    # 2 processes x 2 micro-batches of 2 draw the optimizer steps that 1 process x 1 batch of 8 draws
    split = [_take(BatchSampler(200, 2, 3, rank, 2, lengths, grad_accum=2), 40) for rank in range(2)]
    steps = [sorted(split[0][2 * s] + split[1][2 * s] + split[0][2 * s + 1] + split[1][2 * s + 1]) for s in range(20)]
    assert steps == [sorted(batch) for batch in _take(BatchSampler(200, 8, 3, 0, 1, lengths), 20)]


def test_grouping_cuts_padding_and_the_order_still_changes_each_epoch():
    lengths = _lengths(800)
    steps = 800 // 8
    plain = _take(BatchSampler(800, 8, 0), 2 * steps)
    grouped = _take(BatchSampler(800, 8, 0, lengths=lengths), 2 * steps)
    assert _padding_share(grouped[:steps], lengths) < 0.5 * _padding_share(plain[:steps], lengths)
    assert grouped[:steps] != grouped[steps:]  # epoch 2 is another order
    assert sorted(map(sorted, grouped[:steps])) != sorted(map(sorted, grouped[steps:]))  # and other batches
    # long and short batches are spread over the epoch, not sorted
    longest = [max(lengths[i][1] for i in batch) for batch in grouped[:steps]]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("grouping", [None, "step", "groups"])
def test_a_restored_sampler_continues_the_same_batches(grouping):
    lengths = _lengths(100) if grouping else None
    whole = _take(
        BatchSampler(100, 4, 1, lengths=lengths, grad_accum=2, grouping=grouping or "groups"), 30
    )  # crosses two epoch boundaries
    first = BatchSampler(100, 4, 1, lengths=lengths, grad_accum=2, grouping=grouping or "groups")
    head = _take(first, 17)
    second = BatchSampler(100, 4, 1, lengths=lengths, grad_accum=2, grouping=grouping or "groups")
    second.load_state_dict(first.state_dict())
    assert head + _take(second, 13) == whole


def test_step_grouping_keeps_the_shuffled_steps_and_sorts_only_their_micro_batches():
    lengths = _lengths(800)
    accum, steps = 4, 800 // 8
    plain = _take(BatchSampler(800, 8, 0), steps)
    ranks = [
        _take(BatchSampler(800, 2, 0, rank, 2, lengths, grad_accum=2, grouping="step"), steps * 2) for rank in range(2)
    ]
    # 2 processes x 2 micro-batches of 2 per step: the same examples per optimizer step as 1 x 8 unsorted
    per_step = [sorted(i for m in range(2) for rank in ranks for i in rank[2 * s + m]) for s in range(steps)]
    assert per_step == [sorted(batch) for batch in plain]
    alone = _take(BatchSampler(800, 2, 0, lengths=lengths, grad_accum=accum, grouping="step"), steps * accum)
    for s in range(steps):  # the step's micro-batches come in length order
        keys = [
            BatchSampler._length_key(types.SimpleNamespace(lengths=lengths, RESPONSE_BUCKET=16), i)
            for b in alone[accum * s : accum * (s + 1)]
            for i in b
        ]
        assert keys == sorted(keys)
    assert _padding_share(alone, lengths) < 0.6 * _padding_share(plain, lengths)


def test_batch_counts_padding_positions():
    batch = collate([Example([1, 2, 3], [4, 5]), Example([1], [4, 5, 6, 7])], pad_id=0)
    assert batch.n_positions == 2 * (3 + 4) and batch.n_real == 5 + 5
