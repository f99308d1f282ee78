"""Prepared response pairs (``distill prepare-pairs``, DistiLLM-2's official schedule) and the
``contrastive`` policy reading them; sampling settings per purpose (``generation.train`` /
``generation.eval``)."""

from __future__ import annotations

import json
import shutil

import pytest

from cli_runs import pair_args, read_jsonl, run_cli, runner, sets
from distill.cli import app
from distill.config import GenerationConfig
from distill.pairs import prompt_key
from test_multiprocess import launch

SMALL = sets("train.batch_size=4", "generation.max_new_tokens=10", "eval.rouge_samples=0", "eval.batch_size=8")
RUN = ["--recipe", "distillm2", "--seed", "1", *SMALL]


def prepare_args(pair, out, *extra: str) -> list[str]:
    return ["prepare-pairs", *pair_args(pair), "-o", str(out), *RUN[:4], *SMALL, "--part-prompts", "8", *extra]


def part_texts(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((folder / "parts").glob("part-*.jsonl"))}


@pytest.fixture(scope="module")
def pairs(tiny, tmp_path_factory):
    """Pairs of the tiny pair for ``RUN`` (seed 1), four parts of 8 prompts."""
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    result = runner.invoke(app, prepare_args(tiny, out))
    assert result.exit_code == 0, result.output
    return out


def test_pairs_hold_both_sides_for_every_training_prompt_at_the_training_settings(pairs):
    manifest = json.loads((pairs / "manifest.json").read_text())
    assert manifest["sampling"] == {"max_new_tokens": 10, "temperature": 0.8, "top_k": 0, "top_p": 0.95}
    assert manifest["seed"] == 1 and len(manifest["parts"]) == 4 and manifest["pairs"] == manifest["prompts"]
    records = [json.loads(line) for text in part_texts(pairs).values() for line in text.splitlines()]
    assert len({r["key"] for r in records}) == len(records) == manifest["pairs"]
    for r in records:
        assert r["key"] == prompt_key(r["prompt_ids"])
        assert 1 <= len(r["teacher_ids"]) <= 10 and 1 <= len(r["student_ids"]) <= 10
    assert any(r["teacher_ids"] != r["student_ids"] for r in records)


def test_two_processes_write_the_same_pairs_and_an_interrupted_command_continues(tiny, pairs, tmp_path):
    # each response is seeded by the seed, the side and the prompt, and a part is batched the same way
    # whoever makes it: two processes (parts 0, 2 and 1, 3) write the very bytes of one
    two = tmp_path / "two"
    launch(["-m", "distill", *prepare_args(tiny, two)])
    assert part_texts(two) == part_texts(pairs)
    # killed after two parts: no manifest, a partial part under its temporary name
    cut = tmp_path / "cut"
    shutil.copytree(pairs, cut)
    (cut / "manifest.json").unlink()
    for name in ("part-00002.jsonl", "part-00003.jsonl"):
        (cut / "parts" / name).unlink()
    (cut / "parts" / ".part-00002.jsonl.tmp").write_text('{"key": ')
    other = runner.invoke(app, prepare_args(tiny, cut, "--set", "generation.train.temperature=0.5"))
    assert other.exit_code == 2 and "other models or settings (sampling differ)" in other.output
    assert not (cut / "manifest.json").exists() and len(list((cut / "parts").iterdir())) == 3  # nothing written
    again = runner.invoke(app, prepare_args(tiny, cut))
    assert again.exit_code == 0, again.output
    assert "continuing" in again.output and "2 of 4 parts made before" in again.output
    assert part_texts(cut) == part_texts(pairs) and not list((cut / "parts").glob(".*"))
    assert (
        json.loads((cut / "manifest.json").read_text())["parts"]
        == json.loads((pairs / "manifest.json").read_text())["parts"]
    )
    finished = runner.invoke(app, prepare_args(tiny, cut))
    assert finished.exit_code == 2 and "holds finished pairs" in finished.output


