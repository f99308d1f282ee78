"""``distill eval``'s output: ``distill.evaluation.evaluate_model``'s result as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table


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
