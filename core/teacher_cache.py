"""An offline teacher: its top-K log-probabilities per response position, stored once and read back.

``distill cache-teacher`` runs the teacher over a dataset's responses and stores, for every response
position, the K largest log-probabilities (float16), their token ids (uint16 when the vocabulary
fits, else int32) and the log of the remaining mass (float32). ``distill run --teacher-cache DIR``
then trains the steps whose sequences come from the dataset without a teacher forward.

The math. A cache keeps the teacher's distribution only on the partition of the vocabulary into its
top-K ids and "the rest". Both distributions are mapped through that partition: the teacher's
coarse distribution is its K log-probs plus the log remaining mass; the student's is its
log-softmax gathered at the same K ids plus the log of its own remaining mass (a logsumexp over the
other ids, so nothing cancels). Any divergence plugin then runs unchanged on these ``[N, K + 1]``
log-probabilities (a log-softmax of normalised log-probs returns them). Mapping both distributions
through one function can only lose information (the data-processing inequality), so every built-in
divergence on the coarse pair is at most its value on the full pair, with equality at K = V.

Layout of a cache folder::

    distill.json         the marker of a folder distill wrote (distill.outputs), written first
    manifest.json        written last: a cache without it is unfinished (cache-teacher resumes it)
    settings.json        what the cache is made from (teacher, tokenizer, data, K, temperature)
    parts/r<rank>-<n>/   one finished part: keys.json (sequence keys and lengths), logprobs.npy
                         [T, K] float16, ids.npy [T, K], rest.npy [T] float32 (T: the part's tokens),
                         checksum.json (each file's size and SHA-256, written with the part)

A cache is checked before it is trusted: at open, every part's arrays have the lengths its
``keys.json`` gives and the manifest's byte count matches the disk; a part's checksums are checked
when it is first read (``distill cache-teacher --verify DIR`` checks them all). A damaged part is one
line naming it: delete it and run the same ``cache-teacher`` command, which continues the cache.

A sequence is found by its key, a hash of its prompt and response token ids: the cache answers for
exactly the sequences it was made from, whichever order, split or process asks.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from distill.data import Example, collate
from distill.divergence import NEG_LOGIT, ConfiguredDivergence, prepare_logits
from distill.errors import ConfigError
from distill.loss import chunked_token_mean
from distill.outputs import TEACHER_CACHE, check_folder, claim_folder, file_sha256

MANIFEST = "manifest.json"
SETTINGS = "settings.json"
CHECKSUM = "checksum.json"
FORMAT = 2
"""2: parts carry checksums and the teacher fingerprint hashes the weights' contents (1: names and sizes)."""
ARRAYS = ("logprobs", "ids", "rest")
PART_EXAMPLES = 256
"""Sequences per part file: what an interrupted cache-teacher may have to redo, at most, per process."""


# --- the math: coarse distributions over the teacher's top-K ids and "the rest"


