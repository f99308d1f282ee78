"""Smoke tests of the benchmark scripts on tiny models: each runs end to end, one step per case, and
writes results a reader (and ``report.py``) can rely on. Not timing tests: the numbers are not checked."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

import distill
from cli_runs import pair_args, sets
from tiny_models import make_pair

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    """A benchmark script as a module (registered under its name: the scripts import each other)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


step_cost, quality_budget, report, compute_floor = (
    load_script(name) for name in ("step_cost", "quality_budget", "report", "compute_floor")
)

HAS_TRL = importlib.util.find_spec("trl") is not None
TRL_TRAINERS = load_script("common").trl_trainers() if HAS_TRL else set()
HAS_DISTILLATION_TRAINER = "DistillationTrainer" in TRL_TRAINERS
PNG = b"\x89PNG"
DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


@pytest.fixture(scope="module")
def results(tmp_path_factory, single_thread) -> dict[str, Path]:
    """Both benchmarks run once on tiny models; step_cost first, so quality_budget sizes its runs from it."""
    root = tmp_path_factory.mktemp("bench")
    tiny = make_pair(root)
    settings = [*pair_args(tiny), "--batch-size", "4", "--max-new-tokens", "6", "--set", "eval.batch_size=8"]
    out = root / "results"
    step_cost.main([*settings, "--steps", "1", "--warmup", "0", "--output", str(out / "step_cost.json")])
    quality_budget.main(
        [
            *settings,
            "--budget",
            "0.2",
            "--evals",
            "2",
            "--rouge-samples",
            "2",
            "--step-cost",
            str(out / "step_cost.json"),
            "--output",
            str(out / "quality_budget.json"),
        ]
    )
    return {"folder": out, "step_cost": out / "step_cost.json", "quality_budget": out / "quality_budget.json"}


def test_step_cost_times_every_recipe_our_jsd_cases_and_trl(results):
    report_ = json.loads(results["step_cost"].read_text())
    cases = {c["name"]: c for c in report_["cases"]}
    expected = set(distill.default_registry().names("recipe")) | {"jsd-offpolicy", "jsd-onpolicy"}
    expected |= {name for name, case in step_cost.TRL_CASES.items() if case["trainer"] in TRL_TRAINERS}
    assert set(cases) == expected
    assert report_["complete"] and report_["settings"]["batch_size"] == 4 and report_["settings"]["max_new_tokens"] == 6
    for case in cases.values():
        assert case["steps_timed"] == 1 and case["seconds_per_step"] > 0
        assert case["breakdown"]["other"] + sum(
            case["breakdown"][p] for p in ("generation", "teacher_forward", "student_forward", "optimizer")
        ) == pytest.approx(case["seconds_per_step"])
    assert cases["kd"]["ratio_to_kd"] == 1.0
    assert cases["kd"]["sources"] == ["dataset"] and cases["seqkd"]["sources"] == ["teacher"]
    assert cases["jsd-onpolicy"]["sources"] == ["student"] and cases["jsd-onpolicy"]["breakdown"]["generation"] > 0
    assert cases["jsd-offpolicy"]["divergence"] == "jsd" and cases["jsd-offpolicy"]["divergence_params"] == {
        "beta": 0.5
    }
    assert cases["jsd-offpolicy"]["ce_weight"] == 0.0
    targets = {v["target"].split(" (")[0]: v for v in report_["verdicts"]}
    assert targets["distillm <= 1.3 x kd"]["ratio"] == pytest.approx(
        cases["distillm"]["seconds_per_step"] / cases["kd"]["seconds_per_step"]
    )
    assert (results["folder"] / "step_cost.png").read_bytes().startswith(PNG)


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install 'distill[bench]')")
def test_step_cost_runs_trl_at_both_lambdas_with_and_without_checkpointing(results):
    cases = {c["name"]: c for c in json.loads(results["step_cost"].read_text())["cases"]}
    report_ = json.loads(results["step_cost"].read_text())
    precision = report_["settings"]["precision"]  # auto, resolved as a run here resolves it
    for name, lmbda, checkpointing in (
        ("trl-lmbda0", 0.0, False),
        ("trl-lmbda1", 1.0, False),
        ("trl-lmbda0-gc", 0.0, True),
        ("trl-lmbda1-gc", 1.0, True),
    ):
        case = cases[name]
        assert (case["trainer"], case["lmbda"], case["beta"], case["gradient_checkpointing"]) == (
            "GKDTrainer",
            lmbda,
            0.5,
            checkpointing,
        )
        assert case["mixed_precision"] == {"fp32": "no"}.get(precision, precision) and case["seconds_per_step"] > 0
        # GKDTrainer's forwards go through Accelerate's autocast: the observed dtype is the run's precision
        assert case["compute_dtypes"]["student_forward"] == DTYPE[precision] and case["compute_dtypes_from"].startswith(
            "observed"
        )
    assert cases["trl-lmbda1"]["breakdown"]["generation"] > 0 and cases["trl-lmbda0"]["breakdown"]["generation"] == 0
    assert cases["jsd-offpolicy"]["ratio_to_trl"] == {
        "trl-lmbda0": pytest.approx(
            cases["jsd-offpolicy"]["seconds_per_step"] / cases["trl-lmbda0"]["seconds_per_step"]
        )
    }
    assert cases["jsd-onpolicy"]["ratio_to_trl"]["trl-lmbda1"] == pytest.approx(
        cases["jsd-onpolicy"]["seconds_per_step"] / cases["trl-lmbda1"]["seconds_per_step"]
    )


