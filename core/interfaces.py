"""The two axes of a distillation method: a Divergence and a SamplingPolicy; and the Recipe preset.

Plugins implement these structurally (no base class needed). ``p`` is the teacher's next-token
distribution, ``q`` the student's; both come from logits over the whole vocabulary ``V``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping, Protocol, runtime_checkable

import torch

from distill.params import Params

Source = Literal["dataset", "teacher", "student", "replay", "mixed"]
"""Where an optimizer step's sequences came from (the ``source`` column of metrics.jsonl)."""


@runtime_checkable
class Divergence(Protocol):
    """A divergence D(p, q) between teacher and student next-token distributions.

    ``__call__`` maps ``student_logits [N, V]`` and ``teacher_logits [N, V]`` (float32, finite,
    temperature already applied by the core) to ``[N]`` float32 per-token values: a true divergence,
    0 when p = q and >= 0 always. No masking, chunking or reduction: the core owns those
    (``distill.divergence_loss``).
    """

    name: ClassVar[str]
    Params: ClassVar[type[Params]]

    def __init__(self, params: Params) -> None: ...

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class SamplingPolicy(Protocol):
    """Where the sequences of each optimizer step come from.

    ``sample`` receives the step's dataset examples (``grad_accum x batch_size`` of them, as
    ``distill.data.Example``: prompt and response token ids) and a ``distill.policy.SamplingContext``
    whose ``generate_student`` / ``generate_teacher`` return the same prompts with freshly sampled
    responses. It returns the examples to train on and their ``Source``, or several labelled groups
    ``{source: examples}``, each trained with its own term (``objective.terms.<source>``); an optional
    class attribute ``sources`` lists the sources it may return. All randomness must come
    from a generator seeded identically on every process (the engine calls ``reseed(seed)`` before
    training), so that every rank takes the same branch and generation under sharded training is
    entered together. ``observe_eval`` receives the student's validation loss at each evaluation
    (step 0 is before training). ``metrics()`` returns numbers logged at each step under their own
    names (the adaptive policy's ``sgo_prob``). ``state_dict`` / ``load_state_dict`` carry
    everything needed to resume exactly (probabilities, buffers, generator state).
    ``distill.policy.RandomPolicy`` is the base class: it gives ``reseed``, ``metrics`` (none),
    ``observe_eval`` (nothing) and the generator's state.

    ``bind(run)`` (optional, not a member the protocol checks): called once with a
    ``distill.policy.PolicyRun`` (the resolved config, the tokenizer, the training examples) after the
    data is loaded and before the run's folder is touched; a policy that reads files of its own
    (``contrastive`` with prepared pairs) checks them here and raises ``distill.ConfigError``.

    ``generates`` (an optional class attribute, not a member the protocol checks): whether the policy
    may train on generated sequences (student or teacher outputs, replayed ones included). Those need
    the live teacher: with a teacher cache, a policy whose ``generates`` is false (``offpolicy``;
    ``mixed`` at prob 0) trains without loading the teacher, and every sequence it picks must be in
    the cache. A policy without the attribute is assumed to generate
    (``distill.policy.policy_generates`` reads it).
    """

    name: ClassVar[str]
    Params: ClassVar[type[Params]]

    def __init__(self, params: Params) -> None: ...

    def sample(
        self, step: int, total_steps: int, examples: list[Any], context: Any
    ) -> tuple[list[Any], Source] | Mapping[str, list[Any]]: ...

    def observe_eval(self, step: int, val_loss: float) -> None: ...

    def reseed(self, seed: int) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Recipe:
    """A named preset: a divergence and a policy with their parameters, plus config overrides.

    Any field can be overridden by a config file or a command-line flag.
    """

    name: str
    description: str
    divergence: str
    policy: str
    divergence_params: Mapping[str, Any] = field(default_factory=dict)
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""
