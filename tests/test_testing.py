"""distill.testing, the conformance kit: it passes the built-ins (test_divergences, test_policies) and
catches broken plugins, naming the property they break and giving a counter-example."""

from __future__ import annotations

import importlib
import random
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from pydantic import Field

import distill
from distill.testing import DIVERGENCE_CHECKS, POLICY_CHECKS, check_divergence, check_policy, parametrize_with_checks

pytestmark = pytest.mark.usefixtures("single_thread")


def broken(prop: str) -> pytest.RaisesContext:
    """The kit's failure for ``prop``: an AssertionError that names it."""
    return pytest.raises(AssertionError, match=re.escape(f": {prop}: "))


# --- divergences that break the contract, one property each


class KL:
    """A correct forward KL, the base of the broken ones."""

    name = "test_kl"

    class Params(distill.Params):
        pass

    def __init__(self, params) -> None:
        self.params = params

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_p, log_q = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)


def test_a_correct_divergence_passes():
    check_divergence(KL, max_examples=10)


def test_a_negative_value_is_caught_with_its_inputs():
    class MeanLogRatio(KL):
        name = "mean_log_ratio"

        def __call__(self, student_logits, teacher_logits):  # 0 when p = q, but negative elsewhere
            return (teacher_logits.log_softmax(-1) - student_logits.log_softmax(-1)).mean(-1)

    with broken("D >= 0") as error:
        check_divergence(MeanLogRatio, max_examples=20)
    assert "student_logits=float" in str(error.value) and "teacher_logits=float" in str(error.value)


def test_a_nan_gradient_is_caught():
    class NaiveHellinger(KL):
        name = "naive_hellinger"

        def __call__(self, student_logits, teacher_logits):  # sqrt of a probability of 0: NaN gradient
            p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
            return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)

    with broken("finite values and gradients") as error:
        check_divergence(NaiveHellinger, max_examples=20)
    assert "student gradient" in str(error.value) and "nan" in str(error.value)


class Offset(KL):
    """Breaks D(p, p) = 0 and nothing else."""

    name = "offset"

    def __call__(self, student_logits, teacher_logits):
        return super().__call__(student_logits, teacher_logits) + 1e-3


def test_a_value_at_p_equals_q_is_caught():
    with broken("D(p, p) = 0"):
        check_divergence(Offset, max_examples=10)


@pytest.mark.parametrize(
    "reduce",
    [lambda v: v.mean(), lambda v: v.double(), lambda v: v.unsqueeze(-1), lambda v: v.mean().expand_as(v)],
    ids=["scalar", "float64", "[N, 1]", "rows mixed"],
)
def test_a_wrong_output_is_caught(reduce):
    class Reduced(KL):
        name = "reduced"

        def __call__(self, student_logits, teacher_logits):
            return reduce(super().__call__(student_logits, teacher_logits))

    with broken("output is [N] float32, one value per row"):
        check_divergence(Reduced, max_examples=20)


class BadDefault(KL):
    """Breaks "params are validated" and nothing else: a default outside its own range."""

    name = "bad_default"

    class Params(distill.Params):
        weight: float = Field(2.0, ge=0.0, le=1.0)


def test_a_default_outside_its_own_range_is_caught():
    with broken("params are validated") as error:
        check_divergence(BadDefault)
    assert "weight=2.0" in str(error.value)


def test_a_temperature_parameter_is_caught():
    class OwnTemperature(KL):
        name = "own_temperature"

        class Params(distill.Params):
            temperature: float = Field(1.0, gt=0)

    with broken("params are validated"):
        check_divergence(OwnTemperature)


def test_params_that_accept_unknown_keys_are_caught():
    class Loose(KL):
        name = "loose"

        class Params(distill.Params, extra="ignore"):
            pass

    with broken("registration"):
        check_divergence(Loose)


def test_out_of_range_params_are_refused_as_the_registry_refuses_them():
    from distill.plugins.divergences import JSD

    with pytest.raises(distill.ConfigError, match=r"^divergence jsd\.beta: .*\(got 1\.0\)$"):
        check_divergence(JSD, beta=1.0)
    with pytest.raises(distill.ConfigError, match=r"^divergence jsd\.alpha: unknown parameter$"):
        check_divergence(JSD, alpha=0.1)


