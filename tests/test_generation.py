"""The decode loop against transformers' generate, its sampler, and ResponseGenerator's outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from distill.config import GenerationConfig
from distill.data import Example, collate_prompts
from distill.generation import ResponseGenerator, TokenPicker, decodable, decode
from tiny_models import greedy_generate

VOCAB = 300
PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20], [30, 31, 32, 33, 34]]  # left-padded to 7
NEW = 16


def tiny_model(family: str, vocab: int = VOCAB):
    torch.manual_seed(0)
    ids = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    if family in ("llama", "qwen2"):
        config_class, model_class, kv_heads = {
            "llama": (LlamaConfig, LlamaForCausalLM, 2),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM, 1),
        }[family]
        sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = config_class(**ids, **sizes, num_key_value_heads=kv_heads, max_position_embeddings=256)
        return model_class(config).eval()
    # a wide initialisation: GPT-2's default (std 0.02) makes a 2-layer model repeat one token forever
    config = GPT2Config(**ids, n_positions=256, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def model(request, single_thread):
    return tiny_model(request.param)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return collate_prompts([Example(p, []) for p in PROMPTS], PAD)


def generate(model, eos_id: int | None) -> torch.Tensor:
    """transformers' greedy generate on the same prompts: ``[4, <= NEW]`` new tokens, pad after each row's EOS."""
    ids, attention = prompts()
    return greedy_generate(model, ids, attention, NEW, eos_id, pad_token_id=PAD)


def our_decode(model, eos_id: int | None, pick: TokenPicker | None = None) -> torch.Tensor:
    ids, attention = prompts()
    with torch.no_grad():
        return decode(model, ids, attention, pick or TokenPicker.greedy(), NEW, eos_id, PAD)


def an_eos(model) -> tuple[int, int]:
    """An id that greedy decoding first emits at step >= 2 of one row and never in another, and that
    step: as EOS it makes rows that end early and rows that reach the cap."""
    free = our_decode(model, None).tolist()
    for step in range(2, NEW):
        eos = free[1][step]
        if eos not in free[1][:step] and any(eos not in row for row in free):
            return eos, step
    raise AssertionError(f"no usable EOS in {free}")


def test_greedy_decode_equals_transformers_generate_without_eos(model):
    free = our_decode(model, None)
    assert torch.equal(free, generate(model, None))
    assert len(set(free.flatten().tolist())) > 4  # the model does not repeat one token: the comparison means something


def test_greedy_decode_equals_transformers_generate_with_rows_ending_early(model):
    eos, step = an_eos(model)
    ours, theirs = our_decode(model, eos), generate(model, eos)
    ends = [row.index(eos) if eos in row else None for row in ours.tolist()]
    assert ends[1] == step and None in ends  # one row ends early, one reaches the cap
    # generate stops once every row is done; ours is padded to the cap
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1] :] == PAD).all()
    for row, end in zip(ours.tolist(), ends):
        if end is not None:  # the EOS is kept, nothing but padding after it
            assert row[end] == eos and set(row[end + 1 :]) <= {PAD}


def test_finished_rows_leave_the_batch(model):
    eos, _ = an_eos(model)
    batch_sizes = []
    handle = model.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        ours = our_decode(model, eos)
    finally:
        handle.remove()
    still_going = [sum(eos not in row[: step + 1] for row in ours.tolist()) for step in range(NEW - 1)]
    assert batch_sizes == [len(PROMPTS)] + [n for n in still_going if n > 0]
    assert batch_sizes[-1] < len(PROMPTS)


def test_rows_stop_at_the_cap_without_eos(model):
    free = our_decode(model, None)
    absent = next(i for i in range(1, VOCAB) if i not in free.flatten().tolist())
    capped = our_decode(model, absent)
    assert capped.shape == (len(PROMPTS), NEW) and torch.equal(capped, free)


def test_sampled_decode_is_reproducible_from_the_global_seed(model):
    pick = TokenPicker(temperature=1.5, top_k=0, top_p=1.0)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(our_decode(model, an_eos(model)[0], pick))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "pick",
    [TokenPicker(1.0, 1, 1.0), TokenPicker(1.0, 0, 1e-6), TokenPicker(0.3, 5, 0.5)],
    ids=["top_k=1", "top_p~0", "mixed"],
)
def test_sampling_with_one_token_left_is_greedy(pick):
    """top-k 1 or a top-p below the largest probability leave only the argmax to draw. ("mixed":
    a low temperature makes the most probable token hold more than half the mass of the top 5.)"""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 0.5], [4.0, 0.0, 3.9, 1.0, 0.0, 0.0]])
    torch.manual_seed(0)
    for _ in range(50):
        assert pick(logits).tolist() == [1, 0]


def warped_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The reference: transformers' own warpers, in generate's order, then the softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0].softmax(-1)


@pytest.mark.parametrize(
    "temperature, top_k, top_p, kept",
    [
        (1.0, 0, 1.0, 6),
        (2.0, 0, 1.0, 6),
        (0.5, 0, 1.0, 6),
        (1.0, 3, 1.0, 3),
        # probabilities .45 .27 .16 .06 .04 .02: top-p 0.75 keeps three tokens, 0.5 two, 0.4 one
        (1.0, 0, 0.75, 3),
        (1.0, 0, 0.5, 2),
        (1.0, 0, 0.4, 1),
        (1.0, 4, 0.8, 3),
    ],
)
def test_sampler_draws_from_the_filtered_softmax(temperature, top_k, top_p, kept):
    """Frequencies over 60000 draws against the probabilities transformers' warpers define."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 1.5, -0.5])
    expected = warped_probabilities(logits, temperature, top_k, top_p).double()
    assert int((expected > 0).sum()) == kept
    draws = 60000
    torch.manual_seed(0)
    tokens = TokenPicker(temperature, top_k, top_p)(logits.expand(draws, -1))
    frequencies = torch.bincount(tokens, minlength=len(logits)).double() / draws
    assert (frequencies[expected == 0] == 0).all()
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)


