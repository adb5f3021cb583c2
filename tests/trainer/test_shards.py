"""Tests for prepared token folders (mpirouter.trainer.shards) and the optional HF `datasets` input.

The central promise: training from a prepared folder sees exactly the ids (and so the batches) that
training from the raw corpus with the same tokenizer and val_fraction sees, memory-mapped, not copied.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mpirouter.trainer import data, shards
from mpirouter.trainer.data import (
    DataConfig,
    get_batch,
    iter_eval_batches,
    load_corpus,
    prepare_data,
    prepare_shards,
)
from mpirouter.trainer.shards import (
    ShardsSource,
    is_prepared,
    open_shards,
    read_meta,
    token_dtype,
    verify_shards,
    write_shards,
)

LINES = [
    "Now is the winter of our discontent",
    "Made glorious summer by this sun of York;",
    "And all the clouds that lour'd upon our house",
    "In the deep bosom of the ocean buried.",
    "Shall I compare thee to a summer's day? é ñ 🎭",
]
TEXT = "".join(f"{i}: {line}\n" for i in range(40) for line in LINES)  # ~9 KB
SEQ = 16


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def assert_same_data(prepared: data.TokenData, raw: data.TokenData) -> None:
    """Same ids, same training batches, same eval windows, same corpus identity."""
    for a, b in ((prepared.train_ids, raw.train_ids), (prepared.val_ids, raw.val_ids)):
        assert a.shape == b.shape and torch.equal(a.to(torch.int64), b)
    for step in range(5):
        x, y = get_batch(prepared.train_ids, 4, SEQ, seed=7, step=step)
        x0, y0 = get_batch(raw.train_ids, 4, SEQ, seed=7, step=step)
        assert x.dtype == torch.int64 and torch.equal(x, x0) and torch.equal(y, y0)
    evals = list(iter_eval_batches(prepared.val_ids, 3, SEQ))
    evals0 = list(iter_eval_batches(raw.val_ids, 3, SEQ))
    assert len(evals) == len(evals0) > 0
    assert all(torch.equal(x, x0) and torch.equal(y, y0) for (x, y), (x0, y0) in zip(evals, evals0))
    assert (prepared.corpus.sha256, prepared.corpus.name) == (raw.corpus.sha256, raw.corpus.name)
    assert prepared.tokenizer.vocab_size == raw.tokenizer.vocab_size


def mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


# --- the stored type ----------------------------------------------------------------------


@pytest.mark.parametrize("vocab, dtype", [(1, "uint16"), (256, "uint16"), (2**16, "uint16"), (2**16 + 1, "uint32"),
                                          (2**32, "uint32")], ids=["one", "bytes", "uint16-max", "uint16-max+1", "uint32-max"])
def test_token_dtype_is_the_narrowest_that_fits(vocab, dtype):
    assert token_dtype(vocab) == dtype
    assert np.iinfo(np.dtype(dtype)).max >= vocab - 1


@pytest.mark.parametrize("vocab", [0, 2**32 + 1, True, 3.0], ids=["zero", "too-big", "bool", "float"])
def test_token_dtype_rejects_bad_vocab(vocab):
    with pytest.raises(ValueError, match="vocab_size must be an integer in"):
        token_dtype(vocab)


# --- round trips: prepared folder == raw corpus ----------------------------------------------


def test_byte_round_trip_is_memory_mapped_and_batch_identical(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "corpus.txt", TEXT)), val_fraction=0.1)
    out = tmp_path / "prep"
    meta = prepare_shards(cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # bytes need no tokenizer.json
    assert meta.dtype == "uint16" and (out / "train.bin").stat().st_size == 2 * meta.train_tokens
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed, not left

    raw = prepare_data(cfg, SEQ)
    prepared = prepare_data(replace(cfg, path=str(out)), SEQ)
    assert prepared.train_ids.dtype == torch.uint16
    assert_same_data(prepared, raw)
    assert prepared.corpus.text == ""  # the text is not read back: only tokens
    if Path("/proc/self/maps").exists():  # the ids are a view of the file, not a copy in this process
        assert str(out / "train.bin") in mapped_files() and str(out / "val.bin") in mapped_files()


@pytest.fixture(scope="module")
def bpe_prepared(tmp_path_factory):
    """A corpus, its BPE config (tokenizer cached in tmp), and the folder prepared from it."""
    root = tmp_path_factory.mktemp("bpe")
    cfg = DataConfig(path=str(write(root / "corpus.txt", TEXT)), tokenizer="bpe", bpe_vocab_size=300,
                     cache_dir=str(root / "cache"))
    prepare_shards(cfg, root / "prep")
    return cfg, root / "prep"


def test_bpe_round_trip_keeps_its_tokenizer_in_the_folder(bpe_prepared):
    cfg, out = bpe_prepared
    meta = read_meta(out)
    assert meta.source.tokenizer_kind == "bpe" and meta.source.bpe_vocab_size == 300
    assert set(meta.sha256) == {"train.bin", "val.bin", "tokenizer.json"}
    prepared = prepare_data(replace(cfg, path=str(out)), SEQ)
    raw = prepare_data(cfg, SEQ)
    assert prepared.tokenizer.path == str(out / "tokenizer.json")  # self-contained: not the BPE cache
    assert_same_data(prepared, raw)
    assert prepared.tokenizer.decode(prepared.val_ids) == raw.tokenizer.decode(raw.val_ids)


def test_tokenizer_file_round_trip_accepts_any_copy_of_it(bpe_prepared, tmp_path):
    cfg, bpe_out = bpe_prepared
    tok_file = str(bpe_out / "tokenizer.json")
    file_cfg = replace(cfg, tokenizer=tok_file)
    prepare_shards(file_cfg, tmp_path / "prep")
    assert read_meta(tmp_path / "prep").source.tokenizer_kind == "file"
    copy = tmp_path / "elsewhere.json"
    copy.write_bytes(Path(tok_file).read_bytes())
    prepared = prepare_data(replace(file_cfg, path=str(tmp_path / "prep"), tokenizer=str(copy)), SEQ)
    assert_same_data(prepared, prepare_data(file_cfg, SEQ))


def test_uint32_round_trip_with_a_large_vocabulary(tmp_path):
    """A word-level tokenizer of 70,000 words (built, not trained): ids past 65,535 survive the uint32 files."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(70_000)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "words.json"))
    words = " ".join(f"w{(i * 7919) % 70_000}" for i in range(400)) + "\n"
    cfg = DataConfig(path=str(write(tmp_path / "words.txt", words * 3)), tokenizer=str(tmp_path / "words.json"))
    meta = prepare_shards(cfg, tmp_path / "prep")
    assert meta.dtype == "uint32" and (tmp_path / "prep" / "train.bin").stat().st_size == 4 * meta.train_tokens
    prepared = prepare_data(replace(cfg, path=str(tmp_path / "prep"), tokenizer=str(tmp_path / "prep" / "tokenizer.json")), SEQ)
    raw = prepare_data(cfg, SEQ)
    assert prepared.train_ids.dtype == torch.uint32 and int(raw.train_ids.max()) > 2**16
    assert_same_data(prepared, raw)