# --- policies that break the contract


class Coin(distill.RandomPolicy):
    """A correct policy: student generations with probability prob, else the dataset."""

    name = "coin"

    class Params(distill.Params):
        prob: float = Field(0.5, ge=0, le=1)

    def sample(self, step, total_steps, examples, context):
        if self.draw() < self.params.prob:
            return context.generate_student(examples), "student"
        return examples, "dataset"


def test_a_correct_policy_passes():
    check_policy(Coin, max_examples=5)


@pytest.mark.parametrize("where", ["global generator", "process index"])
def test_a_policy_that_draws_differently_per_rank_is_caught(where):
    class PerRank(Coin):
        name = "per_rank"

        def sample(self, step, total_steps, examples, context):
            r = random.random() if where == "global generator" else (self.draw() + 0.3 * context.process_index) % 1
            return (context.generate_student(examples), "student") if r < self.params.prob else (examples, "dataset")

    with broken("every rank makes the same draws for one seed") as error:
        check_policy(PerRank, max_examples=10)
    assert re.search(r"step \d+: rank 0 sources", str(error.value))


@pytest.mark.parametrize("lapse", ["load ignored", "state left out"])
def test_a_policy_that_does_not_restore_its_state_is_caught(lapse):
    class Forgetful(Coin):
        name = "forgetful"

        def __init__(self, params) -> None:
            super().__init__(params)
            self.calls = 0

        def sample(self, step, total_steps, examples, context):
            self.calls += 1  # a counter the state does not carry
            if lapse == "state left out" and self.calls % 3 == 0:
                return examples, "dataset"
            return super().sample(step, total_steps, examples, context)

        def load_state_dict(self, state) -> None:
            if lapse == "state left out":
                super().load_state_dict(state)

    with broken("a state_dict round trip reproduces the choices that follow") as error:
        check_policy(Forgetful, max_examples=10)
    assert "uninterrupted but" in str(error.value) and "after a checkpoint at step" in str(error.value)


def test_a_state_that_a_checkpoint_cannot_hold_is_caught():
    class Pickled(Coin):
        name = "pickled"

        def state_dict(self):
            return {**super().state_dict(), "policy": self}

    with broken("a state_dict round trip reproduces the choices that follow") as error:
        check_policy(Pickled, max_examples=2)
    assert "weights_only=True" in str(error.value)


@pytest.mark.parametrize(
    "answer",
    [
        lambda examples, context: (examples, "generated"),  # not a source
        lambda examples, context: (context.generate_teacher(examples), "student"),  # mislabelled
        lambda examples, context: ([], "dataset"),
        lambda examples, context: {"student": context.generate_student(examples), "teacher": examples},
    ],
    ids=["unknown", "teacher as student", "empty", "group mislabelled"],
)
def test_invalid_sources_are_caught(answer):
    class Wrong(Coin):
        name = "wrong"

        def sample(self, step, total_steps, examples, context):
            return answer(examples, context)

    with broken("sources are valid") as error:
        check_policy(Wrong, max_examples=3)
    assert re.search(r"step \d+: ", str(error.value))


def test_metrics_must_be_numbers():
    class Chatty(Coin):
        name = "chatty"

        def metrics(self):
            return {"mood": "fine"}

    with broken("sources are valid") as error:
        check_policy(Chatty, max_examples=2)
    assert "metrics()" in str(error.value)


def test_a_policy_returning_groups_passes():
    class Contrastive(Coin):
        name = "contrastive_test"

        def sample(self, step, total_steps, examples, context):
            return {"teacher": context.generate_teacher(examples), "student": context.generate_student(examples)}

    check_policy(Contrastive, max_examples=3)


# --- one pytest case per (plugin, check)


class Unseeded(Coin):
    """Breaks "every rank makes the same draws for one seed" and nothing else: the global generator."""

    name = "unseeded"

    def sample(self, step, total_steps, examples, context):
        if random.random() < self.params.prob:
            return context.generate_student(examples), "student"
        return examples, "dataset"


def cases_of(decorator) -> list:
    """The cases a parametrize decorator gives a test of (plugin, check), each with ``id`` and ``values``."""
    names, cases = decorator.mark.args
    assert tuple(names) == ("plugin", "check")
    return cases


