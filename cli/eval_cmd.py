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
        "bleu": "BLEU vs references (sacrebleu)",
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


def score_files(hypotheses: str, references: str, metrics: list[str]) -> dict[str, float]:
    """The scores of a text file's lines against another's, line by line (``distill eval --hypotheses``):
    mean ROUGE-L and corpus BLEU, as a run's evaluation computes them."""
    from distill.errors import ConfigError
    from distill.evaluation import check_metrics, corpus_bleu, rouge_l

    check_metrics(metrics)
    texts = []
    for flag, path in (("--hypotheses", hypotheses), ("--references", references)):
        try:
            texts.append(Path(path).read_text(encoding="utf-8").splitlines())
        except OSError as error:
            raise ConfigError(f"{flag} {path}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{flag} {path}: not UTF-8 text; give one line of UTF-8 text per sentence") from None
    hyps, refs = texts
    if not hyps:
        raise ConfigError(f"--hypotheses {hypotheses}: no lines to score")
    if len(hyps) != len(refs):
        raise ConfigError(f"--hypotheses has {len(hyps)} lines and --references {len(refs)}: one reference a line")
    result: dict[str, float] = {"lines": len(hyps)}
    if "rouge_l" in metrics:
        scores = rouge_l(hyps, refs)
        result["rouge_l"] = sum(scores) / max(len(scores), 1)
    if "bleu" in metrics:
        result["bleu"] = corpus_bleu(hyps, refs)
    return result