@pytest.mark.skipif(not HAS_DISTILLATION_TRAINER, reason="this trl has no DistillationTrainer")
def test_step_cost_runs_trl_distillation_trainer_on_policy_with_and_without_checkpointing(results):
    report_ = json.loads(results["step_cost"].read_text())
    cases = {c["name"]: c for c in report_["cases"]}
    for name, checkpointing in (("trl-distill-onpolicy", False), ("trl-distill-onpolicy-gc", True)):
        case = cases[name]
        assert (case["trainer"], case["beta"], case["gradient_checkpointing"], case["temperature"]) == (
            "DistillationTrainer",
            0.5,
            checkpointing,
            1.0,
        )
        assert (case["max_completion_length"], case["top_k"], case["top_p"]) == (6, 0, 1.0)
        assert case["sources"] == ["student"] and case["breakdown"]["generation"] > 0
        assert case["breakdown"]["teacher_forward"] > 0 and case["breakdown"]["student_forward"] > 0
        assert {"student_forward", "student_generation", "teacher_forward"} <= set(
            case["compute_dtypes"]
        ) and "student_forward" in case["compute_dtypes_from"]
    ratio = cases["jsd-onpolicy"]["ratio_to_trl"]["trl-distill-onpolicy"]
    assert ratio == pytest.approx(
        cases["jsd-onpolicy"]["seconds_per_step"] / cases["trl-distill-onpolicy"]["seconds_per_step"]
    )
    targets = {v["target"].split(" (")[0]: v for v in report_["verdicts"]}
    assert targets["jsd-onpolicy <= 0.6 x trl-distill-onpolicy"]["ratio"] == pytest.approx(ratio)


def test_step_cost_counts_the_same_real_tokens_for_the_same_batches_in_every_implementation(results):
    """kd, jsd-offpolicy and GKD at λ = 0 train on the same dataset batches; every on-policy case
    starts from the same prompts: their counts, taken by different code, must agree."""
    report_ = json.loads(results["step_cost"].read_text())
    work = {c["name"]: c["work_per_step"] for c in report_["cases"]}
    settings = report_["settings"]
    max_new_tokens, batch = (
        settings["max_new_tokens"],
        settings["batch_size"] * settings["grad_accum"],
    )  # sequences per optimizer step
    offpolicy = ["kd", "jsd-offpolicy", "distillm"] + (["trl-lmbda0"] if HAS_TRL else [])
    for name in offpolicy:
        assert work[name] == work["kd"] and work[name]["generated_tokens"] == 0
    assert 0 < work["kd"]["logit_rows"] < work["kd"]["trained_tokens"]
    onpolicy = (
        ["jsd-onpolicy", "rkl_onpolicy"]
        + (["trl-lmbda1"] if HAS_TRL else [])
        + (["trl-distill-onpolicy"] if HAS_DISTILLATION_TRAINER else [])
    )
    for name in onpolicy:
        w = work[name]
        assert (
            w["generated_sequences"] == batch
            and w["generation_prompt_tokens"] == work["jsd-onpolicy"]["generation_prompt_tokens"]
        )
        assert batch <= w["generated_tokens"] <= batch * max_new_tokens  # real tokens: up to the first EOS
        assert (
            w["logit_rows"] == w["generated_tokens"]
            and w["trained_tokens"] == w["generation_prompt_tokens"] + w["generated_tokens"]
        )
    assert work["seqkd"]["generated_sequences"] == batch


def test_step_cost_reports_each_case_against_its_compute_floor(results):
    report_ = json.loads(results["step_cost"].read_text())
    cases = {c["name"]: c for c in report_["cases"]}
    throughput = report_["matmul_throughput"]
    assert (
        throughput["gflops"]["float32"] > 0
        and throughput["gflops"]["bfloat16"] > 0
        and throughput["torch_threads"] == 1
    )
    precision = report_["settings"]["precision"]
    for case in cases.values():
        assert case["floor_seconds"] > 0 and case["ratio_to_floor"] == pytest.approx(
            case["seconds_per_step"] / case["floor_seconds"]
        )
        assert sum(case["floor_by_part"].values()) == pytest.approx(case["floor_seconds"])
        for part, seconds in case["floor_by_part"].items():
            rate = throughput["gflops"][case["compute_dtypes"][part]]
            assert seconds == pytest.approx(case["flops_per_step"][part] / (rate * 1e9))
    # ours: the dtypes of the run's resolved config.yaml
    assert (
        cases["kd"]["compute_dtypes"]["student_backward"] == DTYPE[precision]
        and "config.yaml" in cases["kd"]["compute_dtypes_from"]
    )
    # the tiny student: 1 Llama layer of hidden 32, intermediate 64, untied head over the tokenizer's vocabulary,
    # embeddings frozen
    student = cases["kd"]["matmul_params"]["student"]
    vocab = student["config"]["vocab_size"]
    assert (student["body_params"], student["head_params"], student["head_trainable"]) == (
        4 * 32 * 32 + 3 * 32 * 64,
        32 * vocab,
        False,
    )
    assert student["body_input_grad"] == student["body_params"] and student["head_input_grad"]
    assert cases["kd"]["matmul_params"]["teacher"]["body_trainable"] == 0
    # off-policy: no generation; on-policy: generation counted with the student, seqkd: with the teacher
    assert (
        cases["kd"]["flops_per_step"]["student_generation"] == 0
        and cases["jsd-onpolicy"]["flops_per_step"]["student_generation"] > 0
    )
    assert (
        cases["seqkd"]["flops_per_step"]["teacher_generation"] > 0
        and cases["seqkd"]["flops_per_step"]["student_generation"] == 0
    )
    targets = {v["target"].split(" (")[0]: v for v in report_["verdicts"]}
    assert targets["kd <= 1.5 x its compute floor"]["ratio"] == pytest.approx(cases["kd"]["ratio_to_floor"])
    assert targets["distillm <= 1.5 x its compute floor"]["ratio"] == pytest.approx(cases["distillm"]["ratio_to_floor"])


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
    assert {v["target"] for v in report_["verdicts"]} >= {
        "distillm token KL < kd's at equal budget",
        "distillm token KL < gkd's at equal budget",
    }
    for name in ("quality_budget_curves.png", "quality_budget_distillm.png"):
        assert name in report_["plots"] and (results["folder"] / name).read_bytes().startswith(PNG)


