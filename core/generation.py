"""Batched sampling of responses from the teacher or the student (left-padded prompts, KV cache).

Two loops produce the responses. ``decode`` is this module's own: one forward per new token with the
model's own cache, no logits processors or stopping-criteria objects, an inverse-CDF sampler (one
uniform draw per row instead of ``torch.multinomial``'s one exponential draw per vocabulary entry),
and rows that reached EOS leave the batch and the cache. transformers' ``generate`` runs what
``decode`` does not: synced generation (FSDP, ZeRO-3: every rank runs a forward until all are done)
and models ``decode`` cannot drive (encoder-decoders, non-transformers modules, PEFT prompt learning).
``benchmarks/generation_speed.py`` measures one against the other.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch

from distill.errors import ConfigError

from distill.data import Example, collate_prompts
from distill.fused import head_of
from distill.models import contiguous_head_input, decoder_start, is_encoder_decoder, stop_ids, vocab_size


class ResponseGenerator:
    """Generates responses for examples' prompts in batches; returns new Examples (token ids).

    Generated responses end at the first stop id of the generating model (``distill.models.stop_ids``:
    its ``generation_config.eos_token_id``, one id or several, and the tokenizer's EOS), which is
    kept: it is a label, even when pad == eos.
    Under sharded training (FSDP, ZeRO-3) every process must call ``generate`` together
    (``synced``: ``synced_gpus``); the sampling policies guarantee that with a rank-synchronised draw.
    ``full_params(model)``: a context in which the unwrapped model's own parameters are whole (FSDP1
    keeps the root module's sharded outside its forward); none needed otherwise.
    Ids at or past ``len(tokenizer)`` (rows a model's head has beyond the tokenizer) are never generated.
    """

    def __init__(
        self,
        tokenizer,
        generation_cfg,
        batch_size: int,
        unwrap=lambda m: m,
        synced: bool = False,
        full_params=None,
        inference_dtype: torch.dtype | None = None,
        *,
        always_generate: bool = False,
    ) -> None:
        """``inference_dtype`` (bf16/fp16 runs with whole weights on every process): generate with a
        copy of a model whose weights are in another dtype, converted to this one and refreshed from
        the model at every call (see ``InferenceCopies``). ``always_generate``: transformers'
        ``generate`` even where ``decode`` could run (benchmarks compare the two)."""
        self.always_generate = always_generate
        self.copies = InferenceCopies(inference_dtype) if inference_dtype is not None else None
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        self.tokenizer = tokenizer
        self.n_tokens = len(tokenizer)
        self.cfg = generation_cfg
        self.batch_size = batch_size
        self.unwrap = unwrap
        self.synced = synced
        self.full_params = full_params or (lambda model: nullcontext())

    def __call__(
        self,
        model,
        examples: list[Example],
        *,
        greedy: bool = False,
        max_new_tokens: int | None = None,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        even: bool = False,
    ) -> list[Example]:
        """``progress(done, total)``: called with 0 first, then after each batch with the number of examples answered.
        ``even`` (synced only): the processes may hold different numbers of examples (even none); they
        first agree on the largest number of batches (a collective), and those with fewer run stand-in
        calls of one token, since every forward of a synced generation is a collective. Every process
        must make the call."""
        with self.full_params(model):
            model = self.unwrap(model)
            stops = self.stop_ids(model)  # the model's own generation_config (a copy's may lack it)
            if self.copies is not None:
                model = self.copies.get(model)
            contiguous_head_input(model)  # generation's last-position logits are a strided slice too
            return self._generate(model, examples, greedy, max_new_tokens, batch_size, stops, progress, even)

    def using(self, generation_cfg) -> ResponseGenerator:
        """This generator with other sampling settings (``GenerationConfig.purpose``), sharing its
        inference copies: training and evaluation sample with their own settings, one copy of the weights."""
        other = copy.copy(self)
        other.cfg = generation_cfg
        return other

    def mixed(self, student, teacher, examples: list[Example], alpha: float) -> list[Example]:
        """Teacher-mixed sampling (``decode_mixed``) for the examples' prompts, in batches: each response
        ends at the student's stop ids and carries its ``rollout`` (log p, log q and q / p̃ per token)."""
        if self.synced:
            raise ConfigError(
                "teacher-mixed sampling runs its own decode loop over both models, which sharded training "
                "(FSDP, ZeRO-3) cannot enter; run it with DDP"
            )
        if not self.cfg.temperature > 0:
            raise ConfigError(
                "teacher-mixed sampling samples: generation.temperature (or generation.train.temperature) must be > 0"
            )
        with self.full_params(student), self.full_params(teacher):
            student, teacher = self.unwrap(student), self.unwrap(teacher)
            stops = self.stop_ids(student)
            if self.copies is not None:
                student = self.copies.get(student)
            for role, model in (("student", student), ("teacher", teacher)):
                if not mixable(model):
                    raise ConfigError(
                        f"teacher-mixed sampling needs a transformers {role} that takes a cache object "
                        "(decoder-only or encoder-decoder)"
                    )
                contiguous_head_input(model)
            if is_encoder_decoder(student) != is_encoder_decoder(teacher):
                raise ConfigError("teacher-mixed sampling needs a teacher and a student of one kind")
            right = is_encoder_decoder(student)  # an encoder's input is right-padded
            pick = TokenPicker(self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, self.n_tokens)
            modes = student.training, teacher.training
            student.eval(), teacher.eval()
            device = next(student.parameters()).device
            out: list[Example] = []
            try:
                for start in range(0, len(examples), self.batch_size):
                    chunk = examples[start : start + self.batch_size]
                    ids, attention = (x.to(device) for x in collate_prompts(chunk, self.pad_id, right=right))
                    with torch.no_grad():
                        tokens, records = decode_mixed(
                            student, teacher, ids, attention, alpha, pick, self.cfg.max_new_tokens, stops, self.pad_id
                        )
                    for row, (example, new) in enumerate(zip(chunk, tokens.tolist())):
                        response = self._cut(new, stops)
                        rollout = tuple(records[k, row, : len(response)].tolist() for k in range(3))
                        out.append(Example(example.prompt_ids, response, reference=example.reference, rollout=rollout))
            finally:
                student.train(modes[0])
                teacher.train(modes[1])
        return out

    def stop_ids(self, model) -> list[int]:
        """The ids that end the responses ``model`` (wrapped or not) generates."""
        return stop_ids(self.unwrap(model), self.tokenizer)

    def _generate(
        self,
        model,
        examples: list[Example],
        greedy: bool,
        max_new_tokens: int | None,
        batch_size: int | None,
        stops: list[int],
        progress: Callable[[int, int], None] | None = None,
        even: bool = False,
    ) -> list[Example]:
        was_training = model.training
        model.eval()
        sample = not greedy and self.cfg.temperature > 0
        pick = (
            TokenPicker(self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, self.n_tokens)
            if sample
            else TokenPicker.greedy(self.n_tokens)
        )
        max_new_tokens = max_new_tokens or self.cfg.max_new_tokens
        lean = not (self.synced or self.always_generate) and decodable(model)
        right = is_encoder_decoder(model)  # an encoder's input is right-padded (BART's positions count from 0)
        device = next(model.parameters()).device
        out: list[Example] = []
        if progress:
            progress(0, len(examples))
        try:
            step = batch_size or self.batch_size
            local = -(-len(examples) // step)
            calls = _largest_batches(local, device) if self.synced and even else local
            for call in range(calls):
                chunk = examples[call * step : (call + 1) * step]
                if not chunk:  # a stand-in call (see ``even``): its answer is dropped
                    stand_in = examples[:1] or [Example([self.eos_id if self.eos_id is not None else 0], [])]
                    ids, attention = collate_prompts(stand_in, self.pad_id, right=right)
                    with torch.no_grad():
                        self._transformers_generate(model, ids.to(device), attention.to(device), sample, 1, stops)
                    continue
                ids, attention = collate_prompts(chunk, self.pad_id, right=right)
                ids, attention = ids.to(device), attention.to(device)
                with torch.no_grad():
                    if lean:
                        responses = decode(model, ids, attention, pick, max_new_tokens, stops, self.pad_id)
                    else:
                        responses = self._transformers_generate(model, ids, attention, sample, max_new_tokens, stops)
                for example, new in zip(chunk, responses.tolist()):
                    out.append(Example(example.prompt_ids, self._cut(new, stops), reference=example.reference))
                if progress:
                    progress(len(out), len(examples))
        finally:
            model.train(was_training)
        return out

    def _transformers_generate(
        self, model, ids: torch.Tensor, attention: torch.Tensor, sample: bool, max_new_tokens: int, stops: list[int]
    ) -> torch.Tensor:
        """transformers' ``generate`` with the same settings as ``decode``: ``[B, P]`` -> ``[B, <= max_new_tokens]``."""
        options = dict(
            do_sample=sample,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=stops or None,
            use_cache=True,
            # a checkpoint's generation_config may ask for beams, length floors or penalties (BART-cnn,
            # Marian): "greedy" and "sampled" here mean one token at a time from the distribution, as decode
            num_beams=1,
            min_length=0,
            min_new_tokens=0,
            no_repeat_ngram_size=0,
            repetition_penalty=1.0,
        )
        if sample:
            options.update(temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p)
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        head_rows = vocab_size(model)
        if head_rows > self.n_tokens:
            options["suppress_tokens"] = list(range(self.n_tokens, head_rows))
        if self.synced:
            options["synced_gpus"] = True
        out = model.generate(input_ids=ids, attention_mask=attention, **options)
        # an encoder-decoder returns the decoder's sequence (its start id first); a decoder-only model the prompt too
        return out[:, 1:] if is_encoder_decoder(model) else out[:, ids.shape[1] :]

    def _cut(self, tokens: list[int], stops: list[int] | None = None) -> list[int]:
        return cut_response(tokens, [self.eos_id] if stops is None else stops, self.eos_id)


def cut_response(tokens: list[int], stops: list[int], eos_id: int | None) -> list[int]:
    """A generated row up to and including its first stop id; without one, all tokens (the cap was
    reached); an empty row is ``[eos_id]``."""
    stops = set(stops)
    end = next((i for i, token in enumerate(tokens) if token in stops), None)
    if end is not None:
        return tokens[: end + 1]
    return tokens or [eos_id]


# --- choosing the next token


class TokenPicker:
    """The next token of each row from its logits: greedy (argmax), or sampled from the softmax of
    ``logits / temperature`` after keeping the ``top_k`` largest logits (0 = all) and then the
    smallest set of most probable tokens whose probability reaches ``top_p`` (the order and the
    tie rules of transformers' warpers). Only the first ``n_tokens`` logits count.

    Sampling inverts the cumulative distribution at one uniform draw per row (``torch.rand`` on the
    logits' device, so the global generator makes it reproducible). ``torch.multinomial`` draws one
    exponential per vocabulary entry instead: for 8 rows x 49152 ids it took 8-9 ms a token against
    1-4 ms for this draw (2-core AMD EPYC, 1 and 2 threads, either CPU path).
    """

    def __init__(
        self,
        temperature: float,
        top_k: int,
        top_p: float,
        n_tokens: int | None = None,
        *,
        sample: bool = True,
        generators: list[torch.Generator] | None = None,
    ) -> None:
        """``generators``: one per row of the batch, each drawing its row's uniforms (the ``rows`` the
        decode loop passes say which rows are still going), so a row's sample depends on its own seed,
        not on the global generator or on which rows share its batch (``distill prepare-pairs``)."""
        self.temperature, self.top_k, self.top_p, self.n_tokens, self.sample = (
            temperature,
            top_k,
            top_p,
            n_tokens,
            sample,
        )
        self.generators = generators

    @classmethod
    def greedy(cls, n_tokens: int | None = None) -> TokenPicker:
        return cls(1.0, 0, 1.0, n_tokens, sample=False)

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, V]`` -> ``[B]`` token ids (int64). ``rows``: the batch rows these logits are (with
        per-row ``generators``; default: all)."""
        if self.n_tokens is not None and logits.shape[-1] > self.n_tokens:
            logits = logits[:, : self.n_tokens]
        logits = logits.float()
        if not self.sample:
            return logits.argmax(-1)
        return self.draw(self._filtered(logits / self.temperature).softmax(-1), rows)

    def draw(self, probs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """One id per row of ``[B, V]`` probabilities (rows of the batch as ``__call__``'s)."""
        if self.generators is None:
            return self._draw(probs)
        picked = range(probs.shape[0]) if rows is None else rows.tolist()
        u = torch.stack([torch.rand((), dtype=torch.float64, generator=self.generators[r]) for r in picked])
        return self._draw(probs, u[:, None].to(probs.device))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits -> the ``[B, V']`` float32 distribution ``__call__`` samples from (V' = ``n_tokens``)."""
        if self.n_tokens is not None and logits.shape[-1] > self.n_tokens:
            logits = logits[:, : self.n_tokens]
        return self._filtered(logits.float() / self.temperature).softmax(-1)

    def _filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits with those outside top-k / top-p set to -inf."""
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of the more probable tokens; 0 for the first, which always stays
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, before >= self.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits

    @staticmethod
    def _draw(probs: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """One id per row of ``[B, V]`` probabilities: the first whose cumulative sum reaches u in (0, total]
        (``uniform``: the ``[B, 1]`` float64 draws in [0, 1); default: ``torch.rand``)."""
        cdf = probs.cumsum(
            -1, dtype=torch.float64
        )  # float32 running sums over 1e5 ids drift by ~1e-7; float64 costs little more
        total = cdf[:, -1:]
        if not torch.isfinite(total).all():
            raise RuntimeError("generation: the model's next-token probabilities are not finite (NaN or inf weights?)")
        # 1 - U[0, 1) lies in (0, 1]: u is never 0, so an id of probability 0 (filtered) is never drawn
        if uniform is None:
            uniform = torch.rand(total.shape, dtype=torch.float64, device=probs.device)
        u = (1.0 - uniform) * total
        return torch.searchsorted(cdf, u).squeeze(1)


# --- the decode loop


def _largest_batches(local: int, device) -> int:
    """The largest number of generation batches of any process (a collective call)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return local
    count = torch.tensor([local], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def decodable(model) -> bool:
    """Whether ``decode`` can drive ``model``: a decoder-only transformers model (or a LoRA-style PEFT
    model around one) whose forward takes position ids and a cache object."""
    base = _loop_base(model)
    if base is None or base.config.is_encoder_decoder:
        return False
    keywords = _forward_keywords(base)
    return {"position_ids", "use_cache"} <= keywords and _cache_keyword(keywords) is not None


def _loop_base(model):
    """The transformers model inside ``model`` that a decode loop of distill's calls into (a LoRA-style
    PEFT model's base), or None: not a transformers model, or PEFT prompt learning (prefix/prompt
    tuning rewrites the inputs and the cache inside PEFT's own generate)."""
    from transformers import PreTrainedModel

    base = _transformers_model(model)
    peft_config = getattr(model, "active_peft_config", None)
    if not isinstance(base, PreTrainedModel) or (peft_config is not None and peft_config.is_prompt_learning):
        return None
    return base


def mixable(model) -> bool:
    """Whether ``decode_mixed`` can drive ``model``: a model ``decode`` drives, or a transformers
    encoder-decoder (or a LoRA-style PEFT model around one) whose forward takes the encoder's output,
    the decoder's ids and a cache object (``_Seq2SeqStepper``)."""
    if decodable(model):
        return True
    base = _loop_base(model)
    if base is None or not base.config.is_encoder_decoder:
        return False
    keywords = _forward_keywords(base)
    return (
        {"encoder_outputs", "decoder_input_ids", "use_cache"} <= keywords
        and _cache_keyword(keywords) is not None
        and callable(getattr(base, "get_encoder", None))
    )


def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pick: TokenPicker,
    max_new_tokens: int,
    stops: int | list[int] | None,
    pad_id: int,
) -> torch.Tensor:
    """New tokens for left-padded prompts: ``[B, P]`` ids and mask -> ``[B, max_new_tokens]`` ids.

    A row ends at its first id in ``stops`` (one id or several; kept) or at ``max_new_tokens``; after its end a row
    holds ``pad_id``. A row that ended leaves the batch and the cache, so later forwards run on the rows still going.
    Positions count real tokens only (left padding takes none), as ``generate``'s do.
    """
    with few_row_head(model):
        return _decode(model, input_ids, attention_mask, pick, max_new_tokens, stops, pad_id)


class _Stepper:
    """One model's side of a decode loop: its cache, the positions and attention mask of the rows still
    going, and one forward per new token (the last position's logits)."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
        base = _transformers_model(model)
        keywords = _forward_keywords(base)
        self.model, self.cache_keyword, self.cache = model, _cache_keyword(keywords), _new_cache(base)
        self.prompt_length = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # the mask of every step, sliced; None without padding (what generate does: the model's causal path is faster)
        self.attention = (
            None
            if bool(attention_mask.all())
            else torch.cat([attention_mask, attention_mask.new_ones(input_ids.shape[0], max_new_tokens)], dim=1)
        )
        first = dict(logits_to_keep=1) if "logits_to_keep" in keywords else {}
        self.logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask if self.attention is not None else None,
            position_ids=positions,
            use_cache=True,
            **{self.cache_keyword: self.cache},
            **first,
        ).logits[:, -1]
        self.next_position = positions[:, -1:] + 1

    def keep(self, kept: torch.Tensor) -> None:
        """Only the rows ``kept`` go on (the others ended)."""
        self.next_position = self.next_position[kept]
        self.attention = self.attention[kept] if self.attention is not None else None
        self.cache.batch_select_indices(kept)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed ``tokens`` (the step-th new token of each row going); the next position's logits."""
        step_mask = self.attention[:, : self.prompt_length + step + 1] if self.attention is not None else None
        self.logits = self.model(
            input_ids=tokens[:, None],
            attention_mask=step_mask,
            position_ids=self.next_position,
            use_cache=True,
            **{self.cache_keyword: self.cache},
        ).logits[:, -1]
        self.next_position = self.next_position + 1
        return self.logits


class _Seq2SeqStepper:
    """An encoder-decoder's side of a decode loop (``_Stepper``'s interface): the encoder runs once on
    the right-padded prompts; the decoder starts from its ``decoder_start_token_id`` and reads one new
    token per step with its self-attention and cross-attention cache (``EncoderDecoderCache``), as
    transformers' ``generate`` does. Every row's decoder is at the same position, so it needs no mask
    of its own; the encoder's mask goes with every forward."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        base = _transformers_model(model)
        self.model, self.cache_keyword = model, _cache_keyword(_forward_keywords(base))
        # no config: T5's num_hidden_layers is its encoder's depth, which a pruned decoder need not share;
        # the layers are made as the decoder's forward first reaches them (full attention throughout)
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self.attention = attention_mask
        self.encoded = base.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        start = torch.full((input_ids.shape[0], 1), decoder_start(base), dtype=torch.long, device=input_ids.device)
        self.logits = self._forward(start)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(
            encoder_outputs=self.encoded,
            attention_mask=self.attention,
            decoder_input_ids=tokens,
            use_cache=True,
            **{self.cache_keyword: self.cache},
        ).logits[:, -1]

    def keep(self, kept: torch.Tensor) -> None:
        """Only the rows ``kept`` go on (the others ended)."""
        from transformers.modeling_outputs import BaseModelOutput

        self.attention = self.attention[kept]
        self.encoded = BaseModelOutput(last_hidden_state=self.encoded.last_hidden_state[kept])
        self.cache.batch_select_indices(kept)

    def step(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Feed ``tokens`` (the step-th new token of each row going); the next position's logits."""
        self.logits = self._forward(tokens[:, None])
        return self.logits


def _decode(model, input_ids, attention_mask, pick, max_new_tokens, stops, pad_id) -> torch.Tensor:
    tokens_out, _ = _decode_loop(
        [_Stepper(model, input_ids, attention_mask, max_new_tokens)],
        lambda logits, rows: (pick(logits[0], rows), None),
        max_new_tokens,
        stops,
        pad_id,
    )
    return tokens_out


def _decode_loop(steppers: list[_Stepper], choose, max_new_tokens: int, stops, pad_id: int):
    """The loop of ``decode``: ``choose([logits of each stepper], rows)`` (``rows``: the batch rows still
    going) gives the next token of every row going and, optionally, ``[k, rows]`` numbers to record
    per token; returns the ``[B, N]`` tokens and the ``[k, B, N]`` records (0 past a row's end; None
    when ``choose`` records nothing)."""
    first = steppers[0].logits
    batch, device = first.shape[0], first.device
    responses = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    records = None
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    stop = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    rows = torch.arange(batch, device=device)  # the row of `responses` each live row writes to
    for step in range(max_new_tokens):
        tokens, recorded = choose([stepper.logits for stepper in steppers], rows)
        responses[rows, step] = tokens
        if recorded is not None:
            if records is None:
                records = torch.zeros((recorded.shape[0], batch, max_new_tokens), dtype=recorded.dtype, device=device)
            records[:, rows, step] = recorded
        if step == max_new_tokens - 1:
            break
        if stop is not None:
            going = ~torch.isin(tokens, stop)
            if not bool(going.all()):
                if not bool(going.any()):
                    break
                kept = going.nonzero().squeeze(1)
                rows, tokens = rows[kept], tokens[kept]
                for stepper in steppers:
                    stepper.keep(kept)
        for stepper in steppers:
            stepper.step(tokens, step)
    return responses, records


def decode_mixed(
    student,
    teacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    alpha: float,
    pick: TokenPicker,
    max_new_tokens: int,
    stops: int | list[int] | None,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-mixed sampling (MiniLLM): every new token is drawn from p̃ = alpha x p + (1 - alpha) x q,
    the teacher's and the student's next-token distributions after ``pick``'s temperature and top-k /
    top-p (mixed in probability space, as the official code's generation does), in one loop over both
    models. Returns the ``[B, N]`` tokens (as ``decode``) and ``[3, B, N]`` per token: log p(y_t),
    log q(y_t) and the importance weight q(y_t) / p̃(y_t) (0, 0, 0 past a row's end).

    Two decoder-only models read left-padded prompts; two encoder-decoders read right-padded ones
    (their encoder's input) and decode from their start id (``_Seq2SeqStepper``)."""

    def choose(logits: list[torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, p = (pick.probabilities(x) for x in logits)
        mixed = alpha * p + (1 - alpha) * q
        tokens = pick.draw(mixed, rows)
        at = tokens[:, None]
        q_y, p_y, mixed_y = (x.gather(-1, at).squeeze(-1) for x in (q, p, mixed))
        return tokens, torch.stack([p_y.log(), q_y.log(), q_y / mixed_y])

    with few_row_head(student), few_row_head(teacher):
        kind = _Seq2SeqStepper if is_encoder_decoder(student) else _Stepper
        steppers = [kind(m, input_ids, attention_mask, max_new_tokens) for m in (student, teacher)]
        return _decode_loop(steppers, choose, max_new_tokens, stops, pad_id)


FEW_ROWS = 8


@contextmanager
def few_row_head(model) -> Iterator[None]:
    """While inside, a float32 CPU output head multiplies at most ``FEW_ROWS`` rows as ``(W @ x.T).T``.

    Decoding projects one position per row through the head: ``[B, H] x [H, V]``, B mostly 8 or fewer.
    ``F.linear`` computes it as ``x @ W.T``, which the CPU BLAS runs well below the speed of the same
    product written ``W @ x.T`` (W's rows read as they lie). A float32 head of the embedded default's
    shape ([8, 576] x [576, 49152]) took 19-25 ms against 9-15 ms, and at 2 rows 23-43 ms against
    6-11 ms (micro-benchmarks on a shared 2-core AMD EPYC, 1 and 2 threads, native and AVX2 paths);
    whole decodes: ``benchmarks/generation_speed.py``. It applies to float32 generation (runs in
    fp32, the AVX2 path's ``auto``); bf16 runs generate from bf16 copies, whose heads measured as
    often slower as faster that way, and taller inputs (a training step's positions: 5-18% at 512
    and 1024 rows, AVX2 path) keep ``F.linear``. Only a plain ``nn.Linear`` head (``fused.head_of``'s
    rule) whose ``forward`` nobody replaced (accelerate's device-map hooks do) is touched; forward
    hooks still run (the trim of padded rows among them); the logits differ from ``F.linear``'s by
    float rounding.
    """
    found = head_of(model, _transformers_model)
    head = None if isinstance(found, str) else found.module
    if (
        head is None
        or head.weight.dtype != torch.float32
        or head.weight.device.type != "cpu"
        or "forward" in vars(head)
    ):
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = head.weight, head.bias  # read at each call: parameters may be swapped meanwhile
        rows = hidden.numel() // max(hidden.shape[-1], 1) if hidden.dim() else 0
        if rows == 0 or rows > FEW_ROWS or hidden.dtype != weight.dtype or hidden.shape[-1] != weight.shape[1]:
            return torch.nn.functional.linear(hidden, weight, bias)  # (and its error message for a wrong shape)
        out = (weight @ hidden.reshape(rows, hidden.shape[-1]).t()).t().contiguous()
        if bias is not None:
            out += bias
        return out.view(*hidden.shape[:-1], weight.shape[0])

    head.forward = forward
    try:
        yield
    finally:
        if vars(head).get("forward") is forward:  # not another decode's (threads) nor anyone else's
            del head.forward


def _transformers_model(model):
    """The transformers model inside a PEFT wrapper (``get_base_model``), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _forward_keywords(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _cache_keyword(keywords: set[str]) -> str | None:
    """What the forward calls its cache argument: ``cache`` (transformers 5) or ``past_key_values``."""
    return next((k for k in ("cache", "past_key_values") if k in keywords), None)


def _new_cache(model):
    """The model's own growing cache (``DynamicCache``; its config picks sliding-window layers)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers before 4.56: no config argument
        return DynamicCache()


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
        if (
            not isinstance(model, PreTrainedModel)
            or getattr(model, "peft_config", None)
            or all(p.dtype == self.dtype for p in weights)
            or not any(p.requires_grad for p in weights)
        ):
            return model  # not a plain model, already in the dtype, or frozen (a teacher: no second copy of it)
        copy = self.copies.get(id(model))
        if copy is None:
            copy = self._new_copy(model)
            self.copies[id(model)] = copy
        with torch.no_grad():
            for target, source in zip(
                copy.state_dict(keep_vars=True).values(), model.state_dict(keep_vars=True).values()
            ):
                target.copy_(source)
        return copy

    def _new_copy(self, model):
        from distill.pruning import _no_init_weights

        with _no_init_weights():
            copy = type(model)(model.config)
        copy.to(device=next(model.parameters()).device, dtype=self.dtype)
        if list(copy.state_dict()) != list(model.state_dict()):
            raise RuntimeError(
                f"cannot copy {type(model).__name__} for generation: its weights differ from a fresh instance's"
            )
        copy.generation_config = model.generation_config
        return copy.eval().requires_grad_(False)
