"""shards: a tokenized corpus on disk, written once and memory-mapped by every process that trains on it.

    DIR/train.bin, DIR/val.bin   flat token ids, little-endian uint16 (vocabulary <= 65,536) or uint32
    DIR/meta.json                what made them (ShardsMeta): counts, dtype, tokenizer, corpus sha256,
                                 the split, and the sha256 of every other file in DIR
    DIR/tokenizer.json           the tokenizer, unless it is bytes, so DIR is self-contained

nanoGPT's layout (train.bin/val.bin). Tokenizing a large corpus in every rank would hold N copies of
its ids in RAM and repeat minutes of work; a memory map is backed by the OS page cache instead, which
all processes on a node share, and only the windows a batch touches are ever read.

This module knows the file format only; `data.prepare_shards` produces the tokens and
`data.prepare_data` loads a folder into TokenData.

A folder must not change while a run maps it. What is checked, and when: on open, meta.json's
fields, each file's size, and the ids at the head of each file; on every batch (get_batch,
iter_eval_batches: IdsGuard), that the file has not shrunk and that the batch's ids are inside the
vocabulary; checksums only by verify_shards. A file truncated between a batch's size check and its
read still kills the process with SIGBUS (exit 135, no message): the OS's answer to reading a
mapped page past the end of a file, which Python cannot turn into an exception.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import secrets
import shutil
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..common.config import from_dict
from ..common.files import fit_name, fsync_dir, fsync_files
from ..common.version import __version__

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "TRAIN_FILE",
    "VAL_FILE",
    "TOKENIZER_FILE",
    "ShardsSource",
    "ShardsMeta",
    "Shards",
    "token_dtype",
    "is_prepared",
    "check_new_folder",
    "read_meta",
    "write_shards",
    "open_shards",
    "verify_shards",
    "file_sha256",
    "IdsGuard",
    "ids_guard",
    "prepared_meta_problem",
    "special_file_kind",
]

FORMAT = "mpirouter-tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
MIN_TOKENS = 2
"""Fewest tokens a split may have: one (input, target) pair."""
_CHUNK = 1 << 22
"""Tokens converted and hashed at a time while writing: bounds the extra memory to a few MB."""
OPEN_SCAN_TOKENS = 1 << 20
"""Ids at the head of each .bin file checked against the vocabulary on open (a few MB, milliseconds);
the rest are checked batch by batch as they are read (IdsGuard)."""
_GUARD_ATTR = "_mpirouter_ids_guard"


@dataclass(frozen=True)
class ShardsSource:
    """What produced the tokens: enough to tell whether a DataConfig describes the same data."""

    corpus: str
    """The corpus's name (Corpus.name) when it was prepared."""
    corpus_sha256: str
    """Hex SHA-256 of the corpus text (Corpus.sha256): the same corpus read raw has the same hash."""
    corpus_documents: int
    """Documents joined into the corpus."""
    tokenizer: str
    """The tokenizer's name (Tokenizer.name)."""
    tokenizer_kind: Literal["byte", "bpe", "file"]
    """How DataConfig.tokenizer named it: "byte", "bpe", or a path to a tokenizer.json ("file")."""
    vocab_size: int
    """The tokenizer's vocabulary size; every id is below it."""
    bpe_vocab_size: int | None
    """DataConfig.bpe_vocab_size for kind "bpe", else None."""
    val_fraction: float
    """DataConfig.val_fraction: the last share of the text's characters went to val.bin."""
    jsonl_field: str
    """DataConfig.jsonl_field the corpus was read with (JSONL, Parquet and Arrow inputs)."""


@dataclass(frozen=True)
class ShardsMeta:
    """The contents of meta.json."""

    format: str
    """Always FORMAT: tells a prepared folder from a folder of text that happens to hold a meta.json."""
    version: int
    """FORMAT_VERSION when written; a reader refuses versions it does not know."""
    dtype: Literal["uint16", "uint32"]
    """Element type of the .bin files (little-endian)."""
    train_tokens: int
    """Tokens in train.bin."""
    val_tokens: int
    """Tokens in val.bin."""
    sha256: dict[str, str]
    """Hex SHA-256 of each other file in the folder, by file name (checked by verify_shards)."""
    source: ShardsSource
    """What produced the tokens."""
    mpirouter_version: str
    """The mpirouter version that wrote the folder."""


