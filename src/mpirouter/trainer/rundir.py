"""Run folders: never overwrite one by accident, move one aside on request, one job per folder.

    mpirouter train --out runs/a            # refuses if runs/a already holds a run
    mpirouter train --out runs/a --resume   # continues it
    mpirouter train --out runs/a --force    # moves the old run to runs/a.old-<time> first, then starts fresh

A run folder is recognised by what only the trainer writes (`is_run_folder`): a metrics.jsonl that
opens with the trainer's `start` record, a config.json holding a whole TrainConfig, or a checkpoints/
folder with the trainer's step_XXXXXXX checkpoints. A folder that merely has files with those names
is not a run, and is never moved aside, `--force` or not. A job holds an
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

from ..common.files import fit_name
from .checkpoint import CONFIG, DCP_DIR, STEP_NAME, WEIGHTS
from .metrics import METRICS_FILE

LOCK_FILE = ".lock"
ASIDE_MARK = ".old-"
"""Moved-aside folders are named `<name>.old-<UTC time>`; report discovery skips them."""
CONFIG_KEYS = frozenset({"model", "data", "optim", "steps", "out_dir"})
"""Top-level keys every config.json the trainer writes has (it writes all of TrainConfig's fields)."""


class RunLockedError(RuntimeError):
    """Another live job holds the run folder's lock."""


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` holds (part of) a training run, judged by the trainer's own markers only.

    Any one suffices: metrics.jsonl opening with the trainer's `start` record; a config.json that is a
    whole TrainConfig; checkpoints/ holding a step_XXXXXXX folder with the trainer's weights and config. A folder of the user's that happens to have a `checkpoints/` or a
    `config.json` of its own is not a run.
    """
    path = Path(path)
    return path.is_dir() and (_opens_with_start_record(path / METRICS_FILE) or _is_train_config(path / CONFIG)
                              or _has_checkpoints(path / "checkpoints"))


def _opens_with_start_record(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
        record = json.loads(first)
    except (OSError, ValueError):
        return False
    # the trainer's first record: "start" with the model's size (every version has written it)
    return isinstance(record, dict) and record.get("event") == "start" and "params_total" in record


def _is_train_config(path: Path) -> bool:
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:  # ours are a few kB
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and CONFIG_KEYS <= data.keys() and isinstance(data["model"], dict) \
        and isinstance(data["model"].get("moe"), dict)


def _has_checkpoints(root: Path) -> bool:
    """A step_XXXXXXX folder under `root` with the trainer's weights (model.safetensors or dcp/.metadata) and config."""
    if not root.is_dir() or root.is_symlink():
        return False
    try:
        return any(STEP_NAME.fullmatch(p.name) and p.is_dir() and ((p / WEIGHTS).is_file() or (p / DCP_DIR / ".metadata").is_file())
                   and _is_train_config(p / CONFIG) for p in root.iterdir())
    except OSError:
        return False


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
    """Rename `path` to a free `<name>.old-<UTC time>[-n]` sibling and return the new path (nothing is deleted).

    A symbolic link is refused: renaming what it points to would leave the link dangling.
    """
    if Path(path).is_symlink():
        raise FileExistsError(f"{path} is a symbolic link (to {os.readlink(path)}); pass the folder itself to move it aside")
    path = path.resolve()  # "." has no name to extend
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    n = 0
    while True:
        suffix = f"{ASIDE_MARK}{stamp}" + (f"-{n}" if n else "")
        target = path.with_name(fit_name(path.name, suffix))
        if not target.exists():
            break
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
    given = Path(run_dir)
    # "." and ".." must still name the folder after the old run is moved aside (the working folder moves with it)
    run_dir = Path(os.path.abspath(given))
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
    moved = False
    try:
        if is_run_folder(run_dir):
            if not force:
                raise FileExistsError(f"{run_dir} already holds a run; continue it with --resume, or pass --force "
                                      f"to move it aside (to {run_dir.name}{ASIDE_MARK}<time>) and start a new one")
            if run_dir.is_symlink():
                raise FileExistsError(f"--out {given} is a symbolic link to {os.readlink(run_dir)}, which holds a run; "
                                      f"--force moves only a real folder aside: pass {run_dir.resolve()} itself")
            aside = move_aside(run_dir)
            moved = True  # from here on nothing at run_dir is ours to undo: another process may make it meanwhile
            say(f"moved the existing run {run_dir} aside to {aside}")
            run_dir.mkdir()
            old, lock = lock, RunLock(run_dir).acquire()
            old.release()
        elif _has_user_files(run_dir):
            raise FileExistsError(f"{run_dir} exists, is not empty and holds no run; choose another --out")
    except BaseException:
        lock.release()
        if not moved:
            _undo_claim(run_dir, created, had_lock_file)
        raise
    lock.created = created or moved
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
    if (run_dir / "checkpoints").is_symlink():  # its rotation and clean-up would reach into the run it points to
        lock.release()
        _undo_claim(run_dir, created=False, had_lock_file=had_lock_file)
        raise FileExistsError(f"{run_dir}/checkpoints is a symbolic link (to {os.readlink(run_dir / 'checkpoints')}); "
                              f"a run's checkpoints must be a folder of its own: copy them in to resume here")
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
