"""The plugin registry: built-ins, fake plugins registered through the hooks, validation and errors.

Every test builds its own registry (``Registry.build(plugins=[...], autoload=False)``), as pytest's
own tests build their own plugin managers; nothing here touches the process-wide registry.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import distill
from distill import registry as registry_module
from distill.registry import AUTOLOAD_ENV, BUILTIN_PLUGINS, BUILTIN_PROVIDER, KINDS, Registry

REPO = Path(__file__).resolve().parents[1]
BUILTIN_DIVERGENCES = {"kl", "rkl", "jsd", "tvd", "skew_kl", "skew_rkl", "uld", "uld_hybrid"}
ALIASES = {"fkl": "kl", "skl": "skew_kl", "sfkl": "skew_kl", "srkl": "skew_rkl"}


# --- fake plugins
def make_divergence(name: str, aliases: tuple[str, ...] = ()) -> type:
    class Fake:
        """A fake divergence: always 0."""

        class Params(distill.Params):
            scale: float = Field(1.0, gt=0.0, description="unused")

        def __init__(self, params) -> None:
            self.params = params

        def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
            return torch.zeros(student_logits.shape[0])

    Fake.name = name
    Fake.aliases = aliases
    return Fake


def plugin_module(module_name: str, *, divergences=(), policies=(), recipes=()) -> types.ModuleType:
    """A module object implementing the three hooks, as a third-party plugin module would."""
    module = types.ModuleType(module_name)

    @distill.hookimpl
    def register_divergences(register):
        for cls in divergences:
            register(cls)

    @distill.hookimpl
    def register_policies(register):
        for cls in policies:
            register(cls)

    @distill.hookimpl
    def register_recipes(register):
        for recipe in recipes:
            register(recipe)

    module.register_divergences = register_divergences
    module.register_policies = register_policies
    module.register_recipes = register_recipes
    return module


def hooked_module(module_name: str, hook) -> types.ModuleType:
    """A module object whose one hook implementation is the function ``hook``, under its own name."""
    module = types.ModuleType(module_name)
    setattr(module, hook.__name__, distill.hookimpl(hook))
    return module


class CoinPolicy:
    """Dataset or student generations, by a coin from a generator seeded identically on every rank."""

    name = "coin"

    class Params(distill.Params):
        prob: float = Field(0.5, ge=0.0, le=1.0, description="probability of student generations")
        seed: int = 0

    def __init__(self, params: "CoinPolicy.Params") -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed)
        self.evals: list[tuple[int, float]] = []

    def sample(self, step: int, total_steps: int, examples: list, context) -> tuple[list, distill.Source]:
        if torch.rand((), generator=self.generator).item() < self.params.prob:
            return context.generate_student(examples), "student"
        return examples, "dataset"

    def observe_eval(self, step: int, val_loss: float) -> None:
        self.evals.append((step, val_loss))

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed * 1000 + self.params.seed)

    def metrics(self) -> dict[str, float]:
        return {"coin_evals": float(len(self.evals))}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "evals": list(self.evals)}

    def load_state_dict(self, state) -> None:
        self.generator.set_state(state["generator"])
        self.evals = list(state["evals"])


class EchoContext:
    """A stand-in for the engine's generation context: 'generates' by tagging the prompts."""

    def generate_student(self, examples: list) -> list:
        return [f"student:{e}" for e in examples]

    def generate_teacher(self, examples: list) -> list:
        return [f"teacher:{e}" for e in examples]


def build(*plugins) -> Registry:
    return Registry.build(plugins=list(plugins), autoload=False)


# --- built-ins
def test_builtin_divergences_and_aliases_are_registered():
    registry = build()
    assert set(registry.names("divergence")) == BUILTIN_DIVERGENCES
    for entry in registry.entries("divergence"):
        assert entry.provider == BUILTIN_PROVIDER
    for alias, name in ALIASES.items():
        assert registry.lookup("divergence", alias).name == name
        assert registry.get_divergence(alias).plugin.__class__ is registry.get_divergence(name).plugin.__class__
        assert registry.get_divergence(alias).name == name


