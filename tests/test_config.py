"""Config layering (recipe < file < flags), flag parsing and one-line errors naming the field."""

from __future__ import annotations

import pytest

import distill
from cli_runs import flags
from distill.config import RunConfig, build_config, dump_config, parse_value, read_config_file
from distill.resolve import plan_run
from distill.resolve import resolve_run as resolve_config  # `distill run`'s config: (config file, flags)

import yaml


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
    config = resolve_config(
        None,
        flags(
            divergence="skew_kl",
            divergence_params=["alpha=0.3"],
            policy_params=["init_prob=0.2", "replay_schedule=constant"],
        ),
    )
    assert config.divergence.params == {"alpha": 0.3}
    assert config.policy.params == {"init_prob": 0.2, "replay_schedule": "constant"}


def test_required_keys_exist_under_their_names():
    config = RunConfig()
    for dotted in [
        "train.max_steps",
        "train.batch_size",
        "train.grad_accum",
        "train.lr",
        "train.ce_weight",
        "train.seed",
        "eval.every",
        "eval.rouge_samples",
        "generation.max_new_tokens",
        "generation.temperature",
        "data.max_prompt_tokens",
        "data.max_response_tokens",
        "checkpoint.every",
    ]:
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
        plan_run(resolve_config(None, flags(divergence_params=["alpha=2"])))
    with pytest.raises(distill.ConfigError, match="unknown parameter"):
        plan_run(resolve_config(None, flags(policy_params=["lambda=0.5"])))
    with pytest.raises(distill.ConfigError, match="objective.terms.student"):
        plan_run(resolve_config(None, flags(recipe="distillm2", settings=["objective.terms.student.params.alpha=3"])))
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
    toml.write_text("[train]\nlr = 0.01\n")
    assert read_config_file(toml) == {"train": {"lr": 0.01}}


def test_flag_values_are_typed():
    assert parse_value("3") == 3 and parse_value("1e-4") == 1e-4 and parse_value("true") is True
    assert parse_value("skew_kl") == "skew_kl"


def test_build_config_is_validated_as_a_whole():
    config = build_config([{"train": {"lr": 1e-3}}, {"train": {"max_steps": 2}}])
    assert (config.train.lr, config.train.max_steps) == (1e-3, 2)
    assert yaml.safe_load(dump_config(config))["train"]["lr"] == 1e-3


def test_one_path_resolves_recipe_then_embedded_default_then_layers():
    import distill.resolve as resolve
    from distill.builtin import DEFAULT_RUN

    plain = resolve.resolve_config()  # no recipe, no teacher: distillm on the embedded default
    assert (
        plain.recipe == "distillm"
        and plain.teacher.ref == DEFAULT_RUN["teacher"]
        and plain.student.ref == DEFAULT_RUN["student"]["ref"]
    )
    named = resolve.resolve_config(
        {"teacher": "t", "student": "s"}, {"recipe": "kd"}
    )  # a teacher named: no embedded default
    assert named.recipe == "kd" and named.teacher.ref == "t" and named.train.max_steps == RunConfig().train.max_steps
    assert resolve.resolve_config({"teacher": "t"}, recipe="gkd").policy.name == "mixed"
    bare = resolve.resolve_config({"teacher": "t"}, recipe=False)  # no recipe layer: the RunConfig defaults
    assert bare.recipe is None and bare.divergence == RunConfig().divergence
    assert resolve.resolve_config(embedded=True, recipe="kd").train.max_steps == DEFAULT_RUN["train"]["max_steps"]
    assert resolve.resolve_config(stamp_output=True).output_dir.startswith("runs/distillm-")
    assert resolve.resolve_config({"output_dir": "x"}, stamp_output=True).output_dir == "x"


def test_plugin_params_are_validated_once_on_the_way_to_the_loss(monkeypatch):
    """The CLI's path: resolving merges and checks no plugin; planning checks each plugin's params
    once; a policy for a run is built from the plan's checked params without another check. (That
    ``train`` uses the plan's objects is what ``open_session`` does; this test does not run it.)"""
    import distill.divergence
    import distill.resolve

    calls = []
    for module in (distill.divergence, distill.resolve):
        original = module.validate_params
        monkeypatch.setattr(
            module,
            "validate_params",
            lambda cls, values, prefix, original=original: calls.append(prefix) or original(cls, values, prefix),
        )
    config = resolve_config(
        None, flags(divergence="skew_kl", divergence_params=["alpha=0.3"], policy_params=["init_prob=0.2"])
    )
    assert calls == []  # merging alone checks no plugin
    plan = plan_run(config)
    assert calls == ["divergence skew_kl", "policy adaptive_offpolicy"]
    assert plan.objective.default.params.alpha == 0.3 and plan.policy_params.init_prob == 0.2
    first, second = plan.make_policy(), plan.make_policy()  # one fresh policy per run, no validation
    assert first is not second and first.params is plan.policy_params and len(calls) == 2


def test_resume_comes_through_the_same_path(tmp_path):
    import distill.resolve as resolve

    from distill.outputs import RUN, claim_folder

    out = claim_folder(tmp_path / "run", RUN)  # a run folder, marked as distill writes it
    saved = resolve.resolve_config({"teacher": "t", "student": "s", "output_dir": str(out)}, recipe="kd")
    (out / "config.yaml").write_text(dump_config(saved))
    again = resolve.resume_config(out, {"train": {"max_steps": 500}})  # a resumable field
    assert again.train.max_steps == 500 and again.model_dump(exclude={"train"}) == saved.model_dump(exclude={"train"})
    with pytest.raises(distill.ConfigError, match="cannot change divergence.name"):
        resolve.resume_config(out, {"divergence": {"name": "rkl"}})
    # the file's `teacher: DIR` and a flag's teacher.cache merge like any two layers: the file's teacher
    # is still compared with the saved one (before, a flag's teacher section replaced the file's string)
    assert resolve.resume_config(out, {"teacher": "t"}, {"teacher": {"ref": "t"}}).teacher.ref == "t"
    with pytest.raises(distill.ConfigError, match="cannot change teacher.ref"):
        resolve.resume_config(out, {"teacher": "other"}, {"teacher": {"cache": None}})
