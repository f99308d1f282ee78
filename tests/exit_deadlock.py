"""``distill`` with a gloo collective still in flight when the run ends, the timing of issue #12's
exit hang. Launched by ``test_multiprocess.test_the_end_of_a_run_cannot_deadlock_in_the_group_teardown``::

    accelerate launch ... tests/exit_deadlock.py run ARGS

Just before ``end_training``, process 0 starts an all-reduce of a tensor and lets go of it, and
process 1 joins that all-reduce 3 s later. Until then a gloo worker of process 0 holds the
collective, and when it finishes it must take the GIL to free the tensor's Python object. If the
group is destroyed meanwhile with the GIL held, as it was when DDP's reducer dropped it, the main
thread joins that worker and the worker waits for the GIL: both wait forever (futex waits). Against
the code without ``distill.distributed.GroupKeeper`` each of 3 launches hung here (gdb: the main
thread in ``~ProcessGroupGloo`` joining a worker, from ``~Reducer``; the worker in ``take_gil``, from
``~AsyncWork``); with it, the group is
destroyed with the GIL released and the run exits."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator

from distill.cli import main

original = Accelerator.end_training


def end_training_with_a_collective_in_flight(self) -> None:
    if os.environ.get("RANK") == "1":
        time.sleep(3.0)
        dist.all_reduce(torch.ones(4))
    else:
        tensor = torch.ones(4)
        work = dist.all_reduce(tensor, async_op=True)
        del tensor, work  # a gloo worker now holds the last reference to the tensor
    original(self)


Accelerator.end_training = end_training_with_a_collective_in_flight

if __name__ == "__main__":
    main(sys.argv[1:])
