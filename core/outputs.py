"""The files of a run: config.yaml, metrics.jsonl, eval.jsonl, checkpoints/, final/ and trackers/.

Only the main process writes. Folders are written under a temporary name and renamed into place,
so a crash never leaves a half-written checkpoint or final model that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from distill.errors import ConfigError

RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoints", "final", "trackers")


def prepare_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Create the output folder; refuse one that holds a previous run unless ``overwrite``."""
    out = Path(path)
    previous = [name for name in RUN_FILES if (out / name).exists()]
    if previous and not overwrite:
        raise ConfigError(
            f"--output-dir {out} holds a previous run ({', '.join(previous)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    for name in previous:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def reopen_output_dir(path: str | Path, step: int) -> Path:
    """Make a run folder look as it did when its checkpoint at ``step`` was written: JSON lines past
    ``step`` (and a line cut short by a kill) go, and half-written temporary folders are removed."""
    out = Path(path)
    for name in ("metrics.jsonl", "eval.jsonl"):
        _truncate_jsonl(out / name, step)
    for tmp in [
        *out.glob(".*.tmp"),
        *out.glob(".*.old"),
        *out.glob("checkpoints/.*.tmp"),
        *out.glob("checkpoints/.*.old"),
    ]:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return out


def _truncate_jsonl(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run may be cut short
        if isinstance(record, dict) and record.get("step", step + 1) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class RunFiles:
    """Appends JSON lines and writes folders atomically; a no-op on non-main processes."""

    def __init__(self, out: Path, main: bool = True) -> None:
        self.out = Path(out)
        self.main = main

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)

    def append(self, name: str, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.out / name, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def write_folder(self, relative: str, fill: Callable[[Path], None]) -> Path:
        """Call ``fill(tmp_folder)`` then rename the folder to ``relative`` (replacing an old one)."""
        final = self.out / relative
        if not self.main:
            return final
        tmp = final.parent / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        if final.exists():
            old = final.parent / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return final

    def prune_checkpoints(self, keep: int) -> None:
        if not self.main:
            return
        folder = self.out / "checkpoints"
        done = sorted((p for p in folder.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
