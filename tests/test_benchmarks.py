"""Smoke tests of the benchmark scripts on tiny models: each runs end to end, one step per case, and
writes results a reader (and ``report.py``) can rely on. Not timing tests: the numbers are not checked."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import distill
from tiny_models import make_pair

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    """A benchmark script as a module (registered under its name: the scripts import each other)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


step_cost, quality_budget, report = (load_script(name) for name in ("step_cost", "quality_budget", "report"))

HAS_TRL = importlib.util.find_spec("trl") is not None
PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def results(tmp_path_factory, single_thread) -> dict[str, Path]:
    """Both benchmarks run once on tiny models; step_cost first, so quality_budget sizes its runs from it."""
    root = tmp_path_factory.mktemp("bench")
    tiny = make_pair(root)
    settings = ["--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data", str(tiny["data"]),
                "--batch-size", "4", "--max-new-tokens", "6", "--set", "eval.batch_size=8"]
    out = root / "results"
    step_cost.main([*settings, "--steps", "1", "--warmup", "0", "--output", str(out / "step_cost.json")])
    quality_budget.main([*settings, "--budget", "0.2", "--evals", "2", "--rouge-samples", "2",
                         "--step-cost", str(out / "step_cost.json"), "--output", str(out / "quality_budget.json")])
    return {"folder": out, "step_cost": out / "step_cost.json", "quality_budget": out / "quality_budget.json"}


def test_step_cost_times_every_recipe_our_jsd_cases_and_trl(results):
    report_ = json.loads(results["step_cost"].read_text())
    cases = {c["name"]: c for c in report_["cases"]}
    expected = set(distill.default_registry().names("recipe")) | {"jsd-offpolicy", "jsd-onpolicy"}
    if HAS_TRL:
        expected |= {"trl-lmbda0", "trl-lmbda1", "trl-lmbda0-gc", "trl-lmbda1-gc"}
    assert set(cases) == expected
    assert report_["complete"] and report_["settings"]["batch_size"] == 4 and report_["settings"]["max_new_tokens"] == 6
    for case in cases.values():
        assert case["steps_timed"] == 1 and case["seconds_per_step"] > 0
        assert case["breakdown"]["other"] + sum(case["breakdown"][p] for p in ("generation", "teacher_forward", "student_forward", "optimizer")) == pytest.approx(case["seconds_per_step"])
    assert cases["kd"]["ratio_to_kd"] == 1.0
    assert cases["kd"]["sources"] == ["dataset"] and cases["seqkd"]["sources"] == ["teacher"]
    assert cases["jsd-onpolicy"]["sources"] == ["student"] and cases["jsd-onpolicy"]["breakdown"]["generation"] > 0
    assert cases["jsd-offpolicy"]["divergence"] == "jsd" and cases["jsd-offpolicy"]["divergence_params"] == {"beta": 0.5}
    assert cases["jsd-offpolicy"]["ce_weight"] == 0.0
    targets = {v["target"].split(" (")[0]: v for v in report_["verdicts"]}
    assert targets["distillm <= 1.3 x kd"]["ratio"] == pytest.approx(cases["distillm"]["seconds_per_step"] / cases["kd"]["seconds_per_step"])
    assert (results["folder"] / "step_cost.png").read_bytes().startswith(PNG)


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install 'distill[bench]')")
def test_step_cost_runs_trl_at_both_lambdas_with_and_without_checkpointing(results):
    cases = {c["name"]: c for c in json.loads(results["step_cost"].read_text())["cases"]}
    for name, lmbda, checkpointing in (("trl-lmbda0", 0.0, False), ("trl-lmbda1", 1.0, False), ("trl-lmbda0-gc", 0.0, True), ("trl-lmbda1-gc", 1.0, True)):
        case = cases[name]
        assert (case["lmbda"], case["beta"], case["gradient_checkpointing"]) == (lmbda, 0.5, checkpointing)
        assert case["mixed_precision"] == "bf16" and case["seconds_per_step"] > 0
    assert cases["trl-lmbda1"]["breakdown"]["generation"] > 0 and cases["trl-lmbda0"]["breakdown"]["generation"] == 0
    assert cases["jsd-offpolicy"]["ratio_to_trl"] == pytest.approx(cases["jsd-offpolicy"]["seconds_per_step"] / cases["trl-lmbda0"]["seconds_per_step"])
    assert cases["jsd-onpolicy"]["ratio_to_trl"] == pytest.approx(cases["jsd-onpolicy"]["seconds_per_step"] / cases["trl-lmbda1"]["seconds_per_step"])


def test_quality_budget_trains_every_recipe_within_the_budget_and_plots(results):
    report_ = json.loads(results["quality_budget"].read_text())
    rows = {r["recipe"]: r for r in report_["recipes"]}
    assert set(rows) == set(distill.default_registry().names("recipe"))
    assert report_["complete"] and report_["settings"]["budget_seconds"] == 0.2
    for row in rows.values():
        assert row["seconds_per_step_from"] == "step_cost.json"  # measured on the same settings just before
        assert 1 <= row["steps_done"] <= row["steps_planned"]
        assert row["stopped_by"] in ("max_steps", "budget")
        # the run ends at the first step that reaches the budget
        assert sum(s["seconds"] for s in row["steps"][:-1]) < 0.2
        for key in ("val_loss", "val_kl", "rouge_l"):
            assert key in row["final"] and key in row["before"]
        assert row["curve"][0]["step"] == 0 and row["curve"][-1]["step"] == row["steps_done"]
    assert all("sgo_prob" in s for s in rows["distillm"]["steps"])
    assert {v["target"] for v in report_["verdicts"]} >= {"distillm token KL < kd's at equal budget", "distillm token KL < gkd's at equal budget"}
    for name in ("quality_budget_curves.png", "quality_budget_distillm.png"):
        assert name in report_["plots"] and (results["folder"] / name).read_bytes().startswith(PNG)


def test_report_writes_results_markdown_with_targets_tables_and_plots(results, tmp_path):
    out = report.main(["--results", str(results["folder"]), "--output", str(tmp_path / "RESULTS.md")])
    text = out.read_text()
    assert "## Targets" in text and "jsd-offpolicy <= 0.6 x trl-lmbda0" in text and "distillm token KL < kd's" in text
    assert "**Not the embedded default**" in text  # tiny models: never mistaken for the real results
    env = json.loads(results["step_cost"].read_text())["environment"]
    assert f"({env['cpu_count']} cores, " in text and f"torch threads {env['torch_threads']} " in text and env["date"] in text
    assert "| kd |" in text and "| distillm |" in text
    for image in ("step_cost.png", "quality_budget_curves.png", "quality_budget_distillm.png"):
        link = next(line for line in text.splitlines() if line.startswith("![") and image in line)
        assert (out.parent / link.split("(", 1)[1].rstrip(")")).is_file()


def test_divergence_memory_still_measures_ours_against_the_peer(tmp_path):
    output = tmp_path / "divergence_memory.json"
    load_script("divergence_memory").main(["--vocab", "256", "--tokens", "32", "--divergences", "kl", "--repeats", "1", "--threads", "1", "--output", str(output)])
    result = json.loads(output.read_text())
    (case,) = result["cases"]
    assert result["complete"] and case["divergence"] == "kl" and (case["vocab"], case["tokens"]) == (256, 32)
    assert case["ours"]["seconds"] > 0 and case["peer"]["seconds"] > 0
    assert case["loss_rel_diff"] < 1e-5 and case["grad_max_abs_diff"] < 1e-6
