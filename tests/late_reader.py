"""``distill`` with process 1 late to read the cache folder: it waits (up to 8 s) until process 0 has
written a part before it looks for finished sequences. Launched by
``test_teacher_cache.test_two_processes_split_the_cache``::

    accelerate launch ... tests/late_reader.py cache-teacher ARGS

Every process must read the same finished set before any writes: without the barrier between the two,
process 1 would count process 0's fresh part as done, share out a shorter list, and leave a quarter of
the sequences uncached (seen once under load before the barrier was added). The forcing is a matter of
timing: against the code without the barrier the test failed (21 of 28 sequences cached), as long as
process 0 writes its part within the wait; with the barrier, process 1 always waits the whole 8 s."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import distill.teacher_cache as teacher_cache
from distill.cli import main

original = teacher_cache.finished_keys


def late(out: Path) -> set[str]:
    if os.environ.get("RANK") == "1":
        deadline = time.monotonic() + 8.0
        while time.monotonic() < deadline and not any((Path(out) / "parts").glob("r000-*")):
            time.sleep(0.1)
    return original(out)


teacher_cache.finished_keys = late

if __name__ == "__main__":
    main(sys.argv[1:])
