"""``distill.divergence_loss``: masking, chunking, the token mean and its gradients.

The reference everywhere is the plain computation a user would write: ``d(student[mask],
teacher[mask])`` by ordinary autograd, summed and divided by the token count. (The divergences
themselves are checked against an independent float64 formula in test_divergences.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import distill
from distill.plugins.divergences import JSD, TVD, ForwardKL, ReverseKL, SkewKL, SkewReverseKL

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl"]
PLUGIN_CLASSES = [ForwardKL, ReverseKL, JSD, TVD, SkewKL, SkewReverseKL]
names = pytest.mark.parametrize("name", NAMES)


def examples(n: int) -> settings:
    """``n`` examples under the default profile, ten times more under HYPOTHESIS_PROFILE=thorough."""
    return settings(max_examples=max(1, n * settings.default.max_examples // 100))


@st.composite
def batches(draw, bound: float = 20.0, max_b: int = 3, max_t: int = 5, max_v: int = 10):
    """(student [B, T, V], teacher [B, T, V], mask [B, T]) with float32 logits in [-bound, bound]."""
    b, t, v = draw(st.integers(1, max_b)), draw(st.integers(1, max_t)), draw(st.integers(2, max_v))
    elements = st.floats(-bound, bound, width=32)
    student = torch.from_numpy(draw(hnp.arrays(np.float32, (b, t, v), elements=elements)))
    teacher = torch.from_numpy(draw(hnp.arrays(np.float32, (b, t, v), elements=elements)))
    mask = torch.from_numpy(draw(hnp.arrays(np.bool_, (b, t))))
    return student, teacher, mask


def loss_and_grads(fn, student: torch.Tensor, teacher: torch.Tensor, *, teacher_grad: bool = True):
    """fn(student, teacher) -> scalar, and its gradients with respect to student (and teacher).

    Uses ``backward()`` and ``.grad`` as a training loop does; a gradient that never arrives is None.
    """
    student = student.detach().clone().requires_grad_(True)
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = fn(student, teacher)
    loss.backward()
    return loss.detach(), student.grad, teacher.grad


def plain_loss(d, mask=None, n_tokens=None):
    """The reference: per-token values of the counted rows by ordinary autograd, sum / n_tokens."""

    def fn(student, teacher):
        rows = (student, teacher) if mask is None else (student[mask], teacher[mask])
        values = d(*rows)
        return values.sum() / (values.numel() if n_tokens is None else n_tokens)

    return fn


def assert_all_close(got, expected, **tolerance) -> None:
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


# --- chunking


@names
@examples(30)
@given(st.data())
def test_chunked_equals_unchunked(name, data):
    n = data.draw(st.integers(3, 13))
    chunk = data.draw(st.sampled_from([c for c in range(2, n) if n % c]))
    v = data.draw(st.integers(2, 10))
    elements = st.floats(-20, 20, width=32)
    student = torch.from_numpy(data.draw(hnp.arrays(np.float32, (n, v), elements=elements)))
    teacher = torch.from_numpy(data.draw(hnp.arrays(np.float32, (n, v), elements=elements)))
    d = distill.get_divergence(name)
    whole = loss_and_grads(lambda s, t: distill.divergence_loss(d, s, t), student, teacher)
    chunked = loss_and_grads(lambda s, t: distill.divergence_loss(d, s, t, chunk_size=chunk), student, teacher)
    # float32 rounding differs between chunkings by a few epsilons of the O(1) probabilities
    # (skew KL on logits of -1e-5 and 0: 2.2e-7, see _near_zero_logits)
    assert_all_close(chunked, whole, rtol=1e-6, atol=1e-6)
    one_row = loss_and_grads(lambda s, t: distill.divergence_loss(d, s, t, chunk_size=1), student, teacher)
    assert_all_close(one_row, whole, rtol=1e-6, atol=1e-6)


# --- masking


def _near_zero_logits():
    """A case CI's hypothesis found: skew KL's fused gradient and autograd's differ by 2.2e-7 on
    gradients of ~1e-9 (two float32 epsilons of the O(1) probabilities they are computed from)."""
    student = torch.zeros(2, 2, 8)
    student[0, 0, 0] = -1e-5
    return student, torch.zeros(2, 2, 8), torch.ones(2, 2, dtype=torch.bool)


@names
@examples(30)
@given(batches(), st.integers(1, 16))
@example(_near_zero_logits(), 1)
def test_masked_batch_equals_the_selected_rows(name, batch, chunk):
    student, teacher, mask = batch
    assume(mask.any())
    d = distill.get_divergence(name)
    got = loss_and_grads(lambda s, t: distill.divergence_loss(d, s, t, mask, chunk_size=chunk), student, teacher)
    expected = loss_and_grads(plain_loss(d, mask), student, teacher)
    assert got[0].dtype == torch.float32 and got[0].shape == ()
    # two implementations (fused gradients and autograd) of quantities of order 1 in float32: they
    # agree to a few epsilons (1.2e-7) absolute, not better
    assert_all_close(got, expected, rtol=1e-5, atol=1e-6)


@names
@examples(30)
@given(batches(), st.data())
def test_masked_positions_change_neither_loss_nor_gradient(name, batch, data):
    student, teacher, mask = batch
    d = distill.get_divergence(name)
    fn = lambda s, t: distill.divergence_loss(d, s, t, mask, chunk_size=2)  # noqa: E731
    loss, student_grad, teacher_grad = loss_and_grads(fn, student, teacher)
    assert (student_grad[~mask] == 0).all() and (teacher_grad[~mask] == 0).all()
    other = st.floats(-1e4, 1e4, width=32)
    new_student = torch.from_numpy(data.draw(hnp.arrays(np.float32, student.shape, elements=other)))
    new_teacher = torch.from_numpy(data.draw(hnp.arrays(np.float32, teacher.shape, elements=other)))
    changed = loss_and_grads(
        fn, torch.where(mask[..., None], student, new_student), torch.where(mask[..., None], teacher, new_teacher)
    )
    assert_all_close(changed, (loss, student_grad, teacher_grad), rtol=0, atol=0)


@names
@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 5)], ids=["BTV", "NV"])
@pytest.mark.parametrize("n_tokens", [None, 7])
def test_empty_mask_gives_zero_and_zero_gradient(name, shape, n_tokens):
    student, teacher = torch.randn(shape), torch.randn(shape)
    mask = torch.zeros(shape[:-1], dtype=torch.bool)
    d = distill.get_divergence(name)
    loss, student_grad, teacher_grad = loss_and_grads(
        lambda s, t: distill.divergence_loss(d, s, t, mask, n_tokens=n_tokens), student, teacher
    )
    assert loss.item() == 0.0
    # a real zero gradient, not None: parameters upstream get zeros, as under DDP they must
    assert student_grad is not None and torch.equal(student_grad, torch.zeros(shape))
    assert teacher_grad is not None and torch.equal(teacher_grad, torch.zeros(shape))


@names
def test_mask_may_be_integer_or_float(name):
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]])
    d = distill.get_divergence(name)
    expected = distill.divergence_loss(d, student, teacher, mask.bool())
    torch.testing.assert_close(distill.divergence_loss(d, student, teacher, mask), expected, rtol=0, atol=0)
    torch.testing.assert_close(distill.divergence_loss(d, student, teacher, mask.float()), expected, rtol=0, atol=0)


# --- the denominator


@names
@examples(30)
@given(batches(), st.integers(1, 1000), st.booleans())
def test_n_tokens_divides_the_sum(name, batch, n_tokens, as_tensor):
    student, teacher, mask = batch
    assume(mask.any())
    d = distill.get_divergence(name)
    given_count = torch.tensor(n_tokens) if as_tensor else n_tokens
    got = loss_and_grads(lambda s, t: distill.divergence_loss(d, s, t, mask, n_tokens=given_count), student, teacher)
    expected = loss_and_grads(plain_loss(d, mask, n_tokens), student, teacher)
    assert_all_close(got, expected, rtol=1e-5, atol=1e-8)


@names
@examples(30)
@given(batches(), st.data())
def test_micro_batch_losses_with_the_global_count_sum_to_the_batch_loss(name, batch, data):
    student, teacher, mask = batch
    assume(len(student) >= 2)
    split = data.draw(st.integers(1, len(student) - 1))
    total = int(mask.sum())
    d = distill.get_divergence(name)

    def accumulated(s, t):
        # gradient accumulation: one backward per micro-batch, each divided by the global count
        losses = [
            distill.divergence_loss(d, s[part], t[part], mask[part], n_tokens=torch.tensor(total))
            for part in (slice(0, split), slice(split, None))
        ]
        for loss in losses[:-1]:
            loss.backward()
        return sum(loss.detach() for loss in losses[:-1]) + losses[-1]

    got = loss_and_grads(accumulated, student, teacher)
    expected = loss_and_grads(lambda s, t: distill.divergence_loss(d, s, t, mask), student, teacher)
    # atol: float32's resolution of the log-probabilities (eps 1.2e-7 x |log p| of a few nats), which two
    # batch shapes round differently; hypothesis found skew_rkl's gradient 2.2e-7 from 0 at uniform logits
    # (a loss of 3.7e-8 against 0), rounding, not a wrong count (that is off by the loss itself)
    assert_all_close(got, expected, rtol=1e-5, atol=1e-6)


# --- dtypes, plugin instances, teacher gradients, temperature


@names
@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)], ids=["bf16", "fp16"])
@examples(20)
@given(batches())
def test_low_precision_student_gets_a_gradient_of_its_dtype_close_to_float32(name, dtype, rtol, batch):
    student, teacher, mask = (x.to(dtype) if x.is_floating_point() else x for x in batch)
    d = distill.get_divergence(name)
    fn = lambda s, t: distill.divergence_loss(d, s, t, mask, chunk_size=3)  # noqa: E731
    loss, student_grad, _ = loss_and_grads(fn, student, teacher, teacher_grad=False)
    expected_loss, expected_grad, _ = loss_and_grads(fn, student.float(), teacher.float(), teacher_grad=False)
    assert loss.dtype == torch.float32 and student_grad.dtype == dtype
    assert torch.isfinite(student_grad).all()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(student_grad.float(), expected_grad, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("plugin_cls", PLUGIN_CLASSES, ids=lambda c: c.name)
def test_bare_plugin_instance_works_at_temperature_one(plugin_cls):
    student, teacher = 3 * torch.randn(2, 4, 7), 3 * torch.randn(2, 4, 7)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    bare = plugin_cls(plugin_cls.Params())
    got = loss_and_grads(lambda s, t: distill.divergence_loss(bare, s, t, mask, chunk_size=2), student, teacher)
    expected = loss_and_grads(plain_loss(distill.get_divergence(plugin_cls.name), mask), student, teacher)
    assert_all_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_non_divergence_is_refused():
    with pytest.raises(TypeError, match="get_divergence"):
        distill.divergence_loss(lambda s, t: (s - t).sum(-1), torch.zeros(2, 3), torch.zeros(2, 3))


@names
@pytest.mark.parametrize("student_grad", [True, False], ids=["student-too", "teacher-only"])
def test_teacher_logits_that_require_grad_get_the_correct_gradient(name, student_grad):
    student, teacher = 3 * torch.randn(3, 4, 6), 3 * torch.randn(3, 4, 6)
    mask = torch.rand(3, 4) < 0.7
    mask[0, 0] = True
    d = distill.get_divergence(name)

    def run(fn):
        s = student.clone().requires_grad_(student_grad)
        t = teacher.clone().requires_grad_(True)
        loss = fn(s, t)
        loss.backward()
        return loss.detach(), s.grad, t.grad

    got = run(lambda s, t: distill.divergence_loss(d, s, t, mask, chunk_size=4))
    expected = run(plain_loss(d, mask))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-7)
    if student_grad:
        torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-7)
    else:
        assert got[1] is None


@names
@examples(20)
@given(batches(), st.floats(0.25, 4.0))
def test_temperature_of_the_divergence_is_applied(name, batch, temperature):
    student, teacher, mask = batch
    assume(mask.any())
    warm = distill.get_divergence(name, temperature=temperature)
    plain = distill.get_divergence(name)
    got = loss_and_grads(lambda s, t: distill.divergence_loss(warm, s, t, mask, chunk_size=2), student, teacher)
    expected = loss_and_grads(plain_loss(lambda s, t: plain(s / temperature, t / temperature), mask), student, teacher)
    assert_all_close(got, expected, rtol=1e-5, atol=1e-7)


# --- how the loss meets the rest of a training step


@names
def test_weighted_sum_with_another_loss_scales_the_gradient(name):
    # e.g. loss = kd + ce_weight * ce, or Accelerate scaling the loss before backward
    student, teacher = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    mask = torch.tensor([[True, False, True, True]] * 3)
    d = distill.get_divergence(name)
    other = lambda s: (s[..., 0] ** 2).mean()  # noqa: E731
    got = loss_and_grads(
        lambda s, t: 0.3 * distill.divergence_loss(d, s, t, mask, chunk_size=5) + other(s), student, teacher
    )
    expected = loss_and_grads(lambda s, t: 0.3 * plain_loss(d, mask)(s, t) + other(s), student, teacher)
    assert_all_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_second_backward_through_the_same_loss_is_refused():
    student = torch.randn(4, 5, requires_grad=True)
    loss = distill.divergence_loss(distill.get_divergence("kl"), student, torch.randn(4, 5))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


class _Recorder:
    """A divergence plugin that records whether its inputs would carry a gradient."""

    name = "recorder"

    class Params(distill.Params):
        pass

    def __init__(self, params=None) -> None:
        self.params = params
        self.inputs_require_grad: list[bool] = []

    def __call__(self, student_logits, teacher_logits):
        self.inputs_require_grad.append(student_logits.requires_grad or teacher_logits.requires_grad)
        return 0.5 * (teacher_logits.softmax(-1) - student_logits.softmax(-1)).abs().sum(-1)


def test_under_no_grad_no_gradient_is_computed():
    # evaluation must not pay for a gradient buffer and a local backward per chunk
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(6, 5)
    recorder = _Recorder()
    with torch.no_grad():
        loss = distill.divergence_loss(recorder, student, teacher, chunk_size=2)
    assert recorder.inputs_require_grad == [False, False, False]
    assert not loss.requires_grad
    torch.testing.assert_close(loss, distill.get_divergence("tvd")(student, teacher).mean().detach())


# --- errors a user can cause


def test_mismatched_shapes_are_refused():
    d = distill.get_divergence("kl")
    with pytest.raises(distill.ConfigError, match=r"student logits have 5 .* teacher logits 6"):
        distill.divergence_loss(d, torch.zeros(2, 3, 5), torch.zeros(2, 3, 6))
    with pytest.raises(distill.ConfigError, match="same shape"):
        distill.divergence_loss(d, torch.zeros(2, 3, 5), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="mask shape"):
        distill.divergence_loss(d, torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        distill.divergence_loss(d, torch.zeros(2, 3, 5), torch.zeros(2, 3, 5), chunk_size=0)


@pytest.mark.parametrize("vocab_size", [1, 1000, 49152, 151936, 1 << 22])
def test_default_chunk_is_about_8_mib_of_float32(vocab_size):
    rows = distill.default_chunk_size(vocab_size)
    assert rows >= 1
    assert rows * vocab_size <= distill.loss.CHUNK_ELEMENTS or rows == 1
    assert (rows + 1) * vocab_size > distill.loss.CHUNK_ELEMENTS


def test_float16_logits_keep_the_small_gradients_a_grad_scaler_lifts():
    # as the fused head (tests/test_fused.py): (q - p) / n_tokens of a rare token underflows float16
    # unless it meets the GradScaler's factor in float32 first
    rows, vocab, grad_scale = 256, 2048, 2.0**16
    generator = torch.Generator().manual_seed(0)
    prior = -torch.linspace(0, 12, vocab)  # the rarest token e^-12 below the commonest
    student = (torch.randn(rows, vocab, generator=generator) + prior).half().requires_grad_()
    teacher = (torch.randn(rows, vocab, generator=generator) + prior).half()
    divergence = distill.get_divergence("kl")
    distill.divergence_loss(divergence, student, teacher, n_tokens=float(rows)).backward(torch.tensor(grad_scale))
    reference = student.detach().float().requires_grad_()
    distill.divergence_loss(divergence, reference, teacher.float(), n_tokens=float(rows)).backward(
        torch.tensor(grad_scale)
    )
    zeros = float((student.grad == 0).float().mean()) * 100
    reference_zeros = float((reference.grad == 0).float().mean()) * 100
    assert student.grad.dtype == torch.float16 and student.grad.isfinite().all()
    assert zeros <= reference_zeros + 0.1, (zeros, reference_zeros)
    assert float((student.grad.float() - reference.grad).norm() / reference.grad.norm()) < 1e-2
