"""Run folders: refusing to reuse a run, moving one aside, and the one-job lock (stale locks included)."""

import json
import subprocess
import sys
import textwrap

import pytest

from mpirouter.common.config import to_dict
from mpirouter.trainer.config import TrainConfig
from mpirouter.trainer.rundir import (LOCK_FILE, RunLock, RunLockedError, claim_new_run, is_moved_aside, is_run_folder,
                                      lock_existing_run)


def make_run(path, content="{}"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(content)
    (path / "metrics.jsonl").write_text('{"event": "start", "step": 0, "params_total": 10}\n')
    (path / "checkpoints").mkdir()
    return path


def test_new_folder_is_created_and_locked(tmp_path):
    lock = claim_new_run(tmp_path / "a" / "b")
    try:
        assert (tmp_path / "a" / "b" / LOCK_FILE).is_file()
        with pytest.raises(RunLockedError, match="in use by another job"):
            RunLock(tmp_path / "a" / "b").acquire()
    finally:
        lock.release()
    RunLock(tmp_path / "a" / "b").acquire().release()  # released: free again


def test_existing_run_is_refused_and_untouched(tmp_path):
    run = make_run(tmp_path / "r", '{"mine": 1}')
    with pytest.raises(FileExistsError, match="already holds a run; continue it with --resume, or pass --force"):
        claim_new_run(run)
    assert (run / "config.json").read_text() == '{"mine": 1}'


def test_force_moves_the_old_run_aside_and_keeps_every_file(tmp_path):
    run = make_run(tmp_path / "r", '{"mine": 1}')
    said = []
    claim_new_run(run, force=True, say=said.append).release()
    aside = [p for p in tmp_path.iterdir() if is_moved_aside(p)]
    assert len(aside) == 1 and (aside[0] / "config.json").read_text() == '{"mine": 1}'
    assert str(aside[0]) in said[0]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # a fresh folder


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_folder_with_other_content_is_never_used_or_moved(tmp_path, force):
    (tmp_path / "notes.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="is not empty and holds no run"):
        claim_new_run(tmp_path, force=force)
    assert (tmp_path / "notes.txt").read_text() == "user data" and not any(is_moved_aside(p) for p in tmp_path.parent.iterdir())


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is an existing file"):
        claim_new_run(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_force_refuses_a_run_another_job_holds(tmp_path):
    run = make_run(tmp_path / "r")
    with lock_existing_run(run):
        with pytest.raises(RunLockedError, match="in use by another job"):
            claim_new_run(run, force=True)
    assert (run / "config.json").is_file() and not any(is_moved_aside(p) for p in tmp_path.iterdir())


def test_lock_of_a_killed_process_does_not_block(tmp_path):
    """kill -9 leaves the .lock file behind; the kernel dropped the flock, so the next job proceeds."""
    run = make_run(tmp_path / "r")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(run / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError):
            lock_existing_run(run)
        holder.kill()
        holder.wait(timeout=30)
        lock_existing_run(run).release()
    finally:
        holder.kill()


def test_a_folder_inside_another_runs_checkpoints_is_refused(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "checkpoints" / "step_0000020").mkdir(parents=True)
    for claim in (lambda p: claim_new_run(p, force=True), lock_existing_run):
        with pytest.raises(ValueError, match="is inside the checkpoints of the run"):
            claim(run / "checkpoints" / "step_0000020")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000020"]  # nothing created there


def test_a_refused_claim_leaves_nothing_behind(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(FileExistsError):
        claim_new_run(tmp_path)  # an existing folder we did not make: only our lock file goes
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_out_dot_with_force_starts_the_new_run_in_the_same_place(tmp_path, monkeypatch):
    run = make_run(tmp_path / "r")
    monkeypatch.chdir(run)
    claim_new_run(".", force=True, say=lambda _: None).release()
    assert run.is_dir() and not (run / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if is_moved_aside(p)] != []


def test_a_refused_resume_leaves_no_lock_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
        lock_existing_run(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def tree(root):
    return sorted((str(p.relative_to(root)), p.is_symlink(), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("layout", ["home-with-checkpoints-dir", "project-config-json", "own-metrics-jsonl", "own-checkpoints",
                                    "step-folder-of-another-tool"])
def test_a_folder_with_run_like_names_is_not_a_run_and_is_never_moved(tmp_path, layout, force):
    """Issue #22 row 3: a `checkpoints/` or `config.json` of the user's made the folder 'a run', and --force moved it."""
    home = tmp_path / "home"
    home.mkdir()
    if layout == "home-with-checkpoints-dir":
        for d in (".ssh", "checkpoints", "docs"):
            (home / d).mkdir()
        (home / ".ssh" / "id").write_text("key")
    elif layout == "project-config-json":
        (home / "config.json").write_text('{"lr": 1}')
    elif layout == "own-metrics-jsonl":
        (home / "metrics.jsonl").write_text('{"event": "start", "epoch": 1}\n')
    elif layout == "own-checkpoints":
        (home / "checkpoints" / "epoch_3").mkdir(parents=True)
        (home / "checkpoints" / "latest").write_text("epoch_3")
    else:  # a step folder of the trainer's name, holding someone else's files
        (home / "checkpoints" / "step_0000001").mkdir(parents=True)
        (home / "checkpoints" / "step_0000001" / "config.json").write_text('{"lr": 1}')
        (home / "checkpoints" / "latest").write_text("step_0000001")
    before = tree(tmp_path)
    assert not is_run_folder(home)
    with pytest.raises(FileExistsError, match="is not empty and holds no run"):
        claim_new_run(home, force=force)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("marker", ["metrics-start-record", "train-config", "checkpoint-folder"])
def test_each_trainer_marker_alone_makes_a_run(tmp_path, marker):
    run = tmp_path / "r"
    run.mkdir()
    if marker == "metrics-start-record":
        (run / "metrics.jsonl").write_text('{"event": "start", "step": 0, "params_total": 10}\n')
    elif marker == "train-config":
        (run / "config.json").write_text(json.dumps(to_dict(TrainConfig())))
    else:
        (run / "checkpoints" / "step_0000010").mkdir(parents=True)
        (run / "checkpoints" / "step_0000010" / "config.json").write_text(json.dumps(to_dict(TrainConfig())))
        (run / "checkpoints" / "step_0000010" / "model.safetensors").write_bytes(b"")
    assert is_run_folder(run)
    with pytest.raises(FileExistsError, match="already holds a run"):
        claim_new_run(run)


def test_force_through_a_symbolic_link_is_refused_and_changes_nothing(tmp_path):
    """Issue #22 row 4: --force moved the run behind the link, then failed "File exists", the link left dangling."""
    target = make_run(tmp_path / "tgt")
    (tmp_path / "lnk").symlink_to(target)
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="is a symbolic link to .*pass .* itself"):
        claim_new_run(tmp_path / "lnk", force=True)
    assert tree(tmp_path) == before


def test_a_long_folder_name_can_still_be_moved_aside(tmp_path):
    """Issue #22 row 24: the `.old-<time>` name of a legal 250-character folder name was too long for the file system."""
    run = make_run(tmp_path / ("r" * 250))
    claim_new_run(run, force=True, say=lambda _: None).release()
    aside = [p for p in tmp_path.iterdir() if is_moved_aside(p)]
    assert len(aside) == 1 and len(aside[0].name.encode()) <= 255 and (aside[0] / "config.json").is_file()


def test_a_resume_through_a_symbolic_link_to_another_runs_checkpoints_is_refused(tmp_path):
    """Rotation and clean-up of stale temporaries would reach into the run the link points to."""
    other = make_run(tmp_path / "A")
    (other / "checkpoints" / ".tmp-step_0000008").mkdir()  # another job's save in progress
    run = tmp_path / "B"
    run.mkdir()
    (run / "checkpoints").symlink_to(other / "checkpoints")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="checkpoints is a symbolic link"):
        lock_existing_run(run)
    assert tree(tmp_path) == before
