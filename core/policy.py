"""Building blocks for sampling policies: the context they generate through, a seeded draw, replay.

A policy's ``sample(step, total_steps, examples, context)`` receives the dataset examples of one
optimizer step and returns the examples to train on and their source, ``(examples, source)``, or
several labelled groups, ``{source: examples}`` (each group gets its own loss term,
``objective.terms.<source>``; ``as_groups`` reads either form). Its randomness comes from
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
    """What a policy may call: generation from the student or the teacher (batched, KV cache), and
    ``generate_mixed(examples, alpha)``: teacher-mixed sampling, each response token drawn from
    alpha x p + (1 - alpha) x q, the responses carrying their ``rollout`` (``distill.sequence``)."""

    generate_student: Callable[[list[Example]], list[Example]]
    generate_teacher: Callable[[list[Example]], list[Example]]
    generate_mixed: Callable[[list[Example], float], list[Example]] | None = None


@dataclass(frozen=True)
class PolicyRun:
    """What a policy's optional ``bind(run)`` sees, once, before the run's folder is touched: the
    resolved config, the tokenizer of the training sequences, the training examples, and whether the
    teacher's and the student's tokenizers differ (``apart``)."""

    cfg: Any
    tokenizer: Any
    train_set: list[Example]
    apart: bool


def policy_generates(policy) -> bool:
    """Whether a sampling policy may train on generated sequences, which need the live teacher (the
    ``generates`` attribute of ``distill.interfaces.SamplingPolicy``; a policy that does not say is
    assumed to generate)."""
    return bool(getattr(policy, "generates", True))


def as_groups(sampled: Any, policy_name: str = "policy") -> dict[str, list[Example]]:
    """A policy's answer as ``{source: examples}``: ``(examples, source)`` is one group.

    The groups keep the policy's order (the same on every process). A malformed answer is a bug in
    the policy and raises ``TypeError`` naming it.
    """
    if isinstance(sampled, Mapping):
        groups = dict(sampled)
    elif isinstance(sampled, tuple) and len(sampled) == 2 and isinstance(sampled[1], str):
        groups = {sampled[1]: sampled[0]}
    else:
        raise TypeError(
            f"policy {policy_name}: sample() must return (examples, "
            f"source) or {{source: examples}}, got {type(sampled).__name__}"
        )
    if not groups:
        raise TypeError(f"policy {policy_name}: sample() returned no group")
    for source, examples in groups.items():
        if not isinstance(source, str) or not source or "+" in source:
            raise TypeError(f"policy {policy_name}: a source must be a non-empty string without '+', got {source!r}")
        if not isinstance(examples, list) or not examples or not all(isinstance(e, Example) for e in examples):
            raise TypeError(f"policy {policy_name}: group {source!r} must be a non-empty list of distill.Example")
    return groups


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
