"""The six built-in divergences, as users get them from ``distill.get_divergence(name, **params)``.

Property tests (hypothesis) for every mathematical claim of DESIGN.md section 2, and example tests
against an independent float64 formula written with plain probabilities (``reference`` below).
p = teacher, q = student; logits are ``[N, V]``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import distill
from distill.plugins.divergences import JSD, TVD, ForwardKL, ReverseKL, SkewKL, SkewReverseKL
from distill.testing import check_divergence


def examples(n: int) -> settings:
    """``n`` examples under the default profile, ten times more under HYPOTHESIS_PROFILE=thorough."""
    return settings(max_examples=max(1, n * settings.default.max_examples // 100))


# (name, params): every built-in at its defaults, plus the parameter values and edges users pick.
SPECS = [
    ("kl", {}),
    ("rkl", {}),
    ("jsd", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9}),
    ("tvd", {}),
    ("skew_kl", {}),
    ("skew_kl", {"alpha": 0.5}),
    ("skew_kl", {"alpha": 0.0}),
    ("skew_kl", {"alpha": 1.0}),
    ("skew_rkl", {}),
    ("skew_rkl", {"alpha": 0.5}),
    ("skew_rkl", {"alpha": 0.0}),
    ("skew_rkl", {"alpha": 1.0}),
]
SPEC_IDS = [name + "".join(f"-{k}={v}" for k, v in params.items()) for name, params in SPECS]
NAMES = ["kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"]
PLUGIN_CLASSES = {
    "kl": ForwardKL,
    "rkl": ReverseKL,
    "jsd": JSD,
    "tvd": TVD,
    "skew_kl": SkewKL,
    "skew_rkl": SkewReverseKL,
}

pytestmark = pytest.mark.usefixtures("single_thread")
specs = pytest.mark.parametrize("name, params", SPECS, ids=SPEC_IDS)


# --- an independent reference: the DESIGN.md table, in float64, with plain probabilities


def reference(
    name: str,
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Per-row D(p, q) for finite logits ``[N, V]`` -> ``[N]`` float64 (differentiable)."""

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        z = logits.double() / temperature
        e = torch.exp(z - z.max(-1, keepdim=True).values)
        return e / e.sum(-1, keepdim=True)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * torch.log(a / b)).sum(-1)

    p, q = probabilities(teacher), probabilities(student)
    assert (p > 0).all() and (q > 0).all(), "the reference needs logits whose probabilities do not underflow"
    if name == "kl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "skew_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_rkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    raise AssertionError(name)


# --- strategies: small tensors, so each example costs well under a millisecond


@st.composite
def logit_pairs(draw, bound: float = 30.0, max_n: int = 6, max_v: int = 12):
    """(student, teacher) float32 ``[N, V]`` with entries in [-bound, bound] (extremes included)."""
    n, v = draw(st.integers(1, max_n)), draw(st.integers(2, max_v))
    elements = st.floats(-bound, bound, width=32)
    student = draw(hnp.arrays(np.float32, (n, v), elements=elements))
    teacher = draw(hnp.arrays(np.float32, (n, v), elements=elements))
    return torch.from_numpy(student), torch.from_numpy(teacher)


@st.composite
def grid_logit_pairs(draw, max_n: int = 6, max_v: int = 12):
    """Like ``logit_pairs`` but on multiples of 1/8 in [-16, 16], plus per-row shifts (multiples of
    1/8 up to +-1000) for student and teacher: every shifted logit is exact in float32, so any
    difference after shifting comes from the divergence, not from rounding the input."""
    n, v = draw(st.integers(1, max_n)), draw(st.integers(2, max_v))

    def grid(shape, limit):
        return torch.from_numpy(draw(hnp.arrays(np.int32, shape, elements=st.integers(-limit, limit)))) / 8.0

    return grid((n, v), 128), grid((n, v), 128), grid((n, 1), 8000), grid((n, 1), 8000)


