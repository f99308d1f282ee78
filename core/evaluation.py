"""Evaluation: the student's validation cross-entropy (the adaptive policy's signal), its divergence
to the teacher on the validation responses, and ROUGE-L of greedy answers against the references."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from distill.builtin import SMOLLM2
from distill.config import DataConfig, GenerationConfig
from distill.data import Example, collate, encode_records, read_records
from distill.errors import ConfigError
from distill.generation import ResponseGenerator
from distill.models import decoder_start, load_model, load_tokenizer, share_vocabulary
from distill.loss import TokenTerms, counted, token_loss
from distill.progress import Progress
from distill.registry import default_registry
from distill.teacher_cache import TeacherCache


METRICS = ("rouge_l", "bleu")
"""What ``eval.metrics`` may ask for: ROUGE-L (always reported with answers) and corpus BLEU."""


def check_metrics(metrics) -> None:
    """BLEU needs sacrebleu: its absence is one line before anything is written."""
    if "bleu" in metrics:
        try:
            import sacrebleu  # noqa: F401
        except ImportError:
            raise ConfigError(
                "eval.metrics: bleu is scored by sacrebleu, which is not installed: pip install 'distill[seq2seq]' "
                "(or sacrebleu), or drop bleu"
            ) from None


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU of ``hypotheses`` against one reference each, as sacrebleu computes it by default
    (its 13a tokenizer, exponential smoothing): the score ``sacrebleu REFERENCES < HYPOTHESES`` prints."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure x 100 per pair (Google's ``rouge-score`` package)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [100.0 * scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


class Evaluator:
    """Evaluates on this process's shard of the validation examples; sums are reduced over ranks.

    Every process runs as many batches (model forwards, generation calls) as the largest shard
    needs: under FSDP and ZeRO-3 each forward is a collective that all ranks enter together, so a
    process whose shard is shorter runs stand-in batches (the first validation example) that count
    for nothing. The metrics are those of the real examples, each counted once."""

    def __init__(
        self,
        examples: list[Example],
        tokenizer,
        divergence,
        generate,
        batch_size: int,
        rouge_samples: int,
        accelerator=None,
        kl=None,
        rouge_before: int | None = None,
        progress: Progress | None = None,
        fused=None,
        rouge_draws: int = 0,
        seed: int = 0,
        metrics: tuple[str, ...] = ("rouge_l",),
    ) -> None:
        """``kl``: forward KL (``get_divergence("kl")``), reported as ``val_kl`` beside the run's divergence.
        ``rouge_before``: answer only the first this many of the ``rouge_samples`` prompts in a
        ``rouge="before"`` pass; a full pass then also reports ROUGE-L on those prompts
        (``rouge_l_subset``), so that before and after compare the same prompts.
        ``progress(phase, done, total)``: called after each batch of this process's share.
        ``fused``: a ``distill.fused.FusedHeads``: the sums come from the heads' inputs, a chunk of
        positions at a time (no ``[B, R, V]`` logits).
        ``rouge_draws``: a full pass (``rouge="all"``) also answers each prompt this many times by
        sampling (the generator's temperature, top-k, top-p) and reports the mean ROUGE-L of the
        draws as ``rouge_l_sampled``; draw d of process r is seeded with ``seed``, d and r, so the
        score does not depend on the training's random state."""
        rank = accelerator.process_index if accelerator else 0
        world = accelerator.num_processes if accelerator else 1
        # sums do not depend on the order: batch similar lengths together, so little of it is padding
        self.examples = sorted(examples[rank::world], key=lambda e: (len(e.response_ids), len(e.prompt_ids)))
        self.world = world
        self.batch_size = batch_size
        self.n_batches = self._largest_shard_batches(len(examples))
        self.stand_in = examples[:1]
        rouge_samples = min(rouge_samples, len(examples))
        self.rouge_total = rouge_samples
        self.rouge_indices = list(range(rouge_samples))[rank::world]
        self.rouge_examples = [examples[i] for i in self.rouge_indices]
        self.rouge_subset = min(rouge_before, rouge_samples) if rouge_before is not None else rouge_samples
        self.tokenizer = tokenizer
        self.divergence = divergence
        self.kl = None if kl is None or (divergence.name == "kl" and divergence.temperature == kl.temperature) else kl
        self.generate = generate
        self.accelerator = accelerator
        self.unwrap = accelerator.unwrap_model if accelerator else (lambda m: m)
        self.progress = progress
        self.fused = fused
        self.rouge_draws, self.seed, self.rank = rouge_draws, seed, rank
        self.bleu = "bleu" in metrics
        self._answers: list[tuple[int, str, str]] = []  # the greedy pass's (prompt index, answer, reference)

    def _largest_shard_batches(self, n_items: int) -> int:
        """Batches of the largest shard when ``n_items`` are dealt round-robin to the processes."""
        largest = -(-n_items // self.world)
        return -(-largest // self.batch_size)

    def _reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            tensor = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()
        return tensor.tolist()

    @torch.no_grad()
    def __call__(
        self, student, teacher, *, with_teacher: bool = True, with_rouge: bool = True, rouge: str = "all"
    ) -> dict[str, float]:
        """``val_loss`` (student CE), ``val_divergence`` (the run's divergence), ``val_kl`` (forward KL
        to the teacher) per response token, and ``rouge_l`` when ``with_rouge`` and samples are set:
        over all ``rouge_samples`` prompts (``rouge="all"``, with ``rouge_l_subset`` over the first
        ``rouge_before`` when that is fewer), or over the first ``rouge_before`` (``rouge="before"``).
        ``rouge_prompts`` says how many prompts ``rouge_l`` covers."""
        was_training = student.training
        student.eval()
        ce_sum = div_sum = kl_sum = tokens = 0.0
        if self.progress:
            self.progress("validation examples", 0, len(self.examples))
        for i in range(self.n_batches):
            chunk = self.examples[i * self.batch_size : (i + 1) * self.batch_size]
            batch = collate(chunk or self.stand_in, self.tokenizer.pad_token_id, decoder_start(self.unwrap(student)))
            batch = batch.to(next(self.unwrap(student).parameters()).device)
            sums = self._batch_sums(student, teacher if with_teacher else None, chunk or self.stand_in, batch)
            if not chunk:
                continue  # a stand-in batch: its forwards match the other processes' (collectives under sharding)
            ce_sum, div_sum, kl_sum = (
                ce_sum + sums["ce"],
                div_sum + sums.get("divergence", 0.0),
                kl_sum + sums.get("kl", 0.0),
            )
            tokens += batch.n_tokens
            if self.progress:
                self.progress(
                    "validation examples", min((i + 1) * self.batch_size, len(self.examples)), len(self.examples)
                )
        ce_sum, div_sum, kl_sum, tokens = self._reduce([ce_sum, div_sum, kl_sum, tokens])
        result = {"val_loss": ce_sum / max(tokens, 1.0)}
        if with_teacher:
            result["val_divergence"] = div_sum / max(tokens, 1.0)
            if self.kl is not None or self.divergence.name == "kl":
                result["val_kl"] = (kl_sum if self.kl is not None else div_sum) / max(tokens, 1.0)
        if with_rouge and (self.rouge_subset if rouge == "before" else self.rouge_total) > 0:  # the same on every rank
            result.update(self._rouge(rouge, student))
        student.train(was_training)
        return result

    def _batch_sums(self, student, teacher, examples: list[Example], batch) -> dict[str, float]:
        """One batch's sums: ``ce`` and, with a teacher (a model or a ``TeacherCache``), ``divergence``
        and ``kl`` (when the run's divergence is not KL itself), in one pass over the rows, the
        teacher's side read as training reads it (``distill.teacher``: the fused heads where the run
        has them, a cache's top-K, else full logits)."""
        from distill.teacher import CachedTeacher, FusedTeacher, LiveTeacher

        cache = teacher if isinstance(teacher, TeacherCache) else None
        model = None if cache is not None else teacher
        side = FusedTeacher(self.fused, model) if self.fused is not None else LiveTeacher(model, self.unwrap)
        if cache is not None:
            side = CachedTeacher(cache, side)
        mask = batch.response_mask
        index = counted(mask, mask.shape, mask.device)
        student_rows = side.student_rows(student, batch, index)
        teacher_rows, reported = None, {}
        if teacher is not None:
            prepared = side.prepare([(None, batch, examples)])[0]
            teacher_rows = side.teacher_rows(batch, index, prepared)
            named = {"divergence": self.divergence, **({"kl": self.kl} if self.kl is not None else {})}
            reported = {name: side.wrap(divergence, prepared) for name, divergence in named.items()}
        _, sums = token_loss(
            student_rows,
            teacher_rows,
            TokenTerms(ce_weight=1.0, reported=reported),
            index,
            n_tokens=1.0,
            labels=batch.labels[index],
        )
        return sums

    def _rouge(self, rouge: str, student=None) -> dict[str, float]:
        """ROUGE-L of greedy answers: ``rouge_l`` over the pass's prompts, ``rouge_prompts`` their
        number, ``rouge_l_subset`` over the first ``rouge_before`` in a full pass over more."""
        chosen = [
            (i, e)
            for i, e in zip(self.rouge_indices, self.rouge_examples)
            if rouge != "before" or i < self.rouge_subset
        ]
        self._answers = []
        scores = self._answer_and_score(student, chosen, rouge, "ROUGE-L answers", greedy=True)
        answers, self._answers = self._answers, []
        subset = [score for (i, _), score in zip(chosen, scores) if i < self.rouge_subset]
        sampled = []
        if rouge == "all":
            for draw in range(self.rouge_draws):
                cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.random.fork_rng(devices=cuda):  # the training's generators are left as they were
                    torch.manual_seed(self.seed * 1_000_003 + draw * 1_009 + self.rank)  # CPU and CUDA
                    sampled += self._answer_and_score(
                        student, chosen, rouge, f"ROUGE-L sampled answers {draw + 1}/{self.rouge_draws}", greedy=False
                    )
        rouge_sum, rouge_n, subset_sum, subset_n, sampled_sum, sampled_n = self._reduce(
            [sum(scores), float(len(scores)), sum(subset), float(len(subset)), sum(sampled), float(len(sampled))]
        )
        result = {"rouge_l": rouge_sum / max(rouge_n, 1.0), "rouge_prompts": int(rouge_n)}
        if 0 < subset_n < rouge_n:  # rouge_before: 0 answers none before training: nothing to compare
            result["rouge_l_subset"] = subset_sum / max(subset_n, 1.0)
        if sampled_n > 0:
            result["rouge_l_sampled"] = sampled_sum / sampled_n
        if self.bleu:  # corpus-level: every process's answers, in prompt order
            if self.accelerator is not None and self.accelerator.num_processes > 1:
                from accelerate.utils import gather_object

                answers = gather_object(answers)
            answers = sorted(answers)
            result["bleu"] = corpus_bleu([a for _, a, _ in answers], [r for _, _, r in answers]) if answers else 0.0
        return result

    def _answer_and_score(self, student, chosen: list, rouge: str, phase: str, greedy: bool) -> list[float]:
        """ROUGE-L of the student's answers to this process's ``chosen`` ``(index, example)`` prompts."""
        scores: list[float] = []
        if chosen:
            shown = {"progress": functools.partial(self.progress, phase)} if self.progress else {}
            answers = self.generate(student, [e for _, e in chosen], greedy=greedy, batch_size=self.batch_size, **shown)
            texts = [self.tokenizer.decode(a.response_ids, skip_special_tokens=True) for a in answers]
            scores = rouge_l(texts, [e.reference for _, e in chosen])
            if greedy:
                self._answers += [(i, text, e.reference) for (i, e), text in zip(chosen, texts)]
        # as many generation calls as the process with the most prompts makes (one per batch): under
        # sharding each is a collective; one token is enough, synced generation steps on with the others
        calls = -(-len(chosen) // self.batch_size)
        for _ in range(
            self._largest_shard_batches(self.rouge_subset if rouge == "before" else self.rouge_total) - calls
        ):
            self.generate(student, self.stand_in, greedy=greedy, max_new_tokens=1, batch_size=self.batch_size)
        return scores


def evaluate_model(
    model: str,
    teacher: str = SMOLLM2,
    data: str = "builtin:val",
    *,
    rouge_samples: int = 64,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_prompt_tokens: int = 256,
    max_response_tokens: int = 256,
    progress: Progress | None = None,
    metrics: tuple[str, ...] = ("rouge_l",),
) -> dict[str, float]:
    """A saved model's ``val_loss``, ``val_divergence`` and ``val_kl`` (forward KL to ``teacher``) per
    response token of ``data``, ``rouge_l`` of its greedy answers to the first ``rouge_samples`` prompts
    (0: none), and ``examples``. ``model``: a folder (a run's ``final/``) or a reference; its tokenizer,
    else the teacher's. ``progress(phase, done, total)`` sees each batch (``distill eval`` shows it)."""
    tokenizer = load_tokenizer(model if Path(model).is_dir() else teacher)
    teacher_model = load_model(teacher, "teacher").eval()
    student = load_model(model, "model", teacher=teacher_model).eval()
    share_vocabulary(teacher_model, student, tokenizer)
    data_cfg = DataConfig(path=data, max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    examples, _ = encode_records(read_records(data), tokenizer, data_cfg, data)
    generate = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=max_new_tokens), batch_size)
    kl = default_registry().get_divergence("kl")
    check_metrics(metrics)
    evaluator = Evaluator(
        examples, tokenizer, kl, generate, batch_size, rouge_samples, progress=progress, metrics=tuple(metrics)
    )
    result = evaluator(student, teacher_model)
    return {"examples": len(examples), **result}
