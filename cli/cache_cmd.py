"""``distill cache-teacher``'s summary table (the config: ``distill.resolve.resolve_cache``; the cache:
``distill.teacher_cache.build_cache``)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


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
