"""Prepared response pairs (``distill prepare-pairs``): DistiLLM-2's training data, sampled once.

DistiLLM-2's official code (``jongwooko/distillm-2`` at fe4cf9bfbb4f83219dd1d69219800164b59685fa)
samples, before training, one response of the teacher and one of the initial student to every
training prompt (``generate/generate_vllm.py:23,25,83-85``: temperature 0.8, top-p 0.95, no top-k),
pairs them (``generate/reformat.py:21-29``: ``chosen`` the teacher's, ``rejected`` the student's) and
trains one epoch on those fixed pairs; nothing is generated during training. ``prepare_pairs`` makes
such a folder from a run's config (the same flags as ``distill run``: models, data, split, and the
training samples' settings, ``generation.train``); the ``contrastive`` policy reads it with
``pairs=DIR`` (``PreparedPairs``).

The folder: ``distill.json`` (its kind), ``settings.json`` (what the pairs are made from, written
first), ``parts/part-NNNNN.jsonl`` (``part_prompts`` prompts each, default ``PART_PROMPTS``, written
whole under a temporary name), ``manifest.json`` (written last: the settings, the counts, each
part's bytes and SHA-256).
Part i is made by process i mod the number of processes; an interrupted run is continued by the same
command (finished parts stay). Each response is drawn with its own generator, seeded by the seed, the
side and the prompt's token ids, and a part's prompts are batched the same way whatever the number
of processes: one process and several write the same pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.config import SAMPLING_KEYS
from distill.data import Example
from distill.errors import ConfigError
from distill.outputs import PAIRS, check_folder, claim_folder, file_sha256

FORMAT = 1
SETTINGS = "settings.json"
MANIFEST = "manifest.json"
PART_PROMPTS = 64
SIDES = ("teacher", "student")


def prompt_key(prompt_ids: list[int]) -> str:
    """A prompt's key: a hash of its token ids."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"|".join(str(i).encode() for i in prompt_ids))
    return digest.hexdigest()


def distinct_prompts(examples: list[Example]) -> list[Example]:
    """The examples' distinct prompts, in the order they first appear."""
    seen: dict[str, Example] = {}
    for example in examples:
        seen.setdefault(prompt_key(example.prompt_ids), example)
    return list(seen.values())


def prompts_fingerprint(examples: list[Example]) -> str:
    """The set of the examples' distinct prompts (their order and repeats aside)."""
    digest = hashlib.sha256()
    for key in sorted({prompt_key(e.prompt_ids) for e in examples}):
        digest.update(key.encode())
    return digest.hexdigest()[:32]