def test_write_shards_refuses_ids_outside_the_vocabulary(tmp_path):
    source = ShardsSource(corpus="c", corpus_sha256="0" * 64, corpus_documents=1, tokenizer="byte", tokenizer_kind="byte",
                          vocab_size=256, bpe_vocab_size=None, val_fraction=0.05, jsonl_field="text")
    with pytest.raises(ValueError, match=r"train ids span \[0, 300\], outside the vocabulary \[0, 256\)"):
        write_shards(tmp_path / "prep", np.array([0, 300, 5]), np.array([1, 2]), source)
    with pytest.raises(ValueError, match="the val split has 1 token"):
        write_shards(tmp_path / "prep", np.array([0, 3, 5]), np.array([1]), source)
    assert not (tmp_path / "prep").exists()


# --- never overwrite, atomic ------------------------------------------------------------------


def test_refuses_a_folder_that_is_not_empty(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "corpus.txt", TEXT)))
    keep = write(tmp_path / "prep" / "notes.txt", "mine")
    with pytest.raises(FileExistsError, match="prep already exists and is not empty"):
        prepare_shards(cfg, tmp_path / "prep")
    assert keep.read_text() == "mine" and sorted(p.name for p in keep.parent.iterdir()) == ["notes.txt"]
    write(tmp_path / "afile", "x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        prepare_shards(cfg, tmp_path / "afile")
    (tmp_path / "empty").mkdir()
    prepare_shards(cfg, tmp_path / "empty")  # an empty folder is fine
    assert is_prepared(tmp_path / "empty")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    cfg = DataConfig(path=str(write(tmp_path / "corpus.txt", TEXT)))
    real = shards._write_bin

    def fail_on_val(path, ids, dtype):
        if path.name == "val.bin":
            raise OSError(28, "No space left on device")
        return real(path, ids, dtype)

    monkeypatch.setattr(shards, "_write_bin", fail_on_val)
    with pytest.raises(OSError, match="No space left"):
        prepare_shards(cfg, tmp_path / "prep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_refuses_to_prepare_a_prepared_folder(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "corpus.txt", TEXT)))
    prepare_shards(cfg, tmp_path / "prep")
    with pytest.raises(ValueError, match="is already prepared data"):
        prepare_shards(replace(cfg, path=str(tmp_path / "prep")), tmp_path / "again")


# --- damaged folders and contradicting configs ----------------------------------------------------


@pytest.fixture
def byte_prepared(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "corpus.txt", TEXT)))
    prepare_shards(cfg, tmp_path / "prep")
    return replace(cfg, path=str(tmp_path / "prep")), tmp_path / "prep"


