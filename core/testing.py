"""A conformance kit for plugin authors: call it from your own tests.

::

    from distill.testing import check_divergence, check_policy

    def test_hellinger_conforms():
        check_divergence(Hellinger)               # or check_divergence(Power, lam=1.0)

    def test_warmup_conforms():
        check_policy(Warmup, warmup_steps=2, prob=0.5)

Each function runs named checks (``distill.testing.DIVERGENCE_CHECKS``, ``POLICY_CHECKS``) against the
plugin class built with ``params``, validated the way the registry validates them (an invalid value
raises ``distill.ConfigError`` naming the field, as ``distill.get_divergence`` does). A check that
fails raises ``AssertionError`` whose message names the property and gives a counter-example: the
inputs hypothesis found (shrunk), or the step and the values that differ.

``parametrize_with_checks`` runs the same checks one per pytest case, as scikit-learn's does, so a
report names the property a plugin breaks (``hellinger-zero_at_equal``) and the others still run::

    from distill.testing import parametrize_with_checks

    @parametrize_with_checks([Hellinger, (Power, {"lam": 1.0}), (Warmup, {"warmup_steps": 2})])
    def test_conforms(plugin, check):
        check(plugin)

The properties with random inputs are driven by hypothesis, which this module needs
(``pip install 'distill[testing]'``); ``max_examples`` sets how many inputs each one tries (by default
25 for a divergence and 10 for a policy, scaled by the active hypothesis profile's ``max_examples`` / 100).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import random
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from pydantic import ValidationError

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError as error:  # the training path never needs it; plugin authors' tests do
    raise ImportError(
        "distill.testing needs hypothesis: pip install 'distill[testing]' (or pip install hypothesis)"
    ) from error

from distill.data import Example
from distill.divergence import ConfiguredDivergence, prepare_logits
from distill.errors import PluginError
from distill.interfaces import Source
from distill.params import describe_validation_error, validate_params
from distill.policy import SamplingContext
from distill.registry import Registry

__all__ = ["DIVERGENCE_CHECKS", "POLICY_CHECKS", "check_divergence", "check_policy", "parametrize_with_checks"]

SOURCES = frozenset(typing.get_args(Source))
EXTREME = 1e4
"""The largest logit magnitude the checks feed (real models reach a few hundred; bf16 and fp16 hold it)."""
ZERO_TOLERANCE = 1e-5
"""|D(p, p)| allowed: float32 rounding of log-probabilities, not a modelling error."""
DEFAULT_EXAMPLES = {"divergence": 25, "policy": 10}
"""Inputs each property tries when ``max_examples`` is not given (scaled by the hypothesis profile)."""


# --- the shared machinery: one named property, its hypothesis run, its failure message


def _fail(kind: str, plugin_cls: type, prop: str, detail: str) -> None:
    raise AssertionError(f"check_{kind}({getattr(plugin_cls, 'name', plugin_cls.__name__)}): {prop}: {detail}")


def _examples(max_examples: int | None, default: int) -> int:
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        return max_examples
    return max(1, default * settings.default.max_examples // 100)


def _run(label: str, strategy: st.SearchStrategy, test: Callable[[Any], None], max_examples: int) -> None:
    """``test`` on ``max_examples`` inputs drawn from ``strategy``; the shrunk failure propagates."""
    run = settings(
        max_examples=max_examples, deadline=None, report_multiple_bugs=False, suppress_health_check=list(HealthCheck)
    )(given(strategy)(test))
    try:
        run()
    except AssertionError:
        raise
    except Exception as error:  # e.g. hypothesis's Flaky: a failure that did not happen again on the same input
        raise AssertionError(f"{label}: {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _quiet_threads() -> Iterator[None]:
    """One intra-op thread: the checks use tiny tensors, for which a busy thread pool costs far more
    than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _show(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)} {tensor.detach().float().tolist()}"


