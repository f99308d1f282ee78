"""Named presets: DistiLLM, DistiLLM-2 and the baselines as (divergence, policy) pairs. Flags override any field."""

from __future__ import annotations

import distill

_TEACHER_SIDE = {"weight": 1.0, "weight_end": 0.5, "ramp": 0.5}

RECIPES = (
    distill.Recipe("kd", "word-level KD on the dataset's responses", "kl", "offpolicy"),
    distill.Recipe(
        "sft",
        "supervised fine-tuning: cross-entropy on the dataset's (teacher's) responses, no divergence term",
        "kl",
        "offpolicy",
        config={"train.kd_weight": 0.0, "train.ce_weight": 1.0},
        note="the divergence (kl) is only reported at validation; training never runs the teacher",
    ),
    distill.Recipe("seqkd", "sequence-level KD: train on teacher generations", "kl", "teacher"),
    distill.Recipe(
        "imitkd",
        "ImitKD: student generations through a replay buffer",
        "kl",
        "mixed",
        policy_params={"prob": 1.0, "replay": True},
    ),
    distill.Recipe(
        "gkd",
        "GKD: generalised JSD, student generations half of the time",
        "jsd",
        "mixed",
        divergence_params={"beta": 0.5},
        policy_params={"prob": 0.5},
    ),
    distill.Recipe(
        "minillm",
        "reverse KL on student generations",
        "rkl",
        "onpolicy",
        note="approximation: MiniLLM proper optimises reverse KL by policy gradient with "
        "teacher-mixed sampling and length normalisation; this trains token-level reverse KL "
        "on pure student samples",
    ),
    distill.Recipe(
        "distillm",
        "DistiLLM: skew KL with adaptive off-policy sampling and replay",
        "skew_kl",
        "adaptive_offpolicy",
        divergence_params={"alpha": 0.1},
    ),
    distill.Recipe(
        "distillm2",
        "DistiLLM-2: skew KL on the teacher's responses, skew reverse KL on the student's",
        "skew_kl",
        "contrastive",
        divergence_params={"alpha": 0.1},
        config={
            # the teacher side (dataset's responses, or the teacher's with -P teacher=generate): the run's skew KL
            "objective.terms.dataset": dict(_TEACHER_SIDE),
            "objective.terms.teacher": dict(_TEACHER_SIDE),
            "objective.terms.student": {
                "divergence": "skew_rkl",
                "params": {"alpha": 0.1, "detach_mixture": True},
                "weight": 1.0,
                "weight_end": 1.5,
                "ramp": 0.5,
            },
            # --set objective.curriculum=true: weights 1/1 -> 0.5/1.5 over the first half
            "objective.curriculum": False,
            "train.normalize": "sequence",  # each response's token mean, then the mean over responses
        },
        note="the official code's curriculum (weights 1/1 -> 0.5/1.5 over the first half of training) is "
        "--set objective.curriculum=true; its adaptive alpha (off by default there) is not implemented",
    ),
)


@distill.hookimpl
def register_recipes(register) -> None:
    for recipe in RECIPES:
        register(recipe)