def test_truncated_bin_is_refused_on_load(byte_prepared):
    cfg, out = byte_prepared
    size = (out / "train.bin").stat().st_size
    with open(out / "train.bin", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(ValueError, match=rf"train\.bin has {size - 2:,} bytes but meta\.json says {size // 2:,} uint16 "
                                         r"tokens .*incomplete or damaged"):
        prepare_data(cfg, SEQ)


def test_missing_bin_is_refused_on_load(byte_prepared):
    cfg, out = byte_prepared
    (out / "val.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.bin is missing"):
        prepare_data(cfg, SEQ)


def test_verify_catches_a_changed_byte_that_the_size_check_cannot(byte_prepared):
    cfg, out = byte_prepared
    assert verify_shards(out).train_tokens > 0
    blob = bytearray((out / "val.bin").read_bytes())
    blob[0] ^= 1
    (out / "val.bin").write_bytes(bytes(blob))
    assert open_shards(out).val_ids[0] == blob[0]  # same size: loading does not notice
    with pytest.raises(ValueError, match=r"val\.bin does not match its sha256"):
        verify_shards(out)


@pytest.mark.parametrize("edit, message", [
    ({"version": 99}, "has format version 99; this mpirouter reads version 1"),
    ({"dtype": "int8"}, 'dtype: "int8" is not one of uint16, uint32'),
    ({"train_tokens": "many"}, "train_tokens: expected an integer"),
], ids=["future-version", "unknown-dtype", "bad-count"])
def test_bad_meta_is_refused(byte_prepared, edit, message):
    cfg, out = byte_prepared
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, **edit}))
    with pytest.raises(ValueError, match=message):
        prepare_data(cfg, SEQ)


@pytest.mark.parametrize("change, hint", [
    (dict(tokenizer="bpe"), r"prepared with tokenizer 'byte', val_fraction 0\.05, but the data config asks for tokenizer 'bpe'"),
    (dict(val_fraction=0.2), r"asks for tokenizer 'byte', val_fraction 0\.2; train on it with: --data \S+prep$"),
], ids=["bpe-on-byte-folder", "other-val-fraction"])
def test_contradicting_config_is_refused_on_a_byte_folder(byte_prepared, change, hint):
    cfg, _ = byte_prepared
    with pytest.raises(ValueError, match=hint):
        prepare_data(replace(cfg, **change), SEQ)


@pytest.mark.parametrize("change, hint", [
    (dict(tokenizer="byte"), r"train on it with: --data \S+ --tokenizer bpe --set data\.bpe_vocab_size=300"),
    (dict(bpe_vocab_size=512), r"asks for tokenizer 'bpe' \(bpe_vocab_size 512\)"),
], ids=["byte-on-bpe-folder", "other-bpe-size"])
def test_contradicting_config_is_refused_on_a_bpe_folder(bpe_prepared, change, hint):
    cfg, out = bpe_prepared
    with pytest.raises(ValueError, match=hint):
        prepare_data(replace(cfg, path=str(out), **change), SEQ)