def test_builtins_can_be_left_out():
    registry = Registry.build(
        plugins=[plugin_module("only", divergences=[make_divergence("solo")])], autoload=False, builtins=False
    )
    assert registry.names("divergence") == ["solo"]


def test_every_builtin_plugin_module_is_listed():
    """A module in plugins/ that implements a hook but is missing from BUILTIN_PLUGINS would never load."""
    hooks = set(KINDS.values())
    implementing = set()
    for path in (REPO / "plugins").rglob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name in hooks for node in tree.body):
            implementing.add("distill.plugins." + ".".join(path.relative_to(REPO / "plugins").with_suffix("").parts))
    assert implementing, "no built-in plugin modules found"
    assert implementing == set(BUILTIN_PLUGINS)


# --- fake plugins through the hooks
def test_fake_divergence_plugin_is_registered_with_its_provider():
    registry = build(plugin_module("acme_plugin", divergences=[make_divergence("acme", ("acm",))]))
    entry = registry.lookup("divergence", "acm")
    assert entry.name == "acme" and entry.provider == "acme_plugin"
    d = registry.get_divergence("acme", scale=2.0)
    assert d.params.scale == 2.0
    assert d(torch.zeros(3, 4), torch.zeros(3, 4)).shape == (3,)


def test_plugin_object_with_hook_methods():
    class Plugin:
        @distill.hookimpl
        def register_divergences(self, register):
            register(make_divergence("from_object"))

    registry = build(Plugin())
    assert registry.lookup("divergence", "from_object").provider == "Plugin"


def test_hook_implementation_may_omit_the_register_argument():
    def register_divergences():
        """Registers nothing (pluggy allows implementations with fewer arguments)."""

    module = hooked_module("lazy_plugin", register_divergences)
    assert set(build(module).names("divergence")) == BUILTIN_DIVERGENCES


def test_misspelt_hook_is_an_error_naming_the_plugin():
    def register_divergence(register):
        register(make_divergence("never"))

    with pytest.raises(distill.PluginError, match="typo_plugin.*register_divergence"):
        build(hooked_module("typo_plugin", register_divergence))


def test_hook_with_wrong_argument_name_is_an_error():
    def register_divergences(reg):
        reg(make_divergence("never"))

    with pytest.raises(distill.PluginError, match="wrong_args"):
        build(hooked_module("wrong_args", register_divergences))


# --- duplicates
def test_duplicate_of_a_builtin_name_names_both_providers():
    with pytest.raises(distill.PluginError) as info:
        build(plugin_module("impostor_pkg", divergences=[make_divergence("kl")]))
    message = str(info.value)
    assert "'kl'" in message and BUILTIN_PROVIDER in message and "impostor_pkg" in message
    assert "\n" not in message


def test_duplicate_between_two_plugins_names_both_providers():
    first = plugin_module("first_pkg", divergences=[make_divergence("hellinger")])
    second = plugin_module("second_pkg", divergences=[make_divergence("hellinger")])
    with pytest.raises(distill.PluginError) as info:
        build(first, second)
    assert "first_pkg" in str(info.value) and "second_pkg" in str(info.value)


@pytest.mark.parametrize(
    "first, second",
    [
        (("alias_owner", ("kl",)), None),  # an alias that is a built-in name
        (("alias_owner", ("fkl",)), None),  # an alias that is a built-in alias
        (("alias_owner", ("shared",)), ("shared", ())),  # a later name equal to an earlier alias
    ],
)
def test_alias_collisions_name_both_providers(first, second):
    plugins = [plugin_module("pkg_one", divergences=[make_divergence(*first)])]
    if second:
        plugins.append(plugin_module("pkg_two", divergences=[make_divergence(*second)]))
    with pytest.raises(distill.PluginError) as info:
        build(*plugins)
    message = str(info.value)
    assert "pkg_one" in message
    assert ("pkg_two" if second else BUILTIN_PROVIDER) in message