def test_parametrize_with_checks_gives_one_case_per_named_check():
    cases = cases_of(parametrize_with_checks([KL, (Coin, {"prob": 2.0})]))
    assert len(cases) == len(DIVERGENCE_CHECKS) + len(POLICY_CHECKS)
    assert [case.id for case in cases] == [
        *("test_kl-registration", "test_kl-params", "test_kl-output_shape", "test_kl-zero_at_equal"),
        *("test_kl-nonnegative", "test_kl-finite"),
        *("coin-registration", "coin-params", "coin-valid_sources", "coin-same_on_every_rank"),
        "coin-state_round_trip",
    ]
    assert [case.values[0] for case in cases] == [KL] * len(DIVERGENCE_CHECKS) + [Coin] * len(POLICY_CHECKS)
    plugin, check = cases[len(DIVERGENCE_CHECKS) + 1].values  # coin-params, with the pair's params
    with pytest.raises(distill.ConfigError, match=r"^policy coin\.prob: "):
        check(plugin)


@pytest.mark.parametrize(
    ("plugin_cls", "kit", "failing", "prop"),
    [
        (Offset, check_divergence, "offset-zero_at_equal", "D(p, p) = 0"),
        (BadDefault, check_divergence, "bad_default-params", "params are validated"),
        (Unseeded, check_policy, "unseeded-same_on_every_rank", "every rank makes the same draws for one seed"),
    ],
    ids=["divergence property", "params", "policy property"],
)
def test_a_broken_plugin_fails_exactly_the_case_of_its_broken_property(plugin_cls, kit, failing, prop):
    failed = {}
    for case in cases_of(parametrize_with_checks([plugin_cls], max_examples=5)):
        plugin, check = case.values
        try:
            check(plugin)
        except AssertionError as error:
            failed[case.id] = str(error)
    assert list(failed) == [failing]
    with pytest.raises(AssertionError) as error:
        kit(plugin_cls, max_examples=5)
    # the kit's message (hypothesis may find another counter-example in another run; a default has one)
    head = f"{kit.__name__}({plugin_cls.name}): {prop}: "
    assert str(error.value).startswith(head) and failed[failing].startswith(head), (failed, str(error.value))
    assert failed[failing] == str(error.value) or plugin_cls is not BadDefault


@parametrize_with_checks([KL, (Coin, {"prob": 0.3})], max_examples=3)
def test_parametrize_with_checks_runs_under_pytest(plugin, check):
    check(plugin)


def test_the_named_checks_are_the_documented_ones():
    assert DIVERGENCE_CHECKS[:2] == POLICY_CHECKS[:2] == ("registration", "params are validated")
    doc = distill.testing.check_divergence.__doc__ + distill.testing.check_policy.__doc__
    assert "DIVERGENCE_CHECKS" in doc and "POLICY_CHECKS" in doc


def test_the_kit_leaves_global_state_as_it_found_it():
    random.seed(3)
    torch.manual_seed(3)
    expected = random.random(), torch.rand(()).item()
    random.seed(3)
    torch.manual_seed(3)
    threads = torch.get_num_threads()
    check_policy(Coin, max_examples=2)
    assert (random.random(), torch.rand(()).item()) == expected and torch.get_num_threads() == threads


def test_without_hypothesis_the_import_error_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "hypothesis" or m.startswith("hypothesis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    monkeypatch.delitem(sys.modules, "distill.testing")
    with pytest.raises(ImportError, match=re.escape("pip install 'distill[testing]'")):
        importlib.import_module("distill.testing")
    monkeypatch.undo()
    assert importlib.import_module("distill.testing").check_divergence is check_divergence


def test_the_kit_never_imports_pytest_itself():
    """pytest is imported by parametrize_with_checks when called, so it is never a training dependency."""
    code = "import sys, distill.testing\nprint('pytest' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_only_the_kit_needs_hypothesis():
    """hypothesis is the `testing` extra: importing distill, its plugins and its CLI never loads it."""
    code = (
        "import sys, distill, distill.plugins.divergences, distill.plugins.policies, distill.cli\n"
        "print('hypothesis' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    assert all(any(r.startswith("hypothesis") for r in extras[extra]) for extra in ("testing", "test"))