@dataclass(frozen=True)
class Shards:
    """A prepared folder opened for reading."""

    train_ids: torch.Tensor
    """1-D uint16/uint32 train ids, memory-mapped read-only: index them, never write into them."""
    val_ids: torch.Tensor
    """1-D uint16/uint32 validation ids, memory-mapped read-only."""
    meta: ShardsMeta
    """The folder's meta.json."""
    path: Path
    """The folder."""


def token_dtype(vocab_size: int) -> Literal["uint16", "uint32"]:
    """The narrowest stored type that holds every id below ``vocab_size``: uint16 up to 65,536 ids, else uint32."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be an integer in [1, 2**32], got {vocab_size!r}")
    return "uint16" if vocab_size <= 2**16 else "uint32"


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by write_shards: its meta.json names FORMAT.

    Only the marker is read, so a damaged prepared folder is still recognised (and open_shards then
    says what is wrong) while a folder of text that holds some other meta.json stays a corpus.
    """
    file = Path(path).expanduser() / META_FILE
    if not file.is_file():
        return False
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError):  # unreadable or not JSON (UnicodeDecodeError is a ValueError): not ours
        return False
    return isinstance(raw, dict) and raw.get("format") == FORMAT


def check_new_folder(out: str | os.PathLike) -> Path:
    """``out`` as a Path if it may receive a prepared folder (absent or an empty folder), else FileExistsError."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise FileExistsError(f"{p} exists and is not a folder; choose a new folder for the prepared data")
    if p.is_dir() and any(p.iterdir()):
        raise FileExistsError(f"{p} already exists and is not empty; prepared data never overwrites: choose a new folder")
    return p


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is ("a fifo", "a socket", "a character device", ...) when it exists but is neither a regular file
    nor a folder; None otherwise. Reading a fifo blocks until someone writes, and a device like /dev/zero never ends."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None  # missing or unreachable: the caller's own open says so
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def _check_regular(file: Path) -> None:
    """ValueError when ``file`` is a fifo, socket, device or folder: no file to read."""
    if kind := special_file_kind(file):
        raise ValueError(f"{file} is {kind}, not a regular file")
    if file.is_dir():
        raise ValueError(f"{file} is a folder, not a regular file")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks (ValueError for a fifo or device, which could block or never end)."""
    _check_regular(Path(path))
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _write_bin(path: Path, ids: np.ndarray, dtype: np.dtype) -> str:
    """Write ``ids`` as ``dtype`` in chunks and return the file's hex SHA-256 (hashed as written, not re-read)."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, len(ids), _CHUNK):
            block = np.ascontiguousarray(ids[start:start + _CHUNK], dtype=dtype).tobytes()
            h.update(block)
            f.write(block)
    return h.hexdigest()


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> None:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} ids must be a 1-D integer array, got {ids.ndim}-D {ids.dtype}")
    if len(ids) < MIN_TOKENS:
        raise ValueError(f"the {name} split has {len(ids)} token(s), need at least {MIN_TOKENS}; "
                         f"use more text or a different val_fraction")
    # A narrowing cast would wrap an out-of-range id silently into a wrong but valid-looking token.
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} ids span [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")


def write_shards(out: str | os.PathLike, train_ids: np.ndarray, val_ids: np.ndarray, source: ShardsSource,
                 tokenizer_file: str | os.PathLike | None = None) -> ShardsMeta:
    """Write a prepared folder at ``out`` atomically and return its meta.

    The files go into a temporary sibling folder, are flushed to disk, and the folder is renamed into
    place, so ``out`` never exists half-written. ``out`` must not exist or be an empty folder
    (FileExistsError otherwise, also when another writer got there first).
    """
    out = check_new_folder(out)
    dtype = token_dtype(source.vocab_size)
    _check_ids("train", train_ids, source.vocab_size)
    _check_ids("val", val_ids, source.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    # pid + random suffix: concurrent writers (even on a shared filesystem) never share a temporary folder
    tmp = out.with_name(fit_name(out.name, f".{os.getpid()}.{secrets.token_hex(4)}.tmp", prefix="."))  # a long --out fits
    tmp.mkdir()
    try:
        sha = {TRAIN_FILE: _write_bin(tmp / TRAIN_FILE, train_ids, DTYPES[dtype]),
               VAL_FILE: _write_bin(tmp / VAL_FILE, val_ids, DTYPES[dtype])}
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            sha[TOKENIZER_FILE] = file_sha256(tmp / TOKENIZER_FILE)
        meta = ShardsMeta(format=FORMAT, version=FORMAT_VERSION, dtype=dtype, train_tokens=len(train_ids),
                          val_tokens=len(val_ids), sha256=sha, source=source, mpirouter_version=__version__)
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2) + "\n")
        fsync_files(tmp)
        try:
            os.rename(tmp, out)  # replaces an empty folder; fails if another writer filled it meanwhile
        except OSError:
            raise FileExistsError(f"{out} was created by someone else while preparing; nothing was written there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return meta


def _meta_json(file: Path) -> object:
    """The parsed JSON of ``file``; FileNotFoundError when it is missing, ValueError naming any other problem."""
    _check_regular(file)
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{file} cannot be read ({e.strerror})") from None


def prepared_meta_problem(path: str | os.PathLike) -> str | None:
    """Why the folder ``path``, which holds train.bin or val.bin, is no usable prepared folder: its meta.json's problem.

    None when neither .bin file is there or meta.json marks the folder as prepared. Lets a caller that
    found no corpus in ``path`` name meta.json instead of saying the folder holds no text.
    """
    p = Path(path).expanduser()
    found = [name for name in (TRAIN_FILE, VAL_FILE) if (p / name).exists()]
    if not found:
        return None
    file = p / META_FILE
    try:
        raw = _meta_json(file)
    except FileNotFoundError:
        problem = f"{file} is missing"
    except ValueError as e:
        problem = str(e)
    else:
        if isinstance(raw, dict) and raw.get("format") == FORMAT:
            return None
        problem = f"{file} is not an mpirouter prepared-data meta.json (no \"format\": \"{FORMAT}\")"
    return (f"{p} holds {' and '.join(found)} like a folder written by `mpirouter prepare-data`, but {problem}; "
            f"prepare the folder again from its corpus")


def read_meta(path: str | os.PathLike) -> ShardsMeta:
    """The meta.json of the prepared folder ``path``, type-checked; ValueError naming the problem otherwise."""
    file = Path(path).expanduser() / META_FILE
    try:
        raw = _meta_json(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} not found: {file.parent} is not a prepared folder (mpirouter prepare-data)") from None
    except ValueError as e:
        raise ValueError(f"{e}; prepare the folder again") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{file} is not an mpirouter prepared-data meta.json (no \"format\": \"{FORMAT}\")")
    if raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format version {raw.get('version')!r}; this mpirouter reads version "
                         f"{FORMAT_VERSION}: prepare the folder again with this version")
    try:
        meta = from_dict(ShardsMeta, raw)
    except (TypeError, ValueError) as e:  # TypeError: a required field is missing
        raise ValueError(f"{file}: {e}") from None
    _check_meta(file, meta)
    return meta


def _check_meta(file: Path, meta: ShardsMeta) -> None:
    """ValueError when meta.json's fields contradict each other (an edit that keeps the file sizes consistent)."""
    vocab = meta.source.vocab_size
    try:
        expected = token_dtype(vocab)
    except ValueError as e:
        raise ValueError(f"{file}: source.{e}") from None
    # write_shards always stores the narrowest type: any other was edited in, and would read ids beyond the vocabulary.
    if meta.dtype != expected:
        raise ValueError(f"{file} says dtype {meta.dtype}, but a vocabulary of {vocab:,} tokens is stored as {expected}: "
                         f"meta.json was edited or damaged; prepare the folder again")
    for name in ("train_tokens", "val_tokens"):
        if getattr(meta, name) < MIN_TOKENS:
            raise ValueError(f"{file}: {name} is {getattr(meta, name)}, a prepared split has at least {MIN_TOKENS}; "
                             f"prepare the folder again")


