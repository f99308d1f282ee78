"""Batched sampling of responses from the teacher or the student (left-padded prompts, KV cache)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from distill.data import Example, collate_prompts


class ResponseGenerator:
    """Generates responses for examples' prompts in batches; returns new Examples (token ids).

    Generated responses end at the first EOS, which is kept: it is a label, even when pad == eos.
    Under sharded training (FSDP, ZeRO-3) every process must call ``generate`` together
    (``synced``: ``synced_gpus``); the sampling policies guarantee that with a rank-synchronised draw.
    ``full_params(model)``: a context in which the unwrapped model's own parameters are whole (FSDP1
    keeps the root module's sharded outside its forward); none needed otherwise.
    """

    def __init__(self, tokenizer, generation_cfg, batch_size: int, unwrap=lambda m: m, synced: bool = False, full_params=None,
                 inference_dtype: torch.dtype | None = None) -> None:
        """``inference_dtype`` (bf16/fp16 runs with whole weights on every process): generate with a
        copy of a model whose weights are in another dtype, converted to this one and refreshed from
        the model at every call (see ``InferenceCopies``)."""
        self.copies = InferenceCopies(inference_dtype) if inference_dtype is not None else None
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.cfg = generation_cfg
        self.batch_size = batch_size
        self.unwrap = unwrap
        self.synced = synced
        self.full_params = full_params or (lambda model: nullcontext())

    def __call__(self, model, examples: list[Example], *, greedy: bool = False, max_new_tokens: int | None = None, batch_size: int | None = None) -> list[Example]:
        with self.full_params(model):
            model = self.unwrap(model)
            if self.copies is not None:
                model = self.copies.get(model)
            return self._generate(model, examples, greedy, max_new_tokens, batch_size)

    def _generate(self, model, examples: list[Example], greedy: bool, max_new_tokens: int | None, batch_size: int | None) -> list[Example]:
        was_training = model.training
        model.eval()
        sample = not greedy and self.cfg.temperature > 0
        options = dict(
            do_sample=sample,
            max_new_tokens=max_new_tokens or self.cfg.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            use_cache=True,
        )
        if sample:
            options.update(temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p)
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        if self.synced:
            options["synced_gpus"] = True
        device = next(model.parameters()).device
        out: list[Example] = []
        try:
            step = batch_size or self.batch_size
            for start in range(0, len(examples), step):
                chunk = examples[start: start + step]
                ids, attention = collate_prompts(chunk, self.pad_id)
                with torch.no_grad():
                    sequences = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), **options)
                for example, new in zip(chunk, sequences[:, ids.shape[1]:].tolist()):
                    out.append(Example(example.prompt_ids, self._cut(new), reference=example.reference))
        finally:
            model.train(was_training)
        return out

    def _cut(self, tokens: list[int]) -> list[int]:
        """Up to and including the first EOS; without one, all tokens (the cap was reached)."""
        if self.eos_id is not None and self.eos_id in tokens:
            return tokens[: tokens.index(self.eos_id) + 1]
        return tokens or [self.eos_id]


class InferenceCopies:
    """Copies of models in the run's compute dtype, for generation only.

    Under mixed precision the student keeps float32 weights and autocast converts each weight at
    every forward; generation runs one forward per new token, so a 128-token answer converts the
    whole model 128 times (and frozen weights are not even cached by autocast). A copy in the compute
    dtype, refreshed from the trained weights once per generation call, skips that: on 2 CPU cores,
    8 answers of 128 tokens from a 15-layer SmolLM2 student take about 7.5 s instead of 12.4 s.
    The copy is a plain transformers model of the same class (another ``dtype``-sized copy of the
    weights in memory). Models whose weights are already in that dtype, frozen models (the teacher:
    a large one would not fit twice) and models that are not plain transformers models (PEFT
    adapters) are used as they are.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.copies: dict[int, torch.nn.Module] = {}

    def get(self, model):
        from transformers import PreTrainedModel

        weights = [p for p in model.parameters() if p.is_floating_point()]
        if (not isinstance(model, PreTrainedModel) or getattr(model, "peft_config", None)
                or all(p.dtype == self.dtype for p in weights) or not any(p.requires_grad for p in weights)):
            return model  # not a plain model, already in the dtype, or frozen (a teacher: no second copy of it)
        copy = self.copies.get(id(model))
        if copy is None:
            copy = self._new_copy(model)
            self.copies[id(model)] = copy
        with torch.no_grad():
            for target, source in zip(copy.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()):
                target.copy_(source)
        return copy

    def _new_copy(self, model):
        from distill.pruning import _no_init_weights

        with _no_init_weights():
            copy = type(model)(model.config)
        copy.to(device=next(model.parameters()).device, dtype=self.dtype)
        if list(copy.state_dict()) != list(model.state_dict()):
            raise RuntimeError(f"cannot copy {type(model).__name__} for generation: its weights differ from a fresh instance's")
        copy.generation_config = model.generation_config
        return copy.eval().requires_grad_(False)
