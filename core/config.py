"""The typed run configuration, and how recipe defaults, a config file and flags combine.

Precedence: recipe defaults < config file < command-line flags. Every section forbids unknown keys,
and every error names the dotted field (``train.lr: Input should be greater than 0 (got -1)``).
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distill.errors import ConfigError
from distill.params import describe_validation_error


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSpec(_Section):
    """LoRA adapters on the student (through ``peft``): only the adapters train, the base is frozen."""

    rank: int = Field(8, gt=0, description="rank r of each adapter")
    alpha: float = Field(16.0, gt=0, description="scale: the update is (alpha / rank) * B @ A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] | str | None = Field(
        None, description="module names to adapt, or 'all-linear'; default: peft's choice for the architecture"
    )
    save_merged: bool = Field(False, description="also save final/merged/: the adapters merged into the base weights")


class ModelSpec(_Section):
    """A model to load; a plain string in a file or flag sets ``ref``."""

    ref: str | None = Field(None, description="local directory, hub id, built-in name, or (student) prune:K[:REF]")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description=(
            "dtype of the loaded weights; auto: the teacher's follows "
            "train.precision, the student's is float32 (master weights)"
        ),
    )
    adapter: str | None = Field(None, description="a PEFT (LoRA) adapter folder, merged into the weights at load")
    tokenizer: str | None = Field(
        None,
        description=(
            "student only: its own tokenizer (default: the student folder's, when it has one, else the teacher's); "
            "one that differs from the teacher's allows sequence-level KD only (--recipe seqkd)"
        ),
    )
    lora: LoraSpec | None = Field(None, description="student only: train LoRA adapters instead of every weight")
    cache: str | None = Field(
        None,
        description=(
            "teacher only: a folder written by distill cache-teacher; steps on the dataset's "
            "sequences read the teacher's top-K log-probs from it (divergences on K+1 outcomes) "
            "instead of running the teacher, which is loaded only if the policy generates"
        ),
    )
    freeze: list[str] = Field(
        default_factory=list,
        description=(
            "student only: parameters kept fixed; 'embeddings' (input "
            "and output embeddings) or glob patterns over parameter names"
        ),
    )
    encoder_layers: int | None = Field(
        None,
        gt=0,
        description="student only, prune:K of an encoder-decoder: its encoder's layers kept (default: K)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"ref": value}
        if isinstance(value, dict) and isinstance(value.get("lora"), bool):  # `--set student.lora=true`
            return {**value, "lora": {} if value["lora"] else None}
        return value


class DivergenceSpec(_Section):
    name: str = Field("kl", description="registered divergence name or alias (distill list divergences)")
    params: dict[str, Any] = Field(default_factory=dict, description="the divergence's parameters")
    temperature: float = Field(1.0, gt=0, description="divides teacher and student logits")


class SequenceSpec(_Section):
    """A sequence-level term of a group (``distill.sequence``: MiniLLM's long-term policy gradient)."""

    name: str = Field(description="registered sequence term (distill.sequence; built-in: minillm_pg)")
    params: dict[str, Any] = Field(default_factory=dict, description="the sequence term's parameters")
    weight: float = Field(1.0, ge=0, description="its weight beside the divergence and the cross-entropy")


class TermSpec(_Section):
    """The loss term of one source's group of sequences (``objective.terms.<source>``); a plain string
    in a file or flag sets ``divergence``."""

    divergence: str | None = Field(
        None,
        description=(
            "registered divergence name or alias; default: the run's divergence (its params and temperature too)"
        ),
    )
    params: dict[str, Any] = Field(default_factory=dict, description="the divergence's parameters")
    temperature: float | None = Field(
        None, gt=0, description="divides teacher and student logits; default: the run's divergence.temperature"
    )
    weight: float = Field(1.0, ge=0, description="the term's weight (at the first step, with a schedule)")
    weight_end: float | None = Field(
        None,
        ge=0,
        description="linear schedule: the weight moves from `weight` to this over `ramp` (then stays); none: constant",
    )
    ramp: float = Field(
        1.0, gt=0, le=1, description="share of train.max_steps over which the weight moves to weight_end"
    )
    ce_weight: float | None = Field(
        None,
        ge=0,
        description="weight of the student's cross-entropy on this group's responses; default: train.ce_weight",
    )
    sequence: SequenceSpec | None = Field(
        None,
        description="a sequence-level term over the group's sampled responses, beside the divergence "
        "(needs a policy that records rollouts: teacher_mixed)",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"divergence": value} if isinstance(value, str) else value

    def weight_at(self, step: int, total_steps: int) -> float:
        """The weight at optimizer step ``step`` (1-based) of ``total_steps``: ``weight`` at the first
        step, ``weight_end`` from ``ramp x total_steps`` steps later on."""
        if self.weight_end is None:
            return self.weight
        progress = min(1.0, (step - 1) / max(self.ramp * total_steps, 1e-12))
        return self.weight + (self.weight_end - self.weight) * progress


class ObjectiveConfig(_Section):
    """Several groups of sequences per step (``{source: examples}`` from the policy), one term each."""

    terms: dict[str, TermSpec] = Field(
        default_factory=dict,
        description=(
            "one loss term per source (dataset, teacher, student, replay, or a "
            "policy's own); a source without one uses the run's divergence with weight "
            "1. Each term is normalised by its own group's global response-token count"
        ),
    )
    curriculum: bool = Field(
        True,
        description="apply the terms' weight schedules (weight -> weight_end); false: every term keeps its `weight`",
    )


class PolicySpec(_Section):
    name: str = Field("offpolicy", description="registered sampling policy (distill list policies)")
    params: dict[str, Any] = Field(default_factory=dict, description="the policy's parameters")


class DataConfig(_Section):
    path: str | None = Field(
        None, description="JSON Lines with prompt/response or messages, or anything datasets.load_dataset reads"
    )
    validation: str | None = Field(None, description="separate validation file; default: a split of `path`")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of `path` held out when `validation` is unset")
    val_max: int = Field(256, ge=1, description="at most this many validation examples")
    split: str = Field("train", description="dataset split when loading through datasets")
    prompt_template: str | None = Field(
        None, description="format string with {prompt}, used when the tokenizer has no chat template"
    )
    max_prompt_tokens: int = Field(256, ge=1, description="longer prompts are dropped (counted and reported)")
    max_response_tokens: int = Field(256, ge=1, description="responses are cut to this many tokens (EOS included)")
    group_by_length: Literal["step", "groups", "off"] = Field(
        "step",
        description="batch examples of similar lengths together (less padding). step: each optimizer step's examples "
        "are the shuffled order's, sorted by length only to deal them to micro-batches and processes (the "
        "step's gradient is unchanged; cuts padding when train.grad_accum or the processes split a step); "
        "groups: steps drawn from groups of similar lengths (cuts padding with one micro-batch too, but "
        "each step holds only short or only long examples); off: neither. true = groups, false = off",
    )

    @field_validator("group_by_length", mode="before")
    @classmethod
    def _grouping_from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "groups" if value else "off"
        return {"true": "groups", "false": "off"}.get(value, value) if isinstance(value, str) else value

    lm_path: str | None = Field(
        None, description="plain-text corpus (.txt or JSON Lines with `text`) for the auxiliary LM loss"
    )


class TrainConfig(_Section):
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    max_seconds: float = Field(
        0.0,
        ge=0,
        description=(
            "time budget: stop after the step at which this invocation's training time (optimizer steps only, "
            "not evaluation or checkpoints) reaches it, then evaluate and save as at max_steps (0 = no limit)"
        ),
    )
    batch_size: int = Field(8, gt=0, description="sequences per micro-batch per process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    lr: float = Field(5e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear learning-rate warm-up")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after warm-up, over train.max_steps"
    )
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping; 0 = off")
    step_weight: Literal["tokens", "equal"] = Field(
        "tokens",
        description="how much an optimizer step counts. Its gradient is the mean over its response tokens, clipped; "
        "tokens: then scaled by the step's response tokens over the run's mean per step, "
        "so every token weighs the same whichever batch it lands in (length-grouped "
        "batches alternate short and long); equal: every step weighs the same",
    )
    normalize: Literal["token", "sequence"] = Field(
        "token",
        description="each group's loss: token = the mean over its response tokens (all micro-batches, all processes); "
        "sequence = each sequence's token mean, then the mean over its sequences (DistiLLM-2's averaging)",
    )
    ce_weight: float = Field(
        0.0,
        ge=0,
        description=(
            "weight of the student's cross-entropy on the same response "
            "tokens (per group: objective.terms.<source>.ce_weight)"
        ),
    )
    kd_weight: float = Field(
        1.0,
        ge=0,
        description=(
            "weight of the divergence term; 0 trains on the cross-entropy alone (recipe sft: the teacher's "
            "answers as plain targets) and skips the teacher's forward in training steps (validation still "
            "reports the KL to the teacher). With objective.terms: multiplies every term's weight"
        ),
    )
    fused_head: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "compute the teacher's and the student's logits from their final hidden states a chunk of positions "
            "at a time, fused with the divergence and cross-entropy, so the [B, R, V] logits and their gradient "
            "never exist whole; auto: wherever the heads allow it (a plain linear head, soft-capping and a bias "
            "included; not a LoRA or quantised head, not FSDP / ZeRO-3), else full logits with one line saying "
            "why; true: a head that does not allow it is an error; false: full logits"
        ),
    )
    lm_weight: float = Field(0.0, ge=0, description="weight of the LM loss on data.lm_path")
    lm_kd_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="MiniLLM's kd_ratio: the LM loss is (1 - this) x cross-entropy + this x KL(teacher || student) "
        "on the corpus's text (the teacher is run on it; MiniLLM's scripts: 0.5)",
    )
    seed: int = Field(
        0, ge=0, description="seeds the split, the batches, the policy's draws, generation and initialisation"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "student compute precision (autocast); auto: bf16 where the device "
            "computes it natively, else fp32; the divergence math is float32 regardless"
        ),
    )
    skip_nonfinite: bool = Field(
        False, description="skip (and count) steps whose loss or gradients are not finite instead of stopping"
    )

    @model_validator(mode="after")
    def _something_to_train(self) -> "TrainConfig":
        if self.kd_weight == 0 and self.ce_weight == 0 and self.lm_weight == 0:
            raise ValueError(
                "kd_weight, ce_weight and lm_weight are all 0: nothing "
                "to train; set train.kd_weight or train.ce_weight above 0"
            )
        return self


SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p")


class SamplingSettings(_Section):
    """One purpose's sampling settings: each one left unset takes ``generation``'s own."""

    max_new_tokens: int | None = Field(None, gt=0, description="response length cap, in tokens")
    temperature: float | None = Field(None, ge=0, description="0 = greedy")
    top_k: int | None = Field(None, ge=0, description="0 = off")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")


class GenerationConfig(_Section):
    """How responses are sampled. ``train`` and ``eval`` override these settings for one purpose each:
    the training samples (the policies' student, teacher and mixed responses, ``distill prepare-pairs``)
    and evaluation's answers (the sampled ROUGE-L draws; greedy answers use only ``max_new_tokens``).
    DistiLLM-2 samples its training responses at temperature 0.8, top-p 0.95 while DistiLLM's
    evaluation samples at 1.0: ``generation.train.temperature=0.8`` keeps the second."""

    max_new_tokens: int = Field(64, gt=0, description="generated response length cap, in tokens")
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling: the smallest set of tokens with this mass")
    train: SamplingSettings = Field(
        default_factory=SamplingSettings,
        description="the training samples' settings (policies' responses, prepare-pairs); unset: the ones above",
    )
    eval: SamplingSettings = Field(
        default_factory=SamplingSettings,
        description="evaluation's settings (sampled ROUGE-L draws; greedy answers' length cap); unset: the ones above",
    )
    inference_copy: bool = Field(
        True,
        description=(
            "bf16/fp16 runs with whole weights per process: generate with a copy of the student's weights "
            "in that dtype, refreshed at every call (faster; one more copy of the weights in memory)"
        ),
    )

    def purpose(self, purpose: Literal["train", "eval"]) -> GenerationConfig:
        """These settings with ``train``'s or ``eval``'s overrides applied (and both emptied)."""
        chosen = getattr(self, purpose).model_dump(exclude_none=True)
        return self.model_copy(update={**chosen, "train": SamplingSettings(), "eval": SamplingSettings()})