class IdsGuard:
    """The checks made on every batch read from a memory-mapped .bin file, before its ids reach a model.

    Reading a mapped page past the end of a file raises SIGBUS, so the file's size is checked (fstat on
    the map's own descriptor: microseconds, and a folder replaced by a rename, whose old file stays
    mapped, is not mistaken for a truncation) before each read; ids at or beyond the vocabulary would
    fail in the embedding (IndexError on CPU, a device-side assert on GPU), so each batch's ids are
    compared with it after.
    """

    def __init__(self, file: Path, mapped: mmap.mmap, nbytes: int, vocab_size: int):
        self.file, self._mapped, self.nbytes, self.vocab_size = file, mapped, nbytes, vocab_size

    def check_size(self) -> None:
        """ValueError when the file has shrunk below the size it was opened with."""
        size = self._mapped.size()  # the file's current size, not the map's
        if size < self.nbytes:
            raise ValueError(f"{self.file} shrank to {size:,} bytes while in use ({self.nbytes:,} when opened): something "
                             f"truncated or rewrote it; a prepared folder must not change under a run, so prepare a new one")

    def check_ids(self, ids: torch.Tensor, positions: torch.Tensor) -> None:
        """ValueError naming the first id in ``ids`` outside the vocabulary; ``positions`` are their places in the file."""
        if ids.numel() == 0 or int(ids.max()) < self.vocab_size:
            return
        first = int((ids >= self.vocab_size).flatten().nonzero()[0])
        raise ValueError(
            f"{self.file}: token id {int(ids.flatten()[first]):,} at position {int(positions.flatten()[first]):,} is outside "
            f"the vocabulary [0, {self.vocab_size:,}): the file was damaged or edited after it was prepared "
            f"(`mpirouter prepare-data --verify {self.file.parent}` checks every file); prepare the folder again")