@st.composite
def shared_neg_inf(draw, n: int, v: int) -> torch.Tensor:
    """``[N, V]`` booleans, true where both models put -inf; each row keeps at least one entry."""
    dropped = torch.from_numpy(draw(hnp.arrays(np.bool_, (n, v))))
    keep = draw(st.integers(0, v - 1))
    dropped[:, keep] = False
    return dropped


def values_and_grads(d, student: torch.Tensor, teacher: torch.Tensor):
    """d(student, teacher) and the gradients of its sum with respect to both inputs."""
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(True)
    values = d(student, teacher)
    student_grad, teacher_grad = torch.autograd.grad(values.sum(), (student, teacher), allow_unused=True)
    zeros = torch.zeros_like
    student_grad = zeros(student) if student_grad is None else student_grad
    teacher_grad = zeros(teacher) if teacher_grad is None else teacher_grad
    return values.detach(), student_grad, teacher_grad


def assert_finite(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        assert torch.isfinite(tensor).all(), tensor


# --- D(p, p) = 0, D >= 0, finite values and gradients


@specs
@examples(40)
@given(grid_logit_pairs())
def test_zero_when_distributions_are_equal(name, params, logits):
    student, _, shift, _ = logits
    d = distill.get_divergence(name, **params)
    zeros = torch.zeros(len(student))
    torch.testing.assert_close(d(student, student), zeros, atol=2e-6, rtol=0)
    # the same distribution written with other logits (a constant added per row)
    torch.testing.assert_close(d(student + shift, student), zeros, atol=2e-6, rtol=0)
    torch.testing.assert_close(d(student, student + shift), zeros, atol=2e-6, rtol=0)


@specs
@examples(40)
@given(logit_pairs(bound=1e4))
def test_nonnegative_float32_and_finite_with_large_logits(name, params, logits):
    d = distill.get_divergence(name, **params)
    values, student_grad, teacher_grad = values_and_grads(d, *logits)
    assert values.dtype == torch.float32 and values.shape == logits[0].shape[:1]
    assert (values >= 0).all(), values
    assert_finite(values, student_grad, teacher_grad)


@specs
@examples(40)
@given(st.data())
def test_shared_neg_inf_entries_are_dropped_from_the_vocabulary(name, params, data):
    student, teacher = data.draw(logit_pairs(bound=50.0))
    dropped = data.draw(shared_neg_inf(*student.shape))
    d = distill.get_divergence(name, **params)
    values, student_grad, teacher_grad = values_and_grads(
        d, student.masked_fill(dropped, -math.inf), teacher.masked_fill(dropped, -math.inf)
    )
    assert_finite(values, student_grad, teacher_grad)
    assert (student_grad[dropped] == 0).all() and (teacher_grad[dropped] == 0).all()
    for row, keep in enumerate(~dropped):
        kept = values_and_grads(d, student[row : row + 1, keep], teacher[row : row + 1, keep])
        torch.testing.assert_close(values[row : row + 1], kept[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(student_grad[row, keep], kept[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(teacher_grad[row, keep], kept[2][0], rtol=1e-5, atol=1e-6)


@specs
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@examples(25)
@given(st.data())
def test_low_precision_inputs_are_computed_in_float32(name, params, dtype, data):
    student, teacher = data.draw(logit_pairs(bound=1e4))
    dropped = data.draw(shared_neg_inf(*student.shape))
    student = student.masked_fill(dropped, -math.inf).to(dtype)
    teacher = teacher.masked_fill(dropped, -math.inf).to(dtype)
    d = distill.get_divergence(name, **params)
    values, student_grad, teacher_grad = values_and_grads(d, student, teacher)
    expected = values_and_grads(d, student.float(), teacher.float())
    assert values.dtype == torch.float32
    assert student_grad.dtype == dtype and teacher_grad.dtype == dtype
    assert_finite(values, student_grad, teacher_grad)
    torch.testing.assert_close(values, expected[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(student_grad, expected[1].to(dtype))
    torch.testing.assert_close(teacher_grad, expected[2].to(dtype))


# --- invariances


@specs
@examples(40)
@given(grid_logit_pairs())
def test_adding_a_constant_per_row_changes_nothing(name, params, logits):
    student, teacher, student_shift, teacher_shift = logits
    d = distill.get_divergence(name, **params)
    plain = values_and_grads(d, student, teacher)
    shifted = values_and_grads(d, student + student_shift, teacher + teacher_shift)
    for got, expected in zip(shifted, plain):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@specs
@examples(30)
@given(logit_pairs(bound=50.0), st.floats(0.1, 10.0))
def test_temperature_divides_both_logits(name, params, logits, temperature):
    student, teacher = logits
    warm = distill.get_divergence(name, temperature=temperature, **params)
    plain = distill.get_divergence(name, **params)
    got = values_and_grads(warm, student, teacher)
    expected = values_and_grads(lambda s, t: plain(s / temperature, t / temperature), student, teacher)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, math.nan, math.inf, "hot", None])
def test_temperature_must_be_a_positive_number(name, temperature):
    with pytest.raises(distill.ConfigError, match=rf"{name}\.temperature"):
        distill.get_divergence(name, temperature=temperature)


# --- jsd


@examples(60)
@given(logit_pairs(bound=1e4))
def test_jsd_is_symmetric_at_half(logits):
    student, teacher = logits
    d = distill.get_divergence("jsd", beta=0.5)
    torch.testing.assert_close(d(student, teacher), d(teacher, student), rtol=1e-5, atol=1e-6)


@examples(60)
@given(logit_pairs(bound=1e4), st.floats(1e-3, 1 - 1e-3))
def test_jsd_is_at_most_the_entropy_of_beta(logits, beta):
    # JSD_beta = H(m) - beta H(p) - (1 - beta) H(q) <= H(beta) <= ln 2, with equality for disjoint p, q
    values = distill.get_divergence("jsd", beta=beta)(*logits)
    entropy = -beta * math.log(beta) - (1 - beta) * math.log1p(-beta)
    assert (values <= entropy * (1 + 1e-5) + 1e-6).all(), (values, entropy)
    assert (values <= math.log(2) * (1 + 1e-5)).all()


def test_jsd_reaches_ln2_on_disjoint_distributions():
    student = torch.tensor([[1e4, 0.0, -math.inf]])
    teacher = torch.tensor([[0.0, 1e4, -math.inf]])
    torch.testing.assert_close(distill.get_divergence("jsd")(student, teacher), torch.tensor([math.log(2)]))


@pytest.mark.parametrize("beta", [0, 0.0, 1, 1.0, -0.1, 1.5, math.nan])
def test_jsd_refuses_beta_outside_the_open_interval(beta):
    # documented choice: beta = 0 or 1 would make the value identically 0; users pick kl or rkl instead
    with pytest.raises(distill.ConfigError, match=r"jsd\.beta\b"):
        distill.get_divergence("jsd", beta=beta)


# --- tvd


@examples(60)
@given(logit_pairs(bound=1e4))
def test_tvd_lies_in_unit_interval(logits):
    values = distill.get_divergence("tvd")(*logits)
    # 1/2 sum |p - q| of two float32 distributions can round a few ulps above 1 (disjoint p and q)
    assert ((values >= 0) & (values <= 1 + 1e-6)).all(), values


def test_tvd_is_one_on_disjoint_distributions():
    student = torch.tensor([[1e4, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 1e4, 1e4]])
    torch.testing.assert_close(distill.get_divergence("tvd")(student, teacher), torch.tensor([1.0]))


# --- skew_kl and skew_rkl


@pytest.mark.parametrize("name", ["skew_kl", "skew_rkl"])
@examples(40)
@given(logit_pairs(bound=1e4), st.floats(1e-3, 1.0))
def test_skew_is_at_most_minus_log_alpha(name, logits, alpha):
    values = distill.get_divergence(name, alpha=alpha)(*logits)
    assert (values <= -math.log(alpha) * (1 + 1e-5) + 1e-6).all(), (values, alpha)


@pytest.mark.parametrize("name, plain", [("skew_kl", "kl"), ("skew_rkl", "rkl")])
@examples(40)
@given(logit_pairs(bound=1e4))
def test_skew_at_alpha_zero_is_plain_kl(name, plain, logits):
    got = values_and_grads(distill.get_divergence(name, alpha=0.0), *logits)
    expected = values_and_grads(distill.get_divergence(plain), *logits)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["skew_kl", "skew_rkl"])
@examples(40)
@given(logit_pairs(bound=1e4))
def test_skew_at_alpha_one_is_zero_with_zero_gradient(name, logits):
    values, student_grad, teacher_grad = values_and_grads(distill.get_divergence(name, alpha=1.0), *logits)
    assert (values == 0).all()
    assert (student_grad == 0).all() and (teacher_grad == 0).all()


@pytest.mark.parametrize("name", ["skew_kl", "skew_rkl"])
def test_skew_at_alpha_one_can_be_backpropagated(name):
    student = torch.randn(3, 5, requires_grad=True)
    distill.get_divergence(name, alpha=1.0)(student, torch.randn(3, 5)).sum().backward()
    assert torch.equal(student.grad, torch.zeros(3, 5))


@pytest.mark.parametrize("name", ["skew_kl", "skew_rkl"])
@pytest.mark.parametrize("alpha", [-0.1, 1.1, math.nan, math.inf, "much"])
def test_skew_refuses_alpha_outside_unit_interval(name, alpha):
    with pytest.raises(distill.ConfigError, match=rf"{name}\.alpha\b"):
        distill.get_divergence(name, alpha=alpha)


@pytest.mark.parametrize("name, params", [("kl", {"alpha": 0.1}), ("jsd", {"alpha": 0.1}), ("skew_kl", {"beta": 0.5})])
def test_unknown_parameters_are_refused_by_name(name, params):
    (key,) = params
    with pytest.raises(distill.ConfigError, match=rf"{name}\.{key}: unknown parameter"):
        distill.get_divergence(name, **params)


# --- example values against the independent float64 reference

REFERENCE_CASES = [
    ("kl", {}),
    ("kl", {"temperature": 2.0}),
    ("rkl", {}),
    ("rkl", {"temperature": 0.5}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.9, "temperature": 2.0}),
    ("tvd", {}),
    ("tvd", {"temperature": 2.0}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.5}),
    ("skew_kl", {"alpha": 0.1, "temperature": 0.5}),
    ("skew_rkl", {"alpha": 0.1}),
    ("skew_rkl", {"alpha": 0.5}),
    ("skew_rkl", {"alpha": 0.9, "temperature": 2.0}),
]
references = pytest.mark.parametrize(
    "name, params", REFERENCE_CASES, ids=[n + "".join(f"-{k}={v}" for k, v in p.items()) for n, p in REFERENCE_CASES]
)


def example_logits(seed: int, shape=(4, 7), scale: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))


@references
@pytest.mark.parametrize("seed", [0, 1])
def test_values_and_gradients_match_float64_reference(name, params, seed):
    student, teacher = example_logits(seed)
    expected = values_and_grads(lambda s, t: reference(name, s, t, **params), student, teacher)
    got = values_and_grads(distill.get_divergence(name, **params), student.float(), teacher.float())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)