def test_report_writes_results_markdown_with_targets_tables_and_plots(results, tmp_path):
    out = report.main(["--results", str(results["folder"]), "--output", str(tmp_path / "RESULTS.md")])
    text = out.read_text()
    assert "## Targets" in text and "jsd-offpolicy <= 0.6 x trl-lmbda0" in text and "distillm token KL < kd's" in text
    assert "kd <= 1.5 x its compute floor" in text and "jsd-onpolicy <= 0.6 x trl-distill-onpolicy" in text
    assert "| floor s | x floor |" in text and "GFLOP/s" in text
    assert "**Not the embedded default**" in text  # tiny models: never mistaken for the real results
    env = json.loads(results["step_cost"].read_text())["environment"]
    assert (
        f"({env['cpu_count']} cores, " in text
        and f"torch threads {env['torch_threads']} " in text
        and env["date"] in text
    )
    assert "| kd |" in text and "| distillm |" in text
    for image in ("step_cost.png", "quality_budget_curves.png", "quality_budget_distillm.png"):
        link = next(line for line in text.splitlines() if line.startswith("![") and image in line)
        assert (out.parent / link.split("(", 1)[1].rstrip(")")).is_file()


def test_readme_embedded_default_table_is_the_one_report_writes_from_its_json():
    readme = (BENCHMARKS.parent / "README.md").read_text(encoding="utf-8")
    measured = json.loads((BENCHMARKS / "results" / report.EMBEDDED_DEFAULT).read_text())
    assert report.with_embedded_default_table(readme, measured) == readme, (
        "README.md's embedded-default table differs from benchmarks/results/embedded_default.json: change the "
        "JSON and run benchmarks/report.py instead of editing the table"
    )


