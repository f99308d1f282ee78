"""``distill eval``: a student's validation CE, token KL to the teacher and ROUGE-L, as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

import distill
from distill.builtin import SMOLLM2
from distill.config import DataConfig, GenerationConfig
from distill.data import encode_records, read_records
from distill.evaluation import Evaluator
from distill.generation import ResponseGenerator
from distill.models import load_model, load_tokenizer, share_vocabulary


def evaluate_model(
    model: str,
    teacher: str = SMOLLM2,
    data: str = "builtin:val",
    *,
    rouge_samples: int = 64,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
    progress=None,
) -> dict[str, float]:
    """Evaluate the model at ``model`` against ``teacher`` on the responses in ``data``;
    ``progress(phase, done, total)`` sees each batch (``distill.progress.Progress``)."""
    tokenizer = load_tokenizer(model if Path(model).is_dir() else teacher)
    teacher_model = load_model(teacher, "teacher").eval()
    student = load_model(model, "model", teacher=teacher_model).eval()
    share_vocabulary(teacher_model, student, tokenizer)
    data_cfg = DataConfig(path=data, max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    examples, _ = encode_records(read_records(data), tokenizer, data_cfg, data)
    generate = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=max_new_tokens), batch_size)
    kl = distill.get_divergence("kl")
    evaluator = Evaluator(examples, tokenizer, kl, generate, batch_size, rouge_samples, progress=progress)
    result = evaluator(student, teacher_model)
    return {"examples": len(examples), **result}


def result_table(model: str, result: dict[str, float]) -> Table:
    table = Table(title=f"distill eval {model}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    names = {
        "val_loss": "validation CE (nats/token)",
        "val_kl": "KL(teacher || student) (nats/token)",
        "rouge_l": "ROUGE-L vs references",
        "examples": "examples",
    }
    for key, value in result.items():
        if key == "val_divergence":
            continue
        table.add_row(names.get(key, key), f"{value:.4f}" if isinstance(value, float) else str(value))
    return table


def write_json(path: str | None, payload: dict) -> str:
    text = json.dumps(payload, indent=2)
    if path:
        Path(path).write_text(text + "\n")
    return text
