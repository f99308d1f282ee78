"""The example Accelerate configs (examples/accelerate/) are valid for the installed Accelerate,
generation is synchronised exactly where the weights are sharded, and benchmarks/gpu_check.py says
so when there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from distill.distributed import synced_generation

EXAMPLES = Path(__file__).parent.parent / "examples" / "accelerate"
CONFIGS = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed-zero2.yaml": DistributedType.DEEPSPEED,
    "deepspeed-zero3.yaml": DistributedType.DEEPSPEED,
}


def launch_env(path: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file PATH` would hand the training processes."""
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return defaults, {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_")) and os.environ.get(k) != v}


def test_every_example_config_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_example_config_is_valid_for_the_installed_accelerate(name):
    path = EXAMPLES / name
    config = load_config_from_file(str(path))  # rejects unknown top-level keys
    assert config.distributed_type == CONFIGS[name]
    assert config.mixed_precision == "bf16" and config.num_processes == 4
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**(config.fsdp_config or {}), **(config.deepspeed_config or {})}
    assert set(nested) <= options, f"keys Accelerate would ignore: {set(nested) - options}"
    defaults, env = launch_env(path)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if name == "fsdp.yaml":
        assert (env["ACCELERATE_USE_FSDP"], env["FSDP_SHARDING_STRATEGY"], env["FSDP_STATE_DICT_TYPE"]) == (
            "true",
            "FULL_SHARD",
            "FULL_STATE_DICT",
        )
        assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_USE_ORIG_PARAMS"] == "true"
    if config.distributed_type == DistributedType.DEEPSPEED:
        with patch_environment(**env):
            plugin = DeepSpeedPlugin()
        stage = 3 if "zero3" in name else 2
        assert plugin.zero_stage == stage and plugin.deepspeed_config["gradient_accumulation_steps"] == 1
        assert plugin.deepspeed_config["gradient_clipping"] == 1.0
        # ZeRO-3 must gather whole weights to save checkpoints and final/
        assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] == (stage == 3)


def fake_accelerator(kind: DistributedType, processes: int = 4, zero_stage: int | None = None):
    plugin = SimpleNamespace(zero_stage=zero_stage) if zero_stage is not None else None
    return SimpleNamespace(
        distributed_type=kind, num_processes=processes, state=SimpleNamespace(deepspeed_plugin=plugin)
    )


@pytest.mark.parametrize(
    "accelerator, synced",
    [
        (fake_accelerator(DistributedType.NO, processes=1), False),
        (fake_accelerator(DistributedType.MULTI_CPU), False),
        (fake_accelerator(DistributedType.MULTI_GPU), False),
        (fake_accelerator(DistributedType.DEEPSPEED, zero_stage=2), False),
        (fake_accelerator(DistributedType.DEEPSPEED, zero_stage=3), True),
        (fake_accelerator(DistributedType.FSDP), True),
        (fake_accelerator(DistributedType.FSDP, processes=1), False),
    ],
    ids=["single", "multi-cpu", "ddp", "zero2", "zero3", "fsdp", "fsdp-one-process"],
)
def test_generation_is_synced_exactly_where_weights_are_sharded(accelerator, synced):
    assert synced_generation(accelerator) is synced


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_check_without_a_gpu_says_so_and_measures_nothing(tmp_path):
    script = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, str(script), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpu_check: no CUDA GPU here") and done.stdout.strip().endswith("nothing measured")
    assert not out.exists()


def test_gpu_check_run_cases_work_and_record_what_the_run_resolved(tmp_path, capsys):
    """Its three run cases, on CPU with tiny models instead of the embedded default: a GPU session has
    15 minutes, so the script must not fail there for the first time."""
    import importlib.util

    from tiny_models import make_pair

    spec = importlib.util.spec_from_file_location(
        "gpu_check", Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    )
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    tiny = make_pair(tmp_path)
    models = [f"teacher.ref={tiny['teacher']}", f"student.ref={tiny['student']}", f"data.path={tiny['data']}"]
    small = ["train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=6", *models]
    runs = {
        name: gpu_check.measure_run(3, 1, [*small, *extra], cuda=False) for name, extra in gpu_check.RUN_CASES.items()
    }
    assert runs["auto"]["config"]["precision"] in ("bf16", "fp32") and runs["auto"]["precision_line"].startswith(
        "precision"
    )
    assert runs["full-logits"]["config"]["fused_head"] is False and runs["auto"]["head_line"]
    assert runs["on-policy"]["sources"] == {"student": 3} and runs["on-policy"]["truncated"] is not None
    assert all(r["steps"] == 3 and r["timed_steps"] == 2 and r["seconds_per_step"] > 0 for r in runs.values())
    gpu_check.print_runs(runs)
    assert "full-logits" in capsys.readouterr().out


def test_gpu_check_seq2seq_cases_work_on_cpu(tmp_path):
    """Its encoder-decoder cases (a T5 pair built from configs), on CPU with a tiny T5 and tokenizer."""
    import importlib.util

    from tiny_models import make_pair

    spec = importlib.util.spec_from_file_location(
        "gpu_check", Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    )
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    tiny = make_pair(tmp_path)
    small = ["train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=6", f"data.path={tiny['data']}"]
    runs = gpu_check.measure_seq2seq(
        3, 1, small, cuda=False, tokenizer_ref=str(tiny["teacher"]), d_model=32, layers=(2, 1)
    )
    assert set(runs) == set(gpu_check.SEQ2SEQ_CASES)
    assert runs["t5 gkd"]["head_line"].startswith("fused head: on")
    assert runs["t5 gkd full-logits"]["config"]["fused_head"] is False
    assert all(r["steps"] == 3 and r["seconds_per_step"] > 0 and r["config"]["recipe"] == "gkd" for r in runs.values())