def coarse_log_probs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` logits and ``[N, K]`` distinct ids -> ``[N, K + 1]`` log-probabilities: the
    log-softmax at ``ids``, then the log of the mass on every other id. Differentiable; float32.

    The remaining mass is a logsumexp over the other ids (those at ``ids`` set to a finite floor),
    never ``log(1 - sum)``, which cancels when the top-K hold almost all the mass.
    """
    x = prepare_logits(logits)
    total = x.logsumexp(-1, keepdim=True)
    rest = x.scatter(-1, ids, NEG_LOGIT).logsumexp(-1, keepdim=True)
    return torch.cat([x.gather(-1, ids), rest], -1) - total


def top_k_targets(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's side of a cache from its ``[N, V]`` logits: top-K log-probs ``[N, K]``
    (float32), their ids ``[N, K]`` and the log remaining mass ``[N]`` (``-inf`` when K = V)."""
    x = prepare_logits(teacher_logits, temperature)
    values, ids = x.topk(k, dim=-1)
    coarse = coarse_log_probs(x, ids)
    rest = coarse[:, -1]
    if k == x.shape[-1]:
        rest = torch.full_like(rest, -float("inf"))
    return coarse[:, :-1], ids, rest


def pack_targets(log_probs: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` log-probs, ``[..., K]`` ids, ``[...]`` rest -> one float32 ``[..., 2K + 1]``
    tensor (ids are exact in float32 below 2**24), so the chunked loss can index it like logits."""
    return torch.cat([log_probs.float(), ids.float(), rest.float().unsqueeze(-1)], -1)


class CoarseDivergence:
    """A configured divergence applied to coarse distributions: ``fn(student_logits [c, V], packed
    [c, 2K + 1]) -> [c]``, for ``chunked_token_mean`` (which owns masking, chunking, reduction).

    The temperature divides the student's logits before they are coarsened; the teacher's cached
    log-probs were made at the cache's temperature (``distill cache-teacher --temperature``)."""

    def __init__(self, divergence: ConfiguredDivergence) -> None:
        self.temperature = divergence.temperature
        self.divergence = ConfiguredDivergence(divergence.plugin, divergence.params, 1.0)
        self.name = divergence.name

    def __call__(self, student_logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        k = (packed.shape[-1] - 1) // 2
        ids = packed[:, k : 2 * k].long()
        student = coarse_log_probs(prepare_logits(student_logits, self.temperature), ids)
        teacher = torch.cat([packed[:, :k], packed[:, 2 * k :]], -1)
        return self.divergence(student, teacher)


def coarse_divergence_loss(
    divergence,
    student_logits: torch.Tensor,
    packed: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    n_tokens: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``divergence_loss`` with the teacher's side read from a cache: ``student_logits [B, R, V]``,
    ``packed [B, R, 2K + 1]`` (``pack_targets``), ``mask [B, R]``; the same masking, chunking (rows
    of ``V``-wide chunks) and token mean."""
    divergence = ConfiguredDivergence.wrap(divergence)
    return chunked_token_mean(
        CoarseDivergence(divergence), student_logits, packed, mask, n_tokens=n_tokens, weights=weights
    )


# --- keys and fingerprints: what a cache was made from


def example_key(example: Example) -> str:
    """A sequence's key: a hash of its prompt and response token ids (and where one ends)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(example.prompt_ids, dtype=np.int64).tobytes())
    digest.update(b"|")
    digest.update(np.asarray(example.response_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()


def data_fingerprint(examples: Iterable[Example]) -> str:
    """The data and its tokenization: a hash of the sorted keys of the distinct sequences. Training
    and validation examples together, so the split (which follows the seed) does not change it."""
    digest = hashlib.sha256()
    for key in sorted({example_key(e) for e in examples}):
        digest.update(key.encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """The token -> id map, the special tokens and the chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())}
    payload = json.dumps([vocab, special, getattr(tokenizer, "chat_template", None) or ""], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def teacher_fingerprint(spec) -> str:
    """The teacher a ``ModelSpec`` names, by the contents of the files it resolves to (a local folder,
    a hub id's local snapshot, the built-in teacher's file) and of its adapter: ``distill.fingerprint``
    (each file is hashed once; later calls read the digest from distill's cache folder)."""
    from distill.fingerprint import model_fingerprint

    return model_fingerprint(spec)


def cache_settings(
    cfg, tokenizer, examples: list[Example], n_train: int, top_k: int, temperature: float, n_logits: int
) -> dict[str, Any]:
    """What a cache is made from; a cache answers a run only when these agree with the run's."""
    return {
        "format": FORMAT,
        "teacher": cfg.teacher.ref,
        "teacher_adapter": cfg.teacher.adapter,
        "teacher_fingerprint": teacher_fingerprint(cfg.teacher),
        "teacher_dtype": cfg.teacher.dtype,  # informative, and a resumed cache keeps it
        "tokenizer": cfg.tokenizer or cfg.teacher.ref,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocabulary": n_logits,
        "top_k": top_k,
        "temperature": temperature,
        "fingerprint": data_fingerprint(examples),
        "data": {
            "path": cfg.data.path,
            "validation": cfg.data.validation,
            "split": cfg.data.split,
            "prompt_template": cfg.data.prompt_template,
            "max_prompt_tokens": cfg.data.max_prompt_tokens,
            "max_response_tokens": cfg.data.max_response_tokens,
        },
        "train_examples": n_train,
        "validation_examples": len(examples) - n_train,
    }


# --- writing a cache (distill cache-teacher)


def _ids_dtype(n_logits: int):
    return np.uint16 if n_logits <= 1 << 16 else np.int32


@torch.no_grad()
def write_part(
    folder: Path,
    name: str,
    examples: list[Example],
    teacher,
    top_k: int,
    temperature: float,
    n_logits: int,
    pad_id: int,
    batch_size: int,
    device,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Run ``teacher`` over ``examples`` (batches of ``batch_size``) and write one part folder,
    atomically (a temporary name renamed into place). Returns the bytes written."""
    from distill.models import decoder_start
    from distill.objective import response_logits

    keys, log_probs, ids, rest = [], [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate(chunk, pad_id, decoder_start(teacher)).to(device)
        logits = response_logits(teacher, batch)[..., :n_logits]
        for row, example in enumerate(chunk):
            n = len(example.response_ids)
            values, top, remaining = top_k_targets(logits[row, :n], top_k, temperature)
            keys.append([example_key(example), n])
            log_probs.append(values.to(torch.float16).cpu().numpy())
            ids.append(top.cpu().numpy().astype(_ids_dtype(n_logits)))
            rest.append(remaining.cpu().numpy().astype(np.float32))
        if progress:
            progress(len(chunk))
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "logprobs.npy", np.concatenate(log_probs))
    np.save(tmp / "ids.npy", np.concatenate(ids))
    np.save(tmp / "rest.npy", np.concatenate(rest))
    (tmp / "keys.json").write_text(json.dumps(keys))
    checksums = {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in sorted(tmp.iterdir())}
    (tmp / CHECKSUM).write_text(json.dumps(checksums, indent=1) + "\n")
    size = sum(f.stat().st_size for f in tmp.iterdir())
    tmp.rename(folder / name)
    return size


def finished_keys(out: Path) -> set[str]:
    """Keys of the sequences in the finished parts of a cache folder (an interrupted run's too)."""
    done: set[str] = set()
    for part in sorted((out / "parts").glob("r*")):
        if (part / "keys.json").is_file():
            done.update(key for key, _ in json.loads((part / "keys.json").read_text()))
    return done


def prepare_cache_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Check ``out`` before anything is written; returns whether it continues an unfinished cache of
    the same settings. A folder that is neither empty nor a teacher cache is refused whatever the
    flags; a finished cache, or an unfinished one of other settings, too, unless ``overwrite`` (which
    then removes the cache's own files, nothing else). A finished cache with a part deleted (a damaged
    part, see ``TeacherCache``) is unfinished again: the same command rebuilds the part."""
    if not check_folder(out, TEACHER_CACHE) or overwrite:
        return False
    if not (out / SETTINGS).is_file():
        return False  # marked, but killed before its settings were written
    if (out / MANIFEST).is_file() and not missing_parts(out):
        raise ConfigError(
            f"--output-dir {out} holds a finished teacher cache; pass --overwrite to replace it, choose another "
            f"folder, or check it with distill cache-teacher --verify {out}"
        )
    saved = json.loads((out / SETTINGS).read_text())
    differ = [key for key in settings if saved.get(key) != settings[key]]
    if differ:
        raise ConfigError(
            f"--output-dir {out} holds an unfinished cache made with other settings ({', '.join(differ)} differ); "
            "repeat its command to continue it, pass --overwrite to start over, or choose another folder"
        )
    return True


def missing_parts(out: Path) -> list[str]:
    """The parts a finished cache's manifest lists that are not on disk (deleted to be rebuilt)."""
    try:
        listed = json.loads((out / MANIFEST).read_text()).get("parts", [])
    except (ValueError, OSError, AttributeError):
        return ["manifest.json"]
    return [name for name in listed if not (out / "parts" / name).is_dir()]


def write_manifest(out: Path, settings: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Sum up the finished parts into ``manifest.json`` (written last, atomically)."""
    examples = tokens = size = 0
    parts = []
    for part in sorted((out / "parts").glob("r*")):
        keys = json.loads((part / "keys.json").read_text())
        examples += len(keys)
        tokens += sum(n for _, n in keys)
        size += sum(f.stat().st_size for f in part.iterdir())
        parts.append(part.name)
    manifest = {
        **settings,
        "examples": examples,
        "tokens": tokens,
        "bytes": size,
        "bytes_per_token": round(size / max(tokens, 1), 1),
        "storage": {"logprobs": "float16", "ids": np.dtype(_ids_dtype(settings["vocabulary"])).name, "rest": "float32"},
        "parts": parts,
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)
    return manifest


# --- reading a cache (distill run --teacher-cache)


class DamagedPart(ConfigError):
    """A part of a teacher cache whose files are not what was written."""

    def __init__(self, part: Path, why: str) -> None:
        super().__init__(
            f"teacher cache part {part} is damaged ({why}); delete that folder and run the same distill "
            "cache-teacher command again: it rebuilds the part"
        )


def open_part(part: Path, top_k: int) -> tuple[list, list[np.ndarray]]:
    """A part's keys and its arrays (memory maps), their shapes checked against the keys."""
    try:
        keys = json.loads((part / "keys.json").read_text())
        arrays = [np.load(part / f"{kind}.npy", mmap_mode="r") for kind in ARRAYS]
    except FileNotFoundError as error:
        raise DamagedPart(part, f"{Path(error.filename).name} is missing") from None
    except (ValueError, OSError) as error:  # a truncated .npy: "mmap length is greater than file size"
        raise DamagedPart(part, f"a file does not read: {error}") from None
    tokens = sum(n for _, n in keys)
    expected = {"logprobs": (tokens, top_k), "ids": (tokens, top_k), "rest": (tokens,)}
    for kind, array in zip(ARRAYS, arrays):
        if array.shape != expected[kind]:
            raise DamagedPart(part, f"{kind}.npy has shape {list(array.shape)}, keys.json gives {list(expected[kind])}")
    return keys, arrays


def check_part(part: Path) -> None:
    """Compare a part's files with the sizes and checksums written with it."""
    try:
        written = json.loads((part / CHECKSUM).read_text())
    except (OSError, ValueError):
        raise DamagedPart(part, f"{CHECKSUM} is missing or unreadable") from None
    for name, expected in written.items():
        file = part / name
        if not file.is_file() or file.stat().st_size != expected["bytes"] or file_sha256(file) != expected["sha256"]:
            raise DamagedPart(part, f"{name} does not match its checksum")


def parts_bytes(folder: Path, names: list[str]) -> int:
    return sum(f.stat().st_size for name in names for f in (folder / "parts" / name).iterdir() if f.is_file())


def verify_cache(folder: str | Path) -> list[str]:
    """Every problem of a cache, one line each (empty: sound): ``distill cache-teacher --verify``."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        names, top_k = list(manifest["parts"]), int(manifest["top_k"])
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{folder}: no readable manifest.json (unfinished: run its distill cache-teacher command again)"]
    if manifest.get("format") != FORMAT:
        return [format_problem(folder, manifest.get("format"))]
    problems = []
    for name in names:
        part = folder / "parts" / name
        if not part.is_dir():
            problems.append(f"teacher cache part {part} is missing; run the same distill cache-teacher command again")
            continue
        try:
            open_part(part, top_k)
            check_part(part)
        except DamagedPart as error:
            problems.append(str(error))
    if not problems and parts_bytes(folder, names) != manifest.get("bytes"):
        problems.append(
            f"{folder}: its parts hold {parts_bytes(folder, names):,} bytes, its manifest says {manifest.get('bytes')}"
        )
    return problems


def format_problem(folder: Path, made: Any) -> str:
    why = (
        "was made before caches carried checksums and a fingerprint of the teacher's weights"
        if isinstance(made, int) and made < FORMAT
        else f"has format {made}, this distill reads {FORMAT}"
    )
    return f"teacher cache {folder} {why}; make it again with distill cache-teacher (--overwrite replaces it)"


@dataclass
class _Part:
    path: Path
    log_probs: np.ndarray
    ids: np.ndarray
    rest: np.ndarray
    checked: bool = False


class TeacherCache:
    """A finished cache folder, read through memory maps: ``targets(examples, width)`` gives the
    packed teacher side of a micro-batch, or None when a sequence is not in the cache (a generated
    one: the live teacher answers it). Opening checks the parts' shapes and the manifest's byte
    count; a part's checksums are checked when it is first read."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            unfinished = (self.folder / SETTINGS).is_file()
            why = (
                "unfinished (run its distill cache-teacher command again to finish it)"
                if unfinished
                else "not a teacher cache (no manifest.json)"
            )
            raise ConfigError(f"--teacher-cache {folder}: {why}")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"--teacher-cache: {format_problem(self.folder, self.manifest.get('format'))}")
        self.top_k = int(self.manifest["top_k"])
        self.temperature = float(self.manifest["temperature"])
        self.parts: list[_Part] = []
        self.index: dict[str, tuple[int, int, int]] = {}
        for number, name in enumerate(self.manifest["parts"]):
            path = self.folder / "parts" / name
            if not path.is_dir():
                raise DamagedPart(path, "missing")
            keys, arrays = open_part(path, self.top_k)
            self.parts.append(_Part(path, *arrays))
            offset = 0
            for key, n in keys:
                self.index[key] = (number, offset, n)
                offset += n
        size = parts_bytes(self.folder, self.manifest["parts"])
        if size != self.manifest["bytes"]:
            raise ConfigError(
                f"--teacher-cache {folder}: its parts hold {size:,} bytes, its manifest says "
                f"{self.manifest['bytes']:,}; find the damaged parts with distill cache-teacher --verify {folder}"
            )

    def note(self, *, loaded: bool) -> str:
        """The start line's word on the cache."""
        teacher = (
            "the live teacher answers generated sequences"
            if loaded
            else "the teacher is not loaded (the policy never generates)"
        )
        return (
            f"teacher cache {self.folder} (top-{self.top_k}, {self.manifest['examples']:,} "
            f"sequences): dataset sequences read it, {teacher}; divergences, validation "
            f"ones included, are over the top {self.top_k} + 1 outcomes"
            + (f"; val_kl is at the cache's temperature {self.temperature:g}" if self.temperature != 1.0 else "")
        )

    def check_temperature(self, key: str, temperature: float) -> None:
        """A divergence that reads this cache must be at the cache's temperature (``key``: its config key)."""
        if temperature != self.temperature:
            raise ConfigError(
                f"--teacher-cache {self.folder} holds the teacher at temperature {self.temperature:g}, this run's "
                f"{key} is {temperature:g}; set {key}={self.temperature:g} or make the cache with --temperature "
                f"{temperature:g} (terms on generated sequences use the live teacher and may differ)"
            )

    def __contains__(self, example: Example) -> bool:
        return example_key(example) in self.index

    def targets(self, examples: list[Example], width: int, device=None) -> torch.Tensor | None:
        """``[B, width, 2K + 1]`` float32 (``pack_targets``; zeros past each response), or None
        unless every example's sequence is in the cache."""
        found = [self.index.get(example_key(e)) for e in examples]
        if any(f is None or f[2] != len(e.response_ids) for f, e in zip(found, examples)):
            return None
        k = self.top_k
        out = np.zeros((len(examples), width, 2 * k + 1), dtype=np.float32)
        for row, (number, offset, n) in enumerate(found):
            part = self.parts[number]
            if not part.checked:  # on first read: the files are what was written
                check_part(part.path)
                part.checked = True
            out[row, :n, :k] = part.log_probs[offset : offset + n]
            out[row, :n, k : 2 * k] = part.ids[offset : offset + n]
            out[row, :n, 2 * k] = part.rest[offset : offset + n]
        return torch.from_numpy(out).to(device) if device is not None else torch.from_numpy(out)

    def check_run(self, cfg, tokenizer, examples: list[Example], n_logits: int) -> None:
        """One line of error unless this cache was made for this run: the same teacher, tokenizer,
        vocabulary and temperature, and every sequence of the run (training and validation examples,
        as tokenized) in the cache; a run on part of the cached data is fine."""
        m, where = self.manifest, f"--teacher-cache {self.folder}"
        if teacher_fingerprint(cfg.teacher) != m["teacher_fingerprint"]:
            raise ConfigError(
                f"{where} was made with teacher "
                f"{m['teacher']}{' + adapter ' + m['teacher_adapter'] if m.get('teacher_adapter') else ''}, "
                f"not this run's {cfg.teacher.ref}; pass --teacher {m['teacher']} or make a cache with this "
                "teacher (distill cache-teacher)"
            )
        if tokenizer_fingerprint(tokenizer) != m["tokenizer_fingerprint"] or n_logits != m["vocabulary"]:
            raise ConfigError(
                f"{where} was made with another tokenizer ({m['tokenizer']}, {m['vocabulary']} logits) than this run's "
                f"({cfg.tokenizer or cfg.teacher.ref}, {n_logits}); use the teacher's tokenizer or make the cache again"
            )
        for key, temperature in cache_temperatures(cfg).items():
            self.check_temperature(key, temperature)
        missing = len({example_key(e) for e in examples} - set(self.index))
        if missing:  # a run may use part of the cached data (fewer validation examples, say), nothing outside it
            d = m["data"]
            raise ConfigError(
                f"{where} was made from other data or another tokenization: {missing} of this run's {len(examples)} "
                f"examples are not in it (it holds {m['examples']} sequences from data.path {d['path']}, "
                f"data.validation {d['validation']}, max_prompt_tokens {d['max_prompt_tokens']}, max_response_tokens "
                f"{d['max_response_tokens']}); use the same data settings or make the cache again"
            )


# --- training and evaluation with a cache


def cache_temperatures(cfg) -> dict[str, float]:
    """The temperatures of the divergences that read the cache for sure, by config key: the run's
    divergence (validation, and every source without a term) and the dataset's term. A term of
    another source is checked when it first reads the cache (``TeacherCache.check_temperature``):
    whether a policy's source holds dataset or generated sequences is the policy's business."""
    temperatures = {"divergence.temperature": cfg.divergence.temperature}
    dataset = cfg.objective.terms.get("dataset")
    if dataset is not None and dataset.temperature is not None:
        temperatures["objective.terms.dataset.temperature"] = dataset.temperature
    return temperatures


def rank_share(examples: list[Example], rank: int, world: int) -> list[Example]:
    """This process's share of the distinct sequences not yet cached, sorted by length (less padding)."""
    distinct = sorted({example_key(e): e for e in examples}.items())
    mine = [e for _, e in distinct[rank::world]]
    return sorted(mine, key=lambda e: (len(e.response_ids), len(e.prompt_ids)))


def build_cache(
    cfg,
    out: str | Path,
    *,
    top_k: int,
    temperature: float = 1.0,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``distill cache-teacher``: the teacher of ``cfg`` over the training and validation examples of
    ``cfg.data`` (split as a run with ``cfg.train.seed`` splits them; the cache holds both), top
    ``top_k`` per response position, into ``out``. Under ``accelerate launch`` every process takes
    its share of the sequences and writes its own parts. Everything a user can get wrong is checked
    before anything is written; an interrupted run is continued by the same command. Returns the
    manifest (None in the other processes of a multi-process run)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from distill.data import load_examples
    from distill.hardware import resolve_precision
    from distill.models import load_model, load_tokenizer, trim_head, vocab_size

    started = time.perf_counter()
    report = report or (lambda message: None)
    cfg, _, _ = resolve_precision(cfg)
    if not cfg.teacher.ref:
        raise ConfigError("--teacher: required (a model folder, hub id or built-in name)")
    state = PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU")
    )  # as Accelerator() reads the launcher's CPU flag
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher)
    n_logits = len(tokenizer)
    if not 1 <= top_k <= n_logits:
        raise ConfigError(f"--top-k {top_k}: must be between 1 and the tokenizer's {n_logits} tokens")
    if not temperature > 0:
        raise ConfigError(f"--temperature {temperature}: must be > 0")
    train_set, val_set, _ = load_examples(cfg.data, tokenizer, cfg.train.seed)
    examples = train_set + val_set
    settings = cache_settings(cfg, tokenizer, examples, len(train_set), top_k, temperature, n_logits)
    out = Path(out)
    resuming = prepare_cache_dir(out, settings, overwrite)  # reads only
    teacher = load_model(cfg.teacher, "teacher").eval().requires_grad_(False)
    if vocab_size(teacher) < n_logits:
        raise ConfigError(
            f"the tokenizer has {n_logits} tokens but the teacher's output head "
            f"only {vocab_size(teacher)} rows; set tokenizer=DIR to the teacher's"
        )
    trim_head(teacher, n_logits)
    teacher.to(state.device)
    # --- nothing was written so far; now the folder (main process), then every process's parts
    if state.is_main_process:
        claim_folder(out, TEACHER_CACHE, clear=not resuming)  # the marker first; only the cache's own files go
        (out / "parts").mkdir(parents=True, exist_ok=True)
        for tmp in (out / "parts").glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
        (out / MANIFEST).unlink(missing_ok=True)
        (out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    state.wait_for_everyone()
    done = finished_keys(out)
    # every process reads the same finished set before any writes a part: a slow process that read
    # it after a fast one's first part would share out a shorter list and leave sequences uncached
    state.wait_for_everyone()
    todo = rank_share([e for e in examples if example_key(e) not in done], state.process_index, state.num_processes)
    if resuming and state.is_main_process:
        report(f"continuing {out}: {len(done)} sequences cached before")
    tell = progress if progress and state.is_main_process else None  # one console: the main process's share
    _write_parts(
        out / "parts", todo, teacher, top_k, temperature, n_logits, tokenizer.pad_token_id, batch_size, state, tell
    )
    state.wait_for_everyone()
    manifest = None
    if state.is_main_process:
        manifest = write_manifest(out, settings, time.perf_counter() - started)
    state.wait_for_everyone()
    return manifest


def _write_parts(
    folder: Path,
    todo: list[Example],
    teacher,
    top_k: int,
    temperature: float,
    n_logits: int,
    pad_id: int,
    batch_size: int,
    state,
    progress: Callable[[str, int, int], None] | None,
) -> None:
    """This process's share of the sequences, ``PART_EXAMPLES`` to a part, numbered after its own
    finished parts (``r<rank>-<n>``)."""
    rank = state.process_index
    first = 1 + max((int(p.name.split("-")[1]) for p in folder.glob(f"r{rank:03d}-*")), default=-1)
    finished = 0
    tell = progress or (lambda phase, n, total: None)
    tell("teacher cache (sequences)", 0, len(todo))

    def advance(n: int) -> None:
        nonlocal finished
        finished += n
        tell("teacher cache (sequences)", finished, len(todo))

    for number, start in enumerate(range(0, len(todo), PART_EXAMPLES)):
        write_part(
            folder,
            f"r{rank:03d}-{first + number:05d}",
            todo[start : start + PART_EXAMPLES],
            teacher,
            top_k,
            temperature,
            n_logits,
            pad_id,
            batch_size,
            state.device,
            advance,
        )
