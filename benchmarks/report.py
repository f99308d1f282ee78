"""Write ``benchmarks/RESULTS.md`` from the benchmarks' JSON results, after running them with ``--run``.

RESULTS.md states the machine, thread count, date, versions and settings of the runs, the targets of
issues 7 and 11 with the measured numbers and pass / miss, the step-cost table (with each case's
compute floor and how it was computed) and the equal-budget table with their
plots, (when ``results/divergence_memory.json`` exists) the divergence memory targets, and last
``benchmarks/notes.md``: the reading of the last full run, written by hand (update it after a rerun).

Run (from the repository root)::

    .venv/bin/python benchmarks/report.py --run              # step_cost.py, quality_budget.py, then RESULTS.md
    .venv/bin/python benchmarks/report.py --run --memory     # also divergence_memory.py's full grid (long)
    .venv/bin/python benchmarks/report.py --run --steps 5 --budget 180 --threads 2
    .venv/bin/python benchmarks/report.py                    # only rewrite RESULTS.md from the JSON there

``--run`` runs each benchmark in its own process, one after the other, on the embedded default; on a
2-core CPU machine step_cost takes about half an hour and quality_budget about 6 x (budget + its
evaluations). RESULTS.md marks results measured on settings other than the embedded default.

It also writes README.md's table of the embedded default's times and scores from
``results/embedded_default.json`` (when that file is there), between the README's
``<!-- embedded-default:begin -->`` and ``<!-- embedded-default:end -->`` lines and nowhere else: change
the figures in the JSON, then run this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS
from default_quality import compute_text

HERE = Path(__file__).resolve().parent
NOTES = HERE / "notes.md"
"""Written by hand after a full run: why a target was missed, what the numbers say; appended to RESULTS.md."""


def run_benchmarks(args) -> None:
    """Each benchmark in a fresh process (its own memory, its own torch threads); stop at a failure."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    commands = [
        [
            HERE / "step_cost.py",
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--output",
            str(args.results / "step_cost.json"),
            *threads,
        ],
        [
            HERE / "quality_budget.py",
            "--budget",
            str(args.budget),
            "--evals",
            str(args.evals),
            "--step-cost",
            str(args.results / "step_cost.json"),
            "--output",
            str(args.results / "quality_budget.json"),
            *threads,
        ],
    ]
    if args.memory:
        commands.append(
            [HERE / "divergence_memory.py", "--output", str(args.results / "divergence_memory.json"), *threads]
        )
    for command in commands:
        print(f"$ {' '.join(map(str, command))}", flush=True)
        started = time.time()
        done = subprocess.run([sys.executable, *map(str, command)], check=False)
        if done.returncode != 0:
            raise SystemExit(f"{Path(command[0]).name} failed (exit {done.returncode}); RESULTS.md not written")
        print(f"({Path(command[0]).name}: {(time.time() - started) / 60:.1f} min)", flush=True)


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- Markdown pieces