class EvalConfig(_Section):
    every: int | Literal["epoch"] = Field(
        50,
        description=(
            "evaluate every N steps (0 = only before and after training), or `epoch`: "
            "at the end of every pass over the training set (as DistiLLM's official "
            "code does; the adaptive policy's φ can change only at an evaluation)"
        ),
    )
    batch_size: int = Field(8, gt=0, description="validation sequences per forward, per process")
    rouge_samples: int = Field(
        0, ge=0, description="validation prompts answered greedily for ROUGE-L (0 = no generation eval)"
    )
    metrics: list[Literal["rouge_l", "bleu"]] = Field(
        default_factory=lambda: ["rouge_l"],
        description="scores of the greedy answers: rouge_l, and bleu (corpus BLEU through sacrebleu)",
    )

    @field_validator("every", mode="before")
    @classmethod
    def _steps_or_epoch(cls, value: Any) -> Any:
        if value == "epoch":
            return value
        try:
            steps = int(value)
        except (TypeError, ValueError):
            steps = None
        if steps is None or steps != value and str(steps) != str(value).strip() or steps < 0:
            raise ValueError(f"a number of steps (0 or more) or `epoch`, not {value!r}")
        return steps

    rouge_draws: int = Field(
        0,
        ge=0,
        description=(
            "at the final evaluation, also answer each ROUGE-L prompt this many times "
            "by sampling (generation's settings, with generation.eval's overrides) and report their mean "
            "as rouge_l_sampled (DistiLLM's evaluation: 5 draws at temperature 1)"
        ),
    )
    rouge_before: int | None = Field(
        None,
        ge=0,
        description=(
            "prompts answered before training: the first N of the rouge_samples prompts "
            "(an untrained student answers up to the token cap, so this pass is slow); the "
            "final evaluation also reports ROUGE-L on them (rouge_l_subset); default: all"
        ),
    )


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="checkpoint every N steps, and always at the end (0 = only at the end)")
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")
"""Experiment trackers Accelerate's ``log_with`` knows (``accelerate.utils.LoggerType``)."""


