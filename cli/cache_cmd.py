"""``distill cache-teacher``: flags -> a config (the data settings a run uses) -> a teacher cache, with
progress and a summary."""

from __future__ import annotations

from typing import Any, Optional

from rich.table import Table

import distill
from distill.config import read_config_file


def resolve_cache_config(config_file: Optional[str], flags: dict[str, Any]) -> "distill.config.RunConfig":
    """config file < flags, like ``distill run`` (the same file gives the same data settings and
    split); without a teacher anywhere, the embedded default's teacher and data."""
    from distill.resolve import resolve_config

    file_layer = read_config_file(config_file) if config_file else {}
    return resolve_config(file_layer, flags, recipe=False)


def manifest_table(manifest: dict[str, Any], out: str, seconds: float) -> Table:
    table = Table(title="distill cache-teacher summary", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    storage = manifest["storage"]
    rows = [
        ("teacher", f"{manifest['teacher']} ({manifest['teacher_dtype']})"),
        ("top-k", str(manifest["top_k"])),
        (
            "sequences (train + validation)",
            f"{manifest['examples']:,} ({manifest['train_examples']:,} + {manifest['validation_examples']:,} examples)",
        ),
        ("response tokens", f"{manifest['tokens']:,}"),
        ("bytes", f"{manifest['bytes']:,} ({manifest['bytes'] / 1e6:,.1f} MB)"),
        (
            "bytes per token",
            f"{manifest['bytes_per_token']:.1f} (log-probs {storage['logprobs']}, "
            f"ids {storage['ids']}, rest {storage['rest']})",
        ),
        ("wall time", f"{seconds:.1f} s"),
        ("output", out),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
