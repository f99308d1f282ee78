"""Shared test settings.

Hypothesis profiles: ``default`` (what CI runs) has no per-example deadline, because the first call
into torch and the first build of the plugin registry take far longer than later examples.
``HYPOTHESIS_PROFILE=thorough`` runs ten times as many examples per property.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import settings

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
