"""Regenerate the built-in instruction data: the built-in teacher answers the project's prompts.

    .venv/bin/python scripts/make_default_data.py            # writes core/assets/default_{train,val}.jsonl

Reads core/assets/prompts.jsonl (written by scripts/make_prompts.py), holds out a validation split
stratified by category, and answers every prompt greedily with SmolLM2-135M-Instruct (the GGUF
teacher, in bfloat16 by default), in length-sorted batches with a progress bar. Answers are cached in
core/assets/.answers.cache.jsonl so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict

import torch
from rich.progress import Progress

from distill.builtin import ASSETS, SMOLLM2
from distill.data import Example, PromptFormatter
from distill.generation import ResponseGenerator
from distill.config import GenerationConfig
from distill.models import load_model, load_tokenizer


def split_ids(rows: list[dict], n_val: int, seed: int) -> set[str]:
    """``n_val`` prompt ids, spread over the categories in proportion to their size."""
    by_category: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        by_category[row["category"]].append(row["id"])
    rng = random.Random(seed)
    n_val = min(n_val, len(rows) // 2)
    chosen: list[str] = []
    for ids in by_category.values():
        rng.shuffle(ids)
    while len(chosen) < n_val:
        for category in sorted(by_category):
            if by_category[category] and len(chosen) < n_val:
                chosen.append(by_category[category].pop())
    return set(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--val", type=int, default=80, help="validation prompts (default 80)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=0, help="answer only the first N prompts (a trial)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="teacher precision for generation (bfloat16 is several times faster on CPUs with AMX)",
    )
    args = parser.parse_args()

    rows = [json.loads(line) for line in (ASSETS / "prompts.jsonl").read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    cache_path = ASSETS / ".answers.cache.jsonl"
    cache = {}
    if cache_path.exists():
        for line in cache_path.read_text().splitlines():
            record = json.loads(line)
            cache[record["id"]] = record
    todo = [r for r in rows if r["id"] not in cache]

    tokenizer = load_tokenizer(SMOLLM2)
    teacher = load_model(SMOLLM2, "teacher", dtype=getattr(torch, args.dtype)).eval()
    formatter = PromptFormatter(tokenizer)
    generate = ResponseGenerator(
        tokenizer, GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0.0), args.batch_size
    )
    todo.sort(key=lambda r: len(formatter([{"role": "user", "content": r["prompt"]}])))
    started = time.perf_counter()
    with Progress() as progress, open(cache_path, "a") as cache_file:
        task = progress.add_task("teacher answers", total=len(todo))
        for start in range(0, len(todo), args.batch_size):
            chunk = todo[start : start + args.batch_size]
            examples = [Example(formatter([{"role": "user", "content": r["prompt"]}]), []) for r in chunk]
            with torch.inference_mode():
                answers = generate(teacher, examples, greedy=True)
            for row, answer in zip(chunk, answers):
                finished = answer.response_ids[-1] == tokenizer.eos_token_id
                text = tokenizer.decode(answer.response_ids, skip_special_tokens=True).strip()
                record = {**row, "response": text, "finished": finished}
                cache[row["id"]] = record
                cache_file.write(json.dumps(record) + "\n")
            cache_file.flush()
            progress.advance(task, len(chunk))
    val_ids = split_ids(rows, args.val, args.seed)
    answered = [cache[r["id"]] for r in rows]
    for name, part in (
        ("default_train.jsonl", [r for r in answered if r["id"] not in val_ids]),
        ("default_val.jsonl", [r for r in answered if r["id"] in val_ids]),
    ):
        with open(ASSETS / name, "w") as handle:
            for r in part:
                handle.write(
                    json.dumps(
                        {"id": r["id"], "category": r["category"], "prompt": r["prompt"], "response": r["response"]}
                    )
                    + "\n"
                )
    unfinished = sum(not r["finished"] for r in answered)
    print(
        f"{len(answered)} answers ({len(todo)} new, {time.perf_counter() - started:.0f} s); "
        f"{unfinished} hit the {args.max_new_tokens}-token cap; validation {len(val_ids)}"
    )


if __name__ == "__main__":
    main()