def test_same_name_in_different_kinds_is_allowed():
    class KlPolicy(CoinPolicy):
        name = "kl"

    registry = build(plugin_module("pkg", policies=[KlPolicy]))
    assert registry.lookup("policy", "kl").obj is KlPolicy
    assert registry.lookup("divergence", "kl").provider == BUILTIN_PROVIDER


# --- unknown names and invalid parameters
def test_unknown_name_suggests_and_lists_installed():
    with pytest.raises(distill.UnknownPluginError) as info:
        build().get_divergence("skew_kll")
    message = str(info.value)
    assert "\n" not in message
    assert "skew_kll" in message
    assert "did you mean skew_kl?" in message
    for name in BUILTIN_DIVERGENCES:
        assert name in message


def test_unknown_name_without_close_match_lists_installed_only():
    with pytest.raises(distill.UnknownPluginError) as info:
        build().get_divergence("wasserstein")
    assert "did you mean" not in str(info.value)
    assert "installed: jsd, kl, rkl, skew_kl, skew_rkl, tvd" in str(info.value)


def test_unknown_policy_and_recipe():
    with pytest.raises(distill.UnknownPluginError, match="policy 'nope'"):
        build().get_policy("nope")
    with pytest.raises(distill.UnknownPluginError, match="recipe 'nope'"):
        build().get_recipe("nope")


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("skew_kl", {"alpha": 2}, "alpha"),
        ("skew_rkl", {"alpha": -0.1}, "alpha"),
        ("jsd", {"beta": 1.0}, "beta"),
        ("jsd", {"beta": "half"}, "beta"),
        ("skew_kl", {"beta": 0.5}, "beta"),  # unknown parameter
        ("kl", {"alpha": 0.1}, "alpha"),
    ],
)
def test_invalid_params_raise_config_error_naming_the_field(name, params, field):
    with pytest.raises(distill.ConfigError) as info:
        build().get_divergence(name, **params)
    message = str(info.value)
    assert f"{name}.{field}" in message
    assert "\n" not in message


def test_unknown_param_says_so():
    with pytest.raises(distill.ConfigError, match=r"skew_kl\.alhpa: unknown parameter"):
        build().get_divergence("skew_kl", alhpa=0.2)


def test_every_bad_field_is_reported_on_one_line():
    with pytest.raises(distill.ConfigError) as info:
        build(plugin_module("pkg", policies=[CoinPolicy])).get_policy("coin", prob=3, seed="x", extra=1)
    message = str(info.value)
    assert "\n" not in message
    for field in ("coin.prob", "coin.seed", "coin.extra"):
        assert field in message


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), "hot"])
def test_invalid_temperature(temperature):
    with pytest.raises(distill.ConfigError, match="temperature"):
        build().get_divergence("kl", temperature=temperature)


def test_valid_params_are_applied():
    d = build().get_divergence("skl", alpha=0.3, temperature=2.0)
    assert d.name == "skew_kl" and d.params.alpha == 0.3 and d.temperature == 2.0


# --- registration validation
class _NoName:
    class Params(distill.Params):
        pass

    def __init__(self, params=None) -> None:
        self.params = params

    def __call__(self, student_logits, teacher_logits):
        return student_logits[:, 0]


def _with(**attrs) -> type:
    return type("Custom", (_NoName,), attrs)


class _LoosePolicyParams(BaseModel):  # pydantic, but unknown keys would be ignored
    prob: float = 0.5


