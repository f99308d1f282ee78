"""Gradients of one optimizer step with the global batch split over 2 CPU processes (DDP, gloo),
started by ``accelerate.debug_launcher``; ``tests/test_ddp_gradients.py`` runs this file and compares
them with one process's gradients.

    python tests/ddp_gradients.py OUT      # writes OUT/rank-0.pt and OUT/rank-1.pt

Each rank takes two micro-batches of the global batch in ``global_batch()`` (ranks and micro-batches
hold different numbers of response tokens), and saves its gradients after the step twice: with the
loss normalised by ``loss_denominator`` (the engine's way) and, as a control, normalised per
micro-batch (the usual mistake), which must differ; and once more the engine's way through the
fused heads (``train.fused_head``: the student's head weight gets its gradient outside DDP's forward).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

VOCAB, CE_WEIGHT = 64, 0.5
# rank 0 gets long responses, rank 1 short ones; micro-batches differ too
SPLIT = {0: [[0, 1], [2, 3]], 1: [[4, 5], [6, 7]]}
RESPONSE_LENGTHS = [12, 9, 7, 11, 2, 1, 5, 3]


def global_batch():
    """8 Examples of random tokens (prompt 3-6 tokens; responses as RESPONSE_LENGTHS)."""
    from distill.data import Example

    g = torch.Generator().manual_seed(0)
    examples = []
    for length in RESPONSE_LENGTHS:
        prompt = int(torch.randint(3, 7, (), generator=g))
        examples.append(
            Example(
                torch.randint(1, VOCAB, (prompt,), generator=g).tolist(),
                torch.randint(1, VOCAB, (length,), generator=g).tolist(),
            )
        )
    return examples


def models():
    """A 2-layer teacher and a 1-layer student (tiny Llamas, seeded: the same on every process)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(layers: int, seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)

    return build(2, 1), build(1, 2)


def step_gradients(accelerator, student, teacher, micro, denominators, fused=None) -> dict[str, torch.Tensor]:
    """Backward over ``micro`` (syncing on the last one only) with one denominator per micro-batch."""
    import distill
    from distill.objective import micro_batch_loss

    divergence = distill.get_divergence("skew_kl", alpha=0.1)
    for i, (batch, denominator) in enumerate(zip(micro, denominators)):
        last = i == len(micro) - 1
        with nullcontext() if last else accelerator.no_sync(student):
            loss, _ = micro_batch_loss(
                student, teacher, batch, divergence, denominator, CE_WEIGHT, accelerator.unwrap_model, fused=fused
            )
            accelerator.backward(loss)
    grads = {name: p.grad.detach().clone() for name, p in accelerator.unwrap_model(student).named_parameters()}
    student.zero_grad(set_to_none=True)
    return grads


def worker(out: str) -> None:
    from accelerate import Accelerator

    from distill.data import collate
    from distill.fused import plan_fused_head
    from distill.objective import loss_denominator

    torch.set_num_threads(1)
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, accelerator.num_processes
    teacher, student = models()
    student = accelerator.prepare(student)
    teacher = accelerator.prepare_model(teacher.eval().requires_grad_(False), evaluation_mode=True)
    examples = global_batch()
    micro = [collate([examples[i] for i in part], pad_id=0) for part in SPLIT[accelerator.process_index]]
    counts = [b.n_tokens for b in micro]
    denominator = loss_denominator(counts, accelerator)
    result = {
        "counts": counts,
        "denominator": denominator,
        "global": step_gradients(accelerator, student, teacher, micro, [denominator] * len(micro)),
        "per_micro_batch_mean": step_gradients(accelerator, student, teacher, micro, [c * len(micro) for c in counts]),
    }
    fused, line = plan_fused_head("auto", student, teacher, micro[0], accelerator.unwrap_model, accelerator)
    assert fused is not None, line
    result["fused"] = step_gradients(accelerator, student, teacher, micro, [denominator] * len(micro), fused)
    torch.save(result, Path(out) / f"rank-{accelerator.process_index}.pt")


if __name__ == "__main__":
    from accelerate import debug_launcher

    debug_launcher(worker, args=(sys.argv[1],), num_processes=2)