def test_hand_computed_values():
    # p = (1/2, 1/2), q = (1/4, 3/4)
    teacher = torch.tensor([[0.5, 0.5]]).log()
    student = torch.tensor([[0.25, 0.75]]).log()
    m = torch.tensor([3 / 8, 5 / 8])  # (p + q) / 2
    expected = {
        "kl": 0.5 * math.log(2) + 0.5 * math.log(2 / 3),
        "rkl": 0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        "tvd": 0.25,
        "jsd": 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
        + 0.5 * (0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])),
        # alpha = 0.5: the mixture is m for both skews
        "skew_kl": 0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]),
        "skew_rkl": 0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1]),
    }
    params = {"jsd": {"beta": 0.5}, "skew_kl": {"alpha": 0.5}, "skew_rkl": {"alpha": 0.5}}
    for name, value in expected.items():
        got = distill.get_divergence(name, **params.get(name, {}))(student, teacher)
        torch.testing.assert_close(got, torch.tensor([float(value)]), rtol=1e-6, atol=1e-7, msg=name)


# --- gradcheck
#
# ``d(...)`` and ``divergence_loss`` deliberately compute in float32 (``prepare_logits`` upcasts any
# input to float32, as DESIGN.md asks), so float64 finite differences through them would only
# measure float32 rounding and ``gradcheck`` cannot pass there. The plugin classes themselves keep
# the input dtype, so ``gradcheck`` runs on each plugin's ``__call__`` in float64; the public path
# (temperature, casting, and divergence_loss's chunked gradient) is checked against autograd of the
# float64 reference above with float32 tolerances (here and in
# test_divergence_loss_gradients_match_float64_reference).


