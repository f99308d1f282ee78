"""Per-step losses of every recipe on tiny models, fused head or not, teacher cache or not: what
``tests/test_pinned_losses.py`` compares against ``tests/data/pinned_losses.json``.

    python tests/pinned_losses.py            # prints the cases' losses as JSON
    python tests/pinned_losses.py --write    # writes tests/data/pinned_losses.json (only for a meant change)

A redesign moves code, never numbers: the pins were written before the loss path was unified, and
a change that moves one of them says by how much in its commit.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

PINS = Path(__file__).parent / "data" / "pinned_losses.json"
STEPS = 3
COMMON = [
    "--max-steps",
    str(STEPS),
    "--seed",
    "5",
    "--set",
    "train.precision=fp32",  # the same numbers on every CPU path
    "--set",
    "train.batch_size=4",
    "--set",
    "train.grad_accum=2",
    "--set",
    "train.lr=3e-3",
    "--set",
    "train.ce_weight=0.5",
    "--set",
    "eval.every=0",
    "--set",
    "eval.rouge_samples=0",
    "--set",
    "eval.batch_size=8",
    "--set",
    "generation.max_new_tokens=10",
]
RECIPES = {
    "kd": [],
    "sft": [],
    "seqkd": [],
    "imitkd": ["-P", "capacity=8"],
    "gkd": [],
    "rkl_onpolicy": [],
    "minillm": [],
    "distillm": ["-P", "init_prob=0.5", "-P", "capacity=8"],
    "distillm2": [],
    # the recipe before it followed the official code (2026-12-04): the dataset's responses on the teacher
    # side, samples at generation's settings, train.ce_weight in both terms; its pins are the old distillm2's
    "distillm2_dataset": [
        "--recipe",
        "distillm2",
        "-P",
        "teacher=dataset",
        "--set",
        "generation.train.temperature=1.0",
        "--set",
        "generation.train.top_p=1.0",
        "--set",
        "objective.terms.dataset.ce_weight=0.5",
        "--set",
        "objective.terms.student.ce_weight=0.5",
    ],
    "tvd": ["--divergence", "tvd", "--policy", "offpolicy"],
    "skew_rkl": ["--divergence", "skew_rkl", "--policy", "offpolicy", "--set", "train.normalize=sequence"],
}
CACHED = ("kd", "distillm", "tvd")
"""Recipes also pinned with a teacher cache (K = 16): dataset steps read it, generated ones the live teacher."""


def cases() -> dict[str, list[str]]:
    """``<recipe>-<fused|full>[-cached]`` -> the ``distill run`` arguments after the models and data."""
    out = {}
    for recipe, extra in RECIPES.items():
        base = ["--recipe", recipe] if recipe not in ("tvd", "skew_rkl", "distillm2_dataset") else []
        for head in ("fused", "full"):
            args = [*base, *extra, *COMMON, "--set", f"train.fused_head={'true' if head == 'fused' else 'false'}"]
            out[f"{recipe}-{head}"] = args
            if recipe in CACHED:
                out[f"{recipe}-{head}-cached"] = [*args, "--teacher-cache", "{cache}"]
    return out


def run_cases(root: Path) -> dict[str, list[dict]]:
    """Each case's per-step ``loss`` and ``terms`` (and sources), run in this process."""
    from typer.testing import CliRunner

    from distill.cli import app
    from tiny_models import make_pair

    runner = CliRunner()
    tiny = make_pair(root / "tiny", teacher_vocab=320, student_vocab=304)
    models = ["--teacher", str(tiny["teacher"]), "--student", str(tiny["student"]), "--data", str(tiny["data"])]
    cache = root / "cache"
    result = runner.invoke(
        app,
        [
            "cache-teacher",
            "--teacher",
            str(tiny["teacher"]),
            "--data",
            str(tiny["data"]),
            "--top-k",
            "16",
            "-o",
            str(cache),
        ],
    )
    assert result.exit_code == 0, result.output
    found = {}
    for name, args in cases().items():
        out = root / name
        args = [a.replace("{cache}", str(cache)) for a in args]
        result = runner.invoke(app, ["run", *models, *args, "--output-dir", str(out)])
        assert result.exit_code == 0, (name, result.output)
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        found[name] = [{k: s[k] for k in ("step", "source", "loss", "terms") if k in s} for s in steps]
    return found


def main(argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as root:
        found = run_cases(Path(root))
    text = json.dumps(found, indent=1, sort_keys=True) + "\n"
    if "--write" in argv:
        PINS.parent.mkdir(exist_ok=True)
        PINS.write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
