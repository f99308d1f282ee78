"""Token normalisation, labels and logits positions of the training objective."""

from __future__ import annotations


import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import distill
from distill.config import DataConfig, GenerationConfig
from distill.data import Example, collate, encode_records
from distill.generation import InferenceCopies, ResponseGenerator
from distill.objective import loss_denominator, micro_batch_loss, response_logits
from tiny_models import make_pair


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = make_pair(tmp_path_factory.mktemp("objective"))
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).eval()
    student = AutoModelForCausalLM.from_pretrained(paths["student"])
    tokenizer = AutoTokenizer.from_pretrained(paths["teacher"])
    return teacher, student, tokenizer


def examples() -> list[Example]:
    return [Example([3, 4, 5, 6, 7], [8, 9, 1]), Example([3, 4], [10, 11, 12, 13, 14, 1])]


def gradients(student, teacher, micro: list[list[Example]], divergence) -> list[torch.Tensor]:
    student.zero_grad()
    denominator = loss_denominator([collate(m, 0).n_tokens for m in micro])
    for m in micro:
        loss, _ = micro_batch_loss(student, teacher, collate(m, 0), divergence, denominator, ce_weight=0.3)
        loss.backward()
    return [p.grad.clone() for p in student.parameters()]


@pytest.mark.parametrize("name", ["kl", "skew_kl", "jsd"])
def test_one_micro_batch_of_two_equals_two_micro_batches_of_one(models, name):
    teacher, student, _ = models
    divergence = distill.get_divergence(name)
    together = gradients(student, teacher, [examples()], divergence)
    split = gradients(student, teacher, [[examples()[0]], [examples()[1]]], divergence)
    for a, b in zip(together, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradient_is_the_mean_over_all_response_tokens(models):
    """Against an independent computation on full logits: sum of per-token KL / number of tokens."""
    teacher, student, _ = models
    divergence = distill.get_divergence("kl")
    batch = collate(examples(), 0)
    student.zero_grad()
    loss, _ = micro_batch_loss(student, teacher, batch, divergence, loss_denominator([batch.n_tokens]))
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    full_s = student(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    with torch.no_grad():
        full_t = teacher(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    r = batch.response_mask.shape[1]
    s, t = full_s[:, -r - 1 : -1][batch.response_mask], full_t[:, -r - 1 : -1][batch.response_mask]
    reference = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-5, atol=1e-6)
    for a, p in zip(ours, student.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def test_response_logits_predict_the_response_tokens(models):
    teacher, _, _ = models
    batch = collate(examples(), 0)
    logits = response_logits(teacher, batch)
    assert logits.shape[:2] == batch.response_mask.shape
    full = teacher(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    p = batch.input_ids.shape[1] - batch.response_mask.shape[1]
    torch.testing.assert_close(logits, full[:, p - 1 : -1])


def test_eos_is_a_label_and_prompt_tokens_are_not(models):
    _, _, tokenizer = models
    assert tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id
    tokenizer.pad_token = tokenizer.eos_token  # pad == eos, the case peers got wrong
    records = [
        {"prompt": "What is 2 plus 2?", "response": "two plus two is four."},
        {"prompt": "Hi", "response": "one."},
    ]
    encoded, _ = encode_records(records, tokenizer, DataConfig(), "test")
    batch = collate(encoded, tokenizer.pad_token_id)
    for row, example in enumerate(encoded):
        labels = batch.labels[row][batch.response_mask[row]].tolist()
        assert labels == example.response_ids
        assert labels[-1] == tokenizer.eos_token_id
        prompt_text = tokenizer.decode(example.prompt_ids)
        assert "<|im_start|>assistant" in prompt_text  # chat template applied to the prompt only
    # padding (also the eos id) is never a label
    assert int(batch.response_mask.sum()) == sum(len(e.response_ids) for e in encoded)


def test_generated_responses_keep_eos_and_nothing_after(models):
    _, student, tokenizer = models
    tokenizer.pad_token = tokenizer.eos_token
    generate = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=5), batch_size=2)
    eos = tokenizer.eos_token_id
    assert generate._cut([5, 6, eos, eos, eos]) == [5, 6, eos]
    assert generate._cut([5, 6, 7]) == [5, 6, 7]
    out = generate(student, examples(), greedy=True, max_new_tokens=5)
    assert [e.prompt_ids for e in out] == [e.prompt_ids for e in examples()]
    assert all(1 <= len(e.response_ids) <= 5 for e in out)
    assert all(eos not in e.response_ids[:-1] for e in out)


def test_inference_copy_follows_the_trained_weights_in_the_compute_dtype(models):
    teacher, student, tokenizer = models
    tokenizer.pad_token = tokenizer.eos_token
    copies = InferenceCopies(torch.bfloat16)
    copy = copies.get(student)
    assert copy is not student and copy.dtype == torch.bfloat16 and not any(p.requires_grad for p in copy.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)  # a training step
    assert copies.get(student) is copy  # made once, refreshed at every call
    for name, value in student.state_dict().items():
        assert torch.equal(copy.state_dict()[name], value.to(torch.bfloat16)), name
    assert copies.get(teacher.requires_grad_(False)) is teacher  # frozen: never copied
    bf16 = teacher.to(torch.bfloat16).requires_grad_(True)
    assert copies.get(bf16) is bf16  # already in the compute dtype
    teacher.float()
    # generation through the copy: what a plain bf16 model of the same weights generates
    reference = AutoModelForCausalLM.from_config(student.config).to(torch.bfloat16).eval()
    reference.load_state_dict(student.state_dict())
    with_copy = ResponseGenerator(
        tokenizer, GenerationConfig(max_new_tokens=6), batch_size=2, inference_dtype=torch.bfloat16
    )
    plain = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=6), batch_size=2)
    assert [e.response_ids for e in with_copy(student, examples(), greedy=True)] == [
        e.response_ids for e in plain(reference, examples(), greedy=True)
    ]
    assert student.dtype == torch.float32