def test_reading_pairs_gives_the_loss_of_generating_the_same_responses(tiny, pairs, tmp_path, monkeypatch):
    """The policy with ``pairs`` and the generating policy (teacher=generate, fresh student samples)
    whose generation returns the pairs' responses train to the same losses."""
    common = [*RUN, "--max-steps", "4", *sets("eval.every=0", "train.lr=1e-3")]
    read = run_cli(tiny, tmp_path / "read", *common, "-P", f"pairs={pairs}")
    assert read.exit_code == 0, read.output

    from distill.generation import ResponseGenerator
    from distill.pairs import PreparedPairs

    prepared = PreparedPairs(pairs)
    layers = {}

    def from_pairs(self, model, examples, **options):
        side = "teacher" if model.config.num_hidden_layers == layers["teacher"] else "student"
        return prepared.sides(examples)[side]

    from distill.models import load_model

    layers["teacher"] = load_model(str(tiny["teacher"]), "teacher").config.num_hidden_layers
    assert load_model(str(tiny["student"]), "student").config.num_hidden_layers != layers["teacher"]
    monkeypatch.setattr(ResponseGenerator, "__call__", from_pairs)
    generated = run_cli(tiny, tmp_path / "generated", *common)
    assert generated.exit_code == 0, generated.output
    ours, theirs = read_jsonl(tmp_path / "read" / "metrics.jsonl"), read_jsonl(tmp_path / "generated" / "metrics.jsonl")
    assert [m["source"] for m in ours] == [m["source"] for m in theirs] == ["teacher+student"] * 4
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=1e-6)
    for side in ("teacher", "student"):
        assert [m["terms"][side] for m in ours] == pytest.approx([m["terms"][side] for m in theirs], rel=1e-6)


def test_a_run_on_pairs_resumes_exactly(tiny, pairs, tmp_path):
    common = [*RUN, "--max-steps", "6", "-P", f"pairs={pairs}"]
    common += sets("checkpoint.every=3", "checkpoint.keep=2", "eval.every=0", "train.lr=1e-3")
    assert run_cli(tiny, tmp_path / "straight", *common).exit_code == 0
    out = tmp_path / "resumed"
    assert run_cli(tiny, out, *common).exit_code == 0
    for later in ("checkpoints/step-6", "final"):  # as if stopped after step 3
        shutil.rmtree(out / later)
    again = run_cli(tiny, out, *common, "--resume")
    assert again.exit_code == 0, again.output
    assert "resuming after step 3" in again.output
    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=0, abs=1e-7)


def test_the_recipe_trains_no_cross_entropy_whatever_train_ce_weight_says(tiny, pairs, tmp_path):
    """DistiLLM-2's loss has none (the official ``distillm_v2`` loss): train.ce_weight 1, as the embedded
    default sets it, leaves both terms the divergence alone."""
    common = [*RUN, "--max-steps", "2", "-P", f"pairs={pairs}", *sets("eval.every=0")]
    with_ce = run_cli(tiny, tmp_path / "ce1", *common, *sets("train.ce_weight=1.0"))
    without = run_cli(tiny, tmp_path / "ce0", *common, *sets("train.ce_weight=0.0"))
    assert with_ce.exit_code == without.exit_code == 0, with_ce.output
    ours, theirs = read_jsonl(tmp_path / "ce1" / "metrics.jsonl"), read_jsonl(tmp_path / "ce0" / "metrics.jsonl")
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=1e-7)
    config = (tmp_path / "ce1" / "config.yaml").read_text()
    assert config.count("ce_weight: 0.0") >= 3  # the three terms


@pytest.mark.parametrize(
    "change, words",
    [
        ({"student": "teacher"}, "made with another student"),
        ({"teacher": "student", "student": "student"}, "made with another teacher"),
        ({"seed": "2"}, "its prompts are not this run's training prompts"),
        ({"pairs": "missing"}, "does not exist: make it with distill prepare-pairs"),
    ],
)
def test_pairs_made_for_another_run_are_one_line_exit_2_and_nothing_written(tiny, pairs, tmp_path, change, words):
    models = {role: tiny[change[role]] for role in ("teacher", "student") if role in change}
    folder = tmp_path / "missing" if change.get("pairs") else pairs
    args = [*RUN, "--max-steps", "1", "-P", f"pairs={folder}"]
    if "seed" in change:
        args[args.index("--seed") + 1] = change["seed"]
    result = run_cli(tiny, tmp_path / "run", *args, **models)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_sampling_settings_per_purpose_fill_from_generation():
    cfg = GenerationConfig(temperature=1.0, top_p=1.0, max_new_tokens=32, train={"temperature": 0.8, "top_p": 0.95})
    train, evaluation = cfg.purpose("train"), cfg.purpose("eval")
    assert (train.temperature, train.top_p, train.top_k, train.max_new_tokens) == (0.8, 0.95, 0, 32)
    assert (evaluation.temperature, evaluation.top_p, evaluation.max_new_tokens) == (1.0, 1.0, 32)
    assert train.train.temperature is None and evaluation.eval.temperature is None
    assert GenerationConfig().purpose("train") == GenerationConfig()  # an existing config keeps its meaning