class Tokenizer:
    """What ResponseGenerator reads from a tokenizer."""

    def __init__(self, eos_token_id: int | None, pad_token_id: int) -> None:
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id

    def __len__(self) -> int:
        return VOCAB


def test_head_rows_past_the_tokenizer_are_never_generated(single_thread):
    """A head with 8 rows more than the tokenizer's 300 ids, their logits raised above all others:
    neither loop returns them."""
    model = tiny_model("llama", vocab=VOCAB + 8)

    def raise_padded_rows(module, args, logits):
        return torch.cat([logits[..., :VOCAB], logits[..., VOCAB:] + 100.0], dim=-1)

    model.lm_head.register_forward_hook(raise_padded_rows)
    examples = [Example(p, []) for p in PROMPTS]
    ids, attention = prompts()
    generator = ResponseGenerator(Tokenizer(2, PAD), GenerationConfig(max_new_tokens=6), batch_size=4)
    with torch.no_grad():
        assert (model(input_ids=ids, attention_mask=attention).logits[:, -1].argmax(-1) >= VOCAB).all()
        for greedy in (True, False):
            assert all(max(e.response_ids) < VOCAB for e in generator(model, examples, greedy=greedy))
            assert generator._transformers_generate(model, ids, attention, not greedy, 6, [2]).max() < VOCAB


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_response_generator_returns_what_the_transformers_path_returns(model, pad_is_eos):
    eos, step = an_eos(model)
    tokenizer = Tokenizer(eos, eos if pad_is_eos else PAD)
    examples = [Example(p, [], reference=f"r{i}") for i, p in enumerate(PROMPTS)]
    model.train()  # as the student is between steps: generation runs in eval mode (no dropout) and gives the mode back
    try:
        ours = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=NEW), batch_size=3)(
            model, examples, greedy=True
        )
        theirs = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=NEW), batch_size=3, always_generate=True)(
            model, examples, greedy=True
        )
        assert model.training
    finally:
        model.eval()
    assert ours == theirs and [e.reference for e in ours] == [e.reference for e in examples]
    assert [e.prompt_ids for e in ours] == PROMPTS
    lengths = [len(e.response_ids) for e in ours]
    assert lengths[1] == step + 1 and NEW in lengths  # ends at the EOS (kept) or at the cap
    assert all(e.response_ids[-1] == eos for e in ours if len(e.response_ids) < NEW)
    assert all(eos not in e.response_ids[:-1] for e in ours)


