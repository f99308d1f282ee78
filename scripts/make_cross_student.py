"""A student with another tokenizer, from what this machine has (#30's evidence pair).

The tokenizer: a byte-level BPE of ``--vocab`` tokens trained on the built-in training data (prompts
and responses), with its own special tokens (``<s>``, ``</s>``, ``<pad>``) and its own chat template
(``[user] ... </s>``), so neither its ids nor its prompts are the teacher's. The model: the embedded
teacher (SmolLM2-135M-Instruct) with ``--layers`` of its 30 layers kept (as ``prune:K``), whose
embeddings (tied to the output head, as the teacher's) are rebuilt for the new vocabulary: each new
token starts as the mean of the teacher's embeddings of the teacher's tokens of its text (the special
tokens as the teacher's ``<|im_start|>`` and ``<|im_end|>``; a token whose text the teacher cuts into
nothing, as the mean of all). The same command gives the same folder.

    .venv/bin/python scripts/make_cross_student.py --output runs/cross-student
    distill run --student runs/cross-student --divergence uld_hybrid --recipe kd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
SPECIALS = {"<s>": "<|im_start|>", "</s>": "<|im_end|>", "<pad>": "<|im_end|>"}
"""The new special tokens and the teacher's token each starts from."""


def train_tokenizer(vocab: int):
    """A byte-level BPE on the built-in training data (deterministic for one data file and size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from distill.builtin import BUILTIN_DATA

    corpus = []
    for line in BUILTIN_DATA["builtin:train"].read_text().splitlines():
        record = json.loads(line)
        corpus.append(record["prompt"] + "\n" + record["response"])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(output: Path, vocab: int, layers: int) -> dict:
    import torch

    from distill.models import load_model, load_tokenizer
    from distill.pruning import prune_layers

    tokenizer = train_tokenizer(vocab)
    teacher_tokenizer = load_tokenizer("smollm2-135m-instruct")
    teacher = load_model("smollm2-135m-instruct", "teacher")
    student = prune_layers(teacher, layers)
    old = teacher.get_input_embeddings().weight.detach()
    rows, starts_empty = [], 0
    for i in range(len(tokenizer)):
        token = tokenizer.convert_ids_to_tokens(i)
        if token in SPECIALS:
            ids = [teacher_tokenizer.convert_tokens_to_ids(SPECIALS[token])]
        else:
            ids = teacher_tokenizer(tokenizer.decode([i]), add_special_tokens=False).input_ids
        if not ids:
            starts_empty += 1
        rows.append(old[ids].mean(0) if ids else old.mean(0))
    weight = torch.stack(rows).to(old.dtype)
    embedding = torch.nn.Embedding(len(tokenizer), weight.shape[1])
    embedding.weight.data.copy_(weight)
    student.set_input_embeddings(embedding)
    head = torch.nn.Linear(weight.shape[1], len(tokenizer), bias=False)
    head.weight = embedding.weight  # tied, as the teacher's
    student.set_output_embeddings(head)
    student.config.vocab_size = len(tokenizer)
    for key, token in (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>")):
        setattr(student.config, key, tokenizer.convert_tokens_to_ids(token))
        setattr(student.generation_config, key, tokenizer.convert_tokens_to_ids(token))
    output.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(output)
    tokenizer.save_pretrained(output)
    teacher_vocab, student_vocab = set(teacher_tokenizer.get_vocab()), set(tokenizer.get_vocab())
    summary = {
        "vocab": len(tokenizer),
        "layers": layers,
        "parameters": sum(p.numel() for p in student.parameters()),
        "tokens_the_teacher_holds_too": len(teacher_vocab & student_vocab),
        "tokens_started_as_the_mean_of_all": starts_empty,
    }
    (output / "cross_student.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="the student's folder (model and tokenizer)")
    parser.add_argument("--vocab", type=int, default=8192, help="the new tokenizer's size (8,000 to 16,000)")
    parser.add_argument("--layers", type=int, default=15, help="teacher layers kept (of 30)")
    args = parser.parse_args(argv)
    summary = build(args.output, args.vocab, args.layers)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
