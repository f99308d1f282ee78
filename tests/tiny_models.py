"""Tiny teacher/student models and data, built from configs (no downloads), for end-to-end tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "zero one two three four five six seven eight nine ten".split()


def make_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b = rng.randrange(5), rng.randrange(5)
        kind = rng.choice(["add", "name", "list"])
        if kind == "add":
            records.append(
                {"prompt": f"What is {a} plus {b}?", "response": f"{WORDS[a]} plus {WORDS[b]} is {WORDS[a + b]}."}
            )
        elif kind == "name":
            records.append({"prompt": f"Spell the number {a}.", "response": f"The number {a} is spelled {WORDS[a]}."})
        else:
            records.append({"prompt": f"Count from {a} to {a + b}.", "response": " ".join(WORDS[a : a + b + 1]) + "."})
    return records


def write_data(path: Path, n: int = 48, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in make_records(n, seed)))
    return path


def make_tokenizer(folder: Path, *, pad_token: str | None = None):
    """A byte-level BPE tokenizer trained on the synthetic data, with a chat template; EOS = <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>"] + ([pad_token] if pad_token else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [r["prompt"] + " " + r["response"] for r in make_records(400, seed=1)] + ["user assistant system"]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token=pad_token
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


OTHER_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def make_other_tokenizer(folder: Path):
    """A tokenizer unlike ``make_tokenizer``'s (280 tokens, other specials and chat template; EOS =
    </s>), as a student from another model family has."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([r["response"] + " " + r["prompt"] for r in make_records(300, seed=3)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", bos_token="<s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.chat_template = OTHER_TEMPLATE
    fast.save_pretrained(folder)
    return fast


# Tiny configs of the decoder architectures the tests train (``test_architectures.py``): hidden 32,
# 2 heads, the tokenizer's ids (BOS 0, EOS 1, no pad id: the tokenizer pads with EOS). Sliding windows
# (8 positions) are shorter than a prompt, so the generation cache's sliding layers really slide.
ARCHITECTURES = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=1, tie_word_embeddings=True)),  # tied, as Qwen2.5-0.5B's
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=1, head_dim=8, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=8)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            num_key_value_heads=1,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=8,
            final_logit_softcapping=30.0,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "phi3": ("Phi3Config", dict(num_key_value_heads=2, sliding_window=8)),
    "gpt2": ("GPT2Config", dict(n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "opt": ("OPTConfig", dict(ffn_dim=64, dropout=0.0)),
}


def make_config(architecture: str, vocab_size: int, layers: int, hidden: int = 32):
    """A tiny config of ``architecture`` (a key of ``ARCHITECTURES``) with ``vocab_size`` head rows."""
    import transformers

    class_name, settings = ARCHITECTURES[architecture]
    config_class = getattr(transformers, class_name)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=None)
    if architecture == "gpt2":
        return config_class(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, **ids, **settings)
    settings = dict(settings)
    if architecture == "gemma3" and layers != len(settings["layer_types"]):
        settings["layer_types"] = settings["layer_types"][:layers]
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=512)
    if architecture != "opt":
        sizes["intermediate_size"] = 2 * hidden
    return config_class(vocab_size=vocab_size, **sizes, **ids, **settings)


def make_model(
    folder: Path, vocab_size: int, layers: int, hidden: int = 32, seed: int = 0, architecture: str | None = None
):
    """A random model saved in ``folder``; ``architecture`` None: the Llama every other test uses
    (transformers' default BOS 1 and EOS 2 in its generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if architecture is None:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
    else:
        model = AutoModelForCausalLM.from_config(make_config(architecture, vocab_size, layers, hidden))
    model.save_pretrained(folder)
    return model


def make_pair(
    root: Path,
    *,
    student_vocab: int | None = None,
    teacher_vocab: int | None = None,
    pad_token: str | None = None,
    architecture: str | None = None,
) -> dict[str, Path]:
    """teacher/ (2 layers) and student/ (1 layer) folders of ``architecture``, both with the tokenizer
    (300 tokens), and data.jsonl. ``*_vocab``: output-head rows, by default the tokenizer's size."""
    teacher, student = root / "teacher", root / "student"
    tokenizer = make_tokenizer(teacher, pad_token=pad_token)
    tokenizer.save_pretrained(student)
    make_model(teacher, teacher_vocab or len(tokenizer), layers=2, seed=1, architecture=architecture)
    make_model(student, student_vocab or len(tokenizer), layers=1, seed=2, architecture=architecture)
    return {"teacher": teacher, "student": student, "data": write_data(root / "data.jsonl")}


def table_rows(output: str) -> dict[str, str]:
    """``distill list`` rows by name. A table (a terminal): the first line of each row, cells joined by
    ' | '. Plain output (not a terminal): each plugin's line, whole (its name is the first word)."""
    found = {}
    if "│" not in output:
        for line in output.splitlines():
            if line.strip() and not line.startswith("#"):
                found[line.split()[0]] = line
        return found
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells and cells[0]:
            found[cells[0]] = " | ".join(cells)
    return found


def greedy_generate(model, ids, attention, max_new_tokens: int, eos_token_id, pad_token_id: int = 0):
    """transformers' own greedy ``generate``, the reference the decode loop is checked against.

    ``ids``, ``attention``: ``[B, P]`` left-padded prompts; returns ``[B, <= max_new_tokens]`` new
    tokens, ``pad_token_id`` after each row's EOS (``eos_token_id``: an id, a list of them, or None)."""
    import torch

    with torch.no_grad():
        return model.generate(
            input_ids=ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            do_sample=False,
            temperature=None,
            top_k=None,
            top_p=None,
        )[:, ids.shape[1] :]


def make_seq2seq_model(folder: Path, vocab_size: int, layers: int, kind: str, seed: int = 0, hidden: int = 32):
    """A random encoder-decoder of ``kind`` (``t5``: tied head, relative positions; ``bart``: learned
    positions, untied ``final_logits_bias``) saved in ``folder``, decoder start id 0, EOS 1, pad 1
    (the tiny tokenizer's ``<|im_start|>`` and ``<|im_end|>``)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

    torch.manual_seed(seed)
    ids = dict(decoder_start_token_id=0, eos_token_id=1, pad_token_id=1)
    if kind == "t5":
        config = T5Config(
            vocab_size=vocab_size, d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=layers, num_heads=2, **ids
        )
    else:
        config = BartConfig(
            vocab_size=vocab_size,
            d_model=hidden,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=2 * hidden,
            decoder_ffn_dim=2 * hidden,
            max_position_embeddings=512,
            bos_token_id=0,
            forced_eos_token_id=None,
            **ids,
        )
    model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config.decoder_start_token_id = 0
    model.save_pretrained(folder)
    return model


def make_seq2seq_pair(root: Path, kind: str = "t5") -> dict[str, Path]:
    """teacher/ (2 layers a stack) and student/ (1) encoder-decoders of ``kind`` with the tiny tokenizer,
    and data.jsonl."""
    teacher, student = root / "teacher", root / "student"
    tokenizer = make_tokenizer(teacher)
    tokenizer.save_pretrained(student)
    make_seq2seq_model(teacher, len(tokenizer), 2, kind, seed=1)
    make_seq2seq_model(student, len(tokenizer), 1, kind, seed=2)
    return {"teacher": teacher, "student": student, "data": write_data(root / "data.jsonl")}
