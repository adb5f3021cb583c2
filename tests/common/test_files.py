"""Crash-safe writes: a failed write leaves the old file as it was and no temporary file behind."""

import errno
import os

import pytest

from mpirouter.common import files
from mpirouter.common.files import atomic_write_text


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError) as e:
        atomic_write_text(path, "new\n" * 1000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)  # says which file could not be written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"] and path.read_text() == "old\n"
    monkeypatch.undo()
    atomic_write_text(path, "new\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"] and path.read_text() == "new\n"
