"""Crash-safe small-file writes: write beside, flush, rename into place, flush the folder.

    from mpirouter.common.files import atomic_write_text
"""

from __future__ import annotations

import os
from pathlib import Path


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers see either the old or the new content.

    The temporary name carries the pid, so processes writing the same file never share it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_files(folder: Path) -> None:
    """Flush every file under `folder`, and its subfolders' entries, to disk (before the folder is renamed into place)."""
    for f in sorted(Path(folder).rglob("*")):
        if f.is_dir():
            fsync_dir(f)
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