def test_the_head_gets_a_contiguous_input_and_the_same_logits():
    """logits_to_keep hands the head a strided slice, which bf16 matmuls take on a slow path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.models import contiguous_head_input

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).eval()
    ids = torch.randint(0, 50, (3, 9))
    expected = model(input_ids=ids, logits_to_keep=4).logits
    seen = []

    def observe(module, args):
        seen.append(args[0].is_contiguous())

    observer = model.get_output_embeddings().register_forward_pre_hook(observe)
    model(input_ids=ids, logits_to_keep=4)
    observer.remove()
    contiguous_head_input(model)
    contiguous_head_input(model)  # idempotent: one hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    model.get_output_embeddings().register_forward_pre_hook(observe)  # runs after ours
    got = model(input_ids=ids, logits_to_keep=4).logits
    assert seen == [False, True]  # the slice was strided, the head now multiplies a contiguous copy
    torch.testing.assert_close(got, expected)


def _padded_copy(model, rows: int, seed: int):
    """``model`` with ``rows`` more output-head rows of large random weights (a padded head)."""
    import copy

    padded = copy.deepcopy(model)
    head = padded.get_output_embeddings()
    extra = torch.randn(rows, head.weight.shape[1], generator=torch.Generator().manual_seed(seed)) * 5
    wider = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0] + rows, bias=False)
    wider.weight.data = torch.cat([head.weight.data, extra])
    padded.set_output_embeddings(wider)
    padded.config.vocab_size = wider.weight.shape[0]
    return padded


@pytest.mark.parametrize("name", ["kl", "skew_rkl", "jsd"])
def test_padded_head_rows_leave_the_loss_and_gradients_as_over_the_real_tokens(models, name):
    from distill.models import share_vocabulary

    teacher, student, tokenizer = models
    divergence = distill.get_divergence(name)
    batch = collate(examples(), 0)
    padded_teacher, padded_student = _padded_copy(teacher, 20, 0), _padded_copy(student, 4, 1)
    untrimmed, _ = micro_batch_loss(
        _padded_copy(student, 20, 1), padded_teacher, batch, divergence, batch.n_tokens, ce_weight=0.5
    )
    assert share_vocabulary(padded_teacher, padded_student, tokenizer) == len(tokenizer) == 300
    results = []
    for s, t in ((student, teacher), (padded_student, padded_teacher)):
        s.zero_grad()
        loss, _ = micro_batch_loss(s, t, batch, divergence, batch.n_tokens, ce_weight=0.5)
        loss.backward()
        body = {k: p.grad.clone() for k, p in s.named_parameters() if "lm_head" not in k}
        results.append((loss.detach(), body, s.get_output_embeddings().weight.grad[:300].clone()))
    (loss, body, head), (padded_loss, padded_body, padded_head) = results
    assert abs(float(untrimmed.detach()) - float(loss)) > 1e-3  # the padded rows would count without the trim
    assert abs(float(padded_loss) - float(loss)) < 1e-6
    for key in body:
        torch.testing.assert_close(padded_body[key], body[key], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded_head, head, atol=1e-6, rtol=1e-5)