def test_synced_generation_goes_through_transformers_generate(monkeypatch, single_thread):
    """FSDP/ZeRO-3: generate's synced_gpus loop keeps every rank stepping; ours is not used."""
    model = tiny_model("llama")
    calls = []
    original = model.generate

    def recording_generate(**options):
        calls.append(options.pop("synced_gpus", False))
        return original(**options)  # one process: nothing to sync with

    monkeypatch.setattr(model, "generate", recording_generate)
    examples = [Example(p, []) for p in PROMPTS]
    tokenizer = Tokenizer(an_eos(model)[0], PAD)
    synced = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=NEW), batch_size=4, synced=True)(
        model, examples, greedy=True
    )
    assert calls == [True]
    plain = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=NEW), batch_size=4)(
        model, examples, greedy=True
    )
    assert calls == [True] and synced == plain


def test_lora_student_decodes_like_peft_generate(single_thread):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(
        tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    assert decodable(student)
    eos, _ = an_eos(student)
    ours, theirs = our_decode(student, eos), generate(student, eos)
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)


def test_models_the_loop_cannot_drive_are_left_to_generate(single_thread):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    assert decodable(tiny_model("gpt2")) and decodable(tiny_model("qwen2"))
    assert not decodable(torch.nn.Linear(2, 2))  # not a transformers model
    assert not decodable(
        T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    )
    assert not decodable(
        get_peft_model(tiny_model("llama"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    )


def test_generation_speed_benchmark_runs_on_tiny_models(tmp_path, monkeypatch, single_thread):
    """The benchmark script end to end (one repetition, 6 tokens): every case, both implementations,
    the same greedy tokens from both. Not a timing test."""
    import importlib.util

    from cli_runs import pair_args, sets
    from tiny_models import make_pair

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "generation_speed.py"
    spec = importlib.util.spec_from_file_location("generation_speed", path)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "generation_speed", benchmark)  # its dataclass looks its module up there
    monkeypatch.syspath_prepend(str(path.parent))  # the benchmarks import common.py from their folder
    spec.loader.exec_module(benchmark)
    tiny = make_pair(tmp_path)
    output = tmp_path / "generation_speed.json"
    sizes = ["--batch-size", "4", "--max-new-tokens", "6", "--repeats", "1", "--eval-repeats", "1", "--threads", "1"]
    benchmark.main(
        [*pair_args(tiny), *sizes, *sets("eval.rouge_samples=2", "eval.batch_size=1"), "--output", str(output)]
    )
    report = json.loads(output.read_text())
    workloads = report["settings"]["workloads"]
    assert report["complete"] and report["settings"]["max_new_tokens"] == 6
    assert (
        workloads["train"]["prompts"],
        workloads["train"]["batch_size"],
        workloads["eval"]["prompts"],
        workloads["eval"]["batch_size"],
    ) == (4, 4, 2, 1)
    cases = {(c["workload"], c["model"], c["dtype"], c["mode"]) for c in report["cases"]}
    models_and_dtypes = [(m, d) for m in ("student", "teacher") for d in ("float32", "bfloat16")]
    assert cases == {("train", m, d, s) for m, d in models_and_dtypes for s in ("sampled", "greedy")} | {
        ("eval", m, d, "greedy") for m, d in models_and_dtypes
    }
    for case in report["cases"]:
        assert all(case[name]["median_seconds"] > 0 for name in ("generate", "decode"))
        assert ("decode-linear-head" in case) == (case["dtype"] == "float32")
        batches, prompts = (1, 4) if case["workload"] == "train" else (2, 2)
        assert (
            batches <= case["decode"]["mean_forwards"] <= 6 * batches
            and case["decode"]["mean_new_tokens"] <= 6 * prompts
        )
        if case["mode"] == "greedy":
            assert case["same_tokens"] and case.get("same_tokens_linear_head", True), case


def two_stop_ids(model) -> list[int]:
    """Two ids of greedy decoding: ``an_eos`` (ends row 1 early), and one that ends another row first."""
    free = our_decode(model, None).tolist()
    first, first_step = an_eos(model)
    for row in (0, 2, 3):
        for step in range(1, NEW):
            token = free[row][step]
            if (
                token != first
                and token not in free[row][:step]
                and first not in free[row][: step + 1]
                and token not in free[1][: first_step + 1]
            ):
                return [first, token]
    raise AssertionError(f"no second stop id in {free}")


def test_several_stop_ids_each_end_a_row_as_generate_does(model):
    stops = two_stop_ids(model)
    ours, theirs = our_decode(model, stops), generate(model, stops)
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    free = our_decode(model, None).tolist()
    for row, done in zip(ours.tolist(), free):
        end = next((i for i, t in enumerate(done) if t in stops), None)
        if end is None:
            assert row == done
        else:  # the first of either id ends the row and is kept
            assert row[: end + 1] == done[: end + 1] and set(row[end + 1 :]) <= {PAD}
    assert {row[i] for row in ours.tolist() for i in range(NEW) if row[i] in stops} == set(
        stops
    )  # both ids ended a row


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_every_id_of_the_generation_config_and_the_tokenizer_eos_ends_a_response(pad_is_eos, single_thread):
    """Llama-3 style: generation_config.eos_token_id is a list; the tokenizer's EOS is yet another id."""
    model = tiny_model("llama")
    first, second = two_stop_ids(model)
    free = our_decode(model, None).tolist()
    tokenizer_eos = next(i for i in range(3, VOCAB) if all(i not in row for row in free))  # never emitted
    model.generation_config.eos_token_id = [first, second]
    tokenizer = Tokenizer(tokenizer_eos, tokenizer_eos if pad_is_eos else PAD)
    generator = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=NEW), batch_size=4)
    assert generator.stop_ids(model) == [first, second, tokenizer_eos]
    examples = [Example(p, []) for p in PROMPTS]
    for always_generate in (False, True):
        generator.always_generate = always_generate
        out = generator(model, examples, greedy=True)
        ends = {e.response_ids[-1] for e in out if len(e.response_ids) < NEW}
        assert ends == {first, second}, (always_generate, out)  # kept as the last label
        assert all(not {first, second} & set(e.response_ids[:-1]) for e in out)


