"""Building blocks for sampling policies: the context they generate through, a seeded draw, replay.

A policy's ``sample(step, total_steps, examples, context)`` receives the dataset examples of one
optimizer step and returns the examples to train on and their source. Its randomness comes from
``self.generator``, seeded identically on every process (``reseed``), so every rank takes the same
branch and enters generation together.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from distill.data import Example


@dataclass
class SamplingContext:
    """What a policy may call: generation from the student or the teacher (batched, KV cache)."""

    generate_student: Callable[[list[Example]], list[Example]]
    generate_teacher: Callable[[list[Example]], list[Example]]


class ReplayBuffer:
    """FIFO buffer of student-generated sequences, stored as token ids; at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[Example] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def add(self, examples: list[Example]) -> None:
        self.items.extend(Example(list(e.prompt_ids), list(e.response_ids)) for e in examples)

    def sample(self, n: int, generator: torch.Generator) -> list[Example]:
        """``n`` sequences drawn uniformly (without replacement while the buffer holds enough)."""
        if not self.items:
            raise RuntimeError("replay from an empty buffer")
        size = len(self.items)
        if n <= size:
            picks = torch.randperm(size, generator=generator)[:n].tolist()
        else:
            picks = torch.randint(size, (n,), generator=generator).tolist()
        return [self.items[i] for i in picks]

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "items": [(e.prompt_ids, e.response_ids) for e in self.items]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.items = deque((Example(list(p), list(r)) for p, r in state["items"]), maxlen=self.capacity)


class RandomPolicy:
    """Base for policies that draw: a CPU generator seeded identically on every rank, in the state."""

    def __init__(self, params) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(0)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def draw(self) -> float:
        """One U(0, 1) draw, identical on every rank."""
        return float(torch.rand((), generator=self.generator))

    def observe_eval(self, step: int, val_loss: float) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        """Numbers to log at each step, by name (none by default)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
