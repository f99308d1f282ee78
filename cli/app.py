"""``distill`` commands. User errors become one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import json
import sys
import time
from enum import Enum
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

import distill
from distill.cli.listing import TABLE_MIN_WIDTH, listing_json, plain_lines, render_blocks, render_listing

app = typer.Typer(
    name="distill",
    help="Knowledge distillation for language models: divergences x sampling policies (DistiLLM and baselines).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"distill {distill.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Knowledge distillation for language models."""


def user_errors(command):
    """Turn a DistillError into one red line on stderr and exit code 2 (no traceback); a stopped
    run exits with its own code (130 Ctrl-C, 143 SIGTERM, 3 non-finite loss)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except distill.DistillError as error:
            raise typer.Exit(_print_error(error)) from None
        except KeyboardInterrupt:  # before training starts, or a second Ctrl-C
            errors.print("[bold red]interrupted[/]", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _print_error(error: Exception) -> int:
    """Print ``error`` as one line on stderr; return the exit code (2 for a user error)."""
    label = "stopped" if isinstance(error, distill.RunStopped) else "error"
    errors.print(f"[bold red]{label}:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    return getattr(error, "exit_code", 2)


class Kind(str, Enum):
    divergences = "divergences"
    policies = "policies"
    sequence_terms = "sequence-terms"
    recipes = "recipes"


@app.command("run")
@user_errors
def run(
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML, TOML or JSON config file."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Preset (distill list recipes); default distillm."),
    divergence: Optional[str] = typer.Option(None, "--divergence", help="Divergence name (distill list divergences)."),
    divergence_params: list[str] = typer.Option([], "-D", help="Divergence parameter key=value (repeatable)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Sampling policy name (distill list policies)."),
    policy_params: list[str] = typer.Option([], "-P", help="Policy parameter key=value (repeatable)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model directory or hub id."),
    teacher_cache: Optional[str] = typer.Option(
        None,
        "--teacher-cache",
        help="A folder from distill cache-teacher: dataset steps read it instead of running the teacher.",
    ),
    student: Optional[str] = typer.Option(None, "--student", help="Student model directory or hub id."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Training data (JSON Lines with prompt/response or messages)."
    ),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Where the run's files go."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    settings: list[str] = typer.Option([], "--set", help="Any config key: dotted.key=value (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous run in --output-dir."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --output-dir from its newest checkpoint, with its saved config."
    ),
) -> None:
    """Distil a teacher into a student. Precedence: recipe < config file < flags."""
    from transformers.utils import logging as hf_logging

    from distill.cli.run_cmd import make_reporter, summary_table
    from distill.engine import train
    from distill.resolve import flag_layer, plan_run, resolve_resume, resolve_run

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    flags = flag_layer(
        recipe=recipe,
        divergence=divergence,
        divergence_params=divergence_params,
        policy=policy,
        policy_params=policy_params,
        teacher=teacher,
        teacher_cache=teacher_cache,
        student=student,
        data=data,
        output_dir=output_dir,
        max_steps=max_steps,
        seed=seed,
        settings=settings,
    )
    if resume and overwrite:
        raise distill.ConfigError(
            "--resume continues the run in --output-dir, --overwrite replaces it; pass one of them"
        )
    resolved = resolve_resume(config, flags) if resume else resolve_run(config, flags)
    plan = plan_run(resolved)  # every plugin's params checked, once: a bad value is one line naming the flag's key
    reporter = make_reporter(console, resolved.train.max_steps)
    try:
        result = train(plan, report=reporter, overwrite=overwrite, resume=resume)
    finally:
        reporter.close()
    if result.main_process:  # under `accelerate launch`, one summary
        console.print(summary_table(result, wall_seconds=time.perf_counter() - started))


@app.command("cache-teacher")
@user_errors
def cache_teacher(
    output_dir: Optional[str] = typer.Option(
        None, "--output-dir", "-o", help="Folder for the cache (manifest.json and parts/)."
    ),
    top_k: int = typer.Option(
        64, "--top-k", help="Teacher log-probs kept per response position (the rest is one outcome)."
    ),
    config: Optional[str] = typer.Option(
        None, "--config", "-c", help="YAML, TOML or JSON config (its teacher, tokenizer, data and seed)."
    ),
    teacher: Optional[str] = typer.Option(
        None, "--teacher", help="Teacher model directory or hub id (default: the embedded default's)."
    ),
    data: Optional[str] = typer.Option(
        None, "--data", help="Training data (JSON Lines with prompt/response or messages)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the validation split (as distill run --seed)."),
    temperature: float = typer.Option(
        1.0, "--temperature", help="Divides the teacher's logits (a run's divergence.temperature must match)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Sequences per teacher forward."),
    settings: list[str] = typer.Option(
        [], "--set", help="Any config key, e.g. data.max_response_tokens=128 (repeatable)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a cache in --output-dir (its own files only; nothing else is removed)."
    ),
    verify: Optional[str] = typer.Option(
        None, "--verify", help="Check every part of the cache in this folder against its checksums, and exit."
    ),
) -> None:
    """Run the teacher once over the data's responses and store its top-K log-probs per position,
    for distill run --teacher-cache. Interrupted, the same command continues it. With --verify DIR:
    check a cache, name each damaged part (exit code 1), and exit."""
    from transformers.utils import logging as hf_logging

    from distill.cli.cache_cmd import manifest_table
    from distill.cli.run_cmd import make_reporter
    from distill.resolve import flag_layer, resolve_cache
    from distill.teacher_cache import build_cache, verify_cache

    if verify is not None:
        problems = verify_cache(verify)
        for problem in problems:
            errors.print(f"[bold red]damaged:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        if problems:
            raise typer.Exit(1)
        console.print(f"{verify}: every part matches its checksums", highlight=False, soft_wrap=True)
        return
    if output_dir is None:
        raise distill.ConfigError("cache-teacher needs --output-dir DIR (or --verify DIR to check a cache)")

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    flags = flag_layer(teacher=teacher, data=data, seed=seed, settings=settings)
    resolved = resolve_cache(config, flags)
    reporter = make_reporter(console, 0)
    try:
        manifest = build_cache(
            resolved,
            output_dir,
            top_k=top_k,
            temperature=temperature,
            batch_size=batch_size,
            overwrite=overwrite,
            progress=lambda phase, done, total: reporter("progress", {"phase": phase, "done": done, "total": total}),
            report=lambda message: console.print(message, soft_wrap=True, highlight=False),
        )
    finally:
        reporter.close()
    if manifest is not None:  # the main process (under accelerate launch)
        console.print(manifest_table(manifest, output_dir, time.perf_counter() - started))


@app.command("prepare-pairs")
@user_errors
def prepare_pairs_command(
    output_dir: str = typer.Option(..., "--output-dir", "-o", help="Folder for the pairs (manifest.json and parts/)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="The run's YAML, TOML or JSON config."),
    recipe: Optional[str] = typer.Option(
        None, "--recipe", "-r", help="The run's recipe (its generation.train settings sample the pairs)."
    ),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model directory or hub id."),
    student: Optional[str] = typer.Option(None, "--student", help="The initial student: directory or hub id."),
    data: Optional[str] = typer.Option(
        None, "--data", help="Training data (JSON Lines with prompt/response or messages)."
    ),
    seed: Optional[int] = typer.Option(None, "--seed", help="The run's seed: its split and the samples' seeds."),
    settings: list[str] = typer.Option([], "--set", help="Any config key: dotted.key=value (repeatable)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Prompts per generation batch."),
    part_prompts: int = typer.Option(
        64, "--part-prompts", min=1, help="Prompts per part file (an interrupted command loses at most one part)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace pairs in --output-dir (their own files only; nothing else is removed)."
    ),
) -> None:
    """Sample, once, the teacher's and the initial student's response to every training prompt, for
    distill run --recipe distillm2 -P pairs=DIR (DistiLLM-2's official schedule). Takes the run's
    flags; interrupted, the same command continues it."""
    from transformers.utils import logging as hf_logging

    from distill.cli.run_cmd import make_reporter
    from distill.pairs import prepare_pairs
    from distill.resolve import flag_layer, resolve_run

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    flags = flag_layer(recipe=recipe, teacher=teacher, student=student, data=data, seed=seed, settings=settings)
    resolved = resolve_run(config, flags)
    reporter = make_reporter(console, 0)
    try:
        manifest = prepare_pairs(
            resolved,
            output_dir,
            batch_size=batch_size,
            part_prompts=part_prompts,
            overwrite=overwrite,
            progress=lambda phase, done, total: reporter("progress", {"phase": phase, "done": done, "total": total}),
            report=lambda message: console.print(message, soft_wrap=True, highlight=False),
        )
    finally:
        reporter.close()
    if manifest is not None:
        tokens = manifest["response_tokens"]
        sampling = ", ".join(f"{k} {v}" for k, v in manifest["sampling"].items())
        console.print(
            f"{manifest['pairs']:,} pairs ({tokens['teacher']:,} teacher and {tokens['student']:,} student response "
            f"tokens; {sampling}) in {time.perf_counter() - started:.1f} s: {output_dir}",
            soft_wrap=True,
            highlight=False,
        )


@app.command("eval")
@user_errors
def evaluate(
    model: Optional[str] = typer.Option(None, "--model", help="Model directory (e.g. a run's final/) or reference."),
    teacher: str = typer.Option("smollm2-135m-instruct", "--teacher", help="Teacher reference."),
    data: str = typer.Option("builtin:val", "--data", help="Prompts with reference responses (JSON Lines)."),
    rouge_samples: int = typer.Option(64, "--rouge-samples", help="Prompts answered greedily for ROUGE-L (0 = none)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Answer length cap for ROUGE-L."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
    metrics: list[str] = typer.Option(
        ["rouge_l"], "--metric", help="Scores of the answers: rouge_l, bleu (corpus BLEU, sacrebleu); repeatable."
    ),
    hypotheses: Optional[str] = typer.Option(
        None, "--hypotheses", help="Score this text file's lines against --references instead of a model's answers."
    ),
    references: Optional[str] = typer.Option(None, "--references", help="With --hypotheses: one reference a line."),
) -> None:
    """Validation CE, token-level KL to the teacher and ROUGE-L of greedy answers (and BLEU with
    --metric bleu); or, with --hypotheses and --references, the scores of two text files."""
    from transformers.utils import logging as hf_logging

    from distill.cli.eval_cmd import result_table, score_files, write_json
    from distill.cli.run_cmd import make_reporter
    from distill.evaluation import METRICS, evaluate_model

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise distill.ConfigError(f"--metric {unknown[0]}: one of {', '.join(METRICS)}")
    if (hypotheses is None) != (references is None):
        raise distill.ConfigError("--hypotheses and --references go together (one line of text each)")
    if hypotheses is not None:
        result = score_files(hypotheses, references, metrics)
        console.print(write_json(json_path, {"hypotheses": hypotheses, "references": references, **result}))
        return
    if model is None:
        raise distill.ConfigError("eval needs --model DIR (or --hypotheses FILE --references FILE to score two files)")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    reporter = make_reporter(console, 0)  # validation and ROUGE-L passes: a bar, or plain lines off a terminal
    try:
        result = evaluate_model(
            model,
            teacher,
            data,
            rouge_samples=rouge_samples,
            max_new_tokens=max_new_tokens,
            progress=lambda phase, done, total: reporter("progress", {"phase": phase, "done": done, "total": total}),
            metrics=tuple(metrics),
        )
    finally:
        reporter.close()
    console.print(result_table(model, result))
    console.print(write_json(json_path, {"model": model, "teacher": teacher, "data": data, **result}), highlight=False)


@app.command("list")
@user_errors
def list_plugins(
    kind: Optional[Kind] = typer.Argument(None, help="Show only divergences, policies, sequence-terms or recipes."),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON: names, aliases, providers, parameters with defaults and ranges."
    ),
) -> None:
    """Show installed divergences, sampling policies and recipes, with parameters and providers.
    A table on a terminal (one block per plugin below 100 columns), one line per plugin when piped."""
    registry = distill.default_registry()
    kinds = [kind.value] if kind else [k.value for k in Kind]
    if as_json:
        typer.echo(json.dumps(listing_json(registry, kinds), indent=2))
        return
    for name in kinds:
        if not console.is_terminal:  # piped or redirected: greppable lines, a title line only between kinds
            if len(kinds) > 1:
                typer.echo(f"# {name}")
            for line in plain_lines(registry, name):
                typer.echo(line)
        elif console.width >= TABLE_MIN_WIDTH:
            console.print(render_listing(registry, name))
        else:
            console.print(render_blocks(registry, name))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. Usage mistakes that click catches (an unknown option, a value of
    the wrong type, a missing argument) are one line too, with exit code 2."""
    click = _click_exceptions()
    try:
        code = app(args=argv, prog_name="distill", standalone_mode=False)
    except click.NoArgsIsHelpError as usage:  # plain `distill`: the help, as before
        console.print(usage.ctx.get_help() if usage.ctx else usage.format_message(), highlight=False, markup=False)
        sys.exit(0)
    except click.UsageError as usage:
        command = usage.ctx.command_path if usage.ctx else "distill"
        sys.exit(_print_error(distill.ConfigError(f"{usage.format_message()} (see {command} --help)")))
    except click.ClickException as failure:  # e.g. a file option that cannot be opened
        sys.exit(_print_error(distill.ConfigError(failure.format_message())))
    except (getattr(click, "Abort", typer.Abort), typer.Abort):  # typer's own click copy has no Abort
        errors.print("[bold red]interrupted[/]", highlight=False)
        sys.exit(130)
    except distill.DistillError as error:
        sys.exit(_print_error(error))
    sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions():
    """click's exception classes as this typer raises them (typer 0.2x carries its own click copy)."""
    try:
        from typer._click import exceptions
    except ImportError:  # older typer: the click package
        from click import exceptions
    return exceptions