@specs
def test_plugin_gradcheck_in_float64(name, params):
    plugin = distill.get_divergence(name, **params).plugin
    student, teacher = (x.requires_grad_(True) for x in example_logits(seed=3, shape=(3, 5), scale=2.0))
    assert plugin(student, teacher).dtype == torch.float64
    assert torch.autograd.gradcheck(plugin, (student, teacher))


@references
def test_divergence_loss_gradients_match_float64_reference(name, params):
    generator = torch.Generator().manual_seed(5)
    student, teacher = (2 * torch.randn(2, 4, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    expected = values_and_grads(lambda s, t: reference(name, s[mask], t[mask], **params).mean(), student, teacher)
    d = distill.get_divergence(name, **params)
    got = values_and_grads(
        lambda s, t: distill.divergence_loss(d, s, t, mask, chunk_size=2), student.float(), teacher.float()
    )
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6)


# --- the plugin contract


@specs
def test_conformance_kit(name, params):
    """distill.testing.check_divergence, what a third-party author runs: D(p, p) = 0, D >= 0, [N]
    float32, finite values and gradients with -inf, +-1e4 and bf16 logits, params validated."""
    check_divergence(PLUGIN_CLASSES[name], **params)


def test_conformance_kit_with_the_mixture_detached():
    check_divergence(SkewReverseKL, alpha=0.1, detach_mixture=True)  # DistiLLM-2's student-side term


@pytest.mark.parametrize("name", NAMES)
def test_registered_class_is_the_builtin_plugin(name):
    d = distill.get_divergence(name)
    assert isinstance(d.plugin, PLUGIN_CLASSES[name]) and d.name == name
    assert isinstance(d.plugin, distill.Divergence)


@pytest.mark.parametrize("name", NAMES)
def test_vocabulary_mismatch_names_both_sizes(name):
    with pytest.raises(distill.ConfigError, match=r"student logits have 5 .* teacher logits 6"):
        distill.get_divergence(name)(torch.zeros(2, 5), torch.zeros(2, 6))


def test_values_are_float32_whatever_the_plugin_returns():
    class Float64Hellinger:
        name = "hellinger64"

        class Params(distill.Params):
            pass

        def __init__(self, params) -> None:
            self.params = params

        def __call__(self, student_logits, teacher_logits):
            p, q = teacher_logits.double().softmax(-1), student_logits.double().softmax(-1)
            return 0.5 * ((p.sqrt() - q.sqrt()) ** 2).sum(-1)

    d = distill.ConfiguredDivergence.wrap(Float64Hellinger(Float64Hellinger.Params()))
    values = d(torch.randn(3, 5, dtype=torch.bfloat16), torch.randn(3, 5, dtype=torch.bfloat16))
    assert values.dtype == torch.float32 and values.shape == (3,)