def ids_guard(ids: torch.Tensor) -> IdsGuard | None:
    """The IdsGuard of ids memory-mapped by open_shards; None for any other tensor (ids tokenized in memory are trusted)."""
    return getattr(ids, _GUARD_ATTR, None)


def _open_bin(file: Path, tokens: int, dtype: str, vocab_size: int, scan: bool) -> torch.Tensor:
    """``file``'s ``tokens`` ids, memory-mapped read-only, carrying their IdsGuard; ``scan``: check the head's ids now."""
    np_dtype = DTYPES[dtype]
    try:
        mode, size = (st := file.stat()).st_mode, st.st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{file} is missing; prepare the folder again") from None
    if not stat.S_ISREG(mode):  # opening a fifo would block
        raise ValueError(f"{file} is {special_file_kind(file) or 'a folder'}, not a regular file; prepare the folder again")
    # Cheap check on every open: a truncated copy or a partly-synced file is caught before training on it.
    if size != tokens * np_dtype.itemsize:
        raise ValueError(f"{file} has {size:,} bytes but meta.json says {tokens:,} {dtype} tokens "
                         f"({tokens * np_dtype.itemsize:,} bytes): the folder is incomplete or damaged; prepare it again")
    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)  # keeps its own descriptor: IdsGuard fstats it
    array = np.frombuffer(mapped, dtype=np_dtype, count=tokens)
    guard = IdsGuard(file, mapped, size, vocab_size)
    head = array[:OPEN_SCAN_TOKENS]
    if scan and int(head.max()) >= vocab_size:
        guard.check_ids(torch.from_numpy(head.astype(np.int64)), torch.arange(len(head)))
    with warnings.catch_warnings():
        # Read-only on purpose: the ids are shared through the page cache and nothing may write into them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        ids = torch.from_numpy(array)
    setattr(ids, _GUARD_ATTR, guard)  # get_batch's signature stays as it is; the ids carry their own checks
    return ids


def open_shards(path: str | os.PathLike, scan: bool = True) -> Shards:
    """Memory-map a prepared folder (no copy: pages are read when a batch touches them).

    File sizes are checked against meta.json, and (``scan``) the first OPEN_SCAN_TOKENS ids of each
    file against the vocabulary; checksums are not (see verify_shards).
    """
    p = Path(path).expanduser()
    meta = read_meta(p)
    vocab = meta.source.vocab_size
    return Shards(train_ids=_open_bin(p / TRAIN_FILE, meta.train_tokens, meta.dtype, vocab, scan),
                  val_ids=_open_bin(p / VAL_FILE, meta.val_tokens, meta.dtype, vocab, scan), meta=meta, path=p)


def verify_shards(path: str | os.PathLike) -> ShardsMeta:
    """Check every file's SHA-256 against meta.json (reads the whole folder); ValueError naming the first mismatch."""
    shards = open_shards(path, scan=False)  # a changed id is reported as the checksum mismatch it also is
    for name, expected in shards.meta.sha256.items():
        file = shards.path / name
        if not file.exists():  # a fifo or device is refused by file_sha256
            raise FileNotFoundError(f"{file} is missing; prepare the folder again")
        if file_sha256(file) != expected:
            raise ValueError(f"{file} does not match its sha256 in meta.json: the file changed or is damaged; "
                             f"prepare the folder again")
    return shards.meta