def test_another_tokenizer_file_is_refused(bpe_prepared, tmp_path):
    cfg, bpe_out = bpe_prepared
    prepare_shards(replace(cfg, tokenizer=str(bpe_out / "tokenizer.json")), tmp_path / "prep")
    other = write(tmp_path / "other.json", (bpe_out / "tokenizer.json").read_text().replace('"Ġ"', '"Ġ" '))
    with pytest.raises(ValueError, match=r"train on it with: --data \S+prep --tokenizer \S+prep/tokenizer\.json"):
        prepare_data(replace(cfg, path=str(tmp_path / "prep"), tokenizer=str(other)), SEQ)


def test_a_corpus_folder_with_another_meta_json_is_still_a_corpus(tmp_path):
    write(tmp_path / "corpus" / "meta.json", '{"format": "something else"}')
    write(tmp_path / "corpus" / "a.txt", TEXT)
    assert not is_prepared(tmp_path / "corpus")
    assert load_corpus(str(tmp_path / "corpus")).text == TEXT


def edit_dtype_to_uint32(out: Path) -> None:
    """meta.json's dtype edited to uint32 with the token counts halved, file sizes kept consistent (issue #22, row 13)."""
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):
        file = out / f"{split}.bin"
        if file.stat().st_size % 4:
            with open(file, "ab") as f:
                f.write(b"\0\0")
        meta[f"{split}_tokens"] = file.stat().st_size // 4
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))


def test_a_dtype_that_is_not_the_vocabularys_is_refused_on_open(byte_prepared):
    cfg, out = byte_prepared
    edit_dtype_to_uint32(out)
    with pytest.raises(ValueError, match=r"meta\.json says dtype uint32, but a vocabulary of 256 tokens is stored as uint16"):
        prepare_data(cfg, SEQ)


def replace_ids(file: Path, change) -> np.ndarray:
    """Rewrite the uint16 ids of ``file`` in place (same size) with ``change(ids)``; return the new ids."""
    ids = change(np.fromfile(file, dtype="<u2"))
    ids.astype("<u2").tofile(file)
    return ids


def test_ids_beyond_the_vocabulary_are_refused_on_open(byte_prepared):
    cfg, out = byte_prepared
    replace_ids(out / "train.bin", lambda ids: np.where(np.arange(len(ids)) == 5, 256, ids))
    with pytest.raises(ValueError, match=r"train\.bin: token id 256 at position 5 is outside the vocabulary \[0, 256\)"):
        prepare_data(cfg, SEQ)


def test_ids_beyond_the_vocabulary_are_caught_batch_by_batch(byte_prepared, monkeypatch):
    cfg, out = byte_prepared
    monkeypatch.setattr(shards, "OPEN_SCAN_TOKENS", 1, raising=False)  # as if the damage lay past the head a load checks
    bad = 2 * SEQ + 5  # inside the third evaluation window
    replace_ids(out / "val.bin", lambda ids: np.where(np.arange(len(ids)) == bad, 300, ids))
    replace_ids(out / "train.bin", lambda ids: np.where(np.arange(len(ids)) > 0, ids + 256, ids))
    loaded = prepare_data(cfg, SEQ)  # opens: the edits keep every size and the first id
    with pytest.raises(ValueError, match=r"train\.bin: token id \d+ at position [\d,]+ is outside the vocabulary \[0, 256\)"
                                         r".*prepare-data --verify"):
        get_batch(loaded.train_ids, 4, SEQ, seed=0, step=0)
    batches = iter_eval_batches(loaded.val_ids, 1, SEQ)
    next(batches), next(batches)
    with pytest.raises(ValueError, match=rf"val\.bin: token id 300 at position {bad} is outside"):
        next(batches)


