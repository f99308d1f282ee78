"""Built-in sampling policies: where each optimizer step's training sequences come from.

``offpolicy`` (the dataset), ``teacher`` (SeqKD), ``onpolicy`` (fresh student outputs), ``mixed``
(GKD / ImitKD), ``adaptive_offpolicy`` (DistiLLM's scheduler with replay), ``contrastive``
(DistiLLM-2: the teacher's and the student's responses to the same prompts, as two groups) and
``teacher_mixed`` (MiniLLM: tokens from the teacher-student mixture, with their rollout).
Each declares the ``sources`` it may return (``objective.terms`` keys are checked against them).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import Field

import distill
from distill.data import Example
from distill.policy import RandomPolicy, ReplayBuffer, SamplingContext


class _NoParams(distill.Params):
    pass


class OffPolicy(RandomPolicy):
    """The dataset's responses (teacher-labelled or gold): plain KD."""

    name = "offpolicy"
    sources = ("dataset",)
    Params = _NoParams
    generates = False  # with a teacher cache, the teacher is never loaded

    def sample(self, step: int, total_steps: int, examples: list[Example], context: SamplingContext):
        return examples, "dataset"


class TeacherPolicy(RandomPolicy):
    """Responses sampled from the teacher for the batch's prompts (sequence-level KD)."""

    name = "teacher"
    sources = ("teacher",)
    Params = _NoParams

    def sample(self, step: int, total_steps: int, examples: list[Example], context: SamplingContext):
        return context.generate_teacher(examples), "teacher"


class OnPolicy(RandomPolicy):
    """Responses sampled from the current student for the batch's prompts, every step."""

    name = "onpolicy"
    sources = ("student",)
    Params = _NoParams

    def sample(self, step: int, total_steps: int, examples: list[Example], context: SamplingContext):
        return context.generate_student(examples), "student"


class Mixed(RandomPolicy):
    """With probability ``prob`` student generations, else the dataset (GKD's lambda).

    With ``replay``, fresh generations go into a FIFO buffer and the step trains on a uniform
    sample of it (ImitKD as DistiLLM's baseline runs it).
    """

    name = "mixed"
    sources = ("dataset", "student", "replay")

    class Params(distill.Params):
        prob: float = Field(0.5, ge=0, le=1, description="probability of a student-generated step (lambda)")
        replay: bool = Field(False, description="train on a sample of a replay buffer of student outputs")
        capacity: int = Field(1000, ge=1, description="replay buffer size in sequences")

    def __init__(self, params: "Mixed.Params") -> None:
        super().__init__(params)
        self.generates = params.prob > 0  # prob 0 never generates: with a teacher cache, no teacher is loaded
        self.buffer = ReplayBuffer(params.capacity) if params.replay else None

    def sample(self, step: int, total_steps: int, examples: list[Example], context: SamplingContext):
        if self.draw() >= self.params.prob:
            return examples, "dataset"
        fresh = context.generate_student(examples)
        if self.buffer is None:
            return fresh, "student"
        self.buffer.add(fresh)
        return self.buffer.sample(len(examples), self.generator), "replay"

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])


