"""Generation under sharded training (``synced_gpus``) when the processes have different numbers of
prompts to answer: the contrastive policy's kept responses can leave one rank nothing to generate.
Started by ``accelerate.debug_launcher`` (2 CPU processes, gloo); ``tests/test_distillm2.py`` runs it.

    python tests/synced_generation.py OUT      # writes OUT/rank-0.json and OUT/rank-1.json

Rank 0 answers 3 prompts one at a time, rank 1 none: every forward of a synced generation is a
collective, so without ``even`` (stand-in calls on rank 1) rank 0 would wait forever.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


class Tokenizer:
    """What ResponseGenerator reads from a tokenizer."""

    pad_token_id, eos_token_id = 0, 1

    def __len__(self) -> int:
        return 64


def worker(out: str) -> None:
    from accelerate import Accelerator

    from ddp_gradients import models
    from distill.config import GenerationConfig
    from distill.data import Example
    from distill.generation import ResponseGenerator

    torch.set_num_threads(1)
    accelerator = Accelerator()
    _, student = models()
    generate = ResponseGenerator(Tokenizer(), GenerationConfig(max_new_tokens=4), batch_size=1, synced=True)
    prompts = [Example([5, 6, i], [1]) for i in range(3)] if accelerator.process_index == 0 else []
    answers = generate(student, prompts, even=True)
    Path(out, f"rank-{accelerator.process_index}.json").write_text(json.dumps([a.prompt_ids for a in answers]))


if __name__ == "__main__":
    from accelerate import debug_launcher

    sys.path.insert(0, str(Path(__file__).parent))
    debug_launcher(worker, args=(sys.argv[1],), num_processes=2)