def test_a_bin_truncated_under_a_live_run_is_an_error_not_a_bus_error(byte_prepared):
    # In a subprocess: reading a mapped page past the end of a truncated file raises SIGBUS, which kills the process.
    cfg, out = byte_prepared
    script = f"""
from mpirouter.trainer.data import DataConfig, get_batch, iter_eval_batches, prepare_data
data = prepare_data(DataConfig(path={str(out)!r}), {SEQ})
get_batch(data.train_ids, 4, {SEQ}, seed=0, step=0)
for name, read in (("train", lambda: get_batch(data.train_ids, 4, {SEQ}, seed=0, step=1)),
                   ("val", lambda: next(iter_eval_batches(data.val_ids, 4, {SEQ})))):
    open({str(out)!r} + f"/{{name}}.bin", "r+b").truncate(0)
    try:
        read()
    except ValueError as e:
        print(e)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(f"{name}.bin shrank to 0 bytes while in use" in line
                                   for name, line in zip(("train", "val"), lines)), proc.stdout


@pytest.mark.parametrize("damage", ["missing", "not-json", "a-folder", "not-ours"])
def test_a_prepared_folder_without_a_usable_meta_json_names_it(byte_prepared, tmp_path, damage):
    cfg, out = byte_prepared
    meta = out / "meta.json"
    meta.unlink()
    if damage == "not-json":
        meta.write_text('{"format": "mpirouter-tokens", "version": 1,')
    elif damage == "a-folder":
        meta.mkdir()
    elif damage == "not-ours":
        meta.write_text('{"format": "something else"}')
    problem = {"missing": "is missing", "not-json": "is not valid JSON", "a-folder": "is a folder, not a regular file",
               "not-ours": "is not an mpirouter prepared-data meta.json"}[damage]
    expected = rf"prep holds train\.bin and val\.bin like a folder written by `mpirouter prepare-data`, but \S+meta\.json {problem}"
    with pytest.raises(ValueError, match=expected):
        prepare_data(cfg, SEQ)
    with pytest.raises(ValueError, match=expected):
        prepare_shards(replace(cfg, path=str(out)), tmp_path / "again")


def test_prepare_shards_says_each_stage_and_is_quiet_by_default(tmp_path, capsys):
    cfg = DataConfig(path=str(write(tmp_path / "corpus.txt", TEXT)), tokenizer="bpe", bpe_vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    said: list[str] = []
    meta = prepare_shards(cfg, tmp_path / "prep", say=said.append)
    stages = ["reading the corpus", "training BPE", "cached the BPE", "tokenizing", "writing"]
    assert [next((s for s in stages if line.startswith(s)), line) for line in said] == stages
    assert f"writing {meta.train_tokens:,} train and {meta.val_tokens:,} validation tokens" in said[-1]
    prepare_shards(cfg, tmp_path / "again")
    assert capsys.readouterr() == ("", "")


# --- HF datasets input (optional) -----------------------------------------------------------------


DOCS = ["first document\nwith two lines", "second: é 🎭", "third"]


def test_parquet_and_arrow_read_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"body": DOCS, "id": [1, 2, 3]})
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))  # a folder holding data-00000-of-00001.arrow
    write(tmp_path / "docs.jsonl", "".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    jsonl = load_corpus(str(tmp_path / "docs.jsonl"), "body")
    parquet = load_corpus(str(tmp_path / "pq" / "part.parquet"), "body")
    arrow = load_corpus(str(tmp_path / "saved"), "body")
    assert parquet.num_documents == arrow.num_documents == 3
    assert parquet.text == arrow.text == jsonl.text and parquet.sha256 == jsonl.sha256
    with pytest.raises(ValueError, match=r"part\.parquet: no column 'text' \(columns: body, id\); set jsonl_field"):
        load_corpus(str(tmp_path / "pq" / "part.parquet"))
    with pytest.raises(ValueError, match=r"column 'id' holds .*int64.*, expected strings"):
        load_corpus(str(tmp_path / "pq" / "part.parquet"), "id")


def test_parquet_corpus_prepares_like_any_other(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [TEXT[:4000], TEXT[4000:]]}).to_parquet(str(tmp_path / "c.parquet"))
    cfg = DataConfig(path=str(tmp_path / "c.parquet"))
    prepare_shards(cfg, tmp_path / "prep")
    assert_same_data(prepare_data(replace(cfg, path=str(tmp_path / "prep")), SEQ), prepare_data(cfg, SEQ))


def test_parquet_without_datasets_names_the_extra(tmp_path, monkeypatch):
    write(tmp_path / "c.parquet", "not read")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'mpirouter\[datasets\]'"):
        load_corpus(str(tmp_path / "c.parquet"))