# --- decode's few-row head


def test_few_row_head_multiplies_few_rows_as_w_times_x_transposed_and_is_restored(single_thread):
    """Up to FEW_ROWS rows: ``(W @ x.T).T + b`` (the same logits as F.linear up to rounding); more rows:
    F.linear itself. The head's own forward is back afterwards, and it never lingers after an error."""
    from distill.generation import FEW_ROWS, few_row_head

    head = torch.nn.Linear(32, VOCAB)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    few, many = torch.randn(2, 3, 32), torch.randn(FEW_ROWS + 1, 32)
    with torch.no_grad(), few_row_head(model):
        assert "forward" in vars(head)
        out_few, out_many = head(few), head(many)
        ours = vars(head)["forward"]
        with few_row_head(model):  # another decode on the same model meanwhile: leaves ours in place
            assert vars(head)["forward"] is ours
        assert vars(head)["forward"] is ours
    assert "forward" not in vars(head)
    with torch.no_grad():
        expected = (head.weight @ few.reshape(6, 32).t()).t() + head.bias
        assert out_few.shape == (2, 3, VOCAB) and out_few.is_contiguous()
        assert torch.equal(out_few.reshape(6, VOCAB), expected)
        torch.testing.assert_close(out_few, torch.nn.functional.linear(few, head.weight, head.bias))
        assert torch.equal(out_many, torch.nn.functional.linear(many, head.weight, head.bias))
    with pytest.raises(RuntimeError, match="inside"), few_row_head(model):
        raise RuntimeError("inside")
    assert "forward" not in vars(head)


def test_few_row_head_leaves_bf16_and_non_linear_heads_alone(single_thread):
    from peft import LoraConfig, get_peft_model

    from distill.generation import few_row_head

    bf16 = tiny_model("llama").to(torch.bfloat16)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["lm_head"]))
    for model in (bf16, lora):
        head = model.get_output_embeddings()
        with few_row_head(model):
            assert "forward" not in vars(head)


def test_decode_uses_the_few_row_head_and_matches_it_turned_off(monkeypatch, single_thread):
    """Inside decode the float32 head multiplies its rows itself: F.linear never sees the head's
    weight (it does with FEW_ROWS = 0, what benchmarks/generation_speed.py compares), and greedy
    tokens are the same either way."""
    import distill.generation as generation

    model = tiny_model("llama")
    plain_linear = torch.nn.functional.linear
    head_calls: list[int] = []

    def counting_linear(input, weight, bias=None):
        if weight is model.lm_head.weight:
            head_calls.append(input.shape[0])
        return plain_linear(input, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    ours = our_decode(model, None)
    assert head_calls == [] and "forward" not in vars(model.lm_head)
    monkeypatch.setattr(generation, "FEW_ROWS", 0)
    assert torch.equal(our_decode(model, None), ours)
    assert len(head_calls) == NEW  # the prefill and each further token: one head call each