class LogConfig(_Section):
    """Experiment trackers; ``metrics.jsonl`` and ``eval.jsonl`` stay the record of a run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    with_: list[str] = Field(
        default_factory=list,
        alias="with",
        description=f"trackers to log to through Accelerate: none, or a list of {', '.join(TRACKERS)}",
    )
    project: str = Field("distill", description="project (run group) name in the trackers")

    @field_validator("with_", mode="before")
    @classmethod
    def _as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and value in (["none"], ["no"]):
            return []
        return value

    @field_validator("with_")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in TRACKERS]
        if unknown:
            raise ValueError(f"unknown tracker {', '.join(unknown)}; choose none or from {', '.join(TRACKERS)}")
        return value


class RunConfig(_Section):
    recipe: str | None = Field(None, description="preset applied under the file and flags")
    teacher: ModelSpec = Field(default_factory=ModelSpec, description="the frozen teacher")
    student: ModelSpec = Field(default_factory=ModelSpec, description="the student being trained")
    tokenizer: str | None = Field(None, description="default: the teacher's tokenizer")
    output_dir: str = Field(
        "runs/latest", description="the run's folder (the CLI makes a new runs/<recipe>-<time> unless given)"
    )
    divergence: DivergenceSpec = Field(default_factory=DivergenceSpec)
    policy: PolicySpec = Field(default_factory=PolicySpec)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    log: LogConfig = Field(default_factory=LogConfig)


# --- reading files and flags


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML, TOML or JSON file as a dict; syntax errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot read ({error.strerror or error})") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML ({error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(error, 'problem', None) or error})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A flag value as YAML scalar (``3`` -> int, ``1e-4`` -> float, ``true`` -> bool), else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _looks_numeric(value):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _looks_numeric(text: str) -> bool:
    return any(c.isdigit() for c in text) and all(c in "0123456789.eE+-" for c in text)


def parse_assignments(items: list[str], flag: str) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; a malformed item names the flag."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        out[key.strip()] = parse_value(value.strip())
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree["a"]["b"] = value`` for ``"a.b"``, creating sections on the way."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def merge_layer(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``layer`` over ``base``. Choosing another divergence or policy drops the old params."""
    out = copy.deepcopy(base)
    layer = {k: ({"ref": v} if k in ("teacher", "student") and isinstance(v, str) else v) for k, v in layer.items()}
    for section in ("divergence", "policy"):
        new = layer.get(section)
        old = out.get(section)
        if isinstance(new, dict) and isinstance(old, dict) and "name" in new and new["name"] != old.get("name"):
            old.pop("params", None)
    layer = _terms_as_mappings(layer)
    old_terms = out["objective"].get("terms") if isinstance(out.get("objective"), dict) else None
    new_terms = layer["objective"].get("terms") if isinstance(layer.get("objective"), Mapping) else None
    if isinstance(old_terms, dict) and isinstance(
        new_terms, Mapping
    ):  # a term that changes divergence drops its params
        for source, new in new_terms.items():
            old = old_terms.get(source)
            if (
                isinstance(old, dict)
                and isinstance(new, Mapping)
                and "divergence" in new
                and new["divergence"] != old.get("divergence")
            ):
                old.pop("params", None)
    _deep_merge(out, layer)
    return out


def _terms_as_mappings(layer: Mapping[str, Any]) -> Mapping[str, Any]:
    """``objective.terms.<source>: NAME`` as ``{divergence: NAME}``, so that it merges with other layers."""
    objective = layer.get("objective")
    if not (isinstance(objective, Mapping) and isinstance(objective.get("terms"), Mapping)):
        return layer
    terms = {k: ({"divergence": v} if isinstance(v, str) else v) for k, v in objective["terms"].items()}
    return {**layer, "objective": {**objective, "terms": terms}}


def _deep_merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def recipe_layer(recipe) -> dict[str, Any]:
    """A Recipe as a config layer."""
    layer: dict[str, Any] = {
        "recipe": recipe.name,
        "divergence": {"name": recipe.divergence, "params": dict(recipe.divergence_params)},
        "policy": {"name": recipe.policy, "params": dict(recipe.policy_params)},
    }
    for dotted, value in recipe.config.items():
        set_dotted(layer, dotted, value)
    return layer


def build_config(layers: list[Mapping[str, Any]]) -> RunConfig:
    """Validate the merge of ``layers`` (lowest precedence first)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge_layer(merged, layer)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from None


def dump_config(config: RunConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` holds; enough to reproduce the run)."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)
