"""The folders distill writes, and the files of a run: config.yaml, metrics.jsonl, eval.jsonl,
checkpoints/, final/ and trackers/.

Every folder distill writes (a run, a teacher cache) carries a marker, ``distill.json``, written
before anything else: its kind, the distill version and the command. ``--overwrite`` removes the
entries that the marker's kind owns and nothing else, and a folder that is neither empty nor
distill's is refused with one line naming its first foreign entry. A folder made before the marker
existed is recognised by its files (a run: a ``config.yaml`` that reads as a distill config beside
``metrics.jsonl``; a cache: ``settings.json`` beside ``parts/``).

Only the main process writes. Folders are written under a temporary name and renamed into place,
so a crash never leaves a half-written checkpoint or final model that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from distill.errors import ConfigError

MARKER = "distill.json"
"""The marker of a folder distill wrote: ``{"kind", "distill", "command", "created"}``."""


@dataclass(frozen=True)
class FolderKind:
    """A kind of folder distill writes: its name in the marker, the top-level entries it owns (and
    their ``.NAME.tmp`` / ``.NAME.old`` temporaries), and how a folder from before the marker is told."""

    name: str
    owns: tuple[str, ...]
    legacy: Callable[[Path], bool]
    noun: str
    shared: dict[str, re.Pattern] = field(default_factory=dict)
    """Owned folders a user may also keep things in: only the entries whose names match go."""

    def owned(self, folder: Path) -> list[Path]:
        """The entries of ``folder`` this kind owns, the marker and temporaries included."""
        names = {*self.owns, MARKER}
        return [
            entry
            for entry in sorted(folder.iterdir())
            if entry.name in names
            or (
                entry.name.startswith(".")
                and entry.name[1:].rsplit(".", 1)[0] in names
                and entry.suffix in (".tmp", ".old")
            )
        ]


def _legacy_run(folder: Path) -> bool:
    """A run folder from before the marker: a config.yaml that reads as a distill config beside metrics.jsonl."""
    config = folder / "config.yaml"
    if not (config.is_file() and (folder / "metrics.jsonl").is_file()):
        return False
    from distill.config import read_config_file

    try:
        saved = read_config_file(config)
    except Exception:  # any file that does not parse is not a distill config
        return False
    return isinstance(saved, dict) and {"teacher", "student", "train"} <= set(saved)


def _legacy_cache(folder: Path) -> bool:
    """A teacher cache from before the marker: settings.json beside parts/."""
    return (folder / "settings.json").is_file() and (folder / "parts").is_dir()


RUN = FolderKind(
    "run",
    ("config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoints", "final", "trackers"),
    _legacy_run,
    "a distill run",
    # a checkpoint, one set aside as damaged, and their temporaries (distill.checkpoint names them)
    {"checkpoints": re.compile(r"\.?step-\d+(\.damaged|\.tmp|\.old)?")},
)
TEACHER_CACHE = FolderKind(
    "teacher-cache", ("manifest.json", "settings.json", "parts"), _legacy_cache, "a teacher cache"
)
PAIRS = FolderKind(
    "pairs", ("manifest.json", "settings.json", "parts"), lambda folder: False, "prepared response pairs"
)
KINDS = {kind.name: kind for kind in (RUN, TEACHER_CACHE, PAIRS)}
RUN_FILES = RUN.owns


def folder_kind(folder: str | Path) -> FolderKind | None:
    """The kind of distill folder ``folder`` is (by its marker, else by its files), or None."""
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file():
        try:
            kind = json.loads(marker.read_text()).get("kind")
        except (ValueError, AttributeError, OSError):
            kind = None
        if kind in KINDS:
            return KINDS[kind]
    return next((kind for kind in KINDS.values() if folder.is_dir() and kind.legacy(folder)), None)


def check_folder(folder: str | Path, kind: FolderKind, flag: str = "--output-dir") -> bool:
    """Refuse ``folder`` unless it is missing, empty, or a folder of ``kind``; returns whether it is
    one of ``kind`` (reads only)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file, not a folder")
    if not folder.exists() or not any(folder.iterdir()):
        return False
    found = folder_kind(folder)
    if found is kind:
        return True
    if found is not None:
        raise ConfigError(f"{flag} {folder} holds {found.noun}, not {kind.noun}; choose another folder")
    first = sorted(entry.name for entry in folder.iterdir())[0]
    raise ConfigError(
        f"{flag} {folder} holds files distill did not write (first: {first!r}); distill removes or replaces "
        "only what it wrote: choose an empty or new folder"
    )


def remove_owned(folder: Path, kind: FolderKind) -> None:
    """Remove what ``kind`` owns in ``folder``; in its shared folders only the matching entries."""
    for entry in kind.owned(folder):
        pattern = kind.shared.get(entry.name)
        if pattern is not None and entry.is_dir() and not entry.is_symlink():  # never reach through a link
            for inner in entry.iterdir():
                if pattern.fullmatch(inner.name):
                    _remove(inner)
            if not any(entry.iterdir()):
                entry.rmdir()
        else:
            _remove(entry)


def _remove(entry: Path) -> None:
    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def claim_folder(folder: str | Path, kind: FolderKind, *, clear: bool = False, flag: str = "--output-dir") -> Path:
    """Make ``folder`` a folder of ``kind``: checked as ``check_folder`` does, created, and marked
    (the marker first); ``clear``: remove what the kind owns first (nothing else is touched)."""
    folder = Path(folder)
    check_folder(folder, kind, flag)
    if clear and folder.is_dir():
        remove_owned(folder, kind)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        write_marker(folder, kind)
    return folder


def write_marker(folder: Path, kind: FolderKind) -> None:
    from distill import __version__

    record = {
        "kind": kind.name,
        "distill": __version__,
        "command": shlex.join(sys.argv),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, folder / MARKER)


def file_sha256(path: Path, block: int = 1 << 23) -> str:
    """SHA-256 (hex) of a file's contents, read sequentially in blocks of ``block`` bytes."""
    digest = hashlib.sha256()
    buffer = bytearray(block)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as file:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := file.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def prepare_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Create and mark the run folder; refuse one that holds a previous run unless ``overwrite``
    (which removes that run's files, nothing else), and any folder that is not distill's."""
    out = Path(path)
    is_run = check_folder(out, RUN)
    previous = [name for name in RUN.owns if (out / name).exists()] if is_run else []
    if previous and not overwrite:
        raise ConfigError(
            f"--output-dir {out} holds a previous run ({', '.join(previous)}); "
            "pass --resume to continue it, --overwrite to replace it, or choose another --output-dir"
        )
    return claim_folder(out, RUN, clear=True)


def reopen_output_dir(path: str | Path, step: int) -> Path:
    """Make a run folder look as it did when its checkpoint at ``step`` was written: JSON lines past
    ``step`` (and a line cut short by a kill) go, and half-written temporary folders are removed.
    A folder that a kill caught between its two renames (``.NAME.old`` without ``NAME``) is put back."""
    out = Path(path)
    for name in ("metrics.jsonl", "eval.jsonl"):
        _truncate_jsonl(out / name, step)
    for parent in (out, out / "checkpoints"):
        for old in parent.glob(".*.old"):
            kept = old.with_name(old.name[1 : -len(".old")])
            if not kept.exists():
                os.replace(old, kept)
    for tmp in [
        *out.glob(".*.tmp"),
        *out.glob(".*.old"),
        *out.glob("checkpoints/.*.tmp"),
        *out.glob("checkpoints/.*.old"),
    ]:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if not (out / MARKER).is_file():  # a run from before the marker
        write_marker(out, RUN)
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
