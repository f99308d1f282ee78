"""The compute floor of a training step: the matmul FLOPs its real tokens need, over this machine's
measured matmul throughput. ``step_cost.py`` reports every case's step time against it.

What a step computes, counted per optimizer step from what the case actually ran on:

- trained sequences: their real tokens (prompt + response; never padding; for generated responses,
  up to and including the first EOS) and their response positions, one logit row each;
- generation: per generating model, the sequences, their real prompt tokens and their real new tokens.

What that costs, from the model objects (``ModelMatmuls``): ``P``, the weights of every linear layer
but the output head (embeddings are lookups, not matmuls), of which ``P_train`` are trainable, and
``H·V``, the output head's size. Per token through a model, the forward is ``2·P`` FLOPs; per logit
row ``2·H·V``. Then, per step:

- teacher forward: ``2·P_t·tokens + 2·H_t·V·logit_rows``;
- student forward: ``2·P_s·tokens + 2·H_s·V·logit_rows``;
- student backward: the input gradient of every linear layer whose input needs one (above the first
  trainable parameter: all of them unless the lowest layers are frozen, since a trainable norm sits
  before each layer's matmuls; seen in a one-token forward), ``2·P_in·tokens``, plus the weight
  gradient of the trainable ones, ``2·P_train·tokens``; for the head ``2·H·V·logit_rows`` for its
  input gradient, and as much again when the head itself trains (not with frozen embeddings);
- generation: per sequence, ``2·P`` for every real prompt token and every real new token but the last
  (the prefill, then one token per decoding step) and ``2·H·V`` per new token (the prefill projects
  its last position only). Tokens a batch keeps generating after its own EOS are not counted.

Not counted: attention scores and values (``QKᵀ`` and ``·V``, about 2·T·d per token and layer: a few
percent here), norms, activations, the loss, the optimizer: so the floor is a lower bound. Each part's
FLOPs are divided by the throughput measured at the start of the run for the dtype that part computes
in (``MatmulThroughput``: ``torch.matmul`` of ``[tokens, hidden] x [hidden, intermediate]`` of the
student, the same torch threads, the best of several runs).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from common import Breakdown, patched

PARTS = ("teacher_forward", "student_forward", "student_backward", "student_generation", "teacher_generation")
"""The parts of a step's FLOPs; each computes in one dtype (``compute_dtypes``)."""

CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)


# --- what a token costs in a model


def _is_matmul_layer(module: torch.nn.Module) -> bool:
    """``nn.Linear``, or transformers' ``Conv1D`` (GPT-2: a linear layer with its weight transposed)."""
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


