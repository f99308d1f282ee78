"""Which teacher a run used, by the contents of its files: a fingerprint that a copy of the same
weights elsewhere shares and that any changed byte changes.

A model reference resolves to files (``model_files``): for a local folder its ``config.json``, its
weight files and index files and its adapter files (top level only: transformers reads no
subfolder, and hub repos keep other formats there, such as Llama's ``original/*.pth``); for the
built-in teacher the GGUF file it is loaded from; for a hub id the files of its snapshot in the local
Hugging Face cache (never the network); for ``prune:K:REF`` the files of ``REF``.
``model_fingerprint`` hashes their names and sha256 digests.

A digest is remembered in ``file-hashes.json`` in distill's cache folder (``$DISTILL_CACHE``, else
``$XDG_CACHE_HOME/distill``, else ``~/.cache/distill``; ``DISTILL_CACHE=off``: nothing is
remembered), under the file's resolved path, size, mtime and inode: a 100 GB teacher is read once,
and again only after it changes. A file changed without a change of size, mtime or inode (a tool
that restores the mtime after writing in place) keeps its old digest until the memo entry goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from distill.builtin import SMOLLM2, SMOLLM2_FILE, cache_root, smollm2_folder
from distill.errors import ConfigError
from distill.models import _looks_local
from distill.outputs import file_sha256 as _sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"
MEMO = "file-hashes.json"
MEMO_FORMAT = 1
RACY_NS = 2_000_000_000
"""A file modified less than this before its hash finished is not remembered: a rewrite of the
same size within the file system's timestamp granularity (up to 2 s on some) would keep its mtime."""


# --- one file's digest, remembered


def file_digest(path: str | Path) -> str:
    """The sha256 (hex) of the contents of the file at ``path``, read from the memo when the file's
    resolved path, size, mtime and inode match the entry, else read in full and remembered.

    A memo that cannot be read or parsed counts as empty; one that cannot be written is skipped."""
    path = Path(path).resolve()
    before = os.stat(path)
    root = cache_root()
    if root is not None:
        entry = _read_memo(root / MEMO).get(str(path))
        if isinstance(entry, dict) and entry.get("stamp") == _stamp(before) and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
    digest = _sha256_file(path)
    after = os.stat(path)
    # a file written to while it was read, or just written, is hashed again next time
    if root is not None and _stamp(after) == _stamp(before) and time.time_ns() - after.st_mtime_ns >= RACY_NS:
        _remember(root, str(path), {"stamp": _stamp(after), "sha256": digest})
    return digest


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _read_memo(memo: Path) -> dict[str, Any]:
    """The memo's entries by path; empty when it is missing, unreadable or not a memo."""
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != MEMO_FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _remember(root: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the memo, dropping entries of files that are gone; written to a temporary
    file renamed into place, so a reader never sees half a memo. Any OSError: no memo this time."""
    memo = root / MEMO
    files = {path: old for path, old in _read_memo(memo).items() if os.path.exists(path)}
    files[key] = entry
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{MEMO}.", suffix=".tmp", dir=root)
    except OSError:
        return
    try:
        with os.fdopen(handle, "w") as file:
            json.dump({"format": MEMO_FORMAT, "files": files}, file)
        os.replace(tmp, memo)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


# --- the files a model reference resolves to


def model_files(ref: str | Path, role: str = "teacher") -> list[Path]:
    """The files the model ``ref`` (a string or a ``ModelSpec``) is loaded from, sorted by name;
    ``role`` names the flag in errors. A reference that names no loadable files locally (a missing
    folder, a hub id not in the local Hugging Face cache) is a one-line ``ConfigError``."""
    ref = str(getattr(ref, "ref", ref) or "")
    if not ref:
        raise ConfigError(f"{role}: required; pass --{role} DIR (a Hugging Face model directory or hub id)")
    if ref.startswith("prune:"):
        _, count, *base = ref.split(":", 2)
        if not count.isdigit() or not base:
            raise ConfigError(f"--{role} {ref}: only prune:K:REF names files (K a number of layers, REF a model)")
        return model_files(base[0], role)
    if ref == SMOLLM2:
        return [smollm2_folder() / SMOLLM2_FILE]
    path = Path(ref).expanduser()
    if path.exists() or _looks_local(ref):
        if not path.exists():
            raise ConfigError(f"--{role} {ref}: no such directory")
        if not path.is_dir():
            raise ConfigError(f"--{role} {ref}: not a model directory (a file)")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--{role} {ref}: not a model directory (no config.json)")
        return _weights(path, f"--{role} {ref}: no weight files in the folder")
    snapshot = _hub_snapshot(ref, role)
    return _weights(
        snapshot, f"--{role} {ref}: its local snapshot ({snapshot}) holds no weight files; hf download {ref}"
    )


def _weights(folder: Path, missing: str) -> list[Path]:
    """``folder``'s config, weight, index and adapter files; ``missing``: the error without weights."""
    files = sorted(
        file
        for file in folder.iterdir()
        if not file.name.startswith(".")
        and file.is_file()
        and (file.name in ("config.json", ADAPTER_CONFIG) or file.name.endswith(WEIGHT_SUFFIXES + INDEX_SUFFIXES))
    )
    if not any(file.name.endswith(WEIGHT_SUFFIXES) for file in files):
        raise ConfigError(missing)
    return files


def _hub_snapshot(ref: str, role: str) -> Path:
    """The folder of hub id ``ref``'s snapshot in the local Hugging Face cache; never the network."""
    from huggingface_hub import constants, errors, snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except errors.HFValidationError:
        raise ConfigError(f"--{role} {ref}: neither a folder nor a valid hub id") from None
    except errors.LocalEntryNotFoundError as error:
        incomplete = isinstance(error, getattr(errors, "IncompleteSnapshotError", ()))
        state = "incomplete" if incomplete else "absent"
        raise ConfigError(
            f"--{role} {ref}: {state} in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"run hf download {ref}, or pass a local folder"
        ) from None


# --- the fingerprint


def model_fingerprint(spec) -> str:
    """The model a ``ModelSpec`` names (``ref``, optional ``adapter``), by the names and contents of
    its files: ``<hash>``, ``prune:K:<hash>`` for ``prune:K:REF``, then ``+adapter:<hash>`` with an
    adapter folder. 32 hex digits per hash; equal for copies of the same files anywhere."""
    ref = str(spec.ref or "")
    files = model_files(ref)
    prefix = ""
    while ref.startswith("prune:"):
        _, count, ref = ref.split(":", 2)
        prefix += f"prune:{count}:"
    parts = [prefix + _files_hash(files)]
    if spec.adapter:
        adapter = Path(spec.adapter).expanduser()
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"teacher.adapter {spec.adapter}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        parts.append("adapter:" + _files_hash(_weights(adapter, f"teacher.adapter {spec.adapter}: no weight files")))
    return "+".join(parts)


def _files_hash(files: list[Path]) -> str:
    """A hash of each file's name (in its folder) and content digest, in name order."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        digest.update(f"{file.name}\0{file_digest(file)}\n".encode())
    return digest.hexdigest()[:32]
