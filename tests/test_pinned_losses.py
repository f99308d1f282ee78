"""Today's per-step losses of every recipe, fused head or not, teacher cache or not, on tiny models
(``tests/pinned_losses.py`` makes them; ``tests/data/pinned_losses.json`` holds the pins). Code that
moves must not move these numbers beyond float32 rounding."""

from __future__ import annotations

import json

import pytest

from pinned_losses import PINS, cases, run_cases

REL = 1e-5


@pytest.fixture(scope="module")
def found(tmp_path_factory) -> dict[str, list[dict]]:
    return run_cases(tmp_path_factory.mktemp("pins"))


def test_every_case_is_pinned():
    assert sorted(json.loads(PINS.read_text())) == sorted(cases())


@pytest.mark.parametrize("name", sorted(cases()))
def test_per_step_losses_repeat_the_pins(found, name):
    pinned = json.loads(PINS.read_text())[name]
    steps = found[name]
    assert [s["source"] for s in steps] == [s["source"] for s in pinned]
    for ours, theirs in zip(steps, pinned):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=REL), (name, ours["step"])
        assert ours.get("terms", {}) == pytest.approx(theirs.get("terms", {}), rel=REL), (name, ours["step"])