@dataclass(frozen=True)
class Check:
    """One named property of the plugin contract; calling it checks that property alone.

    ``prop`` is what its failure message names, ``id`` the second half of its pytest case id
    (``hellinger-zero_at_equal``). A check of the class itself (registration, parameters) has no
    ``inputs`` and runs ``test(check, plugin_cls, params)``; a property runs ``test(plugin, input)``
    on each of the hypothesis ``inputs``, ``plugin`` being the plugin under test (``_Divergence``,
    ``_Policy``) built from validated ``params``.
    """

    kind: str
    id: str
    prop: str
    test: Callable[..., None]
    inputs: st.SearchStrategy | None = None

    def __call__(self, plugin_cls: type, *, max_examples: int | None = None, **params: Any) -> None:
        """Check ``plugin_cls`` built with ``params``: raises ``distill.ConfigError`` if ``params``
        are invalid and ``AssertionError`` naming ``prop``, with a counter-example, if it breaks."""
        if self.inputs is None:
            self.test(self, plugin_cls, params)
            return
        values = validate_params(plugin_cls.Params, dict(params), f"{self.kind} {plugin_cls.name}")
        plugin = _UNDER_TEST[self.kind](plugin_cls, values, self.prop)

        def run(example: Any) -> None:
            self.test(plugin, example)

        run.__name__ = run.__qualname__ = self.id  # hypothesis's report: "Falsifying example: zero_at_equal(...)"
        n = _examples(max_examples, DEFAULT_EXAMPLES[self.kind])
        with _quiet_threads():
            _run(f"check_{self.kind}({plugin_cls.name}): {self.prop}", self.inputs, run, n)


def _registration(check: Check, plugin_cls: type, params: Mapping[str, Any]) -> None:
    try:
        Registry().add(check.kind, plugin_cls, provider="distill.testing")
    except PluginError as error:
        _fail(check.kind, plugin_cls, check.prop, str(error))


def _params(check: Check, plugin_cls: type, params: Mapping[str, Any]) -> None:
    """``params`` validated as the registry validates them; then every declared default must pass
    its own field (pydantic does not validate defaults, so a default out of its range goes unnoticed)."""
    kind, fields = check.kind, plugin_cls.Params.model_fields
    if kind == "divergence" and "temperature" in fields:
        _fail(kind, plugin_cls, check.prop, "`temperature` belongs to the core; do not declare it")
    values = validate_params(plugin_cls.Params, dict(params), f"{kind} {plugin_cls.name}")
    for name, info in fields.items():
        if info.is_required():
            continue
        default = info.get_default(call_default_factory=True)
        try:
            plugin_cls.Params.model_validate({**values.model_dump(), name: default})
        except ValidationError as error:
            _fail(
                kind,
                plugin_cls,
                check.prop,
                f"the default {name}={default!r} is refused: {describe_validation_error(error, 'Params')}",
            )


# --- divergences


@dataclass(frozen=True)
class _Logits:
    student: torch.Tensor
    teacher: torch.Tensor

    def __repr__(self) -> str:
        return f"student_logits={_show(self.student)}, teacher_logits={_show(self.teacher)}"


@st.composite
def _logits(
    draw,
    *,
    same: bool = False,
    masked: bool = False,
    dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    bound: float = EXTREME,
) -> _Logits:
    """Student and teacher logits ``[N, V]``, entries in [-bound, bound] (the ends included), with
    ``-inf`` at the same entries of both when ``masked`` (every row keeps a finite entry)."""
    n, v = draw(st.integers(1, 4)), draw(st.integers(2, 8))
    values = st.one_of(st.sampled_from([-bound, bound, 0.0]), st.floats(-bound, bound, width=32))

    def rows() -> torch.Tensor:
        return torch.tensor(draw(st.lists(values, min_size=n * v, max_size=n * v)), dtype=torch.float32).view(n, v)

    student = rows()
    teacher = student.clone() if same else rows()
    if masked:

        def mask() -> torch.Tensor:
            dropped = torch.tensor(draw(st.lists(st.booleans(), min_size=n * v, max_size=n * v))).view(n, v)
            kept = draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n))
            dropped[torch.arange(n), torch.tensor(kept)] = False
            return dropped

        # the same entries in both models (a padded vocabulary): where only one model puts -inf, KL or
        # reverse KL is truly infinite, and no plugin can be asked for a finite value there
        dropped = mask()
        student = student.masked_fill(dropped, -math.inf)
        teacher = teacher.masked_fill(dropped, -math.inf)
    dtype = draw(st.sampled_from(dtypes))
    return _Logits(student.to(dtype), teacher.to(dtype))


