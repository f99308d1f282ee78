"""Evaluation: the student's validation cross-entropy (the adaptive policy's signal), its divergence
to the teacher on the validation responses, and ROUGE-L of greedy answers against the references."""

from __future__ import annotations

import torch

from distill.data import Example, collate
from distill.loss import divergence_loss
from distill.objective import response_logits, token_cross_entropy


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure x 100 per pair (Google's ``rouge-score`` package)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [100.0 * scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


class Evaluator:
    """Evaluates on this process's shard of the validation examples; sums are reduced over ranks."""

    def __init__(self, examples: list[Example], tokenizer, divergence, generate, batch_size: int, rouge_samples: int, accelerator=None, kl=None) -> None:
        """``kl``: forward KL (``get_divergence("kl")``), reported as ``val_kl`` beside the run's divergence."""
        rank = accelerator.process_index if accelerator else 0
        world = accelerator.num_processes if accelerator else 1
        self.examples = examples[rank::world]
        self.rouge_examples = examples[:rouge_samples][rank::world]
        self.tokenizer = tokenizer
        self.divergence = divergence
        self.kl = None if kl is None or (divergence.name == "kl" and divergence.temperature == 1.0) else kl
        self.generate = generate
        self.batch_size = batch_size
        self.accelerator = accelerator
        self.unwrap = accelerator.unwrap_model if accelerator else (lambda m: m)

    def _reduce(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            tensor = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum").cpu()
        return tensor.tolist()

    @torch.no_grad()
    def __call__(self, student, teacher, *, with_teacher: bool = True, with_rouge: bool = True) -> dict[str, float]:
        """``val_loss`` (student CE), ``val_divergence`` (the run's divergence), ``val_kl`` (forward KL
        to the teacher) per response token, and ``rouge_l`` when ``with_rouge`` and samples are set."""
        was_training = student.training
        student.eval()
        ce_sum = div_sum = kl_sum = tokens = 0.0
        for start in range(0, len(self.examples), self.batch_size):
            batch = collate(self.examples[start: start + self.batch_size], self.tokenizer.pad_token_id)
            batch = batch.to(next(self.unwrap(student).parameters()).device)
            logits = response_logits(student, batch, self.unwrap)
            ce_sum += float(token_cross_entropy(logits, batch.labels, batch.response_mask, n_tokens=1.0))
            if with_teacher:
                teacher_logits = response_logits(teacher, batch, self.unwrap)
                div_sum += float(divergence_loss(self.divergence, logits, teacher_logits, batch.response_mask, n_tokens=1.0))
                if self.kl is not None:
                    kl_sum += float(divergence_loss(self.kl, logits, teacher_logits, batch.response_mask, n_tokens=1.0))
            tokens += batch.n_tokens
        rouge_sum = 0.0
        with_rouge = with_rouge and bool(self.rouge_examples)
        if with_rouge:
            answers = self.generate(student, self.rouge_examples, greedy=True, batch_size=self.batch_size)
            texts = [self.tokenizer.decode(a.response_ids, skip_special_tokens=True) for a in answers]
            rouge_sum = sum(rouge_l(texts, [e.reference for e in self.rouge_examples]))
        ce_sum, div_sum, kl_sum, tokens, rouge_sum, rouge_n = self._reduce([ce_sum, div_sum, kl_sum, tokens, rouge_sum, float(len(self.rouge_examples))])
        student.train(was_training)
        result = {"val_loss": ce_sum / max(tokens, 1.0)}
        if with_teacher:
            result["val_divergence"] = div_sum / max(tokens, 1.0)
            if self.kl is not None or self.divergence.name == "kl":
                result["val_kl"] = (kl_sum if self.kl is not None else div_sum) / max(tokens, 1.0)
        if with_rouge:
            result["rouge_l"] = rouge_sum / rouge_n
        return result
