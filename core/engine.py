"""The training loop: a frozen teacher supervises a student, step by step, on Accelerate.

Read ``_run`` (what ``train`` runs) top to bottom: the set-up (``distill.session.open_session``), an
evaluation before training, then one optimizer step per iteration (the policy picks the sequences,
the divergence is summed over response tokens and normalised once by the global token count),
evaluation and checkpoints once in a while, ``final/``. What runs on Accelerate is in
``distill.distributed``; ``train`` adds only where a multi-process run's group ends
(``distill.distributed.GroupKeeper``).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill.checkpoint import RunState, StopSignals, latest_checkpoint
from distill.config import RunConfig
from distill.data import collate
from distill.distributed import GroupKeeper, accumulating, budget_spent, share
from distill.errors import RunStopped
from distill.objective import group_counts, group_denominator
from distill.policy import as_groups
from distill.registry import Registry, default_registry
from distill.resolve import RunPlan, plan_run
from distill.session import Reporter, Session, open_session


@dataclass
class RunResult:
    """What a finished run reports (also in the output folder's files)."""

    output_dir: Path
    steps: int
    seconds: float
    before: dict[str, float]
    after: dict[str, float]
    sources: dict[str, int] = field(default_factory=dict)
    final_loss: float = math.nan
    skipped: int = 0
    """Steps skipped because the loss or the gradients were not finite (``train.skip_nonfinite``)."""
    main_process: bool = True
    """False in the other processes of a multi-process run (they print nothing)."""

    @property
    def student_share(self) -> float:
        """Share of steps trained on student-generated outputs (fresh, replayed, or teacher-mixed)."""
        total = sum(self.sources.values())
        generated = sum(self.sources.get(source, 0) for source in ("student", "replay", "mixed"))
        return generated / total if total else 0.0


def train(
    config: RunConfig | RunPlan,
    *,
    registry: Registry | None = None,
    report: Reporter | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> RunResult:
    """Run the distillation described by ``config``; ``report(kind, record)`` sees every event.

    ``config``: a ``RunConfig`` (its plugins are checked against ``registry`` first), or a
    ``RunPlan`` that ``distill.resolve.plan_run`` checked already. ``resume``: continue the run in
    ``config.output_dir`` from its newest checkpoint (see ``distill.checkpoint``); the steps after it
    are the ones an uninterrupted run takes.
    """
    registry = registry or default_registry()
    plan = config if isinstance(config, RunPlan) else plan_run(config, registry)
    keeper = GroupKeeper()  # a multi-process run's group is destroyed after the run's objects: see there
    try:
        result = _run(plan, registry, report or (lambda kind, record: None), overwrite, resume, keeper)
    except BaseException as error:
        keeper.release(error)
        raise
    keeper.release()
    return result


def _run(
    plan: RunPlan, registry: Registry, report: Reporter, overwrite: bool, resume: bool, keeper: GroupKeeper
) -> RunResult:
    s = open_session(plan, registry=registry, report=report, overwrite=overwrite, resume=resume)
    cfg, accelerator, report = s.cfg, s.accelerator, s.report
    keeper.hold()
    if s.saved is None:  # evaluate before training: the "before" numbers and the adaptive policy's reference loss
        before = _evaluate(s, 0, rouge="before")
        run = RunState(before=before, after=before)
    else:  # or continue exactly where the checkpoint left off
        run = s.restore()
        report("resume", {"step": run.step, "path": str(s.checkpoint.path)})
    batches = iter(s.sampler)
    started, trained_seconds = time.perf_counter(), 0.0  # trained: optimizer steps only, for train.max_seconds
    with StopSignals() as stop:
        for step in range(run.step + 1, cfg.train.max_steps + 1):
            tick = time.perf_counter()
            # --- the policy picks this step's sequences (one draw, the same on every rank): {source: examples}
            examples = [s.train_set[i] for _ in range(cfg.train.grad_accum) for i in next(batches)]
            groups = as_groups(s.policy.sample(step, cfg.train.max_steps, examples, s.context), cfg.policy.name)
            size = cfg.train.batch_size
            examples_of = {
                source: [group[i : i + size] for i in range(0, len(group), size)] for source, group in groups.items()
            }
            micro = {
                source: [
                    collate(part, s.data_tokenizer.pad_token_id, s.decoder_start).to(accelerator.device)
                    for part in parts
                ]
                for source, parts in examples_of.items()
            }
            # --- forward and backward; each group's term is normalised once, by its global token (or sequence) count
            counts = group_counts(micro, accelerator)
            step_loss, terms = _backward_groups(s, step, micro, counts, examples_of)
            # --- one optimizer step, never with a non-finite loss or gradient (that would ruin the weights)
            finite, norm, weight = _optimizer_step(s, run, step, step_loss, counts)
            run.step, run.last_loss = step, step_loss if finite else run.last_loss
            for source in groups:
                run.sources[source] = run.sources.get(source, 0) + 1
            # --- log one line per optimizer step
            record = _step_record(
                s, step, groups, micro, counts, step_loss if finite else None, terms, norm, weight, tick
            )
            trained_seconds += record["seconds"]
            last = step == cfg.train.max_steps or budget_spent(cfg.train.max_seconds, trained_seconds, accelerator)
            s.files.append("metrics.jsonl", record)
            accelerator.log(_numbers("train", record), step=step)
            s.rank_log(
                {
                    "step": step,
                    "source": record["source"],
                    "tokens": sum(b.n_tokens for parts in micro.values() for b in parts),
                }
            )
            report("step", record)
            # --- evaluate once in a while, and at the end (with ROUGE-L: before and after)
            if last or s.evaluates_at(step):
                run.after = _evaluate(s, step, with_rouge=last)
            # --- checkpoint once in a while, at the end, and when asked to stop (Ctrl-C, SIGTERM)
            signum = stop.requested(accelerator)
            if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or signum:
                path = s.save(step, run)
            if signum:
                _end(accelerator)  # every process stops at this step
                name = signal.Signals(signum).name
                raise RunStopped(
                    f"{name} after step {step}; checkpoint saved to {path}; "
                    f"continue with: distill run --resume --output-dir {s.out}",
                    128 + signum,
                )
            if last:  # max_steps, or the train.max_seconds budget is spent
                break
    s.write_final()
    _end(accelerator)
    result = RunResult(
        s.out,
        run.step,
        time.perf_counter() - started,
        run.before,
        run.after,
        run.sources,
        run.last_loss,
        run.skipped,
        accelerator.is_main_process,
    )
    report("end", {"output_dir": str(s.out), "seconds": result.seconds, "skipped": run.skipped})
    return result


def _end(accelerator) -> None:
    """The end of a run, and of a stop that every process takes at the same step: trackers finish and
    the process group is destroyed (where, see ``GroupKeeper``)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _evaluate(s: Session, step: int, **options) -> dict[str, float]:
    """Validate, tell the policy (the adaptive one compares losses), and log the numbers everywhere."""
    numbers = s.evaluate(s.student, s.teacher, **options)
    s.policy.observe_eval(step, numbers["val_loss"])
    s.files.append("eval.jsonl", {"step": step, **numbers})
    s.accelerator.log(_numbers("eval", numbers), step=step)
    s.report("eval", {"step": step, **numbers})
    return numbers


def _backward_groups(
    session: Session,
    step: int,
    micro: dict[str, list],
    counts: dict[str, tuple[float, float]],
    examples_of: dict[str, list],
) -> tuple[float, dict[str, float]]:
    """Forward and backward of every micro-batch of every group of one optimizer step.

    ``examples_of[source]`` lists each micro-batch's examples (a teacher cache looks them up). Returns
    the step's loss (weighted terms, cross-entropy, LM loss) and each group's unweighted term value
    (its divergence, or its cross-entropy without a teacher), both averaged over processes.
    """
    cfg, accelerator, objective, lm_loss = session.cfg, session.accelerator, session.objective, session.lm_loss
    batches = [
        (source, batch, examples_of[source][j]) for source, group in micro.items() for j, batch in enumerate(group)
    ]
    step_loss = torch.zeros((), device=accelerator.device)
    terms = torch.zeros(len(micro), dtype=torch.float64)
    index = {source: i for i, source in enumerate(micro)}
    # the teacher's side of every micro-batch (a cache or the live teacher), decided for the whole step
    # and the same on every process (teacher forwards are collectives under FSDP / ZeRO-3)
    prepared = session.teacher_side.prepare(batches)
    for i, (source, batch, _) in enumerate(batches):
        term = objective.term(source)
        denominator = group_denominator(counts[source], cfg.train.normalize, accelerator.num_processes)
        # each backward() adds to the gradients, so only the last micro-batch synchronises them
        with accumulating(accelerator, session.student, last=i == len(batches) - 1):
            loss, parts = session.micro_loss(
                batch, term, denominator, term.weight(step, cfg.train.max_steps, objective.curriculum), prepared[i]
            )
            if lm_loss is not None:
                loss = loss + cfg.train.lm_weight * lm_loss(len(batches))
            accelerator.backward(loss)
        step_loss += loss.detach()
        terms[index[source]] += parts.get("divergence", parts.get("ce", 0.0))
    together = torch.cat([step_loss.reshape(1).double().cpu(), terms])
    if accelerator.num_processes > 1:  # one reduction: the same numbers on every rank
        together = accelerator.reduce(together.to(accelerator.device), reduction="mean").cpu()
    values = together.tolist()
    return values[0], {source: values[1 + index[source]] for source in micro}


def _optimizer_step(s: Session, run: RunState, step: int, step_loss: float, counts: dict[str, tuple[float, float]]):
    """Clip, weigh (``train.step_weight``) and take the step, unless the loss or the gradient norm is
    not finite: then skip it (``train.skip_nonfinite``) or stop. Returns (finite, norm, weight)."""
    cfg = s.cfg
    clipping = cfg.train.max_grad_norm > 0
    # the gradient norm is checked with clipping or without: a NaN gradient can stand behind a finite
    # loss. With clipping it is the norm clipping computes; without, a bound of inf leaves every
    # gradient as it is (times 1) and still gives the global norm under every backend
    norm = s.accelerator.clip_grad_norm_(s.student.parameters(), cfg.train.max_grad_norm if clipping else math.inf)
    finite = math.isfinite(step_loss) and (norm is None or math.isfinite(float(norm)))
    # with train.normalize: sequence every sequence weighs the same, so steps are weighed by their sequences
    units = (
        int(round(sum(t for t, _ in counts.values())))
        if cfg.train.normalize == "token"
        else sum(n for _, n in counts.values())
    )
    weight = run.token_weight(units) if cfg.train.step_weight == "tokens" else 1.0
    if finite:
        if weight != 1.0:
            _scale_gradients(s.optimizer, weight)
        s.optimizer.step()
    elif cfg.train.skip_nonfinite:
        run.skipped += 1
    else:  # the loss and the norm are global: every process stops at this step
        _end(s.accelerator)
        raise _nonfinite_stop(step, step_loss, norm, s.out)
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return finite, norm if clipping else None, weight  # the norm is logged where it clips


def _step_record(
    s: Session,
    step: int,
    groups: dict[str, list],
    micro: dict[str, list],
    counts,
    loss: float | None,
    terms: dict[str, float],
    norm,
    weight: float,
    tick: float,
) -> dict[str, Any]:
    """One line of ``metrics.jsonl``: loss (None when skipped), source, tokens, padding, seconds, lr,
    and what applies: per-group terms and their weights, the gradient norm, the step weight, the
    share of generated responses cut at the token cap, the policy's own numbers."""
    cfg, accelerator = s.cfg, s.accelerator
    every_batch = [b for batches in micro.values() for b in batches]
    record = {
        "step": step,
        "loss": loss,
        "source": "+".join(groups),
        "tokens": int(round(sum(tokens for tokens, _ in counts.values()))),
        "padding": _padding(every_batch, accelerator),
        "seconds": time.perf_counter() - tick,
        "lr": s.scheduler.get_last_lr()[0],
    }
    if len(groups) > 1 or cfg.objective.terms:
        record["terms"] = terms
        if s.objective.scheduled:
            record["term_weights"] = {
                g: round(s.objective.term(g).weight(step, cfg.train.max_steps, s.objective.curriculum), 6)
                for g in groups
            }
    if norm is not None:
        record["grad_norm"] = round(float(norm), 4)  # before clipping
    if cfg.train.step_weight == "tokens":
        record["step_weight"] = round(weight, 4)
    generated = [(g, e) for g, group in groups.items() if g in s.ends for e in group]
    if generated:  # generated responses: the share that reached generation.max_new_tokens
        record["truncated"] = share(
            sum(e.response_ids[-1] not in s.ends[g] for g, e in generated), len(generated), accelerator
        )
    record.update(s.policy.metrics())
    if loss is None:
        record["skipped"] = True
    return record


def _numbers(prefix: str, record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics or eval record, as tracker scalars ``prefix/name``."""
    return {
        f"{prefix}/{k}": v
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


@torch.no_grad()
def _scale_gradients(optimizer, weight: float) -> None:
    """``train.step_weight: tokens``: after clipping, the step's gradient times its token weight (the
    optimizer's parameters: after ``prepare`` under FSDP these are its flat shards)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, weight)


def _padding(micro, accelerator) -> float:
    """Share of the positions computed in this step (all micro-batches, all processes) that are padding."""
    return round(1.0 - share(sum(b.n_real for b in micro), sum(b.n_positions for b in micro), accelerator), 4)


def _nonfinite_stop(step: int, loss: float, norm, out: Path) -> RunStopped:
    """The one-line stop at a non-finite step (exit code 3), naming the checkpoint to go back to."""
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {float(norm)}"
    last = latest_checkpoint(out)
    where = f"last good checkpoint: {last.path}" if last else "no checkpoint was written yet"
    return RunStopped(
        f"step {step}: {what}; stopped without updating the weights; {where}. Lower train.lr and start again, "
        f"or skip such steps: distill run --resume --output-dir {out} --set train.skip_nonfinite=true",
        3,
    )


__all__ = ["RunResult", "train"]