def markdown_table(rows: list[list[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return "\n".join(lines)


def verdict(passed: bool | None) -> str:
    return "not measured" if passed is None else ("**pass**" if passed else "**miss**")


def embedded_default_settings() -> dict[str, Any]:
    """The settings record of the embedded default as the code defines it now."""
    import distill
    from common import settings_record
    from distill.resolve import resolve_config

    return settings_record(resolve_config(recipe="kd", embedded=True, registry=distill.default_registry()))


def settings_line(settings: dict[str, Any]) -> str:
    default = embedded_default_settings()
    differs = [k for k, v in default.items() if settings.get(k) != v]
    what = (
        f"teacher `{settings['teacher']}` ({settings['teacher_dtype']}), student `{settings['student']}` "
        f"({settings['student_dtype']} weights, {settings['precision']} compute), data "
        f"`{settings['data']}` (validation `{settings['validation']}`), prompts <= "
        f"{settings['max_prompt_tokens']} and responses <= {settings['max_response_tokens']} tokens, batch "
        f"{settings['batch_size']} x {settings['grad_accum']}, max_new_tokens {settings['max_new_tokens']}"
    )
    if differs:
        return f"**Not the embedded default** (differs in {', '.join(differs)}): {what}."
    return f"The embedded default: {what}."


def environment_line(env: dict[str, Any]) -> str:
    commit = env.get("commit", "unknown") + (" with uncommitted changes" if env.get("uncommitted_changes") else "")
    path = f", {env['cpu_path']}" if env.get("cpu_path") else ""
    return (
        f"{env['date']}; {env['cpu']} ({env['cpu_count']} cores, {env['machine']}{path}), torch threads "
        f"{env['torch_threads']} (OMP_NUM_THREADS={env.get('omp_num_threads') or 'unset'}), device "
        f"{env['device']}; Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"accelerate {env['accelerate']}, trl {env.get('trl') or 'not installed'}; commit {commit}"
    )


def targets_section(
    steps: dict[str, dict], quality: dict | None, memory: dict | None, default_quality: dict | None = None
) -> list[str]:
    rows = [["target", "measured", "result", "from"]]
    for s in (default_quality or {}).get("settings", []):
        if s["overrides"]:
            continue  # the embedded default itself; changed settings are in their own section
        t = default_quality.get("targets", {})
        seeds = f"seeds {' '.join(str(seed) for seed in s['seeds'])}; {compute_text(s['compute'])}"
        rows.append(
            [
                f"embedded default: ROUGE-L >= {t.get('rouge_l', 20.0):g} at every seed",
                f"{' '.join(f'{v:.2f}' for v in s['rouge_l'])} ({seeds})",
                verdict(s["every_seed_reaches_rouge"]),
                "default_quality",
            ]
        )
        rows.append(
            [
                f"embedded default: KL <= {t.get('kl_fraction', 0.25):g}x its start at every seed",
                f"at most {s['kl_fraction_max']:.2f}x ({seeds})",
                verdict(s["every_seed_reaches_kl"]),
                "default_quality",
            ]
        )
    for label, step in steps.items():
        for v in step.get("verdicts", []):
            measured = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x (limit {v['limit']}x)"
            rows.append([v["target"], measured, verdict(v["pass"]), f"step_cost{label}"])
    for v in (quality or {}).get("verdicts", []):
        if "ratio" in v:
            measured = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x (limit {v['limit']}x)"
        else:
            measured = "-" if v["pass"] is None else f"{v['distillm']:.4f} vs {v['other']:.4f} nats/token"
        rows.append([v["target"], measured, verdict(v["pass"]), "quality_budget"])
    if memory:
        for name, v in memory.get("verdicts", {}).items():
            if not v.get("measured"):
                continue
            t = memory["targets"]
            rows.append(
                [
                    f"divergence_loss {name}: peak memory <= {t['memory_ratio']}x, time "
                    f"<= {t['time_ratio']}x the peer's (N={t['tokens']}, V={t['vocab']})",
                    f"memory {v['memory_ratio']:.2f}x, time {v['time_ratio']:.2f}x",
                    f"memory {verdict(v['memory_ok'])}, time {verdict(v['time_ok'])}",
                    "divergence_memory",
                ]
            )
    return ["## Targets", "", markdown_table(rows), ""]


def image(results: Path, out_dir: Path, name: str | None, alt: str) -> list[str]:
    """A Markdown image of ``results/name``, linked relative to RESULTS.md; nothing if the file is missing."""
    if not name or not (results / name).is_file():
        return []
    return [f"![{alt}]({os.path.relpath(results / name, out_dir)})", ""]


def step_cost_section(step: dict, results: Path, out_dir: Path, label: str = "") -> list[str]:
    from step_cost import format_table

    s = step["settings"]
    trl = [c for c in step["cases"] if c.get("kind") == "trl"]
    lines = [
        f"## Seconds per optimizer step (`step_cost.py`){label}",
        "",
        environment_line(step["environment"]) + ".",
        "",
        settings_line(s)
        + (
            f" {s['warmup']} warm-up steps, then {s['steps']} timed steps per case; learning rate {s['lr']} "
            f"({s['schedule']}); JSD β = {s['jsd_beta']}; sampling temperature {s['generation_temperature']}."
        ),
        "",
        markdown_table(format_table(step["cases"])),
        "",
        (
            "Seconds are means over the timed steps (ours: `seconds` in `metrics.jsonl`, which covers the policy's "
            "sampling, generation included, forward, backward and the optimizer step; TRL: `on_step_begin` to "
            '`on_step_end`). "by source": mean seconds (steps) per source of the sequences. "x kd": ratio to `kd`; '
            '"x TRL GKD": `jsd-offpolicy` to `trl-lmbda0`, `jsd-onpolicy` to `trl-lmbda1` (`GKDTrainer`); '
            '"x TRL Distill": `jsd-onpolicy` to `trl-distill-onpolicy` (`DistillationTrainer`, on-policy only); TRL '
            "gradient checkpointing off (`-gc`: on, TRL's default). `distillm` runs at its initial φ = 0 here (φ "
            "rises only at evaluations), so its full-run cost is the equal-budget run's below."
        ),
    ]
    lines += ["", floor_paragraph(step)] if step.get("matmul_throughput") else []
    if trl:
        lines += ["", trl_paragraph(step, trl)]
    if step.get("skipped"):
        lines += ["", f"Not run: {', '.join(step['skipped'])} (trl, or that trainer, not installed)."]
    lines.append("")
    lines += image(results, out_dir, step.get("plot"), "step cost breakdown")
    if not step.get("complete"):
        lines += ["**Incomplete run**: the JSON was written before every case finished.", ""]
    return lines


def floor_paragraph(step: dict) -> str:
    """How "floor s" and "x floor" were computed, with the throughput this run measured."""
    throughput = step["matmul_throughput"]
    rates = ", ".join(f"{dtype} {gflops:.1f}" for dtype, gflops in throughput["gflops"].items())
    return (
        '"floor s": the step\'s compute floor, the matmul FLOPs of its real tokens (no padding; generated answers up '
        'to their first EOS) over this machine\'s matmul throughput; "x floor": the step over it. Per token `2·P` for '
        "each forward through a model (`P`: the weights of its linear layers but the output head, counted on the model "
        "objects), `2·H·V` per response position for the head; the student's backward adds the input gradients (`2·P`, "
        "`2·H·V`) and the weight gradients of its trainable weights; generation `2·P` per prompt and new token and "
        "`2·H·V` per new token. Attention scores, norms, the loss and the optimizer are left out (a lower bound; see "
        f"`benchmarks/compute_floor.py`). Throughput of `torch.matmul` {throughput['shape']} on {throughput['device']} "
        f"with {throughput['torch_threads']} threads, measured at the start of the run: {rates} GFLOP/s; each part at "
        "the dtype it computes in (ours: from the run's `config.yaml`; TRL's: observed)."
    )


def trl_paragraph(step: dict, trl: list[dict]) -> str:
    """TRL's version, trainers, optimizer and precision, and the dtypes its trainers were seen computing in."""
    by_trainer: dict[str, dict] = {}
    for case in trl:
        by_trainer.setdefault(case.get("trainer", "GKDTrainer"), case)
    seen = "; ".join(
        f"`{trainer}`: "
        + ", ".join(
            f"{part.replace('_', ' ')} {dtype}"
            for part, dtype in case["compute_dtypes"].items()
            if part != "teacher_generation"
        )
        for trainer, case in by_trainer.items()
        if case.get("compute_dtypes")
    )
    first = trl[0]
    return (
        f"TRL {step['environment'].get('trl')}: {' and '.join(f'`{t}`' for t in by_trainer)} with the "
        f"optimizer `{first.get('optimizer')}`, mixed precision `{first.get('mixed_precision')}`, the "
        "same teacher and student weights and dtypes, the same tokenized batches."
        + (f" Compute dtypes seen: {seen}." if seen else "")
    )


def quality_section(quality: dict, results: Path, out_dir: Path) -> list[str]:
    from quality_budget import format_table

    s = quality["settings"]
    evals = sorted({r["eval_every"] for r in quality["recipes"]})
    lines = [
        "## Quality at an equal training budget (`quality_budget.py`)",
        "",
        environment_line(quality["environment"]) + ".",
        "",
        settings_line(s)
        + (
            f" Budget {s['budget_seconds']:g} training seconds per recipe (optimizer steps only; evaluation excluded), "
            f"`train.max_steps` from the seconds per step of {' and '.join(quality['seconds_per_step_from'])}, "
            f"{s['evals']} evaluations per run (every {', '.join(map(str, evals))} steps), ROUGE-L on "
            f"{s['rouge_samples']} validation prompts at most; learning rate {s['lr']} ({s['schedule']}, "
            f"{s['warmup_steps']} warm-up steps), CE weight {s['ce_weight']}."
        ),
        "",
        markdown_table(format_table(quality["recipes"])),
        "",
        (
            "val CE: the student's cross-entropy on the teacher's answers to the validation prompts; token "
            "KL: KL(teacher || student) per response token on the same; ROUGE-L: the student's greedy "
            'answers against the teacher\'s. s/step: mean over the whole run (full-run cost). "ended by": '
            "`max_steps` (the whole schedule ran within the budget) or `budget` (`train.max_seconds`)."
        ),
        "",
    ]
    for name in quality.get("plots", []):
        lines += image(results, out_dir, name, name)
    if not quality.get("complete"):
        lines += ["**Incomplete run**: the JSON was written before every recipe finished.", ""]
    return lines


def default_quality_section(dq: dict) -> list[str]:
    """``default_quality.py``: the embedded default's ROUGE-L and KL at each seed, beside changed settings."""
    targets = dq.get("targets", {})
    rouge_target, kl_target = targets.get("rouge_l", 20.0), targets.get("kl_fraction", 0.25)
    env = dq["environment"]
    rows = [
        ["setting", "changed", "computed in", "threads", "seeds", "ROUGE-L each", "mean", "KL end each", "every seed"]
    ]
    for s in dq.get("settings", []):
        reaches = [
            f"ROUGE-L {verdict(s['every_seed_reaches_rouge'])}",
            f"KL {verdict(s['every_seed_reaches_kl'])}",
        ]
        rows.append(
            [
                s["setting"],
                ", ".join(f"`{k}={v}`" for k, v in s["overrides"].items()) or "nothing (the default)",
                compute_text(s["compute"]),
                "/".join(s["threads"]),
                " ".join(str(seed) for seed in s["seeds"]),
                " ".join(f"{v:.2f}" for v in s["rouge_l"]),
                f"{s['rouge_l_mean']:.2f}",
                " ".join(f"{v:.2f}" for v in s["kl_end"]),
                ", ".join(reaches),
            ]
        )
    return [
        "## The embedded default over seeds (`default_quality.py`)",
        "",
        (
            f"Collected {env['date']} on {env['cpu']} ({env['cpu_count']} cores, {env.get('cpu_path', '')}); "
            f"torch {env['torch']}, transformers {env['transformers']}; commit "
            f"{env.get('commit', 'unknown')} at collection (the runs record no commit of their own). "
            "Each run is `distill run` on the embedded default with "
            f"`--seed` and the setting's `--set` overrides; targets: ROUGE-L >= {rouge_target:g} on the "
            f"validation prompts and KL(teacher || student) <= {kl_target:g}x its start, at every seed. "
            "threads: the runs' OMP_NUM_THREADS (unset: torch's choice, one per core)."
        ),
        "",
        markdown_table(rows),
        "",
    ]


# --- README.md's table of the embedded default

README = HERE.parent / "README.md"
EMBEDDED_DEFAULT = "embedded_default.json"
EMBEDDED_DEFAULT_BEGIN = "<!-- embedded-default:begin -->"
EMBEDDED_DEFAULT_END = "<!-- embedded-default:end -->"


def embedded_default_table(measured: dict) -> str:
    """The README's table of ``results/embedded_default.json``: one row per run of ``distill run``, each
    figure as the JSON states it (``:g``, so 19.1 stays 19.1 and 574 stays 574)."""
    rows = [
        [
            "CPU path",
            "precision",
            "`distill run`",
            "KL(teacher ‖ student)",
            f"ROUGE-L, {measured['rouge_samples']} prompts",
        ]
    ]
    previous = None
    for run in measured["runs"]:
        overrides = " ".join(f"--set {k}={v}" for k, v in run["overrides"].items())
        emulation = " ".join(f"{k}={v}" for k, v in run["emulation"].items())
        path = (run["cpu_path"], run["emulation"])
        if overrides and path == previous:
            label = f"the same, `{overrides}`"
        else:
            label = run["cpu_path"] + (f" (emulated: `{emulation}`)" if emulation else "")
            label += f", `{overrides}`" if overrides else ""
        previous = path
        rows.append(
            [
                label,
                run["precision"],
                f"{run['wall_seconds']:g} s",
                f"{run['kl_before']:g} → {run['kl_after']:g}",
                f"{run['rouge_l']:g} (first {measured['rouge_before']}: "
                f"{run['rouge_l_subset_before']:g} → {run['rouge_l_subset_after']:g})",
            ]
        )
    return markdown_table(rows)


def with_embedded_default_table(readme: str, measured: dict) -> str:
    """``readme`` with what lies between its two marker lines replaced by the table; the rest unchanged."""
    begin, end = readme.find(EMBEDDED_DEFAULT_BEGIN), readme.find(EMBEDDED_DEFAULT_END)
    if readme.count(EMBEDDED_DEFAULT_BEGIN) != 1 or readme.count(EMBEDDED_DEFAULT_END) != 1 or end < begin:
        raise ValueError(f"README.md needs one {EMBEDDED_DEFAULT_BEGIN} line and after it one {EMBEDDED_DEFAULT_END}")
    body = (
        f"<!-- written by benchmarks/report.py from benchmarks/results/{EMBEDDED_DEFAULT}: "
        "change the figures there and run it, not here -->\n\n"
        f"{embedded_default_table(measured)}\n\n"
    )
    return f"{readme[: begin + len(EMBEDDED_DEFAULT_BEGIN)]}\n{body}{readme[end:]}"


def write_embedded_default_table(readme: Path, measured: dict) -> bool:
    """Rewrite ``readme``'s table in place; whether it changed."""
    text = readme.read_text(encoding="utf-8")
    new = with_embedded_default_table(text, measured)
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


STUDY_NOTES = HERE / "study_notes.md"
"""The reading of the study's results, written by hand; appended to its section."""


def study_section(study: dict, results: Path, out_dir: Path) -> list[str]:
    """``study.py``'s summary (mean over seeds, min-max), its plots and the reading written by hand."""
    s = study.get("settings", {})
    done = len(study.get("runs", []))
    state = (
        "complete"
        if study.get("complete")
        else f"in progress: {done} run(s) finished so far (the study resumes where it stopped)"
    )
    lines = [
        "## The paper's claims at small scale (`study.py`)",
        "",
        f"{environment_line(study['environment'])}. Status: {state}.",
        "",
        (
            f"Student `{s.get('student')}` after {s.get('init_steps')} steps of sft; {s.get('train_prompts')} "
            f"training prompts x {s.get('epochs')} epochs ({s.get('steps')} steps of 8), evaluated once per epoch on "
            f"{s.get('val_prompts')} validation prompts; the first runs at lr 5e-4 (cosine, warmup {s.get('warmup')}) "
            f"for every recipe, not tuned; rows named `<recipe>@lr<rate>` at other rates (all rates run: "
            f"{s.get('lr_grid')}); ROUGE-L on {s.get('rouge_samples')} prompts, greedy "
            f"and sampled ({s.get('draws')} draws at temperature 1); {s.get('threads') or 'default'} torch thread(s)."
        ),
        "",
    ]
    from study import summary_lines

    rows = summary_lines(study.get("summary", []))
    runs = study.get("runs", [])
    if runs:
        start = runs[0]["before"]
        lines += [
            f"The shared start (after its sft): val CE {start.get('val_loss', float('nan')):.3f}, token KL "
            f"{start.get('val_kl', float('nan')):.3f}.",
            "",
        ]
    lines += [markdown_table(rows), ""]
    lines += image(results, out_dir, "study_quality.png", "quality against training seconds")
    lines += image(results, out_dir, "study_distillm.png", "distillm: φ and step sources")
    if STUDY_NOTES.is_file():
        lines += [STUDY_NOTES.read_text().strip(), ""]
    return lines


CROSS_NOTES = HERE / "cross_tokenizer_notes.md"
"""The reading of cross_tokenizer.py's results, written by hand; appended to its section."""


def cross_cost_table(cost: dict) -> list[str]:
    """The step-cost part of a ``cross_tokenizer.py`` results file, as lines of markdown."""
    rows = [["case", "s/step", "x one-tokenizer kd", "tokens/step"]]
    for name, row in cost["cases"].items():
        rows.append(
            [
                name,
                f"{row['seconds_per_step']:.2f}",
                f"{row['x_kd_one_tokenizer']:.2f}",
                f"{row['tokens_per_step']:.0f}",
            ]
        )
    return [
        f"Step cost ({cost['steps']} steps after {cost['warmup']}; target <= {cost['target']}x the one-tokenizer "
        "`kd` step, the teacher into `prune:15`):",
        "",
        markdown_table(rows),
        "",
    ]


def cross_tokenizer_section(cross: dict, others: dict[str, dict] | None = None) -> list[str]:
    """``cross_tokenizer.py``: the shared tokens, the loss's memory, the step cost and the quality runs;
    ``others``: more results files of it by name (``cross_tokenizer-avx2.json``: the cost on the AVX2
    path), whose step cost follows with their own machine line."""
    lines = ["## Teachers with another tokenizer (`cross_tokenizer.py`)", ""]
    if cross.get("environment"):
        lines += [f"{environment_line(cross['environment'])}.", ""]
    vocab = cross.get("map")
    if vocab:
        lines += [
            f"The pair: the teacher's {vocab['teacher_vocab']:,} tokens against the student's "
            f"{vocab['student_vocab']:,}; "
            f"{vocab['matched_exact']:,} token strings in both (GOLD's exact match), "
            f"{vocab['more_when_normalised']:,} more with the space markers written alike.",
            "",
        ]
    memory = cross.get("memory")
    if memory and memory.get("ratio") is not None:
        lines += [
            f"Loss memory at {memory['positions']:,} response positions (forward and backward, tensors alive at "
            f"once): {memory['cross_vocabulary_peak_mib']:.0f} MiB across vocabularies (`uld_hybrid`) against "
            f"{memory['same_tokenizer_peak_mib']:.0f} MiB for `skew_kl` over the larger vocabulary on both sides: "
            f"{memory['ratio']:.2f}x (target <= {memory['target']}x): {verdict(memory['ratio'] <= memory['target'])}.",
            "",
        ]
    cost = cross.get("cost")
    if cost:
        lines += cross_cost_table(cost)
    for name, other in (others or {}).items():
        if other.get("cost"):
            where = f": {environment_line(other['environment'])}" if other.get("environment") else ""
            lines += [f"`results/{name}`{where}.", "", *cross_cost_table(other["cost"])]
    quality = (cross.get("quality") or {}).get("summary") or {}
    if quality:
        rows = [["case", "seeds", "ROUGE-L", "CE on the teacher's answers", "s/step", "steps on student outputs"]]
        for name, row in quality.items():
            cells = []
            for key, fmt in (("rouge_l", "{:.1f}"), ("val_ce", "{:.3f}"), ("seconds_per_step", "{:.1f}")):
                value = row.get(key)
                if value is None:
                    cells.append("-")
                    continue
                lo, hi = value["range"]
                cells.append(
                    fmt.format(value["mean"])
                    + (f" ({fmt.format(lo)}-{fmt.format(hi)})" if len(row["seeds"]) > 1 else "")
                )
            own = row.get("student_output_steps")
            own_cell = ", ".join("?" if n is None else str(n) for n in own) if own else "-"
            rows.append([name, ",".join(map(str, row["seeds"])), *cells, own_cell])
        lines += [
            "Quality at equal steps (mean over seeds, min-max; steps on student outputs: each seed's, fresh or "
            "replayed):",
            "",
            markdown_table(rows),
            "",
        ]
    if CROSS_NOTES.is_file():
        lines += [CROSS_NOTES.read_text().strip(), ""]
    return lines


def teacher_cache_section(step_runs: dict[str, dict], quality_runs: dict[str, dict]) -> list[str]:
    """``teacher_cache.py``'s results: every ``teacher_cache_steps*.json`` (bytes per token, the cached
    step against the live one) and ``teacher_cache_quality*.json`` (full-vocabulary val KL after the
    same run trained either way), each with its machine, date and verdict against the targets."""
    lines = [
        "## Offline teacher (`teacher_cache.py`)",
        "",
        (
            "Each file is one run; its ratios are measured within it (cases alternating), but a "
            "shared machine's load changes them from run to run: the quietest run is the better guide."
        ),
        "",
    ]
    for name, run in step_runs.items():
        targets, cache = run.get("targets", {}), run.get("cache", {})
        lines += [f"`results/{name}`: {environment_line(run['environment'])}.", ""]
        rows = [
            [
                "recipe",
                "live s/step",
                "cached s/step",
                "ratio (mean)",
                "ratio (median)",
                f"target <= {targets.get('step_ratio')}x",
            ]
        ]
        for r in run.get("recipes", []):
            rows.append(
                [
                    r["recipe"],
                    f"{r['live_mean']:.2f}",
                    f"{r['cache_mean']:.2f}",
                    f"{r['ratio_mean']:.2f}x",
                    f"{r['ratio_median']:.2f}x",
                    verdict(r["ratio_mean"] <= targets.get("step_ratio", 0)),
                ]
            )
        per_token = cache.get("bytes_per_token", float("nan"))
        gflop = run["floor"]["gflop_per_sequence"] if run.get("floor") else {}
        lines += [
            markdown_table(rows),
            "",
            *(
                [
                    f"Compute floor: by matmul FLOPs per training sequence a cached step costs at least "
                    f"{run['floor']['cached_over_live']:.3f}x the live one (teacher forward "
                    f"{gflop['teacher_forward']:.1f} GFLOP, student forward and backward "
                    f"{gflop['student_forward'] + gflop['student_backward']:.1f}).",
                    "",
                ]
                if run.get("floor")
                else []
            ),
            (
                f"{run.get('rounds')} round(s) x {run.get('steps_timed')} timed steps after "
                f"{run.get('warmup')} warm-up step(s) per case, live and cached alternating. Cache: K = "
                f"{cache.get('top_k')}, {cache.get('tokens', 0):,} response tokens, {per_token:.1f} bytes "
                f"per token (target <= {targets.get('bytes_per_token_k64')} at K = 64: "
                f"{verdict(per_token <= targets.get('bytes_per_token_k64', 0))})."
            ),
            "",
        ]
    for name, run in quality_runs.items():
        live, cached = run["live"], run["cached"]
        limit = run.get("targets", {}).get("val_kl_relative", 0.03)
        relative = run["relative_difference"]
        lines += [
            (
                f"`results/{name}`: {environment_line(run['environment'])}. After {live.get('steps')} steps, the "
                f"full-vocabulary val KL on {live.get('examples')} validation answers: live teacher "
                f"{live['val_kl_full']:.3f}, K = 64 cache {cached['val_kl_full']:.3f} nats per token "
                f"({100 * relative:+.1f}%; target within {100 * limit:.0f}%: {verdict(abs(relative) <= limit)}); "
                f"val CE {live.get('val_loss', float('nan')):.3f} and {cached.get('val_loss', float('nan')):.3f}."
            ),
            "",
        ]
    return lines


def render(
    steps: dict[str, dict],
    quality: dict | None,
    memory: dict | None,
    results: Path,
    out_dir: Path,
    study: dict | None = None,
    cache: tuple[dict[str, dict], dict[str, dict]] = ({}, {}),
    default_quality: dict | None = None,
    cross: dict | None = None,
    cross_others: dict[str, dict] | None = None,
) -> str:
    """``steps``: step_cost results by label ("" for ``step_cost.json``, ", AVX2 path" for
    ``step_cost-avx2.json``: the same benchmark without native bf16)."""
    lines = [
        "# Benchmark results",
        "",
        (
            "Written by `benchmarks/report.py` from `benchmarks/results/*.json`; regenerate everything with "
            "`.venv/bin/python benchmarks/report.py --run` (see `benchmarks/report.py`)."
        ),
        "",
    ]
    lines += targets_section(steps, quality, memory, default_quality)
    for label, step in steps.items():
        lines += step_cost_section(step, results, out_dir, label)
    if quality:
        lines += quality_section(quality, results, out_dir)
    if memory:
        lines += [
            "## Divergence memory (`divergence_memory.py`)",
            "",
            (
                f"{memory.get('cpu_count')} cores, {memory.get('threads')} threads, torch "
                f"{memory.get('torch')}, {memory.get('device')}, {memory.get('wall_seconds', 0) / 60:.0f} "
                "min; the full tables are in `results/divergence_memory.json`."
            ),
            "",
        ]
    if NOTES.is_file():  # the maintainers' reading of the last full run, written by hand
        lines += [NOTES.read_text().strip(), ""]
    if cache[0] or cache[1]:
        lines += teacher_cache_section(*cache)
    if default_quality:
        lines += default_quality_section(default_quality)
    if study:
        lines += study_section(study, results, out_dir)
    if cross:
        lines += cross_tokenizer_section(cross, cross_others)
    return "\n".join(lines)


STEP_COST_FILES = {"": "step_cost.json", ", without native bf16 (AVX2 path)": "step_cost-avx2.json"}
"""step_cost results and their section labels: ``step_cost-avx2.json`` is step_cost.py run with
``--output benchmarks/results/step_cost-avx2.json`` on a CPU without native bf16, or under
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``."""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run step_cost.py and quality_budget.py first")
    parser.add_argument("--memory", action="store_true", help="with --run: also divergence_memory.py (its full grid)")
    parser.add_argument("--steps", type=int, default=10, help="step_cost.py --steps")
    parser.add_argument("--warmup", type=int, default=2, help="step_cost.py --warmup")
    parser.add_argument(
        "--budget", type=float, default=300.0, help="quality_budget.py --budget (training seconds per recipe)"
    )
    parser.add_argument("--evals", type=int, default=10, help="quality_budget.py --evals")
    parser.add_argument("--threads", type=int, help="torch threads in every benchmark")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the JSON results")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--readme", type=Path, default=README, help=f"the README whose table is written from {EMBEDDED_DEFAULT}"
    )
    args = parser.parse_args(argv)
    if args.run:
        run_benchmarks(args)
    steps = {
        label: found for label, name in STEP_COST_FILES.items() if (found := load(args.results / name)) is not None
    }
    quality, memory = load(args.results / "quality_budget.json"), load(args.results / "divergence_memory.json")
    if not steps and quality is None:
        raise SystemExit(f"no step_cost.json or quality_budget.json in {args.results}; run with --run")
    study = load(args.results / "study.json")
    cache = tuple(
        {
            path.name: found
            for path in sorted(args.results.glob(f"teacher_cache_{kind}*.json"))
            if (found := load(path)) is not None
        }
        for kind in ("steps", "quality")
    )
    default_quality = load(args.results / "default_quality.json")
    cross = load(args.results / "cross_tokenizer.json")
    cross_others = {
        path.name: found
        for path in sorted(args.results.glob("cross_tokenizer-*.json"))
        if (found := load(path)) is not None
    }
    args.output.write_text(
        render(
            steps,
            quality,
            memory,
            args.results,
            args.output.resolve().parent,
            study,
            cache,
            default_quality,
            cross,
            cross_others,
        )
    )
    print(f"wrote {args.output}")
    embedded_default = load(args.results / EMBEDDED_DEFAULT)
    if embedded_default is not None and write_embedded_default_table(args.readme, embedded_default):
        print(f"wrote the embedded default's table in {args.readme}")
    return args.output


if __name__ == "__main__":
    main()
