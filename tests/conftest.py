"""Shared test settings, and the tiny pair the end-to-end modules train on (``tiny``, ``padded``;
the command lines they type: cli_runs.py).

Hypothesis profiles: ``default`` (what CI runs) has no per-example deadline, because the first call
into torch and the first build of the plugin registry take far longer than later examples.
``HYPOTHESIS_PROFILE=thorough`` runs ten times as many examples per property.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from tiny_models import make_pair

# the built-in teacher's plain copy (distill.builtin) goes to a folder of this test session, which
# training subprocesses inherit: tests never write into the user's cache
_SESSION_CACHE = None if "DISTILL_CACHE" in os.environ else tempfile.mkdtemp(prefix="distill-test-cache-")
if _SESSION_CACHE:
    os.environ["DISTILL_CACHE"] = _SESSION_CACHE


# precision `auto` follows the CPU's native bf16; tests compute in float32 on every machine (so pinned
# values hold on AVX2 and AMX alike) unless a test forces the detection itself
os.environ.setdefault("DISTILL_NATIVE_BF16", "0")


def pytest_sessionfinish(session, exitstatus):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


settings.register_profile("default", deadline=None)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny-tensor tests: on a busy 2-core machine the thread
    pool makes some small autograd ops (log_softmax) thousands of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny pair (``tiny_models.make_pair``: teacher/, student/, data.jsonl), built once a module."""
    return make_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> dict[str, Path]:
    """The tiny pair with heads padded differently past the 300-token tokenizer (teacher 320 rows,
    student 304), as Qwen2.5-7B's 152064 rows and 0.5B's 151936 over 151665 tokens."""
    return make_pair(tmp_path_factory.mktemp("padded"), teacher_vocab=320, student_vocab=304)


@pytest.fixture(scope="module")
def cache_k8(tiny, tmp_path_factory) -> Path:
    """``distill cache-teacher --top-k 8`` of the tiny pair's teacher on its data, made once a module."""
    from cli_runs import cache_cli

    out = tmp_path_factory.mktemp("caches") / "k8"
    result = cache_cli(tiny, out, "--top-k", "8")
    assert result.exit_code == 0, result.output
    return out
