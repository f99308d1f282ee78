"""Across vocabularies (#30): the alignment of two tokenizations of one text by character spans, and
the tokens two vocabularies share."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.crossvocab import VocabularyMap, align, align_ends, normalise
from distill.errors import ConfigError
from tiny_models import make_other_tokenizer, make_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return make_tokenizer(root / "teacher"), make_other_tokenizer(root / "student")


def check_partition(groups, n_student: int, n_teacher: int, length: int) -> None:
    """Every token in exactly one group of its side, in order; every character in exactly one group."""
    if not groups:
        assert n_student == n_teacher == 0
        return
    assert [g.student_start for g in groups] == [0] + [g.student_end for g in groups[:-1]]
    assert [g.teacher_start for g in groups] == [0] + [g.teacher_end for g in groups[:-1]]
    assert [g.char_start for g in groups] == [0] + [g.char_end for g in groups[:-1]]
    if groups:
        assert (groups[-1].student_end, groups[-1].teacher_end, groups[-1].char_end) == (n_student, n_teacher, length)
    assert all(g.char_start <= g.char_end for g in groups)


TEXT = st.text(alphabet=st.sampled_from(list("abcde fgh,.!?0123") + ["é", "ü", "→", "中", "😀", "\n"]), max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_alignment_maps_every_character_and_token_to_exactly_one_group(tokenizers, text):
    teacher, student = tokenizers
    student_ids, teacher_ids, groups = align(text, student, teacher)
    check_partition(groups, len(student_ids), len(teacher_ids), len(text) if student_ids or teacher_ids else 0)
    # a group's tokens decode to its characters, on each side (byte-level tokens: whole groups decode exactly)
    for g in groups:
        if g.student_end > g.student_start and g.teacher_end > g.teacher_start:
            left = student.decode(student_ids[g.student_start : g.student_end])
            right = teacher.decode(teacher_ids[g.teacher_start : g.teacher_end])
            assert left.strip() == right.strip() == text[g.char_start : g.char_end].strip()


@settings(max_examples=300, deadline=None)
@given(
    cuts=st.tuples(
        st.lists(st.integers(0, 40), max_size=12).map(sorted), st.lists(st.integers(0, 40), max_size=12).map(sorted)
    ),
    length=st.integers(0, 45),
)
def test_alignment_of_any_two_cuts_is_a_partition(cuts, length):
    student, teacher = ([min(e, length) for e in ends] for ends in cuts)
    groups = align_ends(student, teacher, length)
    if student or teacher:
        check_partition(groups, len(student), len(teacher), length)
    for g in groups:  # a group closes where both sides have a token boundary (or at the text's end)
        last = g is groups[-1]
        if not last:
            assert student[g.student_end - 1] == teacher[g.teacher_end - 1] == g.char_end


def test_identical_tokenizers_align_token_by_token(tokenizers):
    teacher, _ = tokenizers
    text = "Spell the number 3. Three!"
    student_ids, teacher_ids, groups = align(text, teacher, teacher)
    assert student_ids == teacher_ids and len(groups) == len(student_ids)
    assert all(g.student_end - g.student_start == 1 == g.teacher_end - g.teacher_start for g in groups)


def test_a_slow_tokenizer_is_refused_in_one_line(tokenizers):
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="slow .* fast version"):
        align("text", Slow(), tokenizers[0])


def test_vocabulary_map_matches_equal_strings_and_optionally_the_space_markers(tokenizers):
    teacher, student = tokenizers
    exact = VocabularyMap.build(student, teacher)
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    strings = {i: t for t, i in t_vocab.items()}
    assert exact.matched == len(set(t_vocab) & set(s_vocab)) > 0
    for s, t in zip(exact.student_ids, exact.teacher_ids):
        assert s_vocab[strings[t]] == s
    assert list(exact.teacher_ids) == sorted(exact.teacher_ids)
    normalised = VocabularyMap.build(student, teacher, normalised=True)
    assert normalised.matched >= exact.matched
    assert normalise("\u0120the") == normalise("\u2581the") != "\u0120the"


def test_vocabulary_map_is_kept_in_the_cache_folder(tokenizers, tmp_path, monkeypatch):
    teacher, student = tokenizers
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))
    first = VocabularyMap.cached(student, teacher)
    (kept,) = (tmp_path / "vocabulary-maps").iterdir()
    assert VocabularyMap.cached(student, teacher) == first == VocabularyMap.build(student, teacher)
    kept.write_text("{damaged")
    assert VocabularyMap.cached(student, teacher) == first  # made again
    monkeypatch.setenv("DISTILL_CACHE", "off")
    assert VocabularyMap.cached(student, teacher) == first


# --- ULD and the hybrid against TRL's GOLD (trl 1.16, the test extra pins it)


class FakeTokenizer:
    """Only what the vocabulary map and GOLD's mapping read: ``get_vocab`` and the size."""

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