def sample_seed(seed: int, side: str, key: str) -> int:
    """The seed of one response: the run's seed, the side (teacher or student) and the prompt."""
    digest = hashlib.blake2b(f"{seed}|{side}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def model_facts(cfg, tokenizer) -> dict[str, Any]:
    """The models a run (or a pairs folder) is made of, by content: what must agree between them."""
    from distill.fingerprint import model_fingerprint
    from distill.models import derives_from_teacher
    from distill.teacher_cache import tokenizer_fingerprint

    teacher = model_fingerprint(cfg.teacher)
    if derives_from_teacher(cfg.student):  # prune:K: K of the teacher's layers, so the teacher's files and K
        student = f"{cfg.student.ref}:{teacher}" + (
            f":encoder_layers={cfg.student.encoder_layers}" if cfg.student.encoder_layers else ""
        )
    else:
        student = model_fingerprint(cfg.student)
    return {
        "teacher": cfg.teacher.ref,
        "teacher_fingerprint": teacher,
        "student": cfg.student.ref,
        "student_fingerprint": student,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }


def pair_settings(cfg, tokenizer, prompts: list[Example], batch_size: int, part_prompts: int) -> dict[str, Any]:
    """What a pairs folder is made from; a continued command must agree on all of it."""
    sampling = cfg.generation.purpose("train")
    return {
        "format": FORMAT,
        **model_facts(cfg, tokenizer),
        "sampling": {key: getattr(sampling, key) for key in SAMPLING_KEYS},
        "seed": cfg.train.seed,
        "prompts": len(prompts),
        "prompts_fingerprint": prompts_fingerprint(prompts),
        "data": {
            "path": cfg.data.path,
            "validation": cfg.data.validation,
            "split": cfg.data.split,
            "prompt_template": cfg.data.prompt_template,
            "max_prompt_tokens": cfg.data.max_prompt_tokens,
        },
        "part_prompts": part_prompts,
        "batch_size": batch_size,  # the batches a part's prompts are sampled in (padding moves the last bits)
    }


# --- making a folder


def _continues(out: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Check ``out`` before anything is written; whether it continues an unfinished folder of the same
    settings (reads only)."""
    if not check_folder(out, PAIRS) or overwrite:
        return False
    if not (out / SETTINGS).is_file():
        return False
    if (out / MANIFEST).is_file():
        raise ConfigError(
            f"--output-dir {out} holds finished pairs; pass --overwrite to replace them, or choose another folder"
        )
    saved = json.loads((out / SETTINGS).read_text())
    differ = [key for key in settings if saved.get(key) != settings[key]]
    if differ:
        raise ConfigError(
            f"--output-dir {out} holds unfinished pairs made with other models or settings ({', '.join(differ)} "
            "differ); repeat their command to continue them, pass --overwrite to start over, or choose another folder"
        )
    return True


def _sample(
    model, tokenizer, examples: list[Example], side: str, seed: int, sampling, batch_size: int, n_tokens: int
) -> list[list[int]]:
    """One response per example from ``model``, each drawn with its own seeded generator."""
    from distill.data import collate_prompts
    from distill.generation import TokenPicker, cut_response, decode
    from distill.models import contiguous_head_input, stop_ids

    stops = stop_ids(model, tokenizer)
    contiguous_head_input(model)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        generators = [torch.Generator().manual_seed(sample_seed(seed, side, prompt_key(e.prompt_ids))) for e in chunk]
        sample = sampling.temperature > 0
        pick = (
            TokenPicker(sampling.temperature, sampling.top_k, sampling.top_p, n_tokens, generators=generators)
            if sample
            else TokenPicker.greedy(n_tokens)
        )
        ids, attention = (x.to(device) for x in collate_prompts(chunk, tokenizer.pad_token_id))
        with torch.no_grad():
            tokens = decode(model, ids, attention, pick, sampling.max_new_tokens, stops, tokenizer.pad_token_id)
        out += [cut_response(row, stops, tokenizer.eos_token_id) for row in tokens.tolist()]
    return out


def _write_part(folder: Path, number: int, prompts: list[Example], models: dict, tokenizer, settings, n_tokens) -> None:
    """One part: both sides' responses to ``prompts``, batched by length, written whole."""
    from distill.config import GenerationConfig

    sampling = GenerationConfig(**settings["sampling"])
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i].prompt_ids), i))  # less padding
    ordered = [prompts[i] for i in order]
    answers = {
        side: _sample(
            models[side], tokenizer, ordered, side, settings["seed"], sampling, settings["batch_size"], n_tokens
        )
        for side in SIDES
    }
    lines = []
    for row, example in enumerate(ordered):
        record = {"key": prompt_key(example.prompt_ids), "prompt_ids": list(example.prompt_ids)}
        record.update({f"{side}_ids": answers[side][row] for side in SIDES})
        record["prompt"] = tokenizer.decode(example.prompt_ids)
        record.update({side: tokenizer.decode(answers[side][row]) for side in SIDES})
        lines.append(json.dumps(record, ensure_ascii=False))
    name = f"part-{number:05d}.jsonl"
    tmp = folder / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, folder / name)


