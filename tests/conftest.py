"""Shared test settings.

Hypothesis profiles: ``default`` (what CI runs) has no per-example deadline, because the first call
into torch and the first build of the plugin registry take far longer than later examples.
``HYPOTHESIS_PROFILE=thorough`` runs ten times as many examples per property.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

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