STUDENT_VOCAB = {"a": 0, "b": 1, "c": 2, "x": 3, "y": 4, "\u0120the": 5, "d": 6}
TEACHER_VOCAB = {"b": 0, "a": 1, "z": 2, "c": 3, "w": 4, "q": 5, "\u2581the": 6, "d": 7, "e": 8}


def gold_loss(hybrid: bool, **config):
    import types

    trl_gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    settings_ = dict(
        uld_crossentropy_weight=0.0,
        uld_distillation_weight=1.0,
        uld_student_temperature=1.0,
        uld_teacher_temperature=1.0,
        uld_skip_student_eos=False,
        uld_skip_teacher_eos=False,
        use_extended_uld=True,
        uld_token_merge_strategy="observed",
        uld_use_hybrid_loss=hybrid,
        uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None,
        beta=0.5,
    )
    settings_.update(config)
    return trl_gold.ULDLoss(
        types.SimpleNamespace(**settings_), FakeTokenizer(STUDENT_VOCAB), FakeTokenizer(TEACHER_VOCAB)
    )


def test_trl_is_the_pinned_version():
    trl = pytest.importorskip("trl")
    assert trl.__version__.startswith("1.16."), trl.__version__


@pytest.mark.parametrize("weights", [None, (0.3, 1.7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hybrid_equals_gold_on_fixed_distributions(seed, weights):
    import torch

    from distill import default_registry

    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(5, len(STUDENT_VOCAB), generator=generator, dtype=torch.float64).softmax(-1)
    teacher = torch.randn(5, len(TEACHER_VOCAB), generator=generator, dtype=torch.float64).softmax(-1)
    config = (
        {} if weights is None else dict(uld_hybrid_matched_weight=weights[0], uld_hybrid_unmatched_weight=weights[1])
    )
    theirs = gold_loss(True, **config)._compute_hybrid_uld_loss(student, teacher)
    params = {"matched": "gold_jsd", "beta": 0.5}
    if weights is not None:
        params.update(matched_weight=weights[0], unmatched_weight=weights[1])
    ours = default_registry().get_divergence("uld_hybrid", **params)
    ours.plugin.bind(VocabularyMap.build(FakeTokenizer(STUDENT_VOCAB), FakeTokenizer(TEACHER_VOCAB)))
    values = ours(student.log().float(), teacher.log().float())  # logits whose softmax is the distribution
    assert values.shape == (5,)
    assert values.mean().item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("strategy", ["observed", "bayesian"])
def test_alignment_merge_and_uld_equal_gold_on_one_sequence(strategy):
    """A response the student cut in 5 tokens and the teacher in 4, after one prompt position: GOLD's
    groups (by span ends), its merged probabilities and its ULD loss equal ours (``bayesian`` reads each
    token's probability at the position before it, as GOLD does)."""
    import torch

    from distill.crossvocab import merge_groups, sorted_l1

    generator = torch.Generator().manual_seed(3)
    student_ends, teacher_ends = [1, 2, 4, 6, 7], [2, 4, 5, 7]
    s_logits = torch.randn(1, 6, len(STUDENT_VOCAB), generator=generator)
    t_logits = torch.randn(1, 5, len(TEACHER_VOCAB), generator=generator)
    s_ids, t_ids = torch.tensor([[6, 0, 1, 2, 3, 4]]), torch.tensor([[7, 1, 0, 3, 2]])
    s_offsets = torch.tensor([[[0, 0]] + [[e - 1, e] for e in student_ends]])
    t_offsets = torch.tensor([[[0, 0]] + [[e - 1, e] for e in teacher_ends]])
    labels_s, labels_t = s_ids.clone(), t_ids.clone()
    labels_s[0, 0] = labels_t[0, 0] = -100  # the prompt
    loss = gold_loss(False, uld_token_merge_strategy=strategy)
    theirs = loss(s_logits, t_logits, labels_s, labels_t, s_ids, t_ids, s_offsets, t_offsets)
    groups = align_ends(student_ends, teacher_ends, 7)
    gold_groups = loss._align_by_byte_offsets(s_offsets[0, 1:].tolist(), t_offsets[0, 1:].tolist())
    assert [list(range(g.student_start, g.student_end)) for g in groups] == gold_groups[0]
    assert [list(range(g.teacher_start, g.teacher_end)) for g in groups] == gold_groups[1]
    shift = 1 if strategy == "bayesian" else 0
    s_probs, t_probs = (x[0, 1 - shift : x.shape[1] - shift].softmax(-1) for x in (s_logits, t_logits))
    s_rows = merge_groups(s_probs, gold_groups[0], s_ids[0, 1:].tolist(), strategy)
    t_rows = merge_groups(t_probs, gold_groups[1], t_ids[0, 1:].tolist(), strategy)
    assert torch.equal(s_rows, loss._merge_probabilities_with_alignment_groups(s_probs, gold_groups[0], s_ids[0, 1:]))
    assert sorted_l1(s_rows, t_rows).mean().item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("name, params", [("uld", {}), ("uld_hybrid", {}), ("uld_hybrid", {"matched": "gold_jsd"})])
def test_cross_vocabulary_gradients_match_finite_differences(name, params):
    import torch

    from distill import default_registry

    divergence = default_registry().get_divergence(name, **params)
    if name == "uld_hybrid":
        divergence.plugin.bind(VocabularyMap.build(FakeTokenizer(STUDENT_VOCAB), FakeTokenizer(TEACHER_VOCAB)))
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(3, len(STUDENT_VOCAB), generator=generator, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, len(TEACHER_VOCAB), generator=generator, dtype=torch.float64)
    plugin = divergence.plugin  # float64 straight to the plugin: the core's wrapper computes in float32
    assert torch.autograd.gradcheck(lambda s: plugin(s, teacher).sum(), (student,), eps=1e-6, atol=1e-6)


PROBS = st.lists(st.floats(-6, 6), min_size=2, max_size=12)


@settings(max_examples=100, deadline=None)
@given(logits=PROBS, other=PROBS, data=st.data())
def test_uld_properties(logits, other, data):
    import torch

    from distill import default_registry

    uld = default_registry().get_divergence("uld")
    p = torch.tensor([logits])
    order = data.draw(st.permutations(range(len(logits))))
    permuted = p[:, list(order)]
    assert uld(permuted, p).item() == pytest.approx(0.0, abs=1e-6)  # zero under any permutation
    q = torch.tensor([other])
    forward, backward = uld(q, p).item(), uld(p, q).item()
    assert forward >= 0 and forward == pytest.approx(backward, abs=1e-6)  # non-negative, symmetric
    padded = torch.cat([q, torch.full((1, 5), -1e4)], dim=-1)  # zero-probability entries past a vocabulary
    assert uld(padded, p).item() == pytest.approx(forward, abs=1e-6)


def test_bad_cross_vocabulary_input_is_one_line():
    from distill import default_registry

    hybrid = default_registry().get_divergence("uld_hybrid")
    with pytest.raises(ConfigError, match="share no token string"):
        hybrid.plugin.bind(VocabularyMap.build(FakeTokenizer({"a": 0}), FakeTokenizer({"b": 0})))
    with pytest.raises(ConfigError, match="set both or neither"):
        default_registry().get_divergence("uld_hybrid", matched_weight=0.5)
    with pytest.raises(ConfigError, match="other than uld_hybrid"):
        default_registry().get_divergence("uld_hybrid", matched="uld_hybrid")
