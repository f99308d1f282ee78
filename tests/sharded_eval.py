"""Evaluation over 2 CPU processes (DDP, gloo, started by ``accelerate.debug_launcher``) on a
validation set that does not split evenly; ``tests/test_sharded_eval.py`` runs this file.

    python tests/sharded_eval.py TINY OUT      # TINY from tiny_models.make_pair; writes OUT/rank-<i>.json

Generation runs as under FSDP / ZeRO-3 (``synced_gpus``). Each rank counts the forwards of the
student and the teacher (hooks on the modules) and the generation calls, and saves them with the
metrics of the passes in ``PASSES``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

VAL_EXAMPLES, BATCH_SIZE, ROUGE_BEFORE, MAX_NEW_TOKENS = 5, 2, 1, 6
# rank 0 holds 3 examples (2 batches), rank 1 holds 2 (1 batch); the first ROUGE_BEFORE prompts all sit on rank 0
PASSES = {
    "all": dict(rouge="all"),
    "before": dict(rouge="before"),
    "no_teacher": dict(with_teacher=False, with_rouge=False),
}


def setup(tiny: Path, accelerator=None, *, synced: bool = False):
    """The validation examples, tokenizer, models and an Evaluator over them (one process without
    ``accelerator``)."""
    import distill
    from distill.config import DataConfig, GenerationConfig
    from distill.data import load_examples
    from distill.evaluation import Evaluator
    from distill.generation import ResponseGenerator
    from distill.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny / "teacher"))
    data = DataConfig(path=str(tiny / "data.jsonl"), val_fraction=0.5, val_max=VAL_EXAMPLES)
    _, val, _ = load_examples(data, tokenizer, seed=0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny / "teacher").eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(tiny / "student")
    generation = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
    # the untrained student's answers are noise (ROUGE-L 0 against any reference): make every other
    # prompt's reference its own greedy answer, computed here in each process alone, so scores differ
    answers = ResponseGenerator(tokenizer, generation, BATCH_SIZE, always_generate=True)(student, val, greedy=True)
    val = [
        replace(e, reference=tokenizer.decode(a.response_ids, skip_special_tokens=True)) if i % 2 == 0 else e
        for i, (e, a) in enumerate(zip(val, answers))
    ]
    unwrap = accelerator.unwrap_model if accelerator else (lambda m: m)
    if accelerator is not None:
        student = accelerator.prepare(student)
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    # one process: transformers' generate too (not distill's own loop), so the greedy answers match
    generate = ResponseGenerator(tokenizer, generation, BATCH_SIZE, unwrap, synced=synced, always_generate=True)
    evaluator = Evaluator(
        val,
        tokenizer,
        distill.get_divergence("skew_kl", alpha=0.1),
        generate,
        BATCH_SIZE,
        rouge_samples=len(val),
        accelerator=accelerator,
        kl=distill.get_divergence("kl"),
        rouge_before=ROUGE_BEFORE,
    )
    return val, student, teacher, evaluator


def worker(tiny: str, out: str) -> None:
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, accelerator.num_processes
    val, student, teacher, evaluator = setup(Path(tiny), accelerator, synced=True)
    counts = {"student": 0, "teacher": 0, "generate": 0}

    def count(name):
        def hook(*_):
            counts[name] += 1

        return hook

    inner = accelerator.unwrap_model(student)
    inner.register_forward_hook(count("student"))
    accelerator.unwrap_model(teacher).register_forward_hook(count("teacher"))
    real_generate = inner.generate

    def generate(*args, **kwargs):
        counts["generate"] += 1
        return real_generate(*args, **kwargs)

    inner.generate = generate
    result = {
        "val_examples": len(val),
        "shard": len(evaluator.examples),
        "rouge_shard": len(evaluator.rouge_examples),
        "passes": {},
    }
    for name, options in PASSES.items():
        metrics = evaluator(student, teacher, **options)
        result["passes"][name] = {"metrics": metrics, "counts": dict(counts)}
        counts.update(student=0, teacher=0, generate=0)
    Path(out, f"rank-{accelerator.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(worker, args=(sys.argv[1], sys.argv[2]), num_processes=2)