def prepare_pairs(
    cfg,
    out: str | Path,
    *,
    batch_size: int = 8,
    part_prompts: int = PART_PROMPTS,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """``distill prepare-pairs``: for every distinct prompt of ``cfg``'s training split, one response of
    the teacher and one of the student as ``cfg`` names them (the initial student), sampled at
    ``generation.train``'s settings, into ``out``. Under ``accelerate launch`` each process makes its
    parts. Everything a user can get wrong is checked before anything is written. Returns the
    manifest (None in the other processes)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from distill.data import load_examples
    from distill.generation import decodable
    from distill.hardware import resolve_precision
    from distill.models import load_model, load_tokenizer, share_vocabulary
    from distill.vocabulary import student_tokenizer_ref

    started = time.perf_counter()
    report = report or (lambda message: None)
    cfg, _, _ = resolve_precision(cfg)
    if not cfg.teacher.ref or not cfg.student.ref:
        raise ConfigError("prepare-pairs needs a teacher and a student (--teacher, --student or a config)")
    if batch_size < 1 or part_prompts < 1:
        raise ConfigError(f"--batch-size {batch_size}, --part-prompts {part_prompts}: each must be 1 or more")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.teacher)
    own = student_tokenizer_ref(cfg.student, cfg.student.tokenizer)
    if own is not None:
        from distill.vocabulary import mismatch

        difference = mismatch(tokenizer, load_tokenizer(own))
        if difference is not None:
            raise ConfigError(
                f"prepare-pairs: the teacher's and the student's tokenizers differ ({difference}); the pairs hold "
                "one tokenization: use a student with the teacher's tokenizer"
            )
    train_set, _, _ = load_examples(cfg.data, tokenizer, cfg.train.seed)
    prompts = distinct_prompts(train_set)
    settings = pair_settings(cfg, tokenizer, prompts, batch_size, part_prompts)
    out = Path(out)
    continuing = _continues(out, settings, overwrite)  # reads only
    teacher = load_model(cfg.teacher, "teacher").eval().requires_grad_(False)
    student = load_model(cfg.student, "student", teacher=teacher).eval().requires_grad_(False)
    for role, model in (("teacher", teacher), ("student", student)):
        if not decodable(model):
            raise ConfigError(
                f"prepare-pairs samples with distill's decode loop: the {role} is not a decoder-only model"
            )
    n_tokens = share_vocabulary(teacher, student, tokenizer)
    teacher.to(state.device)
    student.to(state.device)
    # --- nothing was written so far
    parts = out / "parts"
    if state.is_main_process:
        claim_folder(out, PAIRS, clear=not continuing)
        parts.mkdir(parents=True, exist_ok=True)
        for tmp in parts.glob(".*.tmp"):
            tmp.unlink()
        (out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    state.wait_for_everyone()
    numbers = range(-(-len(prompts) // part_prompts))
    todo = [
        n for n in numbers if n % state.num_processes == state.process_index and not (parts / _part_name(n)).is_file()
    ]
    if continuing and state.is_main_process:
        made = sum((parts / _part_name(n)).is_file() for n in numbers)
        report(f"continuing {out}: {made} of {len(numbers)} parts made before")
    tell = progress if progress and state.is_main_process else (lambda phase, done, total: None)
    tell("prepared pairs (parts)", 0, len(todo))
    for done, number in enumerate(todo, 1):
        chunk = prompts[number * part_prompts : (number + 1) * part_prompts]
        _write_part(parts, number, chunk, {"teacher": teacher, "student": student}, tokenizer, settings, n_tokens)
        tell("prepared pairs (parts)", done, len(todo))
    state.wait_for_everyone()
    manifest = None
    if state.is_main_process:
        manifest = _write_manifest(out, settings, len(numbers), time.perf_counter() - started)
    state.wait_for_everyone()
    return manifest


def _part_name(number: int) -> str:
    return f"part-{number:05d}.jsonl"


def _write_manifest(out: Path, settings: dict[str, Any], n_parts: int, seconds: float) -> dict[str, Any]:
    files = [out / "parts" / _part_name(n) for n in range(n_parts)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"prepare-pairs: parts {', '.join(missing)} were not written; repeat the command")
    tokens = {side: 0 for side in SIDES}
    pairs = 0
    for file in files:
        for line in file.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            pairs += 1
            for side in SIDES:
                tokens[side] += len(record[f"{side}_ids"])
    manifest = {
        **settings,
        "pairs": pairs,
        "response_tokens": tokens,
        "parts": {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in files},
        "seconds": round(seconds, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


# --- reading a folder (the contrastive policy's pairs=DIR)


@dataclass(frozen=True)
class Pair:
    teacher_ids: list[int]
    student_ids: list[int]


class PreparedPairs:
    """A finished pairs folder, read whole (each part checked against the manifest's SHA-256): the
    teacher's and the student's response to each prompt, by the prompt's token ids."""

    def __init__(self, folder: str | Path, flag: str = "policy.params.pairs") -> None:
        folder = Path(folder)
        self.folder = folder
        if not folder.is_dir() or not (folder / MANIFEST).is_file():
            what = "does not exist" if not folder.exists() else "holds no finished pairs (no manifest.json)"
            raise ConfigError(f"{flag} {folder} {what}: make it with distill prepare-pairs (the same flags as the run)")
        self.manifest = json.loads((folder / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(
                f"{flag} {folder}: pairs format {self.manifest.get('format')}, this distill reads {FORMAT}; "
                "make them again with distill prepare-pairs"
            )
        self.pairs: dict[str, Pair] = {}
        for name, expected in self.manifest["parts"].items():
            part = folder / "parts" / name
            if not part.is_file() or file_sha256(part) != expected["sha256"]:
                raise ConfigError(
                    f"{flag} {folder}: part {name} is missing or damaged (its checksum differs); make the pairs "
                    "again with distill prepare-pairs --overwrite"
                )
            for line in part.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                self.pairs[record["key"]] = Pair(record["teacher_ids"], record["student_ids"])

    def check_run(self, cfg, tokenizer, train_set: list[Example], flag: str = "policy.params.pairs") -> None:
        """Refuse a run these pairs were not made for: other models (by content), another tokenizer,
        or other training prompts. One line, before the run's folder is touched."""
        run = model_facts(cfg, tokenizer)
        for key in ("teacher_fingerprint", "student_fingerprint", "tokenizer_fingerprint"):
            if self.manifest.get(key) != run[key]:
                role = key.split("_")[0]
                made = self.manifest.get(role, "?") if role != "tokenizer" else "its tokenizer"
                raise ConfigError(
                    f"{flag} {self.folder}: made with another {role} ({made}) than this run's "
                    f"({run.get(role, 'the teacher tokenizer')}); make pairs for this run with distill prepare-pairs"
                )
        keys = {prompt_key(e.prompt_ids) for e in train_set}
        missing, extra = len(keys - self.pairs.keys()), len(self.pairs.keys() - keys)
        if missing or extra:
            raise ConfigError(
                f"{flag} {self.folder}: its prompts are not this run's training prompts ({missing} of the run's "
                f"{len(keys)} missing, {extra} not in the run's data; another data file, split or seed?); make "
                "pairs for this run with distill prepare-pairs"
            )

    def sides(self, examples: list[Example]) -> dict[str, list[Example]]:
        """The teacher's and the student's prepared response to each example's prompt."""
        teacher, student = [], []
        for e in examples:
            pair = self.pairs[prompt_key(e.prompt_ids)]
            teacher.append(Example(list(e.prompt_ids), list(pair.teacher_ids), reference=e.reference))
            student.append(Example(list(e.prompt_ids), list(pair.student_ids), reference=e.reference))
        return {"teacher": teacher, "student": student}
