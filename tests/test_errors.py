"""Bad input, through the command line: one line that says what to change, exit code 2, no traceback,
and nothing written to --output-dir (a previous run there is left exactly as it was)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from cli_runs import pair_args, run_args, sets
from distill.checkpoint import RESUMABLE_FIELDS
from distill.cli import app
from tiny_models import make_model

runner = CliRunner()
SMALL = [*sets("train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=8"), "--recipe", "kd"]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """A finished two-step run, for the cases about an existing --output-dir."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = runner.invoke(app, run_args(tiny, out, "--max-steps", "2", *SMALL))
    assert result.exit_code == 0, result.output
    return out


def models(tiny) -> list[str]:
    return ["--teacher", str(tiny["teacher"]), "--student", str(tiny["student"])]


def with_stop_ids(source: Path, folder: Path, ids) -> str:
    """A copy of the model folder ``source`` whose generation_config.json ends responses on ``ids``."""
    import shutil

    shutil.copytree(source, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": ids}))
    return str(folder)


def write(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def data(tiny) -> list[str]:
    return pair_args(tiny)


ROW = json.dumps({"prompt": "What is 1 plus 2?", "response": "three."})

# case -> (arguments after `run`, given the tiny models and a scratch folder; what the line must say)
Case = Callable[[dict, Path], list[str]]
CASES: dict[str, tuple[Case, list[str]]] = {
    # --- data
    "missing data file": (
        lambda t, tmp: [*models(t), "--data", str(tmp / "missing.jsonl")],
        ["missing.jsonl", "does not exist"],
    ),
    "unreadable data file": (
        lambda t, tmp: [*models(t), "--data", write(tmp, "latin1.jsonl", b"\xff\xfe" + ROW.encode())],
        ["latin1.jsonl", "cannot read"],
    ),
    "empty data": (
        lambda t, tmp: [*models(t), "--data", write(tmp, "empty.jsonl", "\n\n")],
        ["empty.jsonl", "holds no examples"],
    ),
    "malformed JSON names the line": (
        lambda t, tmp: [
            *models(t),
            "--data",
            write(tmp, "bad.jsonl", f'{ROW}\n{ROW}\n{{"prompt": "a" "response": 1}}\n'),
        ],
        ["bad.jsonl:3:", "malformed JSON"],
    ),
    "rows without prompt/response": (
        lambda t, tmp: [*models(t), "--data", write(tmp, "qa.jsonl", '{"question": "a", "answer": "b"}\n' * 30)],
        ["record 1", "`prompt` and `response`", "`messages`"],
    ),
    "messages without an assistant turn": (
        lambda t, tmp: [
            *models(t),
            "--data",
            write(tmp, "chat.jsonl", (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n") * 20),
        ],
        ["`messages`", "assistant"],
    ),
    "nothing left after length filtering": (
        lambda t, tmp: [*data(t), "--set", "data.max_prompt_tokens=2"],
        ["no example left", "prompt too long", "raise data.max_prompt_tokens (now 2)"],
    ),
    "fewer examples than one batch": (
        lambda t, tmp: [*data(t), "--set", "train.batch_size=1000"],
        ["cannot fill one batch of 1000", "lower train.batch_size"],
    ),
    # --- plugin names and parameters
    "unknown divergence": (
        lambda t, tmp: [*data(t), "--divergence", "skew_kll"],
        ["skew_kll", "did you mean skew_kl?", "installed:", "tvd"],
    ),
    "unknown policy": (
        lambda t, tmp: [*data(t), "--policy", "adaptive"],
        ["did you mean adaptive_offpolicy?", "installed:", "onpolicy"],
    ),
    "unknown recipe": (
        lambda t, tmp: [*data(t), "--recipe", "distilm"],
        ["did you mean distillm?", "installed:", "gkd"],
    ),
    "divergence parameter out of range": (
        lambda t, tmp: [*data(t), "--divergence", "skew_kl", "-D", "alpha=2"],
        ["skew_kl.alpha", "less than or equal to 1", "got 2"],
    ),
    "unknown divergence parameter": (
        lambda t, tmp: [*data(t), "--divergence", "skew_kl", "-D", "alpah=0.2"],
        ["skew_kl.alpah", "unknown parameter"],
    ),
    "unknown policy parameter": (
        lambda t, tmp: [*data(t), "--policy", "adaptive_offpolicy", "-P", "capcity=8"],
        ["adaptive_offpolicy.capcity", "unknown parameter"],
    ),
    # --- config keys and files
    "unknown key on the command line": (
        lambda t, tmp: [*data(t), "--set", "train.lrr=1e-4"],
        ["train.lrr", "unknown key"],
    ),
    "malformed --set": (lambda t, tmp: [*data(t), "--set", "train.lr"], ["--set", "expected key=value"]),
    "unknown key in a config file": (
        lambda t, tmp: [*data(t), "--config", write(tmp, "run.yaml", "train:\n  max_steps: 2\n  lrr: 1\n")],
        ["train.lrr", "unknown key"],
    ),
    "YAML syntax error names file and line": (
        lambda t, tmp: [*data(t), "--config", write(tmp, "run.yaml", "train:\n  lr: [1\n  max_steps: 2\n")],
        ["run.yaml:3:", "invalid YAML"],
    ),
    "JSON config syntax error names file and line": (
        lambda t, tmp: [*data(t), "--config", write(tmp, "run.json", '{"train":\n {"lr": }}')],
        ["run.json:2:", "invalid JSON"],
    ),
    "TOML config syntax error names file and line": (
        lambda t, tmp: [*data(t), "--config", write(tmp, "run.toml", "[train]\nlr = \n")],
        ["run.toml", "line 2", "invalid TOML"],
    ),
    "missing config file": (
        lambda t, tmp: [*data(t), "--config", str(tmp / "none.yaml")],
        ["--config", "none.yaml", "cannot read"],
    ),
    # --- non-positive numbers
    "zero steps": (lambda t, tmp: [*data(t), "--max-steps", "0"], ["train.max_steps", "greater than 0", "got 0"]),
    "zero batch size": (
        lambda t, tmp: [*data(t), "--set", "train.batch_size=0"],
        ["train.batch_size", "greater than 0"],
    ),
    "negative learning rate": (
        lambda t, tmp: [*data(t), "--set", "train.lr=-1e-4"],
        ["train.lr", "greater than 0", "got -0.0001"],
    ),
    "zero learning rate": (lambda t, tmp: [*data(t), "--set", "train.lr=0"], ["train.lr", "greater than 0"]),
    # --- models
    "teacher path missing": (
        lambda t, tmp: ["--teacher", str(tmp / "nowhere"), "--student", str(t["student"]), "--data", str(t["data"])],
        ["--teacher", "nowhere", "no such directory"],
    ),
    "student is not a model": (
        lambda t, tmp: ["--teacher", str(t["teacher"]), "--student", str(tmp), "--data", str(t["data"])],
        ["--student", "not a model directory", "config.json"],
    ),
    "a tokenizer larger than a model's head": (
        lambda t, tmp: (
            make_model(tmp / "narrow", 250, layers=1),
            ["--teacher", str(t["teacher"]), "--student", str(tmp / "narrow"), "--data", str(t["data"])],
        )[1],
        ["the tokenizer has 300 tokens", "student's output head only 250 rows", "set student.tokenizer=DIR"],
    ),
    "a stop id outside the head": (
        lambda t, tmp: [
            "--teacher",
            with_stop_ids(t["teacher"], tmp / "teacher", [1, 999]),
            "--student",
            str(t["student"]),
            "--data",
            str(t["data"]),
        ],
        ["the teacher's stop id 999", "outside the 300 logits", "generation_config.json"],
    ),
    # --- output folder and --resume
    "output dir is a file": (
        lambda t, tmp: [*data(t), "--output-dir", write(tmp, "file.txt", "x")],
        ["file.txt", "is a file"],
    ),
    "resume without --output-dir": (lambda t, tmp: [*data(t), "--resume"], ["--resume needs --output-dir"]),
    "resume a folder without a run": (
        lambda t, tmp: [*data(t), "--resume", "--output-dir", str(tmp)],
        ["holds no run to continue", "config.yaml"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_with_exit_code_2_and_writes_nothing(tiny, tmp_path, case):
    build, expected = CASES[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = build(tiny, scratch)
    out = tmp_path / "out"
    if "--output-dir" not in args and case != "resume without --output-dir":
        args += ["--output-dir", str(out)]
    result = runner.invoke(app, ["run", *SMALL, "--max-steps", "2", *args])  # the case's flags come last and win
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for words in expected:
        assert words in lines[0], (words, lines[0])
    assert not out.exists()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


PREVIOUS_RUN_CASES = {
    "a new run into a previous run's folder": (
        lambda t: [*data(t), "--max-steps", "3"],
        ["holds a previous run", "--resume", "--overwrite"],
    ),
    "resume and overwrite together": (
        lambda t: [*data(t), "--resume", "--overwrite", "--max-steps", "3"],
        ["--resume", "--overwrite", "one of them"],
    ),
    "resume a finished run": (
        lambda t: ["--resume", "--max-steps", "2"],
        ["already reached step 2", "--max-steps N with N > 2"],
    ),
    "resume changing unsafe fields": (
        lambda t: ["--resume", "--max-steps", "4", "--set", "train.lr=1e-2", "--divergence", "rkl", "-P", "capacity=4"],
        [
            "cannot change",
            "divergence.name",
            "train.lr",
            "policy.params.capacity",
            "allowed: " + ", ".join(RESUMABLE_FIELDS),
        ],
    ),
    "resume with bad data for a safe field": (
        lambda t: ["--resume", "--max-steps", "-4"],
        ["train.max_steps", "greater than 0"],
    ),
}


@pytest.mark.parametrize("case", list(PREVIOUS_RUN_CASES))
def test_a_previous_run_is_never_changed_by_bad_input(tiny, finished, case):
    build, expected = PREVIOUS_RUN_CASES[case]
    before = snapshot(finished)
    result = runner.invoke(app, ["run", *SMALL, *build(tiny), "--output-dir", str(finished)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for words in expected:
        assert words in lines[0], (words, lines[0])
    assert snapshot(finished) == before


def test_a_tokenizer_without_pad_token_trains(tiny, tmp_path):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny["teacher"]).pad_token is None
    result = runner.invoke(app, ["run", *data(tiny), "--output-dir", str(tmp_path / "run"), "--max-steps", "1", *SMALL])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "final" / "config.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--max-steps", "abc"], "error: Invalid value for '--max-steps'"),
        (["run", "--bogus"], "error: No such option: --bogus (see distill run --help)"),
        (["eval"], "error: eval needs --model DIR"),
        (["list", "nope"], "error: Invalid value for 'kind'"),
    ],
)
def test_usage_mistakes_are_one_line_with_exit_code_2(capsys, argv, message):
    from distill.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.out == ""
    assert message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err


def test_the_entry_point_still_shows_help_and_version(capsys):
    from distill.cli import main

    for argv, expected in (
        ([], "Usage: distill"),
        (["--version"], "distill 0.1.0"),
        (["run", "--help"], "--divergence"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 0 and expected in capsys.readouterr().out


def test_a_bug_reaches_the_user_as_its_own_traceback(monkeypatch):
    """main() names exception classes only when one is raised: a missing one would hide the bug
    behind an AttributeError of its own (typer's click copy has no Abort)."""
    import importlib

    cli = importlib.import_module("distill.cli.app")  # the module (distill.cli.app is also the Typer app's name)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["run"])