@pytest.mark.parametrize(
    "kind, obj, expected",
    [
        ("divergence", _NoName, "needs a lowercase string `name`"),
        ("divergence", _with(name=""), "needs a lowercase string `name`"),
        ("divergence", _with(name="Hellinger"), "needs a lowercase string `name`"),
        ("divergence", _with(name=3), "needs a lowercase string `name`"),
        ("divergence", _with(name="x", Params=None), "needs a pydantic `Params`"),
        ("divergence", _with(name="x", Params=dict), "needs a pydantic `Params`"),
        ("divergence", _with(name="x", Params=_LoosePolicyParams), "must reject unknown keys"),
        ("divergence", _with(name="x")(distill.Params()), "not an instance"),
        ("divergence", type("NoCall", (), {"name": "x", "Params": distill.Params}), "must define __call__"),
        ("divergence", _with(name="x", aliases="xx"), "`aliases` must be a tuple"),
        ("divergence", _with(name="x", aliases=("Bad Alias",)), "`aliases` must be a tuple"),
        ("policy", CoinPolicy(CoinPolicy.Params()), "not an instance"),
        (
            "policy",
            type("Half", (), {"name": "half", "Params": distill.Params, "observe_eval": lambda s, a, b: None}),
            "lacks sample, reseed, metrics, state_dict, load_state_dict (distill.policy.RandomPolicy gives defaults)",
        ),
        ("recipe", types.SimpleNamespace(name="kd", divergence="kl", policy="offpolicy"), "must be a distill.Recipe"),
    ],
)
def test_invalid_registrations_raise_plugin_error(kind, obj, expected):
    hook = {"divergence": "divergences", "policy": "policies", "recipe": "recipes"}[kind]
    module = plugin_module("bad_plugin", **{hook: [obj]})
    with pytest.raises(distill.PluginError) as info:
        build(module)
    assert expected in str(info.value)
    assert "bad_plugin" in str(info.value)


def test_params_model_with_explicit_forbid_is_accepted():
    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = Field(3, ge=1)

    cls = _with(name="plain_pydantic", Params=Params)
    d = build(plugin_module("pkg", divergences=[cls])).get_divergence("plain_pydantic", width=4)
    assert d.params.width == 4


# --- policies and recipes
def test_policy_plugin_is_returned_by_get_policy():
    registry = build(plugin_module("policy_pkg", policies=[CoinPolicy]))
    entry = registry.lookup("policy", "coin")
    assert entry.provider == "policy_pkg"
    policy = registry.get_policy("coin", prob=1.0, seed=3)
    assert isinstance(policy, CoinPolicy) and isinstance(policy, distill.SamplingPolicy)
    assert policy.params == CoinPolicy.Params(prob=1.0, seed=3)
    assert policy.sample(0, 10, ["a", "b"], EchoContext()) == (["student:a", "student:b"], "student")
    assert registry.get_policy("coin") is not registry.get_policy("coin"), "each call builds a new policy"
    with pytest.raises(distill.ConfigError, match=r"policy coin\.prob"):
        registry.get_policy("coin", prob=1.5)


def test_a_policys_metrics_are_logged_each_step_under_their_own_names(tmp_path):
    from distill.config import build_config
    from distill.engine import train
    from tiny_models import make_pair

    paths = make_pair(tmp_path)
    registry = build(plugin_module("policy_pkg", policies=[CoinPolicy]))
    config = build_config(
        [
            {
                "teacher": str(paths["teacher"]),
                "student": str(paths["student"]),
                "data": {"path": str(paths["data"])},
                "divergence": {"name": "kl"},
                "policy": {"name": "coin", "params": {"prob": 0.0}},
                "output_dir": str(tmp_path / "run"),
                "train": {"max_steps": 2, "batch_size": 4},
                "eval": {"every": 0, "rouge_samples": 0},
            }
        ]
    )
    train(config, registry=registry)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["coin_evals"] for m in metrics] == [1.0, 1.0]  # the evaluation before training, observed


def test_policy_state_round_trip():
    registry = build(plugin_module("policy_pkg", policies=[CoinPolicy]))
    policy = registry.get_policy("coin", seed=7)
    context = EchoContext()
    [policy.sample(step, 100, ["x"], context) for step in range(5)]
    policy.observe_eval(5, 1.25)
    state = policy.state_dict()
    expected = [policy.sample(step, 100, ["x"], context)[1] for step in range(5, 25)]
    assert set(expected) == {"student", "dataset"}
    resumed = registry.get_policy("coin", seed=0)
    resumed.load_state_dict(state)
    assert [resumed.sample(step, 100, ["x"], context)[1] for step in range(5, 25)] == expected
    assert resumed.evals == [(5, 1.25)]


