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
    # MiniLLM as its authors run it (microsoft/LMOps, minillm/, commit 4f2a9deb5f08e459fd44c2e4792344d78ca89fc3):
    # - the single-step term: exact token-level KL(q || p) on the sampled prefixes, weight 1, no importance
    #   weight (losses.py:98-108, 172-173; single_step_reg on in scripts/gpt2/minillm/train_base_xl.sh:75);
    # - the long-term term: minillm_pg with its defaults (rewards /0.5 and clipped at 100, gamma 0.95,
    #   length-normalised, whitened returns, PPO ratio x w clipped at 0.2: see plugins/sequence_terms.py);
    # - teacher-mixed sampling at alpha 0.2 (train_base_xl.sh:76), each collection trained on for 4 optimizer
    #   steps (ppo_epochs 4, :70); temperature 1, top-k 0, top-p 1 (:81-84: generation's defaults here);
    # - no cross-entropy on the samples (the RL loss has none, trainer.py:287): the term's ce_weight is 0.
    # Not here: the pre-training term (lm_coef 1, kd_ratio 0.5 on an LM corpus, losses.py:206-226) and the
    # learning rate 5e-6 with 16 GPUs' batches (:53-54), which the run's train.lr and data set.
    distill.Recipe(
        "minillm",
        "MiniLLM: reverse KL of whole responses by policy gradient on teacher-mixed samples",
        "rkl",
        "teacher_mixed",
        policy_params={"alpha": 0.2, "inner_epochs": 4},
        config={"objective.terms.mixed": {"sequence": {"name": "minillm_pg"}, "ce_weight": 0.0}},
        note="single-step token-level reverse KL + minillm_pg's long-term term (official code's settings); "
        "without MiniLLM's pre-training term",
    ),
    distill.Recipe(
        "rkl_onpolicy",
        "reverse KL on student generations",
        "rkl",
        "onpolicy",
        note="the token-level approximation the project shipped as minillm before: reverse KL on pure student "
        "samples, no long-term term, no teacher-mixed sampling",
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