class _Divergence:
    """The divergence under test as users get it (``d``: what ``distill.get_divergence`` builds,
    temperature 1), and the property checked, which its failure messages name."""

    def __init__(self, plugin_cls: type, values: Any, prop: str) -> None:
        self.plugin_cls, self.prop = plugin_cls, prop
        self.d = ConfiguredDivergence(plugin_cls(values), values)

    def fail(self, detail: str) -> None:
        _fail("divergence", self.plugin_cls, self.prop, detail)

    def call(self, case: _Logits, *, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """d(student, teacher) as users get it, and the gradient of its sum for the student logits."""
        student = case.student.clone().requires_grad_(grad)
        try:
            values = self.d(student, case.teacher)
            gradient = torch.autograd.grad(values.sum(), student)[0] if grad else None
        except Exception as error:
            self.fail(f"raised {type(error).__name__}: {error} on {case}")
        return values.detach(), gradient


def _output_shape(plugin: _Divergence, case: _Logits) -> None:
    d = plugin.d
    try:
        values = d.plugin(prepare_logits(case.student), prepare_logits(case.teacher))
    except Exception as error:
        plugin.fail(f"raised {type(error).__name__}: {error} on {case}")
    n = case.student.shape[0]
    if not isinstance(values, torch.Tensor):
        plugin.fail(f"returned {type(values).__name__}, not a tensor, on {case}")
    if values.shape != (n,) or values.dtype != torch.float32:
        got = f"{str(values.dtype).removeprefix('torch.')}{list(values.shape)}"
        plugin.fail(f"returned {got}, expected float32[{n}], on {case}")
    for row in range(n):
        alone = d.plugin(prepare_logits(case.student[row : row + 1]), prepare_logits(case.teacher[row : row + 1]))
        alone = alone.detach().float()
        if not torch.allclose(values[row : row + 1].detach(), alone, rtol=1e-4, atol=1e-5, equal_nan=True):
            plugin.fail(
                f"row {row} is {values[row].item()!r} in the batch but {alone.flatten()[0].item()!r} alone, on {case}"
            )


def _zero_on_equal(plugin: _Divergence, case: _Logits) -> None:
    values, _ = plugin.call(case)
    if not (values.abs() <= ZERO_TOLERANCE).all():
        plugin.fail(f"values {values.tolist()} on {case}")


def _nonnegative(plugin: _Divergence, case: _Logits) -> None:
    values, _ = plugin.call(case)
    if not (values >= 0).all():  # NaN fails too
        plugin.fail(f"values {values.tolist()} on {case} (a rounding error below 0 needs .clamp_min(0))")


def _finite(plugin: _Divergence, case: _Logits) -> None:
    values, gradient = plugin.call(case, grad=True)
    if not torch.isfinite(values).all():
        plugin.fail(f"values {values.tolist()} on {case}")
    if not torch.isfinite(gradient).all():
        plugin.fail(
            f"student gradient {_show(gradient)} on {case} (take sqrt and log of probabilities from log_softmax)"
        )


_LOW = (torch.float32, torch.bfloat16, torch.float16)
_DIVERGENCE = (
    Check("divergence", "registration", "registration", _registration),
    Check("divergence", "params", "params are validated", _params),
    Check("divergence", "output_shape", "output is [N] float32, one value per row", _output_shape, _logits(bound=50.0)),
    Check("divergence", "zero_at_equal", "D(p, p) = 0", _zero_on_equal, _logits(same=True, masked=True, dtypes=_LOW)),
    Check(
        "divergence",
        "nonnegative",
        "D >= 0",
        _nonnegative,
        st.one_of(_logits(), _logits(bound=50.0), _logits(masked=True, dtypes=_LOW)),
    ),
    Check(
        "divergence",
        "finite",
        "finite values and gradients",
        _finite,
        st.one_of(_logits(), _logits(masked=True, dtypes=_LOW)),
    ),
)

DIVERGENCE_CHECKS = tuple(check.prop for check in _DIVERGENCE)
"""The properties ``check_divergence`` checks, in order; each failure message names one."""


def check_divergence(plugin_cls: type, *, max_examples: int | None = None, **params: Any) -> None:
    """Check the divergence class ``plugin_cls`` built with ``params`` against the plugin contract.

    Properties (``DIVERGENCE_CHECKS``): it registers (name, a ``Params`` that rejects unknown keys,
    ``__call__``); its parameter defaults pass their own ranges and it declares no ``temperature``;
    for logits ``[N, V]`` it returns ``[N]`` float32, one value per row; D(p, p) = 0 (within 1e-5) and
    D >= 0; values and student gradients stay finite with ``-inf`` logits (the same entries in both),
    logits of +-1e4 and bf16 / fp16 inputs. Inputs go through the core as users' do
    (``distill.get_divergence``): float32, ``-inf`` raised to a finite floor.

    Raises ``distill.ConfigError`` if ``params`` are invalid and ``AssertionError`` naming the
    broken property, with a counter-example, if the plugin breaks one.
    """
    for check in _DIVERGENCE:
        check(plugin_cls, max_examples=max_examples, **params)


# --- policies


MARKS = {"dataset": 11, "student": 12, "teacher": 13, "mixed": 14}
"""The first response token of each origin, so a returned example shows where it came from."""
EOS = 2


@dataclass
class SimulatedContext(SamplingContext):
    """A ``SamplingContext`` of one simulated process: generation is a deterministic function of
    (step, prompt, model), and every call is recorded."""

    process_index: int = 0
    num_processes: int = 1
    step: int = 0
    calls: list[tuple[int, str, int]] = field(default_factory=list)
    generated: dict[str, set[tuple[tuple[int, ...], tuple[int, ...]]]] = field(
        default_factory=lambda: {"student": set(), "teacher": set(), "mixed": set()}
    )

    @classmethod
    def for_rank(cls, process_index: int, num_processes: int) -> "SimulatedContext":
        context = cls(
            lambda ex: context.generate("student", ex),
            lambda ex: context.generate("teacher", ex),
            lambda ex, alpha: context.generate("mixed", ex),
            process_index,
            num_processes,
        )
        return context

    def generate(self, model: str, examples: list[Example]) -> list[Example]:
        self.calls.append((self.step, model, len(examples)))
        rollout = ([-1.0] * 4, [-1.5] * 4, [1.0] * 4) if model == "mixed" else None  # 4 response tokens
        out = [
            Example(list(e.prompt_ids), [MARKS[model], 20 + self.step, 20 + i, EOS], rollout=rollout)
            for i, e in enumerate(examples)
        ]
        self.generated[model].update((tuple(e.prompt_ids), tuple(e.response_ids)) for e in out)
        return out

    def batch(self, step: int, size: int = 4) -> list[Example]:
        """This rank's dataset examples of ``step``: different on every rank, as a sharded sampler gives."""

        def prompt(i: int) -> list[int]:
            return [30 + self.process_index, 40 + step, 50 + i]

        return [Example(prompt(i), [MARKS["dataset"], 60 + i, EOS]) for i in range(size)]


@dataclass(frozen=True)
class _Schedule:
    """One simulated run: the seed, the steps, and the validation loss at each evaluation."""

    seed: int
    total_steps: int
    eval_every: int
    val_losses: tuple[float, ...]
    checkpoint: int

    def __repr__(self) -> str:
        losses = ", ".join(f"{x:.6g}" for x in self.val_losses)
        return (
            f"run: seed={self.seed}, total_steps={self.total_steps}, evaluation every {self.eval_every} "
            f"steps with val losses [{losses}], checkpoint after step {self.checkpoint}"
        )

    def val_loss(self, step: int) -> float | None:
        """The loss observed after ``step`` (step 0: before training), or None when no evaluation."""
        if step % self.eval_every and step != self.total_steps:
            return None
        return self.val_losses[min(step // self.eval_every, len(self.val_losses) - 1)]


@st.composite
def _schedules(draw) -> _Schedule:
    total = draw(st.integers(4, 16))
    every = draw(st.integers(1, 4))
    losses = draw(st.lists(st.floats(0.0, 10.0), min_size=total // every + 2, max_size=total // every + 2))
    return _Schedule(draw(st.integers(0, 2**31 - 1)), total, every, tuple(losses), draw(st.integers(1, total - 1)))


def _groups(result: Any) -> list[tuple[Any, Any]]:
    """``(examples, source)`` or ``{source: examples}`` as a list of (source, examples)."""
    if isinstance(result, Mapping):
        return list(result.items())
    if isinstance(result, tuple) and len(result) == 2:
        return [(result[1], result[0])]
    raise TypeError(f"sample returned {type(result).__name__}; expected (examples, source) or {{source: examples}}")


@contextlib.contextmanager
def _rank_environment(process_index: int, num_processes: int, seed: int, step: int) -> Iterator[None]:
    """What differs between real processes besides the context: the global random generators
    (seeded per rank, as ``seed + process_index`` often is, and moving on with the steps) and the
    launcher's variables."""
    saved_env = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    saved_rng = random.getstate(), torch.get_rng_state()
    os.environ.update(RANK=str(process_index), LOCAL_RANK=str(process_index), WORLD_SIZE=str(num_processes))
    random.seed(seed + 7919 * process_index + 104729 * step)
    torch.manual_seed(seed + 7919 * process_index + 104729 * step)
    try:
        yield
    finally:
        random.setstate(saved_rng[0])
        torch.set_rng_state(saved_rng[1])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class _Step:
    """What one process saw at one step: the sources, generation calls, examples and metrics."""

    sources: list[str]
    calls: list[tuple[int, str, int]]
    examples: list[list[tuple[tuple[int, ...], tuple[int, ...]]]]
    metrics: dict[str, float]


class _Policy:
    """The policy class under test with its validated parameters (``build`` makes a fresh instance),
    and the property checked, which its failure messages name."""

    def __init__(self, plugin_cls: type, values: Any, prop: str) -> None:
        self.plugin_cls, self.values, self.prop = plugin_cls, values, prop

    def build(self) -> Any:
        return self.plugin_cls(self.values)

    def fail(self, detail: str) -> None:
        _fail("policy", self.plugin_cls, self.prop, detail)

    def step(self, policy: Any, context: SimulatedContext, schedule: _Schedule, t: int) -> _Step:
        """One optimizer step of one process, then its evaluation when one is due."""
        context.step = t
        examples = context.batch(t)
        first_call = len(context.calls)
        try:
            with _rank_environment(context.process_index, context.num_processes, schedule.seed, t):
                groups = _groups(policy.sample(t, schedule.total_steps, examples, context))
                metrics = policy.metrics()
                if schedule.val_loss(t) is not None:
                    policy.observe_eval(t, schedule.val_loss(t))
        except Exception as error:
            self.fail(f"step {t}: raised {type(error).__name__}: {error} ({schedule})")
        if not groups:
            self.fail(f"step {t}: sample returned no group ({schedule})")
        sources, returned = [], []
        for source, group in groups:
            if source not in SOURCES:
                self.fail(f"step {t}: source {source!r} is not one of {sorted(SOURCES)} ({schedule})")
            if not isinstance(group, list) or not group or not all(isinstance(e, Example) for e in group):
                self.fail(
                    f"step {t}: the {source!r} examples are not a non-empty list of distill.Example: "
                    f"{group!r} ({schedule})"
                )
            sources.append(source)
            returned.append([(tuple(e.prompt_ids), tuple(e.response_ids)) for e in group])

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(metrics, dict) or not all(isinstance(k, str) and number(v) for k, v in metrics.items()):
            self.fail(
                f"step {t}: metrics() must return dict[str, float] of finite numbers, got {metrics!r} ({schedule})"
            )
        return _Step(sources, context.calls[first_call:], returned, dict(metrics))

    def start(self, policy: Any, context: SimulatedContext, schedule: _Schedule) -> None:
        try:
            with _rank_environment(context.process_index, context.num_processes, schedule.seed, 0):
                policy.reseed(schedule.seed)
                policy.observe_eval(0, schedule.val_loss(0))
        except Exception as error:
            self.fail(f"reseed / observe_eval(0) raised {type(error).__name__}: {error} ({schedule})")


def _valid_sources(plugin: _Policy, schedule: _Schedule) -> None:
    policy, context = plugin.build(), SimulatedContext.for_rank(0, 1)
    plugin.start(policy, context, schedule)
    dataset: set = set()
    for t in range(1, schedule.total_steps + 1):
        dataset.update((tuple(e.prompt_ids), tuple(e.response_ids)) for e in context.batch(t))
        record = plugin.step(policy, context, schedule, t)
        fresh = {
            model: {(p, r) for p, r in context.generated[model] if r[1] == 20 + t} for model in ("student", "teacher")
        }
        origin = {
            "dataset": dataset,
            **fresh,
            "replay": context.generated["student"],
            "mixed": context.generated["mixed"],
        }
        for source, examples in zip(record.sources, record.examples):
            stray = [e for e in examples if e not in origin[source]]
            if stray:
                where = {
                    "dataset": "the dataset examples seen so far",
                    "student": "this step's student generations",
                    "teacher": "this step's teacher generations",
                    "replay": "past student generations",
                    "mixed": "teacher-mixed generations",
                }[source]
                plugin.fail(f"step {t}: labelled {source!r} but {stray[0]} is not among {where} ({schedule})")


def _same_on_every_rank(plugin: _Policy, schedule: _Schedule) -> None:
    ranks = 3
    policies = [plugin.build() for _ in range(ranks)]
    contexts = [SimulatedContext.for_rank(i, ranks) for i in range(ranks)]
    for policy, context in zip(policies, contexts):
        plugin.start(policy, context, schedule)
    for t in range(1, schedule.total_steps + 1):
        records = [plugin.step(p, c, schedule, t) for p, c in zip(policies, contexts)]
        for rank, record in enumerate(records[1:], 1):
            for what in ("sources", "calls", "metrics"):
                if getattr(record, what) != getattr(records[0], what):
                    plugin.fail(
                        f"step {t}: rank 0 {what} {getattr(records[0], what)} but rank {rank} "
                        f"{getattr(record, what)} ({schedule}; the ranks differ only in their data, "
                        f"RANK and the global random generators: draw from self.generator)"
                    )


def _round_trip(plugin: _Policy, schedule: _Schedule) -> None:
    policy, context = plugin.build(), SimulatedContext.for_rank(0, 1)
    plugin.start(policy, context, schedule)
    for t in range(1, schedule.checkpoint + 1):
        plugin.step(policy, context, schedule, t)
    buffer = io.BytesIO()
    try:  # as a checkpoint stores it: tensors and plain values only
        torch.save(policy.state_dict(), buffer)
        state = torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    except Exception as error:
        plugin.fail(
            f"state_dict() after step {schedule.checkpoint} cannot be checkpointed "
            f"(torch.save, then torch.load(weights_only=True)): {type(error).__name__}: {error} "
            f"({schedule})"
        )
    resumed, resumed_context = plugin.build(), SimulatedContext.for_rank(0, 1)
    try:  # as the engine resumes: reseed with the run's seed, then load
        resumed.reseed(schedule.seed)
        resumed.load_state_dict(state)
    except Exception as error:
        plugin.fail(f"load_state_dict raised {type(error).__name__}: {error} ({schedule})")
    for t in range(schedule.checkpoint + 1, schedule.total_steps + 1):
        expected, got = plugin.step(policy, context, schedule, t), plugin.step(resumed, resumed_context, schedule, t)
        for what in ("sources", "calls", "metrics", "examples"):
            if getattr(got, what) != getattr(expected, what):
                plugin.fail(
                    f"step {t} after a checkpoint at step {schedule.checkpoint}: {what} "
                    f"{getattr(expected, what)} uninterrupted but {getattr(got, what)} resumed ({schedule})"
                )


_POLICY = (
    Check("policy", "registration", "registration", _registration),
    Check("policy", "params", "params are validated", _params),
    Check("policy", "valid_sources", "sources are valid", _valid_sources, _schedules()),
    Check(
        "policy",
        "same_on_every_rank",
        "every rank makes the same draws for one seed",
        _same_on_every_rank,
        _schedules(),
    ),
    Check(
        "policy",
        "state_round_trip",
        "a state_dict round trip reproduces the choices that follow",
        _round_trip,
        _schedules(),
    ),
)

POLICY_CHECKS = tuple(check.prop for check in _POLICY)
"""The properties ``check_policy`` checks, in order; each failure message names one."""


def check_policy(plugin_cls: type, *, max_examples: int | None = None, **params: Any) -> None:
    """Check the sampling-policy class ``plugin_cls`` built with ``params`` against the plugin contract.

    Simulated runs (hypothesis draws the seed, the number of steps, the evaluation losses and a
    checkpoint step) feed ``sample`` a 4-example batch per step and a ``SimulatedContext`` whose
    generations are recorded. Properties (``POLICY_CHECKS``): it registers; its parameter defaults
    pass their own ranges; every step returns ``(examples, source)``, or ``{source: examples}`` groups,
    with each source one of dataset / teacher / student / replay, a non-empty list of
    ``distill.Example`` that really came from there, and ``metrics()`` a dict of finite numbers;
    three simulated ranks (same seed; different data, ``process_index``, ``RANK`` and global random
    generators) choose the same sources, call generation identically and report the same metrics;
    a ``state_dict`` saved and loaded as a checkpoint is (``torch.load(weights_only=True)``) into a
    fresh instance reproduces the sources, generation calls, examples and metrics that follow.

    Raises ``distill.ConfigError`` if ``params`` are invalid and ``AssertionError`` naming the
    broken property, with a counter-example, if the plugin breaks one.
    """
    for check in _POLICY:
        check(plugin_cls, max_examples=max_examples, **params)


# --- one pytest case per (plugin, check)


_UNDER_TEST = {"divergence": _Divergence, "policy": _Policy}
_CHECKS = {"divergence": _DIVERGENCE, "policy": _POLICY}


def parametrize_with_checks(plugins: list, *, max_examples: int | None = None):
    """A pytest decorator giving one test case per (plugin, named check), as scikit-learn's
    ``parametrize_with_checks`` does: a report names each property a plugin breaks, and a broken
    one does not hide the others.

    ``plugins``: divergence and policy classes (a class with a ``sample`` method is a policy), or
    ``(class, params)`` pairs. Each case's id is the plugin's name and the check's id
    (``hellinger-zero_at_equal``, ``warmup-same_on_every_rank``); the test takes ``plugin`` (the
    class) and ``check``, which runs that one check of ``check_divergence`` / ``check_policy`` with
    ``params`` and ``max_examples``, failing with the same message::

        @parametrize_with_checks([Hellinger, (Power, {"lam": 1.0}), Warmup])
        def test_conforms(plugin, check):
            check(plugin)
    """
    import pytest  # only plugin authors' test suites need it, never training

    cases = []
    for item in plugins:
        plugin_cls, params = item if isinstance(item, tuple) else (item, {})
        kind = "policy" if callable(getattr(plugin_cls, "sample", None)) else "divergence"
        name = getattr(plugin_cls, "name", plugin_cls.__name__)
        for check in _CHECKS[kind]:
            run = functools.partial(check, max_examples=max_examples, **params)
            cases.append(pytest.param(plugin_cls, run, id=f"{name}-{check.id}"))
    return pytest.mark.parametrize(("plugin", "check"), cases)