def test_recipes_register_through_the_hook():
    recipe = distill.Recipe(
        name="hellinger_kd",
        description="Hellinger on dataset responses",
        divergence="tvd",
        policy="coin",
        policy_params={"prob": 0.2},
    )
    registry = build(plugin_module("recipe_pkg", policies=[CoinPolicy], recipes=[recipe]))
    assert registry.get_recipe("hellinger_kd") is recipe
    assert registry.lookup("recipe", "hellinger_kd").provider == "recipe_pkg"
    with pytest.raises(distill.PluginError, match="recipe_pkg.*other_pkg|other_pkg.*recipe_pkg"):
        build(plugin_module("recipe_pkg", recipes=[recipe]), plugin_module("other_pkg", recipes=[recipe]))


# --- entry points and the autoload switch
def _fake_entry_points(monkeypatch, module: types.ModuleType, value: str | None = None):
    """Make ``importlib.metadata.entry_points(group="distill")`` return one entry point for ``module``."""
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entry_point = importlib.metadata.EntryPoint(name="ep", value=value or module.__name__, group="distill")
    calls = []

    def entry_points(**selection):
        calls.append(selection)
        return importlib.metadata.EntryPoints([entry_point]) if selection.get("group") == "distill" else ()

    monkeypatch.setattr(registry_module.metadata, "entry_points", entry_points)
    return calls


def test_entry_point_plugins_are_autoloaded(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    _fake_entry_points(monkeypatch, plugin_module("distill_fake_ep", divergences=[make_divergence("from_ep")]))
    registry = Registry.build()
    assert "from_ep" in registry.names("divergence")
    assert BUILTIN_DIVERGENCES <= set(registry.names("divergence"))


@pytest.mark.parametrize("value", ["1", "true", "YES"])
def test_autoload_switch_skips_entry_points_but_keeps_builtins(monkeypatch, value):
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    calls = _fake_entry_points(monkeypatch, plugin_module("distill_fake_ep", divergences=[make_divergence("from_ep")]))
    registry = Registry.build()
    assert set(registry.names("divergence")) == BUILTIN_DIVERGENCES
    assert calls == []


def test_autoload_switch_off_value_still_loads(monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "0")
    _fake_entry_points(monkeypatch, plugin_module("distill_fake_ep", divergences=[make_divergence("from_ep")]))
    assert "from_ep" in Registry.build().names("divergence")


def test_broken_entry_point_names_itself(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    _fake_entry_points(monkeypatch, types.ModuleType("distill_fake_ep"), value="distill_missing_module_xyz")
    with pytest.raises(distill.PluginError) as info:
        Registry.build()
    assert "distill_missing_module_xyz" in str(info.value) and AUTOLOAD_ENV in str(info.value)


# --- nothing happens at import time
def test_import_builds_no_registry():
    code = (
        "import sys, distill, distill.registry as r; "
        "assert r._default is None, 'registry built at import'; "
        "assert 'distill.plugins.divergences' not in sys.modules, 'built-ins imported at import'; "
        "assert 'distill.cli' not in sys.modules; "
        "distill.get_divergence('kl'); assert r._default is not None; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_reset_default_registry_rebuilds(monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    monkeypatch.setattr(registry_module, "_default", None)
    first = distill.default_registry()
    assert distill.default_registry() is first
    distill.reset_default_registry()
    assert distill.default_registry() is not first


def test_builtin_recipes_name_registered_plugins_with_valid_params():
    registry = build()
    assert registry.names("recipe"), "no built-in recipes"
    for recipe in (entry.obj for entry in registry.entries("recipe")):
        registry.get_divergence(recipe.divergence, **recipe.divergence_params)
        policy = registry.get_policy(recipe.policy, **recipe.policy_params)
        assert isinstance(policy, distill.SamplingPolicy)
