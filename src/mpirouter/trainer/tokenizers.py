"""Tokenizers: UTF-8 bytes, or a Hugging Face `tokenizers` byte-level BPE (trained locally, never downloaded).

    tok = ByteTokenizer()                       # vocabulary 256, nothing to train
    tok = HFTokenizer("runs/x/tokenizer.json")  # a saved one; `data.build_tokenizer` trains and caches BPE
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import torch


class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str: ...


def _as_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no training, nothing to cache."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        # A sampled sequence can end mid-character; replace rather than fail.
        return bytes(_as_list(ids)).decode("utf-8", errors="replace")


def import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "BPE tokenizers need the 'tokenizers' package: pip install 'mpirouter[bpe]' "
            "(or use tokenizer='byte')"
        ) from None
    return tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a tokenizer.json."""

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        p = Path(path).expanduser()
        if not p.is_file():
            if p.exists():  # a folder, or a fifo or device that would block or never end when read
                raise ValueError(f"tokenizer file {p} is not a regular file")
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        tokenizers = import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(p))
        except Exception as e:  # the library raises a bare Exception on bad JSON
            raise ValueError(f"could not load tokenizer from {p}: {e}") from None
        self.path = str(p)
        self.name = name or f"hf:{p}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        return self._tok.decode(_as_list(ids), skip_special_tokens=False)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mpirouter"


MAX_PIECE = 256
"""Longest run of non-whitespace (or of whitespace) characters a trained BPE sees as one piece; longer runs are cut.

BPE training and encoding cost grows with the square of a piece's length, so a corpus without
whitespace (one 3 MB "word") took hours; words shorter than this are pre-tokenized exactly as before."""


def bpe_pre_tokenizer(max_piece: int | None = MAX_PIECE):
    """The byte-level pre-tokenizer of `train_bpe`: GPT-2's split, after cutting runs of ``max_piece`` characters (None: uncut)."""
    import_tokenizers()
    from tokenizers import Regex, pre_tokenizers

    # No prefix space: every string encodes (no <unk>) and decode(encode(s)) == s exactly.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if max_piece is None:
        return byte_level
    # "isolated" keeps each matched run of exactly max_piece characters as its own piece; text without
    # such runs is one unmatched piece, which ByteLevel then splits as if nothing had run before it.
    cut = pre_tokenizers.Split(Regex(rf"\S{{{max_piece}}}|\s{{{max_piece}}}"), behavior="isolated")
    return pre_tokenizers.Sequence([cut, byte_level])


def train_bpe(text: str, vocab_size: int, out: Path, max_piece: int | None = MAX_PIECE) -> None:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``text`` and save it (atomically) as the tokenizer.json ``out``.

    ``max_piece`` bounds the pre-tokenized pieces (bpe_pre_tokenizer); name the cache after it.
    """
    tokenizers = import_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = bpe_pre_tokenizer(max_piece)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    # Feeding lines, not one huge string, keeps the trainer's memory bounded.
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename so concurrent runs never read a half-written cache.
    fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