@dataclass(frozen=True)
class ModelMatmuls:
    """The weights a model multiplies per token, read from the model object."""

    body_params: int
    """Weights of every linear layer but the output head (``P``)."""
    body_trainable: int
    """Of those, the ones that require gradients (``P_train``; with LoRA: the adapters)."""
    body_input_grad: int
    """Of those, the ones whose input needs a gradient in the backward pass: every layer above the
    first trainable parameter (all of them unless the lowest layers are frozen)."""
    head_params: int
    """Hidden size x rows of the output head (``H·V``)."""
    head_trainable: bool
    head_input_grad: bool
    config: dict[str, Any]
    """The model config's sizes, for the reader: hidden, layers, intermediate, heads, kv heads, vocabulary."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelMatmuls:
        """Counted on ``model``'s modules; which inputs need gradients is seen in a one-token forward
        (in eval mode, so no gradient checkpointing; its graph is dropped at once)."""
        head = model.get_output_embeddings()
        layers = [m for m in model.modules() if _is_matmul_layer(m) and m is not head]
        needs_grad = _inputs_needing_grad(model, [*layers, head])
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(
            body_params=sum(m.weight.numel() for m in layers),
            body_trainable=sum(m.weight.numel() for m in layers if m.weight.requires_grad),
            body_input_grad=sum(m.weight.numel() for m, needed in zip(layers, needs_grad) if needed),
            head_params=head.weight.numel(),
            head_trainable=head.weight.requires_grad,
            head_input_grad=needs_grad[-1],
            config={name: getattr(config, name, None) for name in CONFIG_FIELDS},
        )

    def forward_flops(self, n_tokens: int, n_logit_rows: int) -> float:
        return 2.0 * self.body_params * n_tokens + 2.0 * self.head_params * n_logit_rows

    def backward_flops(self, n_tokens: int, n_logit_rows: int) -> float:
        """Input gradients where they are needed, weight gradients of the trainable weights."""
        body = 2.0 * self.body_input_grad + 2.0 * self.body_trainable
        head = 2.0 * self.head_params * (int(self.head_input_grad) + int(self.head_trainable))
        return body * n_tokens + head * n_logit_rows

    def generation_flops(self, n_sequences: int, n_prompt_tokens: int, n_new_tokens: int) -> float:
        """Prefill of the prompts, then one token per decoding step; a logit row per new token."""
        n_fed = n_prompt_tokens + max(n_new_tokens - n_sequences, 0)
        return 2.0 * self.body_params * n_fed + 2.0 * self.head_params * n_new_tokens


def _inputs_needing_grad(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[bool]:
    """For each of ``layers`` (modules of ``model``), whether its input requires a gradient: true
    when a trainable parameter lies before it on the way from the input ids."""
    seen: dict[int, bool] = {}

    def record(index: int, args: tuple) -> None:  # a pre-hook that returns something replaces the input
        seen.setdefault(index, bool(args) and bool(getattr(args[0], "requires_grad", False)))

    hooks = [layer.register_forward_pre_hook(lambda _m, args, i=i: record(i, args)) for i, layer in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            model(
                input_ids=torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device), use_cache=False
            )
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [seen.get(i, True) for i in range(len(layers))]


# --- what a step ran on


def _empty_step() -> dict[str, Any]:
    return {"trained": {}, "generated": {}}


class WorkCounter:
    """Real tokens per optimizer step: what the teacher and the student ran on (``trained``), what
    each model generated (``generated``). ``take()`` returns the counts since the last ``take()``.
    ``model(role, model)`` keeps the first model seen in each role ("teacher", "student");
    ``matmuls()``, called after training (it runs a forward), reads their ``ModelMatmuls``."""

    def __init__(self) -> None:
        self.models: dict[str, torch.nn.Module] = {}
        self._step = _empty_step()

    def model(self, role: str, model: torch.nn.Module) -> None:
        self.models.setdefault(role, model)

    def matmuls(self) -> dict[str, ModelMatmuls]:
        found = {role: ModelMatmuls.of(model) for role, model in self.models.items()}
        self.models = {}  # the run's models can go now
        return found

    def trained(self, role: str, n_tokens: int, n_logit_rows: int) -> None:
        counts = self._step["trained"].setdefault(role, {"tokens": 0, "logit_rows": 0})
        counts["tokens"] += n_tokens
        counts["logit_rows"] += n_logit_rows

    def generated(self, role: str, n_sequences: int, n_prompt_tokens: int, n_new_tokens: int) -> None:
        counts = self._step["generated"].setdefault(role, {"sequences": 0, "prompt_tokens": 0, "new_tokens": 0})
        counts["sequences"] += n_sequences
        counts["prompt_tokens"] += n_prompt_tokens
        counts["new_tokens"] += n_new_tokens

    def take(self) -> dict[str, Any]:
        step, self._step = self._step, _empty_step()
        return step

    @contextmanager
    def active(self, observers: list[tuple[object, str, Callable[..., None]]]) -> Iterator[WorkCounter]:
        """Within: each ``owner.attribute`` also calls ``observer(result, *args, **kwargs)`` after it returns."""

        def observing(function: Callable, observer: Callable[..., None]) -> Callable:
            def observed(*args, **kwargs):
                result = function(*args, **kwargs)
                observer(result, *args, **kwargs)
                return result

            return observed

        with patched(
            [(owner, attribute, lambda f, o=observer: observing(f, o)) for owner, attribute, observer in observers]
        ):
            yield self


def distill_observers(work: WorkCounter) -> list[tuple[object, str, Callable[..., None]]]:
    """What ``distill.train`` runs on: each training forward's batch (the student's with gradients,
    the teacher's without; evaluation imports its own ``response_logits``, so it is not counted) and
    each generation's prompts and answers (cut after the first EOS by the generator)."""
    import distill.objective
    from distill.generation import ResponseGenerator

    def forward(logits, model, batch, unwrap=lambda m: m) -> None:
        # by its weights, not by grad mode: the fused heads' start-up check runs the student without gradients
        inner = unwrap(model)
        role = "student" if any(p.requires_grad for p in inner.parameters()) else "teacher"
        work.model(role, inner)
        work.trained(role, int(batch.attention_mask.sum()), int(batch.response_mask.sum()))

    def generation(answers, generator, model, examples, **_) -> None:
        inner = generator.unwrap(model)
        role = "student" if any(p.requires_grad for p in inner.parameters()) else "teacher"
        work.model(role, inner)
        work.generated(
            role, len(answers), sum(len(a.prompt_ids) for a in answers), sum(len(a.response_ids) for a in answers)
        )

    return [(distill.objective, "response_logits", forward), (ResponseGenerator, "__call__", generation)]


