"""``distill`` with a gloo collective still in flight while the run's objects are freed: the timing of
issue #12's exit hang. Launched by ``test_multiprocess`` with ``DISTILL_TEST_SYNC=DIR``::

    accelerate launch ... tests/exit_deadlock.py run ARGS

At the end of the run (``end_training``, also on a stop), process 0 starts an all-reduce of a tensor
and lets go of it. Process 1 joins that all-reduce only once process 0 has freed its DDP-wrapped
student (a file in DIR, written by a finalizer of the DDP module). Until then a gloo worker of
process 0 holds the collective, and when it finishes it must take the GIL to free the tensor's
Python object. Had freeing the DDP module destroyed the group (DDP's reducer dropping the last
reference, with the GIL held), its main thread would be joining that worker, and the worker waiting
for the GIL: both wait forever (futex waits; gdb: the main thread in ``~ProcessGroupGloo`` joining
a worker, from ``~Reducer``; the worker in ``take_gil``, from ``~AsyncWork``). Against the code
without ``distill.distributed.GroupKeeper`` all 5 launches tried hung there: 3 with process 1
joining after a fixed 3 s, 2 with this handshake. Without its clearing of a stop's traceback
frames, the stop test hung too.

At exit every process writes ``exited-<rank>`` to DIR and waits (at most 60 s) for the others', so
that torchrun does not kill a process that is still in its teardown when another one has exited
with an error (a stop exits with 128 + the signal): a process that never gets there leaves its
file missing.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from distill.cli import main

SYNC = Path(os.environ["DISTILL_TEST_SYNC"])
RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
original = Accelerator.end_training


def wait_for(path: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def end_training_with_a_collective_in_flight(self) -> None:
    if RANK == 1:
        wait_for(SYNC / "ddp-freed-0")
        dist.all_reduce(torch.ones(4))
    else:
        (ddp,) = [model for model in gc.get_objects() if isinstance(model, DistributedDataParallel)]  # the student
        weakref.finalize(ddp, (SYNC / "ddp-freed-0").touch)
        del ddp
        tensor = torch.ones(4)
        work = dist.all_reduce(tensor, async_op=True)
        del tensor, work  # a gloo worker now holds the last reference to the tensor
    original(self)


Accelerator.end_training = end_training_with_a_collective_in_flight

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    finally:
        (SYNC / f"exited-{RANK}").touch()
        for rank in range(WORLD):
            wait_for(SYNC / f"exited-{rank}")
