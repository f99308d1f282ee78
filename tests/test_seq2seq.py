"""Encoder-decoder models (#31): T5 and BART pairs through the same plugins. The prompt is the
encoder's input, the response the decoder's labels; generation runs through transformers' generate."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from cli_runs import cache_cli, pair_args, read_jsonl, run_cli, sets
from distill import default_registry
from distill.config import DataConfig
from distill.data import collate, load_examples
from distill.models import decoder_start, load_model, load_tokenizer
from distill.objective import micro_batch_loss
from test_multiprocess import launch
from tiny_models import make_seq2seq_pair

SMALL = sets("train.batch_size=4", "eval.batch_size=8", "generation.max_new_tokens=6", "eval.rouge_samples=2")


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return make_seq2seq_pair(tmp_path_factory.mktemp("t5"), "t5")


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    return make_seq2seq_pair(tmp_path_factory.mktemp("bart"), "bart")


def test_an_encoder_decoder_folder_loads_whole(bart):
    """BART would load as BartForCausalLM (its decoder alone) through the causal-LM class."""
    model = load_model(str(bart["teacher"]), "teacher")
    assert type(model).__name__ == "BartForConditionalGeneration" and decoder_start(model) == 0


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_the_loss_of_one_batch_equals_a_float64_computation_from_both_models_full_logits(t5, bart, kind):
    pair = {"t5": t5, "bart": bart}[kind]
    tokenizer = load_tokenizer(str(pair["teacher"]))
    teacher, student = (load_model(str(pair[r]), r).eval() for r in ("teacher", "student"))
    train, _, _ = load_examples(DataConfig(path=str(pair["data"])), tokenizer, 0)
    examples = train[:5]
    batch = collate(examples, tokenizer.pad_token_id, decoder_start(student))
    assert batch.encoder_ids.shape[0] == 5 and bool((batch.input_ids[:, 0] == 0).all())
    divergence = default_registry().get_divergence("skew_kl", alpha=0.1)
    loss, _ = micro_batch_loss(student, teacher, batch, divergence, batch.n_tokens, 0.5)

    with torch.no_grad():  # the same from the models' own forward, in float64, token by token
        total, count = 0.0, 0
        for e in examples:
            enc = torch.tensor([e.prompt_ids])
            dec = torch.tensor([[0, *e.response_ids[:-1]]])
            q = student.double()(input_ids=enc, decoder_input_ids=dec).logits[0].log_softmax(-1)
            p = teacher.double()(input_ids=enc, decoder_input_ids=dec).logits[0].log_softmax(-1)
            mix = torch.logaddexp(p + math.log(0.1), q + math.log(0.9))
            kl = (p.exp() * (p - mix)).sum(-1)
            ce = -q.gather(-1, torch.tensor(e.response_ids)[:, None])[:, 0]
            total += float((kl + 0.5 * ce).sum())
            count += len(e.response_ids)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(
    "kind, recipe",
    [("t5", r) for r in ("kd", "seqkd", "imitkd", "gkd", "distillm", "distillm2", "rkl_onpolicy", "minillm")]
    + [("bart", r) for r in ("kd", "seqkd", "imitkd", "gkd", "distillm", "distillm2", "rkl_onpolicy", "minillm")],
)
def test_every_recipe_runs_on_an_encoder_decoder_pair(t5, bart, tmp_path, kind, recipe):
    from transformers import AutoModelForSeq2SeqLM

    pair = {"t5": t5, "bart": bart}[kind]
    extra = ["-P", "init_prob=0.5"] if recipe == "distillm" else []
    result = run_cli(pair, tmp_path / "run", "--recipe", recipe, *extra, "--max-steps", "3", *SMALL)
    assert result.exit_code == 0, result.output
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)
    if recipe in ("gkd", "rkl_onpolicy", "seqkd"):
        assert any(m["source"] in ("student", "teacher") for m in metrics)
    if recipe == "minillm":  # one collection of teacher-mixed samples, trained on for each of the 3 steps
        assert [m["source"] for m in metrics] == ["mixed"] * 3 and [m["collection_use"] for m in metrics] == [1, 2, 3]
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert "rouge_l" in evals[-1] and "val_kl" in evals[-1]
    model, info = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_teacher_mixed_decoding_of_encoder_decoders_records_the_models_own_log_probs(t5, bart, kind, alpha):
    """MiniLLM's decode loop over two encoder-decoders (the encoder once, the decoder from its start id
    with its cache): every recorded log p and log q is the model's own at the sampled token, as a
    forward of the whole decoded sequence gives it, also for rows that ended early (their cache and
    encoder rows dropped from the batch)."""
    from distill.data import collate_prompts
    from distill.generation import TokenPicker, decode_mixed

    pair = {"t5": t5, "bart": bart}[kind]
    tokenizer = load_tokenizer(str(pair["teacher"]))
    teacher, student = (load_model(str(pair[r]), r).eval() for r in ("teacher", "student"))
    train, _, _ = load_examples(DataConfig(path=str(pair["data"])), tokenizer, 0)
    examples = train[:4]
    ids, attention = collate_prompts(examples, tokenizer.pad_token_id, right=True)
    assert not bool(attention.all())  # prompts of different lengths: the encoder's padding is exercised
    pick = TokenPicker(1.0, 0, 1.0, len(tokenizer))
    common = [t for t in range(len(tokenizer)) if t != tokenizer.pad_token_id]
    for seed in range(20):  # until some row stops before another (a stop id among frequent tokens)
        torch.manual_seed(seed)
        with torch.no_grad():
            tokens, records = decode_mixed(student, teacher, ids, attention, alpha, pick, 8, common[:20], -1)
        ended = [(row == -1).any().item() for row in tokens]
        if any(ended) and not all(ended):
            break
    assert any(ended) and not all(ended)
    log_p, log_q, w = records
    live = tokens != -1
    mixture = alpha * log_p.exp() + (1 - alpha) * log_q.exp()
    assert torch.allclose(w[live], (log_q.exp() / mixture)[live], rtol=1e-5) and bool((w[~live] == 0).all())
    start = decoder_start(student)
    for row in range(tokens.shape[0]):
        response = tokens[row][tokens[row] != -1]
        n = len(response)
        enc, mask = ids[row : row + 1], attention[row : row + 1]
        decoder = torch.tensor([[start, *response[:-1].tolist()]])
        for model, recorded in ((student, log_q), (teacher, log_p)):
            with torch.no_grad():
                logits = model(input_ids=enc, attention_mask=mask, decoder_input_ids=decoder).logits[0]
            own = logits[:, : len(tokenizer)].float().log_softmax(-1).gather(-1, response[:, None])[:, 0]
            assert torch.allclose(own, recorded[row, :n], atol=1e-4)
            assert bool((recorded[row, n:] == 0).all())


def test_an_encoder_decoder_run_resumes_exactly(t5, tmp_path):
    common = ["--recipe", "gkd", "--max-steps", "6", *SMALL, *sets("checkpoint.every=3", "eval.every=0")]
    assert run_cli(t5, tmp_path / "straight", *common).exit_code == 0
    out = tmp_path / "resumed"
    assert run_cli(t5, out, *common).exit_code == 0
    for later in ("checkpoints/step-6", "final"):
        shutil.rmtree(out / later)
    again = run_cli(t5, out, *common, "--resume")
    assert again.exit_code == 0, again.output
    ours, theirs = read_jsonl(out / "metrics.jsonl"), read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert [m["source"] for m in ours] == [m["source"] for m in theirs]
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=0, abs=1e-6)


def test_an_encoder_decoder_run_on_two_processes(t5, tmp_path):
    out = tmp_path / "run"
    launch(["-m", "distill", "run", *pair_args(t5, out), "--recipe", "gkd", "--max-steps", "3", *SMALL])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert len(metrics) == 3 and all(math.isfinite(m["loss"]) for m in metrics)


def test_a_teacher_cache_of_an_encoder_decoder_gives_the_live_losses(t5, tmp_path):
    assert cache_cli(t5, tmp_path / "cache", "--top-k", "300").exit_code == 0
    common = ["--recipe", "kd", "--max-steps", "3", *SMALL, *sets("eval.every=0", "eval.rouge_samples=0")]
    cached = run_cli(t5, tmp_path / "cached", *common, "--teacher-cache", str(tmp_path / "cache"))
    assert cached.exit_code == 0, cached.output
    assert run_cli(t5, tmp_path / "live", *common).exit_code == 0
    ours, theirs = read_jsonl(tmp_path / "cached" / "metrics.jsonl"), read_jsonl(tmp_path / "live" / "metrics.jsonl")
    assert [m["loss"] for m in ours] == pytest.approx([m["loss"] for m in theirs], rel=1e-3)  # float16 storage


@pytest.mark.parametrize(
    "args, words",
    [
        (
            ["--recipe", "kd", "--student", "{decoder}"],
            "the teacher is an encoder-decoder and the student a decoder-only",
        ),
    ],
)
def test_bad_input_with_encoder_decoders_is_one_line_and_writes_nothing(t5, tiny, tmp_path, args, words):
    args = [str(tiny["student"]) if a == "{decoder}" else a for a in args]
    student = args[args.index("--student") + 1] if "--student" in args else None
    if student:
        args = args[: args.index("--student")] + args[args.index("--student") + 2 :]
    result = run_cli(t5, tmp_path / "run", *args, "--max-steps", "1", *SMALL, student=student)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_prune_keeps_evenly_spaced_layers_of_each_stack(tmp_path, kind):
    """A 3-layer teacher: prune:2 keeps decoder layers 0 and 2 (renumbered 0 and 1), encoder_layers 1
    keeps encoder layer 0; every other weight is the teacher's."""
    from distill.config import ModelSpec
    from tiny_models import make_seq2seq_model

    teacher = make_seq2seq_model(tmp_path / "teacher", 300, 3, kind, seed=4)
    student = load_model(ModelSpec(ref="prune:2", encoder_layers=1), "student", teacher=teacher)
    assert type(student) is type(teacher)
    enc, dec = {"t5": ("encoder.block", "decoder.block"), "bart": ("model.encoder.layers", "model.decoder.layers")}[
        kind
    ]
    assert len(student.get_submodule(enc)) == 1 and len(student.get_submodule(dec)) == 2
    theirs = dict(teacher.named_parameters())
    for name, weight in student.named_parameters():
        source = name.replace(f"{dec}.1.", f"{dec}.2.")  # the kept layers 0 and 2 are the student's 0 and 1
        assert torch.equal(weight, theirs[source]), name
    with pytest.raises(Exception, match="keep must be between 1 and 3"):
        load_model(ModelSpec(ref="prune:4"), "student", teacher=teacher)