def test_training_samples_and_evaluation_draws_use_their_own_settings(tiny, tmp_path, monkeypatch):
    """A run's policies sample at generation.train's settings, its sampled ROUGE-L at generation.eval's."""
    from distill import session as session_module
    from distill.generation import ResponseGenerator

    seen: list[tuple[str, float, int]] = []
    real = ResponseGenerator.__call__

    def spy(self, model, examples, **options):
        seen.append(("greedy" if options.get("greedy") else "sampled", self.cfg.temperature, self.cfg.max_new_tokens))
        return real(self, model, examples, **options)

    monkeypatch.setattr(ResponseGenerator, "__call__", spy)
    args = ["--recipe", "gkd", "-P", "prob=1.0", "--max-steps", "1", *sets("train.batch_size=4", "eval.every=0")]
    args += sets("eval.rouge_samples=2", "eval.rouge_draws=1", "eval.rouge_before=0", "eval.batch_size=8")
    args += sets("generation.max_new_tokens=6", "generation.train.temperature=0.7", "generation.train.max_new_tokens=3")
    args += sets("generation.eval.temperature=1.3")
    result = run_cli(tiny, tmp_path / "run", *args)
    assert result.exit_code == 0, result.output
    assert session_module is not None
    train_calls = [s for s in seen if s[1:] == (0.7, 3)]
    eval_calls = [s for s in seen if s[1:] == (1.3, 6)]
    assert train_calls and all(kind == "sampled" for kind, _, _ in train_calls)
    assert {kind for kind, _, _ in eval_calls} == {"greedy", "sampled"}
    assert len(train_calls) + len(eval_calls) == len(seen)
    (record,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["source"] == "student"


def test_the_recipe_under_the_embedded_default_takes_no_cross_entropy_and_samples_at_the_official_settings():
    """The embedded default sets train.ce_weight 1; distillm2's terms pin theirs to 0, and its training
    samples take the official 0.8 / 0.95 while evaluation keeps generation's own settings."""
    from cli_runs import flags
    from distill.resolve import resolve_run

    cfg = resolve_run(None, flags(recipe="distillm2"))
    assert cfg.train.ce_weight == 1.0 and cfg.teacher.ref  # the embedded default's layer is in
    assert {source: term.ce_weight for source, term in cfg.objective.terms.items()} == {
        "dataset": 0.0,
        "teacher": 0.0,
        "student": 0.0,
    }
    train, evaluation = cfg.generation.purpose("train"), cfg.generation.purpose("eval")
    assert (train.temperature, train.top_p, train.top_k) == (0.8, 0.95, 0)
    assert (evaluation.temperature, evaluation.top_p) == (1.0, 1.0)
    assert cfg.policy.params["teacher"] == "generate"


def test_pairs_for_a_student_cut_from_the_teacher(tiny, tmp_path):
    """prune:K has no files of its own: the pairs name it by K and the teacher's files."""
    out = tmp_path / "pairs"
    args = ["prepare-pairs", "--teacher", str(tiny["teacher"]), "--student", "prune:1", "--data", str(tiny["data"])]
    result = runner.invoke(app, [*args, "-o", str(out), "--recipe", "distillm2", "--seed", "1", *SMALL])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["student_fingerprint"].startswith("prune:1:")
    run = run_cli(tiny, tmp_path / "run", *RUN, "--max-steps", "1", "-P", f"pairs={out}", student="prune:1")
    assert run.exit_code == 0, run.output
    other = run_cli(tiny, tmp_path / "other", *RUN, "--max-steps", "1", "-P", f"pairs={out}", student="prune:2")
    assert other.exit_code == 2 and "made with another student" in other.output