class AdaptiveOffPolicy(RandomPolicy):
    """DistiLLM's adaptive off-policy scheduler, as its official code runs it.

    phi, the probability of student-generated outputs (``sgo_prob``, logged each step), starts at
    ``init_prob``; the reference loss is the validation loss before training. At each evaluation, a
    loss >= reference + ``loss_eps`` raises phi by ``prob_step`` and makes that loss the reference
    (an improvement never lowers it). Each step draws r ~ U(0, 1): r < s (s = phi scaled by
    ``replay_schedule``), or r < phi while the buffer is not full, generates fresh student outputs
    (pushed to the buffer); else r < phi replays a buffer sample; else the dataset batch is used.
    """

    name = "adaptive_offpolicy"
    sources = ("dataset", "student", "replay")

    class Params(distill.Params):
        init_prob: float = Field(0.0, ge=0, le=1, description="initial probability phi of student-generated outputs")
        prob_step: float = Field(0.1, ge=0, le=1, description="increase of phi when the validation loss rises")
        loss_eps: float = Field(0.1, ge=0, description="rise of the validation loss over the reference that raises phi")
        capacity: int = Field(1000, ge=1, description="replay buffer size in sequences")
        replay_schedule: Literal["decreasing", "increasing", "constant"] = Field(
            "decreasing", description="share of phi spent on fresh generations: phi*(1-t/T), phi*t/T or phi/2"
        )

    def __init__(self, params: "AdaptiveOffPolicy.Params") -> None:
        super().__init__(params)
        self.sgo_prob = params.init_prob
        self.reference_loss: float | None = None
        self.buffer = ReplayBuffer(params.capacity)

    def metrics(self) -> dict[str, float]:
        return {"sgo_prob": self.sgo_prob}

    def fresh_share(self, step: int, total_steps: int) -> float:
        """s: the probability of fresh generations at this step."""
        progress = step / max(1, total_steps)
        schedule = self.params.replay_schedule
        if schedule == "decreasing":
            return self.sgo_prob * (1.0 - progress)
        if schedule == "increasing":
            return self.sgo_prob * progress
        return self.sgo_prob / 2.0

    def choose(self, step: int, total_steps: int) -> str:
        """The source of this step: "student" (fresh), "replay" or "dataset". One draw per call."""
        r = self.draw()
        if r < self.fresh_share(step, total_steps) or (r < self.sgo_prob and not self.buffer.full):
            return "student"
        if r < self.sgo_prob:
            return "replay"
        return "dataset"

    def sample(self, step: int, total_steps: int, examples: list[Example], context: SamplingContext):
        source = self.choose(step, total_steps)
        if source == "student":
            fresh = context.generate_student(examples)
            self.buffer.add(fresh)
            return fresh, "student"
        if source == "replay":
            return self.buffer.sample(len(examples), self.generator), "replay"
        return examples, "dataset"

    def observe_eval(self, step: int, val_loss: float) -> None:
        if self.reference_loss is None:
            self.reference_loss = val_loss
        elif val_loss >= self.reference_loss + self.params.loss_eps:
            self.sgo_prob = min(self.sgo_prob + self.params.prob_step, 1.0)
            self.reference_loss = val_loss

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "prob": self.sgo_prob,  # the key of earlier checkpoints
            "reference_loss": self.reference_loss,
            "buffer": self.buffer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.sgo_prob = float(state["prob"])
        self.reference_loss = state["reference_loss"]
        self.buffer.load_state_dict(state["buffer"])


class Contrastive(RandomPolicy):
    """DistiLLM-2: for the step's prompts, two groups, each with its own term (``objective.terms``):
    the teacher's responses and the student's own (source ``student``).

    ``pairs`` (a folder from ``distill prepare-pairs``): both responses come from it (sources
    ``teacher`` and ``student``), sampled once before training from the teacher and the initial
    student, as the official code does (``generate/generate_vllm.py``, then one epoch on the fixed
    pairs); nothing is generated during training, and the run is refused when the folder was made
    for other models or other training prompts. Without it, the responses are generated: the
    teacher side is the dataset's responses (``teacher: dataset``, source ``dataset``) or sampled
    from the teacher at every step (``generate``, source ``teacher``), the student side sampled from
    the current student, fresh at every step, or with ``refresh_every`` k > 1 generated once and
    reused whenever the prompt comes back within k steps (the kept responses are part of the
    checkpoint). Every process calls generation at every step, with whatever its prompts need
    (possibly none): generation under sharding is entered together.
    """

    name = "contrastive"
    sources = ("dataset", "teacher", "student")

    class Params(distill.Params):
        pairs: str | None = Field(
            None,
            description=(
                "a folder from distill prepare-pairs: both sides' responses from it (the official schedule); "
                "teacher and refresh_every then unused"
            ),
        )
        teacher: Literal["dataset", "generate"] = Field(
            "dataset",
            description="the teacher-side group: the dataset's responses, or responses sampled from the teacher",
        )
        refresh_every: int = Field(
            1,
            ge=1,
            description=(
                "steps a prompt's student response is reused for before it is generated again (1: fresh every step)"
            ),
        )

    def __init__(self, params: "Contrastive.Params") -> None:
        super().__init__(params)
        self.responses: dict[
            tuple[int, ...], tuple[list[int], int]
        ] = {}  # prompt ids -> (student response ids, step generated)
        self.prepared = None

    def bind(self, run) -> None:
        """With ``pairs``: read the folder and refuse a run it was not made for (``distill.pairs``)."""
        if self.params.pairs is None:
            return
        from distill.pairs import PreparedPairs

        if run.apart:
            raise distill.ConfigError(
                "policy.params.pairs: the teacher's and the student's tokenizers differ; prepared pairs hold one "
                "tokenization"
            )
        self.prepared = PreparedPairs(self.params.pairs)
        self.prepared.check_run(run.cfg, run.tokenizer, run.train_set)

    def sample(self, step: int, total_steps: int, examples: list[Example], context: SamplingContext):
        if self.params.pairs is not None:
            if self.prepared is None:
                raise TypeError("policy contrastive: pairs set but never bound to the run (the engine calls bind)")
            return self.prepared.sides(examples)
        if self.params.teacher == "generate":
            teacher_side, teacher_source = context.generate_teacher(examples), "teacher"
        else:
            teacher_side, teacher_source = examples, "dataset"
        return {teacher_source: teacher_side, "student": self.student_responses(step, examples, context)}

    def student_responses(self, step: int, examples: list[Example], context: SamplingContext) -> list[Example]:
        """Fresh student responses, or with ``refresh_every`` > 1 the kept ones that are recent enough."""
        if self.params.refresh_every == 1:
            return context.generate_student(examples)
        self.responses = {
            k: v for k, v in self.responses.items() if step - v[1] < self.params.refresh_every
        }  # drop stale ones
        keys = [tuple(e.prompt_ids) for e in examples]
        missing = list({k: e for k, e in zip(keys, examples) if k not in self.responses}.values())
        for example in context.generate_student(missing):
            self.responses[tuple(example.prompt_ids)] = (list(example.response_ids), step)
        return [
            Example(list(e.prompt_ids), list(self.responses[k][0]), reference=e.reference)
            for k, e in zip(keys, examples)
        ]

    def metrics(self) -> dict[str, float]:
        return {"kept_responses": len(self.responses)} if self.params.refresh_every > 1 else {}

    def state_dict(self) -> dict[str, Any]:
        items = [(list(prompt), response, made) for prompt, (response, made) in self.responses.items()]
        return {**super().state_dict(), "responses": items}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.responses = {tuple(prompt): (list(response), int(made)) for prompt, response, made in state["responses"]}


