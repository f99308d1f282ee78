"""Config layering (recipe < file < flags), flag parsing and one-line errors naming the field."""

from __future__ import annotations

import pytest

import distill
from distill.cli.run_cmd import flag_layer, resolve_config
from distill.config import RunConfig, build_config, dump_config, parse_value, read_config_file

import yaml


def flags(**kwargs):
    base = dict(recipe=None, divergence=None, divergence_params=[], policy=None, policy_params=[], teacher=None,
                student=None, data=None, output_dir=None, max_steps=None, seed=None, settings=[])
    base.update(kwargs)
    return flag_layer(**base)


def test_recipe_then_file_then_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("recipe: gkd\ntrain:\n  lr: 0.001\n  max_steps: 7\ndivergence:\n  params:\n    beta: 0.2\n")
    config = resolve_config(str(config_file), flags(max_steps=3, settings=["train.batch_size=2"]))
    assert config.recipe == "gkd"
    assert config.divergence.name == "jsd" and config.divergence.params == {"beta": 0.2}  # file over recipe
    assert config.policy.name == "mixed" and config.policy.params == {"prob": 0.5}  # from the recipe
    assert config.train.lr == 0.001 and config.train.max_steps == 3 and config.train.batch_size == 2


def test_default_recipe_is_distillm_and_flags_override_it():
    config = resolve_config(None, flags())
    assert (config.divergence.name, config.policy.name) == ("skew_kl", "adaptive_offpolicy")
    config = resolve_config(None, flags(divergence="kl"))
    assert config.divergence.name == "kl" and config.divergence.params == {}  # skew_kl's alpha dropped
    config = resolve_config(None, flags(divergence="skew_kl", divergence_params=["alpha=0.3"], policy_params=["init_prob=0.2", "replay_schedule=constant"]))
    assert config.divergence.params == {"alpha": 0.3}
    assert config.policy.params == {"init_prob": 0.2, "replay_schedule": "constant"}


def test_required_keys_exist_under_their_names():
    config = RunConfig()
    for dotted in ["train.max_steps", "train.batch_size", "train.grad_accum", "train.lr", "train.ce_weight", "train.seed",
                   "eval.every", "eval.rouge_samples", "generation.max_new_tokens", "generation.temperature",
                   "data.max_prompt_tokens", "data.max_response_tokens", "checkpoint.every"]:
        section, key = dotted.split(".")
        assert hasattr(getattr(config, section), key), dotted


def test_resolved_config_round_trips(tmp_path):
    config = resolve_config(None, flags(recipe="gkd", max_steps=5, teacher="t", student="s", data="d.jsonl"))
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    again = resolve_config(str(path), flags())
    assert again == config


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["train.lr=-1"], "train.lr"),
        (["train.max_steps=0"], "train.max_steps"),
        (["train.batch_size=0"], "train.batch_size"),
        (["train.learning_rate=1"], "train.learning_rate: unknown key"),
        (["evaluation.every=3"], "evaluation: unknown key"),
        (["generation.top_p=2"], "generation.top_p"),
    ],
)
def test_bad_values_name_the_field(settings, message):
    with pytest.raises(distill.ConfigError, match=message):
        resolve_config(None, flags(settings=settings))


def test_bad_plugin_params_and_names():
    with pytest.raises(distill.ConfigError, match="alpha"):
        resolve_config(None, flags(divergence_params=["alpha=2"]))
    with pytest.raises(distill.ConfigError, match="unknown parameter"):
        resolve_config(None, flags(policy_params=["lambda=0.5"]))
    with pytest.raises(distill.UnknownPluginError, match="did you mean gkd"):
        resolve_config(None, flags(recipe="gdk"))
    with pytest.raises(distill.ConfigError, match="key=value"):
        resolve_config(None, flags(settings=["train.lr"]))


def test_config_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  max_steps: [1,\n")
    with pytest.raises(distill.ConfigError, match=r"bad.yaml:\d+"):
        read_config_file(bad)
    with pytest.raises(distill.ConfigError, match="cannot read"):
        read_config_file(tmp_path / "missing.yaml")
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nlr = 0.01\n')
    assert read_config_file(toml) == {"train": {"lr": 0.01}}


def test_flag_values_are_typed():
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value("skew_kl") == "skew_kl"


def test_build_config_is_validated_as_a_whole():
    config = build_config([{"train": {"lr": 1e-3}}, {"train": {"max_steps": 2}}])
    assert (config.train.lr, config.train.max_steps) == (1e-3, 2)
    assert yaml.safe_load(dump_config(config))["train"]["lr"] == 1e-3
