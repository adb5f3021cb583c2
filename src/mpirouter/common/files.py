"""Crash-safe small-file writes: write beside, flush, rename into place, flush the folder.

    from mpirouter.common.files import atomic_write_text, replacing
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

NAME_MAX = 255
"""Longest file name most file systems take (bytes); names derived from a user's (`.old-<time>`, hidden
temporaries) are kept within it."""


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk; best effort where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path):
    """Yield a temporary sibling of `path` to write; on success rename it into place, on failure remove it.

    Readers see either the old file or the whole new one, and a failed write (a full disk) leaves no
    half-written file behind. The temporary name carries the pid, so processes writing the same file
    never share it."""
    path = Path(path)
    tmp = path.with_name(fit_name(path.name, f".{os.getpid()}.tmp", prefix="."))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # best effort: the error worth reporting is the write's
        # a failed write(2) names no file, and "No space left on device" alone does not say where
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see either the old or the new content (see `replacing`)."""
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_files(folder: Path) -> None:
    """Flush every file under `folder`, and its subfolders' entries, to disk (before the folder is renamed into place)."""
    for f in sorted(Path(folder).rglob("*")):
        if f.is_dir():
            fsync_dir(f)
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def fit_name(name: str, suffix: str, prefix: str = "") -> str:
    """`prefix + name + suffix`, with `name` shortened (keeping its start) so the result fits NAME_MAX bytes.

    Names derived from a user's folder (moved-aside and temporary siblings) must not fail on a
    long but legal folder name; a shortened name keeps a hash of the whole so two long names stay apart.
    """
    whole = f"{prefix}{name}{suffix}"
    if len(whole.encode()) <= NAME_MAX:
        return whole
    tag = "~" + hashlib.sha256(name.encode()).hexdigest()[:8]
    room = NAME_MAX - len(f"{prefix}{tag}{suffix}".encode())
    short = name.encode()[:room].decode(errors="ignore")
    return f"{prefix}{short}{tag}{suffix}"