def test_prune_above_a_stacks_depth_is_one_line_and_writes_nothing(t5, tmp_path):
    result = run_cli(t5, tmp_path / "run", "--recipe", "kd", "--max-steps", "1", *SMALL, student="prune:3")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "keep must be between 1 and 2" in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_bleu_of_two_files_is_what_sacrebleus_command_line_prints(tmp_path):
    """Corpus-level BLEU, sacrebleu's default tokenizer, one reference a line, in order."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from cli_runs import runner
    from distill.cli import app

    hyps = ["the cat sat on the mat", "hello there general kenobi", "a b c d e f", "summarize: nothing here"]
    refs = ["the cat is on the mat", "hello there", "a b c d e g", "nothing is here at all"]
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
    args = ["eval", "--hypotheses", str(tmp_path / "hyp.txt"), "--references", str(tmp_path / "ref.txt")]
    result = runner.invoke(app, [*args, "--metric", "bleu", "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "out.json").read_text())["bleu"]
    tool = Path(sys.executable).with_name("sacrebleu")
    printed = subprocess.run(
        [str(tool), str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"), "-b", "-w", "4"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert round(ours, 4) == float(printed)
    swapped = runner.invoke(
        app,
        [
            "eval",
            "--hypotheses",
            str(tmp_path / "ref.txt"),
            "--references",
            str(tmp_path / "hyp.txt"),
            "--metric",
            "bleu",
        ],
    )
    assert json.loads(swapped.output)["bleu"] != pytest.approx(ours)  # the order of hypotheses and references counts


def test_a_run_reports_bleu_when_asked_and_refuses_it_without_sacrebleu(t5, tmp_path, monkeypatch):
    result = run_cli(
        t5, tmp_path / "run", "--recipe", "kd", "--max-steps", "1", *SMALL, *sets("eval.metrics=[rouge_l, bleu]")
    )
    assert result.exit_code == 0, result.output
    evals = read_jsonl(tmp_path / "run" / "eval.jsonl")
    assert all("bleu" in e and 0.0 <= e["bleu"] <= 100.0 for e in evals)
    import builtins

    real_import = builtins.__import__

    def without_sacrebleu(name, *args, **kwargs):
        if name == "sacrebleu":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_sacrebleu)
    refused = run_cli(
        t5, tmp_path / "refused", "--recipe", "kd", "--max-steps", "1", *SMALL, *sets("eval.metrics=[bleu]")
    )
    assert refused.exit_code == 2, refused.output
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and "sacrebleu, which is not installed" in lines[0]
    assert not (tmp_path / "refused").exists()


def test_the_fused_head_serves_t5_and_bart_falls_back_with_its_line(t5, bart, tmp_path):
    """T5's head input is the decoder's output after its rescaling (captured at the head): the fused
    loss equals the full-logits one. BART adds final_logits_bias after its head: auto falls back."""
    common = ["--recipe", "gkd", "--max-steps", "3", "--seed", "3", *SMALL, *sets("eval.rouge_samples=0")]
    common += sets("train.precision=fp32")
    losses = {}
    for fused in ("true", "false"):
        result = run_cli(t5, tmp_path / f"t5-{fused}", *common, *sets(f"train.fused_head={fused}"))
        assert result.exit_code == 0, result.output
        assert ("fused head: on" in result.output) == (fused == "true")
        losses[fused] = [m["loss"] for m in read_jsonl(tmp_path / f"t5-{fused}" / "metrics.jsonl")]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
    result = run_cli(bart, tmp_path / "bart", *common, *sets("train.fused_head=auto"))
    assert result.exit_code == 0, result.output
    assert "fused head: off (the student's logits are not its head's linear output" in result.output


@pytest.mark.parametrize("teacher_kind", ["encoder-decoder", "decoder-only"])
def test_models_of_two_kinds_train_sequence_level_under_seqkd(t5, tiny, tmp_path, teacher_kind):
    """The teacher's generated text as the student's target, as across tokenizers."""
    from transformers import AutoConfig

    teacher, student = (
        (t5["teacher"], tiny["student"]) if teacher_kind == "encoder-decoder" else (tiny["teacher"], t5["student"])
    )
    result = run_cli(
        t5, tmp_path / "run", "--recipe", "seqkd", "--max-steps", "2", *SMALL, teacher=teacher, student=student
    )
    assert result.exit_code == 0, result.output
    assert "(or model kinds) differ: sequence-level KD" in result.output
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["source"] for m in metrics] == ["teacher", "teacher"] and all(math.isfinite(m["loss"]) for m in metrics)
    assert AutoConfig.from_pretrained(tmp_path / "run" / "final").is_encoder_decoder == (teacher_kind == "decoder-only")


def test_generation_ignores_a_checkpoints_beam_and_penalty_settings(bart):
    """BART-cnn and Marian checkpoints ask for beams and n-gram blocking: greedy stays greedy."""
    from distill.config import GenerationConfig
    from distill.generation import ResponseGenerator

    tokenizer = load_tokenizer(str(bart["teacher"]))
    model = load_model(str(bart["teacher"]), "teacher").eval()
    train, _, _ = load_examples(DataConfig(path=str(bart["data"])), tokenizer, 0)
    generate = ResponseGenerator(tokenizer, GenerationConfig(max_new_tokens=8), 4)
    plain = generate(model, train[:4], greedy=True)
    model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size = 4, 2
    model.generation_config.repetition_penalty = 2.0
    assert [e.response_ids for e in generate(model, train[:4], greedy=True)] == [e.response_ids for e in plain]


@pytest.mark.parametrize(
    "args, words",
    [
        (sets("train.lm_weight=0.5", "data.lm_path={corpus}"), "for decoder-only students"),
        (["--divergence", "uld", "--student", "{other}"], "with encoder-decoders use --recipe seqkd"),
    ],
)
def test_more_bad_input_with_encoder_decoders(t5, tmp_path, args, words):
    from tiny_models import make_other_tokenizer, make_seq2seq_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some plain text to model. " * 50)
    other = tmp_path / "other"
    tokenizer = make_other_tokenizer(other)
    make_seq2seq_model(other, len(tokenizer), 1, "t5")
    args = [a.replace("{corpus}", str(corpus)) for a in args]
    student = str(other) if "{other}" in args else None
    args = [a for a in args if a not in ("--student", "{other}")]
    result = run_cli(t5, tmp_path / "run", "--recipe", "kd", *args, "--max-steps", "1", *SMALL, student=student)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_scoring_files_refuses_empty_and_non_utf8_files_in_one_line(tmp_path):
    from cli_runs import runner
    from distill.cli import app

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "ref.txt").write_text("cafe\n")
    for hyps, words in (("empty.txt", "no lines to score"), ("latin.txt", "not UTF-8 text")):
        args = [
            "eval",
            "--hypotheses",
            str(tmp_path / hyps),
            "--references",
            str(tmp_path / "ref.txt"),
            "--metric",
            "bleu",
        ]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and words in result.output, result.output