# --- the dtype each part computes in


def config_compute_dtypes(precision: str, teacher_dtype: str, student_dtype: str) -> dict[str, str]:
    """Per part, the dtype of a ``distill.train`` run: under bf16 / fp16 autocast (the student's, and
    the teacher's, which Accelerate prepares with the same autocast) that dtype; else the weights'."""
    autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    teacher, student = autocast or teacher_dtype, autocast or student_dtype
    return {
        "teacher_forward": teacher,
        "student_forward": student,
        "student_backward": student,
        "student_generation": student,
        "teacher_generation": teacher,
    }


class DtypeProbe:
    """The dtype each model's matmuls actually produce, per part of the step: a forward hook on one
    linear layer of each model's decoder records its output dtype under the part being timed
    (``Breakdown.outermost``). For trainers whose autocast is not what their settings suggest."""

    def __init__(self, breakdown: Breakdown) -> None:
        self.breakdown = breakdown
        self.seen: dict[tuple[str, str], str] = {}

    @contextmanager
    def active(self, models: dict[str, torch.nn.Module]) -> Iterator[DtypeProbe]:
        handles = []
        for role, model in models.items():
            head = model.get_output_embeddings()
            layer = next(m for m in model.modules() if _is_matmul_layer(m) and m is not head)
            handles.append(layer.register_forward_hook(lambda _m, _i, output, r=role: self._record(r, output)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, role: str, output: torch.Tensor) -> None:
        self.seen.setdefault((role, self.breakdown.outermost() or "other"), str(output.dtype).removeprefix("torch."))

    def dtypes(self, fallback: dict[str, str]) -> tuple[dict[str, str], list[str]]:
        """Observed dtype per part, ``fallback``'s where nothing was observed; and the parts observed."""
        teacher = self.seen.get(("teacher", "teacher_forward")) or next(
            (d for (r, _), d in self.seen.items() if r == "teacher"), None
        )
        observed = {
            "teacher_forward": teacher,
            "student_forward": self.seen.get(("student", "student_forward")),
            "student_backward": self.seen.get(("student", "student_forward")),
            "student_generation": self.seen.get(("student", "generation")),
            "teacher_generation": None,
        }
        return {part: observed[part] or fallback[part] for part in PARTS}, [part for part in PARTS if observed[part]]


# --- this machine's matmul throughput


class MatmulThroughput:
    """GFLOP/s of ``torch.matmul`` of ``[n_tokens, hidden] x [hidden, intermediate]`` on ``device``,
    per dtype, measured once each (in this process, so with its torch threads): the best time of at
    least ``repeats`` runs and ``min_seconds`` of running, after one untimed run."""

    def __init__(
        self, n_tokens: int, hidden: int, intermediate: int, device: str, repeats: int = 3, min_seconds: float = 0.5
    ) -> None:
        self.shape = (n_tokens, hidden, intermediate)
        self.device = device
        self.repeats = repeats
        self.min_seconds = min_seconds
        self.gflops: dict[str, float] = {}

    @classmethod
    def for_model(cls, model: torch.nn.Module, n_tokens: int, device: str, **options) -> MatmulThroughput:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = config.hidden_size
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(max(n_tokens, 1), hidden, intermediate, device, **options)

    def rate(self, dtype: str) -> float:
        """GFLOP/s at ``dtype`` ("float32", "bfloat16", ...), measured at the first request."""
        if dtype not in self.gflops:
            self.gflops[dtype] = self._measure(getattr(torch, dtype))
        return self.gflops[dtype]

    def _measure(self, dtype: torch.dtype) -> float:
        n, h, i = self.shape
        a = torch.randn(n, h, device=self.device).to(dtype)
        b = torch.randn(h, i, device=self.device).to(dtype)
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        torch.matmul(a, b)
        sync()
        times: list[float] = []
        while len(times) < self.repeats or sum(times) < self.min_seconds:
            tick = time.perf_counter()
            torch.matmul(a, b)
            sync()
            times.append(time.perf_counter() - tick)
            if len(times) >= 1000:
                break
        return 2.0 * n * h * i / min(times) / 1e9

    def record(self) -> dict[str, Any]:
        n, h, i = self.shape
        return {
            "shape": f"[{n}, {h}] x [{h}, {i}]",
            "device": self.device,
            "torch_threads": torch.get_num_threads(),
            "gflops": dict(sorted(self.gflops.items())),
        }


# --- per case


def summarise_work(steps: list[dict[str, Any]], models: dict[str, ModelMatmuls]) -> dict[str, Any]:
    """Means per step of the counts and of each part's FLOPs, over the timed steps' ``WorkCounter.take()``."""
    flops = [step_flops(step, models) for step in steps]
    n = max(len(steps), 1)

    def total(get) -> float:
        return sum(get(step) for step in steps) / n

    return {
        "work_per_step": {
            "trained_tokens": total(lambda s: s["trained"].get("student", {}).get("tokens", 0)),
            "logit_rows": total(lambda s: s["trained"].get("student", {}).get("logit_rows", 0)),
            "teacher_tokens": total(lambda s: s["trained"].get("teacher", {}).get("tokens", 0)),
            "generated_sequences": total(lambda s: sum(g["sequences"] for g in s["generated"].values())),
            "generation_prompt_tokens": total(lambda s: sum(g["prompt_tokens"] for g in s["generated"].values())),
            "generated_tokens": total(lambda s: sum(g["new_tokens"] for g in s["generated"].values())),
        },
        "flops_per_step": {part: sum(f[part] for f in flops) / n for part in PARTS},
        "matmul_params": {role: asdict(m) for role, m in sorted(models.items())},
    }


def step_flops(step: dict[str, Any], models: dict[str, ModelMatmuls]) -> dict[str, float]:
    """FLOPs of each part of one step's counts (see the module docstring)."""
    flops = dict.fromkeys(PARTS, 0.0)
    for role, counts in step["trained"].items():
        model = models[role]
        flops[f"{role}_forward"] += model.forward_flops(counts["tokens"], counts["logit_rows"])
        if role == "student":
            flops["student_backward"] += model.backward_flops(counts["tokens"], counts["logit_rows"])
    for role, counts in step["generated"].items():
        flops[f"{role}_generation"] += models[role].generation_flops(
            counts["sequences"], counts["prompt_tokens"], counts["new_tokens"]
        )
    return flops


def add_floor(row: dict[str, Any], throughput: MatmulThroughput) -> None:
    """``floor_seconds`` (per part and in all) and ``ratio_to_floor`` of a case with ``flops_per_step`` and
    ``compute_dtypes``."""
    flops, dtypes = row.get("flops_per_step"), row.get("compute_dtypes")
    if not flops or not dtypes:
        return
    parts = {part: flops[part] / (throughput.rate(dtypes[part]) * 1e9) for part in PARTS if flops[part]}
    row["floor_by_part"] = parts
    row["floor_seconds"] = sum(parts.values())
    seconds = row.get("seconds_per_step")
    row["ratio_to_floor"] = seconds / row["floor_seconds"] if seconds and row["floor_seconds"] else None
