"""Batches: shuffled, rank-sharded, resumable; grouped by length so padding is a small share."""

from __future__ import annotations

import random

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


@given(n=st.integers(8, 300), batch_size=st.integers(1, 8), world=st.integers(1, 3), seed=st.integers(0, 5), grouped=st.booleans())
def test_each_epoch_visits_every_example_at_most_once_and_drops_less_than_a_step(n, batch_size, world, seed, grouped):
    if n < batch_size * world:
        return
    lengths = _lengths(n, seed) if grouped else None
    per_step = batch_size * world
    steps = n // per_step
    ranks = [_take(BatchSampler(n, batch_size, seed, rank, world, lengths), steps) for rank in range(world)]
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


@pytest.mark.parametrize("grouped", [False, True])
def test_a_restored_sampler_continues_the_same_batches(grouped):
    lengths = _lengths(100) if grouped else None
    whole = _take(BatchSampler(100, 8, 1, lengths=lengths), 30)  # crosses two epoch boundaries
    first = BatchSampler(100, 8, 1, lengths=lengths)
    head = _take(first, 17)
    second = BatchSampler(100, 8, 1, lengths=lengths)
    second.load_state_dict(first.state_dict())
    assert head + _take(second, 13) == whole


def test_batch_counts_padding_positions():
    batch = collate([Example([1, 2, 3], [4, 5]), Example([1], [4, 5, 6, 7])], pad_id=0)
    assert batch.n_positions == 2 * (3 + 4) and batch.n_real == 5 + 5