def test_readme_rewrite_touches_nothing_outside_the_markers(tmp_path):
    measured = json.loads((BENCHMARKS / "results" / report.EMBEDDED_DEFAULT).read_text())
    readme = tmp_path / "README.md"
    readme.write_text((BENCHMARKS.parent / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    before = readme.read_text(encoding="utf-8")
    measured["runs"][0]["wall_seconds"], measured["runs"][-1]["rouge_l"] = 600, 19.25
    assert report.write_embedded_default_table(readme, measured)
    after = readme.read_text(encoding="utf-8")

    def outside(text: str) -> tuple[str, str]:
        head, rest = text.split(report.EMBEDDED_DEFAULT_BEGIN)
        return head, rest.split(report.EMBEDDED_DEFAULT_END)[1]

    assert outside(after) == outside(before)
    assert "| 600 s |" in after and "| 19.25 (first 16:" in after and "| 574 s |" not in after
    assert not report.write_embedded_default_table(readme, measured)  # a second run changes nothing
    for broken in (
        before.replace(report.EMBEDDED_DEFAULT_END, ""),
        before + report.EMBEDDED_DEFAULT_BEGIN,
        f"{report.EMBEDDED_DEFAULT_END}\ntext\n{report.EMBEDDED_DEFAULT_BEGIN}\n",
    ):
        with pytest.raises(ValueError, match="embedded-default"):
            report.with_embedded_default_table(broken, measured)


def test_divergence_memory_still_measures_ours_against_the_peer(tmp_path):
    output = tmp_path / "divergence_memory.json"
    load_script("divergence_memory").main(
        [
            "--vocab",
            "256",
            "--tokens",
            "32",
            "--divergences",
            "kl",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--output",
            str(output),
        ]
    )
    result = json.loads(output.read_text())
    (case,) = result["cases"]
    assert result["complete"] and case["divergence"] == "kl" and (case["vocab"], case["tokens"]) == (256, 32)
    assert case["ours"]["seconds"] > 0 and case["peer"]["seconds"] > 0
    assert case["loss_rel_diff"] < 1e-5 and case["grad_max_abs_diff"] < 1e-6


def test_study_seconds_budget_takes_the_quickest_seed(tmp_path):
    """A shared machine's load only slows a run down: the budget is distillm's least training seconds
    and the recipe's least seconds per step over the seeds that have a record, whichever --seeds."""
    from argparse import Namespace

    study = load_script("study")
    args = Namespace(root=tmp_path, seeds=[0, 1], lr=study.UNTUNED_LR)
    (tmp_path / "records").mkdir()
    assert study.seconds_budget(args, "kd") is None
    for recipe, seed, seconds, pace in (
        ("distillm", 0, 500.0, 8.0),
        ("distillm", 1, 900.0, 15.0),
        ("kd", 0, 360.0, 6.0),
        ("kd", 1, 720.0, 12.0),
    ):
        study.write_json(
            study.record_path(args, "steps", recipe, seed), {"train_seconds": seconds, "seconds_per_step": pace}
        )
    assert study.seconds_budget(args, "kd") == (500.0, 6.0)
    assert study.seconds_budget(args, "distillm") == (500.0, 8.0)
    # a process running seed 1 alone takes seed 0's records into account too
    seed_1 = Namespace(root=tmp_path, seeds=[1], lr=study.UNTUNED_LR)
    assert study.seconds_budget(seed_1, "kd") == (500.0, 6.0)
    for other in ("kd-sft", "kd_other"):  # other recipes whose names start with kd's
        study.write_json(study.record_path(args, "steps", other, 0), {"train_seconds": 1.0, "seconds_per_step": 0.1})
    assert study.seconds_budget(seed_1, "kd") == (500.0, 6.0)
    # a run at another rate is named with it, paced by its own runs at that rate, and gets the one
    # budget of every equal-seconds row: distillm's at the first runs' rate, not distillm's at its rate
    grid = Namespace(root=tmp_path, seeds=[0], lr=1e-4)
    assert study.record_path(grid, "steps", "kd", 0).name == "steps-kd@lr0.0001-s0.json"
    assert study.seconds_budget(grid, "kd") is None
    for recipe, seconds, pace in (("distillm", 700.0, 9.0), ("kd", 400.0, 7.0)):
        study.write_json(
            study.record_path(grid, "steps", recipe, 0), {"train_seconds": seconds, "seconds_per_step": pace}
        )
    assert study.seconds_budget(grid, "kd") == (500.0, 7.0) and study.seconds_budget(args, "kd") == (500.0, 6.0)
    assert study.seconds_budget(grid, "distillm") == (500.0, 9.0)


def test_study_counts_the_quickest_preparation_of_the_same_pairs(tmp_path):
    """Load only slows a preparation down: a seed's pairs cost the least seconds over the preparations
    of the same models, settings and prompts (other seeds), never those of other work."""
    from argparse import Namespace

    from distill.pairs import MANIFEST

    study = load_script("study")
    work = {"teacher": "t", "student": "s", "sampling": {"temperature": 0.8}, "prompts_fingerprint": "p"}
    for seed, seconds, extra in ((0, 456.3, {}), (1, 204.3, {}), (2, 50.0, {"prompts_fingerprint": "other"})):
        folder = tmp_path / "pairs" / f"s{seed}"
        folder.mkdir(parents=True)
        manifest = {**work, **extra, "seed": seed, "seconds": seconds, "created": f"day {seed}"}
        manifest["response_tokens"] = {"teacher": 7000 + seed, "student": 5000 - seed}
        (folder / MANIFEST).write_text(json.dumps(manifest))
    args = Namespace(root=tmp_path)
    counted = [study.prepare_seconds(args, None, {}, "distillm2", tmp_path / "pairs" / f"s{s}") for s in (0, 1, 2)]
    assert counted == [204.3, 204.3, 50.0]


def test_study_restores_the_committed_records_on_a_new_machine(tmp_path):
    """A new machine has no study root: the records of the results file are written there first (the
    first runs' with their rate), so finished runs are not run again and the budgets can be sized."""
    from argparse import Namespace

    study = load_script("study")
    output = tmp_path / "study.json"
    runs = [
        {"budget": "steps", "recipe": "kd", "seed": 0, "train_seconds": 1.0},
        {"budget": "steps", "recipe": "kd@lr0.0001", "seed": 0, "lr": 1e-4, "train_seconds": 2.0},
    ]
    study.write_json(output, {"settings": {"lr": 2.5e-4}, "runs": runs})  # the last call's rate, not the first runs'
    args = Namespace(root=tmp_path / "root", output=output, lr=1e-4)
    assert study.restore_records(args) == ["steps-kd-s0", "steps-kd@lr0.0001-s0"]
    assert study.load_records(args) == [{**runs[0], "lr": 5e-4, "restored_from": "study.json"}] + [
        {**runs[1], "restored_from": "study.json"}
    ]
    assert study.restore_records(args) == []  # a record already there is kept as it is


def test_study_processes_sharing_a_root_claim_runs(tmp_path):
    """A run another process holds is left to it (its lock, here from a child process); once that
    process is gone, even killed, the run can be claimed; a released claim leaves no file."""
    import os
    import signal
    import subprocess
    import textwrap
    from argparse import Namespace

    study = load_script("study")
    args = Namespace(root=tmp_path, lr=5e-4)
    held = study.claim(args, "steps", "kd", 0)
    assert held is not None and study.claim_path(args, "steps", "kd", 0).read_text() == str(os.getpid())
    assert study.claim(args, "steps", "kd", 0) is None  # a second claim, even from the same process, is refused
    study.release(held)
    assert not study.claim_path(args, "steps", "kd", 0).exists()

    path = study.claim_path(args, "steps", "kd", 1)
    holder = subprocess.Popen(  # noqa: S603
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import fcntl, sys, time
                file = open({str(path)!r}, "a+")
                fcntl.flock(file, fcntl.LOCK_EX)
                print("held", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert study.claim(args, "steps", "kd", 1) is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    taken = study.claim(args, "steps", "kd", 1)
    assert taken is not None
    study.release(taken)


def test_study_plots_records_of_recipes_it_does_not_know(tmp_path):
    """Processes sharing a root may run different copies of study.py: a record of a recipe missing
    from this copy's VARIANTS (a newer copy's) is plotted too, not a KeyError that ends the process."""
    study = load_script("study")
    records = [
        {
            "recipe": name,
            "budget": "steps",
            "seed": 0,
            "train_seconds": 10.0 + i,
            "rouge_l_greedy": 5.0,
            "token_kl": 4.0,
        }
        for i, name in enumerate(("kd", "a_newer_recipe"))
    ]
    written = study.plot(records, tmp_path)
    assert [p.name for p in written] == ["study_quality.png"] and written[0].stat().st_size > 0


def test_study_runs_both_budgets_from_a_shared_start_resumes_and_plots(tmp_path, single_thread):
    study = load_script("study")
    tiny = make_pair(tmp_path / "pair")
    argv = ["--root", str(tmp_path / "root"), "--output", str(tmp_path / "study.json")]
    argv += ["--teacher", str(tiny["teacher"]), "--student", str(tiny["student"])]
    argv += ["--train-prompts", "16", "--epochs", "2", "--init-steps", "1", "--rouge-samples", "2", "--draws", "2"]
    argv += ["--seeds", "0", "--only", "kd", "sft", "distillm", "distillm2_pairs"]
    argv += sets("eval.batch_size=8", "generation.max_new_tokens=4", "data.val_max=4")
    report_ = study.main(argv)
    assert report_["complete"]
    runs = {(r["budget"], r["recipe"]): r for r in report_["runs"]}
    names = ("kd", "sft", "distillm", "distillm2_pairs")
    assert set(runs) == {(b, n) for b in ("steps", "seconds") for n in names}
    for key, run in runs.items():
        for field in (
            "recipe",
            "seed",
            "budget",
            "steps",
            "train_seconds",
            "sources",
            "max_sgo_prob",
            "rouge_l_greedy",
            "rouge_l_sampled",
            "token_kl",
            "val_ce",
        ):
            assert run[field] is not None, (key, field)
        assert [c["step"] for c in run["curve"]][0] == 0
        # each source's mean step time, from the run's own steps
        # (a step of several groups, "teacher+student", counts once for each of its sources)
        assert {s for k in run["seconds_by_source"] for s in k.split("+")} == set(run["sources"])
        assert "step_seconds" not in run
        if all("+" not in k for k in run["seconds_by_source"]):
            assert sum(run["seconds_by_source"][s] * n for s, n in run["sources"].items()) == pytest.approx(
                run["train_seconds"], abs=0.01 * len(run["sources"]) * run["steps"]
            )
    assert all(runs["steps", n]["steps"] == 4 for n in ("kd", "sft", "distillm"))  # 2 epochs of 16 prompts, 8 a step
    assert [c["step"] for c in runs["steps", "kd"]["curve"]] == [0, 2, 4]  # once per epoch
    assert runs["steps", "sft"]["distill_recipe"] == "sft" and runs["steps", "distillm"]["sgo_prob"] is not None
    assert all(r["train_seconds"] > 0 and r["curve"][-1]["train_seconds"] == r["train_seconds"] for r in runs.values())
    # equal seconds: each run's schedule is sized from its own pace, and the budget is distillm's time at equal steps
    for name in names:
        pace, prepared = runs["steps", name]["seconds_per_step"], runs["seconds", name]["prepare_seconds"]
        budget = runs["steps", "distillm"]["train_seconds"] - prepared  # the pairs' preparation counts
        assert runs["seconds", name]["steps"] == max(1, math.ceil(budget / pace))
    # the official schedule: pairs prepared once for the seed (both budgets count their seconds), no generation
    pairs = json.loads((tmp_path / "root" / "pairs" / "s0" / "manifest.json").read_text())
    for budget in ("steps", "seconds"):
        assert runs[budget, "distillm2_pairs"]["prepare_seconds"] == pairs["seconds"] > 0
        run = runs[budget, "distillm2_pairs"]
        assert run["sources"] == {"teacher": run["steps"], "student": run["steps"]}
    assert all(runs[budget, n]["prepare_seconds"] == 0 for budget in ("steps", "seconds") for n in names[:3])
    for name in ("study_quality.png", "study_distillm.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)
    section = "\n".join(report.study_section(report_, tmp_path, tmp_path))
    assert (
        "Status: complete" in section
        and "| steps | distillm | 0 | 4 |" in section
        and "![quality against training seconds]" in section
    )
    # finished runs are kept and skipped: a second call trains nothing
    records = sorted((tmp_path / "root" / "records").glob("*.json"))
    stamps = [p.stat().st_mtime_ns for p in records]
    study.main(argv)
    assert [p.stat().st_mtime_ns for p in records] == stamps
    # --report-only rewrites the report and says whether the selected runs are all there
    assert study.main([*argv, "--report-only"])["complete"]
    assert not study.main([*argv, "--report-only", "--seeds", "0", "1"])["complete"]


# --- the compute floor's arithmetic against torch's own FLOP counter


def tiny_llama(tie: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(**sizes, num_key_value_heads=2, tie_word_embeddings=tie, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def counted_matmul_flops(run) -> int:
    """Matmul FLOPs torch counts while ``run()`` runs (mm and bmm: the linear layers; sdpa attention is not
    among them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return sum(
        n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm", "aten.bmm")
    )


@pytest.mark.parametrize("frozen", [["embeddings"], [], ["embeddings", "layer 0"]])
def test_floor_flops_of_a_forward_and_backward_match_torch_flop_counter(frozen):
    import torch

    model = tiny_llama()
    if "embeddings" in frozen:
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    if "layer 0" in frozen:
        model.model.layers[0].requires_grad_(False)
    ids = torch.randint(0, 96, (3, 10))
    keep = 4  # logits of the last 4 positions of each row: the response

    def step():
        model(input_ids=ids, logits_to_keep=keep).logits.float().logsumexp(-1).sum().backward()

    matmuls = compute_floor.ModelMatmuls.of(model)
    n_tokens, n_logit_rows = ids.numel(), 3 * keep
    expected = matmuls.forward_flops(n_tokens, n_logit_rows) + matmuls.backward_flops(n_tokens, n_logit_rows)
    assert counted_matmul_flops(step) == expected
    assert matmuls.head_trainable == ("embeddings" not in frozen)
    layer = 32 * 32 * 2 + 2 * 32 * 16 + 3 * 32 * 48  # q, o; k, v (2 kv heads of 8); gate, up, down
    assert (matmuls.body_params, matmuls.head_params) == (2 * layer, 96 * 32)
    assert matmuls.body_trainable == (layer if "layer 0" in frozen else 2 * layer)
    # a frozen first layer needs no input gradients; frozen embeddings alone do not spare any (the norms train)
    assert matmuls.body_input_grad == (layer if "layer 0" in frozen else 2 * layer)


def test_floor_flops_of_generation_match_torch_flop_counter():
    import torch

    model = tiny_llama(tie=True).eval()
    prompts = torch.randint(2, 96, (2, 7))
    new = 5

    def generate():
        with torch.no_grad():
            model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )

    assert counted_matmul_flops(generate) == compute_floor.ModelMatmuls.of(model).generation_flops(
        2, prompts.numel(), 2 * new
    )


def test_dtype_probe_sees_the_dtype_each_part_computes_in():
    import torch

    model = tiny_llama()
    breakdown = compute_floor.Breakdown()
    probe = compute_floor.DtypeProbe(breakdown)
    ids = torch.randint(0, 96, (1, 5))
    with probe.active({"student": model}):
        with breakdown.timing("student_forward"), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids)
        with breakdown.timing("generation"):
            model(input_ids=ids)
    fallback = dict.fromkeys(compute_floor.PARTS, "float16")
    dtypes, observed = probe.dtypes(fallback)
    assert (dtypes["student_forward"], dtypes["student_backward"], dtypes["student_generation"]) == (
        "bfloat16",
        "bfloat16",
        "float32",
    )
    assert dtypes["teacher_forward"] == "float16" and set(observed) == {
        "student_forward",
        "student_backward",
        "student_generation",
    }


def test_matmul_throughput_is_measured_once_per_dtype():
    throughput = compute_floor.MatmulThroughput(64, 32, 48, "cpu", repeats=2, min_seconds=0.0)
    rate = throughput.rate("float32")
    assert rate > 0 and throughput.rate("float32") == rate and set(throughput.gflops) == {"float32"}
    assert throughput.record()["shape"] == "[64, 32] x [32, 48]"


def test_fused_head_measures_fused_today_and_peer_and_a_whole_run(tmp_path):
    output = tmp_path / "fused_head.json"
    load_script("fused_head").main(
        [
            "--vocab",
            "256",
            "--tokens",
            "32",
            "--hidden",
            "8",
            "--divergences",
            "skew_kl",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--run-vocab",
            "512",
            "--output",
            str(output),
        ]
    )
    result = json.loads(output.read_text())
    (case,) = result["cases"]
    assert (
        result["complete"]
        and case["divergence"] == "skew_kl"
        and (case["vocab"], case["hidden"], case["tokens"]) == (256, 8, 32)
    )
    for implementation in ("fused", "today", "peer"):
        assert case[implementation]["seconds"] > 0 and case[implementation]["peak_extra_bytes"] >= 0
    assert case["fused_time_ratio"] == pytest.approx(case["fused"]["seconds"] / case["peer"]["seconds"])
    assert case["loss_rel_diff"] < 1e-5 and case["grad_max_abs_diff"] < 1e-5
    run = result["run"]
    assert (run["vocab"], run["sequences"], run["response_tokens"]) == (512, 8, 128) and run[
        "logits_bytes_per_model"
    ] == 4 * 8 * 128 * 512
    assert (
        run["fused"]["head"].startswith("fused head: on")
        and run["full"]["head"] == "fused head: off (train.fused_head=false): full logits"
    )
    for name in ("fused", "full"):
        assert run[name]["start_rss_bytes"] > 0 and run[name]["seconds"] > 0


def test_teacher_cache_benchmark_times_both_variants_and_compares_full_vocabulary_kl(tmp_path, single_thread):
    from typer.testing import CliRunner

    from distill.cli import app

    teacher_cache = load_script("teacher_cache")
    tiny = make_pair(tmp_path)
    settings = [*pair_args(tiny), "--batch-size", "4"]
    cache = tmp_path / "cache"
    teacher_cache.main(
        [
            *settings,
            "--cache",
            str(cache),
            "--top-k",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--output",
            str(tmp_path / "steps.json"),
        ]
    )
    record = json.loads((tmp_path / "steps.json").read_text())
    assert record["complete"] and [r["recipe"] for r in record["recipes"]] == ["kd", "distillm"]
    assert all(
        len(r["live_seconds"]) == len(r["cache_seconds"]) == 1 and r["ratio_mean"] > 0 for r in record["recipes"]
    )
    assert (
        record["cache"]["top_k"] == 8
        and record["cache"]["payload_bytes_per_token"] == 36
        and record["cache"]["bytes_per_token"] >= 36
    )
    floor = record[
        "floor"
    ]  # the compute floor of the tiny pair: skipping the teacher saves its forward, never the student's work
    assert 0.4 < floor["cached_over_live"] < 1 and floor["gflop_per_sequence"]["teacher_forward"] > 0
    runs = {}
    for name, extra in (("live", []), ("cached", ["--teacher-cache", str(cache)])):
        runs[name] = tmp_path / name
        kd = ["run", "--recipe", "kd", *pair_args(tiny), "--max-steps", "2", *sets("train.batch_size=4")]
        result = CliRunner().invoke(app, [*kd, *sets("eval.every=0"), "-o", str(runs[name]), *extra])
        assert result.exit_code == 0, result.output

    def compare(live: Path, cached: Path, output: Path) -> None:
        teacher_cache.main(["quality", "--live", str(live), "--cached", str(cached), "--output", str(output)])

    compare(runs["live"], runs["cached"], tmp_path / "quality.json")
    quality = json.loads((tmp_path / "quality.json").read_text())
    assert quality["live"]["val_kl_full"] > 0 and quality["cached"]["val_kl_full"] > 0
    assert quality["relative_difference"] == pytest.approx(
        quality["cached"]["val_kl_full"] / quality["live"]["val_kl_full"] - 1
    )
    # the cached run logged the coarse KL, which is at most the full one of the same student
    assert quality["cached"]["logged_val_kl"] <= quality["cached"]["val_kl_full"] * 1.01
    with pytest.raises(SystemExit):  # not the same settings: refused
        compare(runs["cached"], runs["live"], tmp_path / "no.json")
    # RESULTS.md renders both files, each with its machine and verdicts
    lines = report.teacher_cache_section({"teacher_cache_steps.json": record}, {"teacher_cache_quality.json": quality})
    text = "\n".join(lines)
    assert "| kd |" in text and "| distillm |" in text and "bytes per token (target <= 512 at K = 64" in text
    assert f"costs at least {floor['cached_over_live']:.3f}x the live one" in text
    assert f"{100 * quality['relative_difference']:+.1f}%" in text and record["environment"]["date"] in text


def test_a_study_run_stopped_by_sigterm_goes_on_from_its_checkpoint(tmp_path, single_thread, monkeypatch):
    """A session that ends sends SIGTERM: the run saves a checkpoint at the end of its step, and the
    next study process continues that run instead of starting it over."""
    import os
    import signal

    study = load_script("study")
    tiny = make_pair(tmp_path / "pair")
    args = study.build_parser().parse_args(
        ["--root", str(tmp_path / "root"), "--teacher", str(tiny["teacher"]), "--student", str(tiny["student"])]
        + ["--train-prompts", "16", "--epochs", "2", "--init-steps", "1", "--rouge-samples", "2", "--draws", "1"]
        + ["--set", "eval.batch_size=8", "--set", "generation.max_new_tokens=4", "--set", "data.val_max=4"]
    )
    registry = distill.default_registry()
    study.write_subset(args)
    study.make_init(args, registry)
    real_print = print

    def stop_at_step_1(*parts, **options):  # the run's progress line of step 1: as if the session ended then
        real_print(*parts, **options)
        if parts and str(parts[0]).startswith("  step 1 "):
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(study, "print", stop_at_step_1, raising=False)
    with pytest.raises(distill.RunStopped, match="SIGTERM after step 1"):
        study.run_one(args, registry, "kd", 0, "steps", None, None)
    monkeypatch.undo()
    args.keep_runs = True
    record = study.run_one(args, registry, "kd", 0, "steps", None, None)
    assert record["resumed"] and record["steps"] == record["steps_planned"] == study.steps_of(args, {})
    assert [c["step"] for c in record["curve"]][0] == 0 and record["train_seconds"] > 0
    # finished, but its record never written (the process died in between): rebuilt from its files
    args.keep_runs = False
    again = study.run_one(args, registry, "kd", 0, "steps", None, None)
    assert (
        again["resumed"]
        and again["token_kl"] == record["token_kl"]
        and again["train_seconds"] == record["train_seconds"]
    )
    assert not (tmp_path / "root" / "runs" / "steps-kd-s0").exists()


def _default_run_folder(
    root: Path, name: str, seed: int, layer: dict, rouge: float, kl_end: float, done=True, fp32=False
):
    """A finished ``distill run`` of the embedded default as default_quality.py finds it on disk: with
    precision and dtypes as ``auto`` resolves them with native bf16, or (``fp32``) without."""
    from distill.config import dump_config
    from distill.resolve import resolve_config

    resolved = {
        "train": {"seed": seed, "precision": "fp32" if fp32 else "bf16"},
        "teacher": {"dtype": "float32" if fp32 else "bfloat16"},
        "student": {"dtype": "float32"},
    }
    config = resolve_config(layer, {"output_dir": str(root / name / "run"), **resolved})
    run = root / name / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(config))
    steps = config.train.max_steps
    evals = [{"step": 0, "val_kl": 11.0, "rouge_l": 0.0}, {"step": steps, "val_kl": kl_end, "rouge_l": rouge}]
    (run / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s + 1, "seconds": 2.0}) + "\n" for s in range(steps))
    )
    if done:
        (root / name / "done").touch()


def test_default_quality_groups_runs_by_what_they_changed_and_checks_every_seed(tmp_path):
    """A setting is the keys a run's config.yaml changed from the embedded default (not its seed, its
    folder or what auto resolved to); runs that did not finish are left out; a setting reaches a
    target only when every seed does."""
    script = load_script("default_quality")
    root = tmp_path / "runs"
    _default_run_folder(root, "default-s0", 0, {}, rouge=21.0, kl_end=2.0)
    _default_run_folder(root, "default-s1", 1, {}, rouge=19.0, kl_end=2.2)
    _default_run_folder(root, "lr-s0", 0, {"train": {"lr": 2e-3}}, rouge=22.0, kl_end=2.1)
    _default_run_folder(root, "lr-s1", 1, {"train": {"lr": 2e-3}}, rouge=20.5, kl_end=3.0)
    _default_run_folder(root, "lr-s2", 2, {"train": {"lr": 2e-3}}, rouge=1.0, kl_end=9.0, done=False)
    _default_run_folder(root, "avx2-s0", 0, {}, rouge=19.5, kl_end=2.0, fp32=True)  # the default, float32
    out = tmp_path / "dq.json"
    result = script.main(["--root", str(root), "--report-only", "--json", str(out)])
    assert json.loads(out.read_text())["settings"] == result["settings"]
    avx2, default, lr = result["settings"]
    assert (avx2["overrides"], avx2["seeds"], avx2["compute"]["train.precision"]) == ({}, [0], "fp32")
    assert (default["setting"], default["overrides"], default["seeds"]) == ("default", {}, [0, 1])
    assert default["rouge_l_mean"] == pytest.approx(20.0) and not default["every_seed_reaches_rouge"]
    assert default["every_seed_reaches_kl"]  # 2.2 / 11 <= 0.25
    assert (lr["overrides"], lr["seeds"]) == ({"train.lr": 0.002}, [0, 1])
    assert lr["every_seed_reaches_rouge"] and not lr["every_seed_reaches_kl"]  # 3.0 / 11 > 0.25
    assert [r["precision"] for r in result["runs"]].count("bf16") == 4 and len(result["runs"]) == 5
    # RESULTS.md: the default's targets in the targets table, every setting in its own section
    targets = "\n".join(report.targets_section({}, None, None, result))
    bf16 = "bf16 (teacher bfloat16, student float32)"
    assert f"| embedded default: ROUGE-L >= 20 at every seed | 21.00 19.00 (seeds 0 1; {bf16}) | **miss** |" in targets
    assert f"| embedded default: KL <= 0.25x its start at every seed | at most 0.20x (seeds 0 1; {bf16}) |" in targets
    assert "| 19.50 (seeds 0; fp32 (teacher float32, student float32)) | **miss** |" in targets
    assert "train.lr" not in targets
    section = "\n".join(report.default_quality_section(result))
    assert f"| lr | `train.lr=0.002` | {bf16} | unset | 0 1 | 22.00 20.50 | 21.25 | 2.10 3.00 |" in section


def test_default_quality_runs_each_seed_once_and_says_which_failed(tmp_path, monkeypatch):
    script = load_script("default_quality")
    commands, real_run = [], script.subprocess.run

    def fake_run(command, **kwargs):
        if command[0] == "git":  # the report's commit
            return real_run(command, **kwargs)
        env = kwargs["env"]
        commands.append((command, env.get("OMP_NUM_THREADS")))
        return type("Done", (), {"returncode": 3 if "7" in command else 0})()

    monkeypatch.setattr(script.subprocess, "run", fake_run)
    name, pairs = script.parse_setting("lr:train.lr=2e-3,train.warmup_steps=10")
    assert (name, pairs) == ("lr", ["train.lr=2e-3", "train.warmup_steps=10"])
    folder = script.run_one(tmp_path, name, 1, pairs, threads=1)
    assert (folder / "done").exists() and folder.name == "lr-s1"
    command, threads = commands[0]
    assert threads == "1" and command[command.index("--seed") + 1] == "1"
    assert command.count("--set") == 2 and "train.warmup_steps=10" in command
    script.run_one(tmp_path, name, 1, pairs, threads=1)  # done: not run again
    assert len(commands) == 1
    with pytest.raises(SystemExit, match="lr-s1 was run with --set train.lr=2e-3 train.warmup_steps=10, not"):
        script.run_one(tmp_path, name, 1, ["train.lr=5e-4"], threads=1)
    with pytest.raises(SystemExit, match="lr-s7 failed .exit 3."):
        script.run_one(tmp_path, name, 7, pairs, threads=None)
    assert not (tmp_path / "lr-s7" / "done").exists()
    for bad in ("lr-s2:train.lr=1", "lr:train.lr", ":train.lr=1"):
        with pytest.raises(SystemExit, match="setting"):
            script.parse_setting(bad)
    # a failed run leaves the others' report written, then exits non-zero naming it
    root = tmp_path / "main"
    _default_run_folder(root, "lr-s0", 0, {"train": {"lr": 2e-3}}, rouge=20.0, kl_end=2.0)
    out = tmp_path / "dq.json"
    argv = ["--root", str(root), "--setting", "lr:train.lr=2e-3", "--seeds", "0", "7", "--json", str(out)]
    with pytest.raises(SystemExit, match="lr-s7 failed"):
        script.main(argv)
    assert [r["name"] for r in json.loads(out.read_text())["runs"]] == ["lr-s0"]


def test_the_cross_tokenizer_student_and_the_benchmarks_map_and_memory_parts(tmp_path):
    """scripts/make_cross_student.py: another tokenizer (its own specials and template) trained on the
    built-in data, the teacher's layers, each new embedding the mean of the teacher's embeddings of its
    text's teacher tokens; benchmarks/cross_tokenizer.py's vocabulary map and loss memory on it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.models import load_model, load_tokenizer

    bench = load_script("cross_tokenizer")
    output = tmp_path / "cross.json"
    args = ["--root", str(tmp_path), "--output", str(output), "--parts", "map", "memory"]
    report_ = bench.main(
        [*args, "--vocab", "600", "--layers", "2", "--batch", "1", "--positions", "4", "--threads", "1"]
    )
    student_dir = tmp_path / "student"
    tokenizer, model = AutoTokenizer.from_pretrained(student_dir), AutoModelForCausalLM.from_pretrained(student_dir)
    assert len(tokenizer) == 600 and tokenizer.eos_token == "</s>" and model.config.num_hidden_layers == 2
    assert model.config.eos_token_id == tokenizer.eos_token_id and model.get_output_embeddings().weight.shape[0] == 600
    teacher_tok, teacher = load_tokenizer("smollm2-135m-instruct"), load_model("smollm2-135m-instruct", "teacher")
    specials = set(tokenizer.all_special_ids)  # these start as the teacher's <|im_start|> and <|im_end|>
    word = next(i for i in range(len(tokenizer)) if i not in specials and len(tokenizer.decode([i]).strip()) >= 4)
    teacher_ids = teacher_tok(tokenizer.decode([word]), add_special_tokens=False).input_ids
    expected = teacher.get_input_embeddings().weight[teacher_ids].mean(0)
    torch.testing.assert_close(model.get_input_embeddings().weight[word], expected)
    assert report_["map"]["student_vocab"] == 600 and 0 < report_["map"]["matched_exact"] <= 600
    assert report_["memory"]["positions"] == 4 and report_["memory"]["ratio"] > 0
    assert json.loads(output.read_text())["memory"] == report_["memory"]


def test_the_cross_tokenizer_section_reads_every_part_of_its_results():
    cross = {
        "map": {"teacher_vocab": 49152, "student_vocab": 8192, "matched_exact": 6721, "more_when_normalised": 0},
        "memory": {
            "positions": 1024,
            "cross_vocabulary_peak_mib": 362.0,
            "same_tokenizer_peak_mib": 602.0,
            "ratio": 0.6,
            "target": 2.0,
        },
        "cost": {
            "steps": 6,
            "warmup": 2,
            "target": 1.5,
            "cases": {"kd one": {"seconds_per_step": 9.5, "x_kd_one_tokenizer": 1.0, "tokens_per_step": 718.0}},
        },
        "quality": {
            "summary": {
                "kd-uld": {
                    "seeds": [0, 1],
                    "rouge_l": {"mean": 12.5, "range": [11.0, 14.0]},
                    "val_ce": {"mean": 3.25, "range": [3.2, 3.3]},
                },
                "distillm-uld": {
                    "seeds": [0, 1],
                    "rouge_l": {"mean": 12.5, "range": [11.0, 14.0]},
                    "student_output_steps": [0, 6],
                },
            }
        },
    }
    slower = {**cross["cost"]["cases"]["kd one"], "seconds_per_step": 20.0}
    avx2 = {"cost": {**cross["cost"], "cases": {"kd one": slower}}}
    text = "\n".join(report.cross_tokenizer_section(cross, {"cross_tokenizer-avx2.json": avx2}))
    assert "`results/cross_tokenizer-avx2.json`." in text and "| kd one | 20.00 | 1.00 | 718 |" in text
    assert "6,721 token strings in both" in text and "0.60x (target <= 2.0x): **pass**" in text
    assert "| kd one | 9.50 | 1.00 | 718 |" in text
    assert "| kd-uld | 0,1 | 12.5 (11.0-14.0) | 3.250 (3.200-3.300) | - | - |" in text
    assert "| distillm-uld | 0,1 | 12.5 (11.0-14.0) | - | - | 0, 6 |" in text
