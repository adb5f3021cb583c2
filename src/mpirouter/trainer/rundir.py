"""Run folders: never overwrite one by accident, move one aside on request, one job per folder.

    mpirouter train --out runs/a            # refuses if runs/a already holds a run
    mpirouter train --out runs/a --resume   # continues it
    mpirouter train --out runs/a --force    # moves the old run to runs/a.old-<time> first, then starts fresh

A run folder is one that holds config.json, metrics.jsonl or checkpoints/. A job holds an
exclusive lock on its run folder (`.lock`, an flock) for as long as it writes there, so a second
job refuses instead of interleaving its checkpoints with the first one's. The kernel drops an
flock when its process dies, even under `kill -9`, so a stale `.lock` file never blocks. (When the
ranks of one torchrun job write one folder together, rank 0 takes the lock for the job.)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"
RUN_MARKERS = ("config.json", "metrics.jsonl", "checkpoints")
ASIDE_MARK = ".old-"
"""Moved-aside folders are named `<name>.old-<UTC time>`; report discovery skips them."""


class RunLockedError(RuntimeError):
    """Another live job holds the run folder's lock."""


def is_run_folder(path: Path) -> bool:
    """Whether `path` holds (part of) a training run."""
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def is_moved_aside(path: Path) -> bool:
    return ASIDE_MARK in path.name


def _has_user_files(path: Path) -> bool:
    return any(p.name != LOCK_FILE for p in path.iterdir())


def check_not_inside_a_run(path: Path) -> None:
    """Refuse a folder inside another run's checkpoints/: checkpoint rotation there deletes folders."""
    for parent in Path(path).resolve().parents:
        if parent.name == "checkpoints" and is_run_folder(parent.parent):
            raise ValueError(f"{path} is inside the checkpoints of the run {parent.parent}; choose a folder outside it")


def move_aside(path: Path) -> Path:
    """Rename `path` to a free `<name>.old-<UTC time>[-n]` sibling and return the new path (nothing is deleted)."""
    path = path.resolve()  # "." has no name to extend
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}{ASIDE_MARK}{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{ASIDE_MARK}{stamp}-{n}")
        n += 1
    os.rename(path, target)
    return target


class RunLock:
    """An exclusive lock on a run folder, held from `acquire()` until `release()` (or process exit)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self.created = False

    def acquire(self) -> "RunLock":
        path = self.run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
                raise RunLockedError(f"run folder {self.run_dir} is in use by another job ({who}); "
                                     f"wait for it to finish or use another --out") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}


def claim_new_run(run_dir: str | Path, force: bool = False, say=print) -> RunLock:
    """Lock `run_dir` for a fresh run, creating it; refuse (FileExistsError) to reuse one that holds a run.

    force=True moves an existing run aside (never deletes it) and says where. A folder with other
    content that is not a run is refused even with force: it is not ours to move.
    """
    run_dir = Path(run_dir).absolute()  # "." must still name the folder after the old run is moved aside
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"--out {run_dir} is an existing file, not a run folder; choose another --out")
    check_not_inside_a_run(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    had_lock_file = (run_dir / LOCK_FILE).exists()
    try:
        lock = RunLock(run_dir).acquire()
    except BaseException:
        _undo_claim(run_dir, created, had_lock_file)
        raise
    try:
        if is_run_folder(run_dir):
            if not force:
                raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume, or pass --force "
                                      f"to move it aside (to {run_dir.name}{ASIDE_MARK}<time>) and start a new one")
            aside = move_aside(run_dir)
            say(f"moved the existing run {run_dir} aside to {aside}")
            run_dir.mkdir()
            old, lock = lock, RunLock(run_dir).acquire()
            old.release()
        elif _has_user_files(run_dir):
            raise FileExistsError(f"{run_dir} exists, is not empty and holds no run; choose another --out")
    except BaseException:
        lock.release()
        _undo_claim(run_dir, created, had_lock_file)
        raise
    lock.created = created
    return lock


def _undo_claim(run_dir: Path, created: bool, had_lock_file: bool) -> None:
    """A refused claim leaves the folder as it was: our lock file removed, the folder too if we made it."""
    if not had_lock_file:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
    if created:
        forget_unused(run_dir, created)


def forget_unused(run_dir: Path, created: bool) -> None:
    """After a job that wrote nothing: remove its lock file, and the folder if the job made it."""
    try:
        if sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]:
            (run_dir / LOCK_FILE).unlink()
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        pass


def lock_existing_run(run_dir: str | Path) -> RunLock:
    """Lock a run folder that must already exist (to resume it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {str(run_dir)!r} does not exist")
    check_not_inside_a_run(run_dir)
    had_lock_file = (run_dir / LOCK_FILE).exists()
    lock = RunLock(run_dir).acquire()  # first: a run another job is starting has no checkpoints/ yet
    if not (run_dir / "checkpoints").is_dir():
        lock.release()
        _undo_claim(run_dir, created=False, had_lock_file=had_lock_file)
        raise FileNotFoundError(f"{run_dir} has no checkpoints/ folder: not a run that can be resumed")
    return lock


def check_not_locked(run_dir: str | Path) -> None:
    """RunLockedError if another job holds `run_dir`; creates nothing (a folder without `.lock` is free)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(fd)
        raise RunLockedError(f"run folder {run_dir} is in use by another job (pid {holder.get('pid', '?')} on "
                             f"{holder.get('host', '?')}, since {holder.get('since', '?')}); wait for it to finish") from None
    finally:
        os.close(fd)  # closing drops our flock if we got it