class TeacherMixed(RandomPolicy):
    """MiniLLM's sampling: responses drawn token by token from alpha x p + (1 - alpha) x q, the teacher's
    and the student's next-token distributions in one decode loop, each token recording log p, log q
    and its importance weight q / p̃ (the ``rollout`` a sequence term reads: ``minillm_pg``).

    A collection (one step's prompts, answered by the student of that step) is trained on for
    ``inner_epochs`` optimizer steps with the log-probs of the student that sampled it, as the official
    code's PPO epochs reuse a collection (``minillm/trainer.py:242-391``; ``ppo_epochs`` 4 in
    ``scripts/gpt2/minillm/train_base_xl.sh:70``). With its 16 processes and 256 rollouts a process
    holds 16 rollouts, one mini-batch of 16, so each collection gives 4 optimizer steps on the same
    sequences: the schedule here. The dataset examples of the steps that reuse a collection are not
    trained on; the data position still advances. alpha 0.2: ``train_base_xl.sh:76``."""

    name = "teacher_mixed"
    sources = ("mixed",)
    records_rollouts = True

    class Params(distill.Params):
        alpha: float = Field(0.2, ge=0, le=1, description="the teacher's share of the sampling mixture")
        inner_epochs: int = Field(4, ge=1, description="optimizer steps trained on each collection of rollouts")

    def __init__(self, params: "TeacherMixed.Params") -> None:
        super().__init__(params)
        self.collection: list[Example] = []
        self.uses = 0

    def sample(self, step: int, total_steps: int, examples: list[Example], context: SamplingContext):
        if not self.collection or self.uses >= self.params.inner_epochs:
            if context.generate_mixed is None:
                raise TypeError("policy teacher_mixed: the sampling context cannot sample from the teacher mixture")
            self.collection, self.uses = context.generate_mixed(examples, self.params.alpha), 0
        self.uses += 1
        return self.collection, "mixed"

    def metrics(self) -> dict[str, float]:
        return {"collection_use": float(self.uses)}

    def state_dict(self) -> dict[str, Any]:
        kept = [(e.prompt_ids, e.response_ids, [list(x) for x in e.rollout]) for e in self.collection]
        return {**super().state_dict(), "collection": kept, "uses": self.uses}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.collection = [
            Example(list(prompt), list(response), rollout=tuple(list(x) for x in rollout))
            for prompt, response, rollout in state["collection"]
        ]
        self.uses = int(state["uses"])


@distill.hookimpl
def register_policies(register) -> None:
    for policy in (OffPolicy, TeacherPolicy, OnPolicy, Mixed, AdaptiveOffPolicy, Contrastive, TeacherMixed):
        register(policy)
