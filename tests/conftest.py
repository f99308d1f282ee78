"""Shared test settings.

Hypothesis profiles: ``default`` (what CI runs) has no per-example deadline, because the first call
into torch and the first build of the plugin registry take far longer than later examples.
``HYPOTHESIS_PROFILE=thorough`` runs ten times as many examples per property.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("default", deadline=None)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
