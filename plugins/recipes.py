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
    # The official code samples from decoder-only models (GPT-2, OPT, LLaMA); two encoder-decoders run the
    # same mixture with the encoder once and each decoder from its start id (generation._Seq2SeqStepper):
    # an extension of the method to that kind, which its authors did not run.
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
    # DistiLLM-2 as its authors run it (jongwooko/distillm-2, commit fe4cf9bfbb4f83219dd1d69219800164b59685fa):
    # - teacher responses: skew KL, KL(p || 0.1 p + 0.9 q), the mixture's q not detached
    #   (src/distillm_trainer.py:506, 1160-1165); student responses: skew reverse KL, KL(q || 0.9 p + 0.1 sg(q))
    #   (:1194-1199); each response's token mean, then the mean over responses (:1233, 1298, 1347);
    # - weights 1 and 1: the curriculum (1/1 -> 0.5/1.5 over the first half, :1074-1078) is off as shipped
    #   (gradual_beta False, :508); --set objective.curriculum=true turns it on; the adaptive alpha is off too
    #   (update_alpha False, :507) and is not implemented here;
    # - no cross-entropy in either term (the distillm_v2 loss has none; NLL only in seqkd, :1092): each term's
    #   ce_weight is 0, whatever train.ce_weight says;
    # - training samples at temperature 0.8, top-p 0.95, no top-k (generate/generate_vllm.py:23, 25, 83-85):
    #   generation.train, so evaluation keeps its own settings;
    # - the teacher side is the teacher's samples (generate_vllm.py run with the teacher; reformat.py:21-24,
    #   chosen = the teacher's): policy teacher=generate.
    # The official schedule samples both sides once, before training, the student side from the initial student,
    # and trains one epoch on the fixed pairs: distill prepare-pairs, then -P pairs=DIR. Without pairs the
    # student side is sampled from the current student at every step. Not here: max_tokens 1024
    # (generate_vllm.py:29; generation.max_new_tokens is the run's), the learning rate 5e-5 with LoRA r 16,
    # cosine, warmup 0.1, one epoch (training_configs/qwen2.5-1.5b-distillm2.yaml:8-19, 38, 41, 44, 55): the run's.
    distill.Recipe(
        "distillm2",
        "DistiLLM-2: skew KL on the teacher's responses, skew reverse KL on the student's",
        "skew_kl",
        "contrastive",
        divergence_params={"alpha": 0.1},
        policy_params={"teacher": "generate"},
        config={
            # the teacher side (the teacher's samples; the dataset's with -P teacher=dataset): the run's skew KL
            "objective.terms.dataset": {**_TEACHER_SIDE, "ce_weight": 0.0},
            "objective.terms.teacher": {**_TEACHER_SIDE, "ce_weight": 0.0},
            "objective.terms.student": {
                "divergence": "skew_rkl",
                "params": {"alpha": 0.1, "detach_mixture": True},
                "weight": 1.0,
                "weight_end": 1.5,
                "ramp": 0.5,
                "ce_weight": 0.0,
            },
            # --set objective.curriculum=true: weights 1/1 -> 0.5/1.5 over the first half
            "objective.curriculum": False,
            "train.normalize": "sequence",  # each response's token mean, then the mean over responses
            "generation.train": {"temperature": 0.8, "top_p": 0.95, "top_k": 0},
        },
        note="the official schedule (both sides sampled once before training) is distill prepare-pairs, then "
        "-P pairs=DIR; without it the student side is sampled at every step. No cross-entropy in either term. "
        "Its adaptive alpha (off as shipped) is not implemented",
    ),
)


@distill.hookimpl
def register_recipes(register) -> None:
    for recipe in RECIPES:
        register(recipe)
