"""Provenance: the source commit comes from the package's own checkout (not the cwd), "+dirty" only for
uncommitted changes under the given folder, and the environment record has every key."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from mpirouter.common.provenance import ENV_KEYS, PACKAGE_DIR, UNKNOWN_COMMIT, cpu_model, describe, environment, source_commit

REPO = PACKAGE_DIR.parent.parent
needs_git = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True, env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git repo with a committed package folder `pkg/` and a committed file outside it."""
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "other.txt").write_text("a\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    return root


@needs_git
def test_source_commit_ignores_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from_repo = source_commit()
    monkeypatch.chdir(tmp_path)  # not a checkout: the old git-in-cwd code said "unknown" here
    from_elsewhere = source_commit()
    assert from_repo != UNKNOWN_COMMIT and re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", from_elsewhere)
    # other people may edit the tree between the two calls, so compare the commit, not the dirty flag
    assert from_elsewhere.split("+")[0] == from_repo.split("+")[0] == git(REPO, "rev-parse", "--short", "HEAD")


@needs_git
def test_dirty_means_uncommitted_changes_to_tracked_files_under_the_folder(repo):
    commit = git(repo, "rev-parse", "--short", "HEAD")
    assert source_commit(repo / "pkg") == commit
    (repo / "pkg" / "new.py").write_text("untracked\n")
    (repo / "other.txt").write_text("changed outside the package\n")
    assert source_commit(repo / "pkg") == commit  # untracked files and changes elsewhere do not count
    assert source_commit(repo) == commit + "+dirty"
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    assert source_commit(repo / "pkg") == commit + "+dirty"


def test_not_a_checkout_is_unknown_and_does_not_raise(tmp_path, monkeypatch):
    assert source_commit(tmp_path) == UNKNOWN_COMMIT
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert source_commit() == UNKNOWN_COMMIT


@needs_git
def test_a_folder_without_tracked_files_inside_a_checkout_is_not_its_source(repo):
    (repo / "venv" / "site-packages" / "pkg").mkdir(parents=True)  # an install into an ignored virtualenv
    assert source_commit(repo / "venv" / "site-packages" / "pkg") == UNKNOWN_COMMIT


def test_environment_has_every_key_and_serializes():
    env = environment()
    assert tuple(env) == ENV_KEYS
    assert env["device"] == "cpu" and env["gpu"] is None and env["torch"] == torch.__version__
    assert env["threads"] == torch.get_num_threads() and env["cpu"] == cpu_model() and env["mpirouter_version"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", env["date"])
    assert json.loads(json.dumps(env)) == env


def test_describe_renders_new_and_old_records():
    env = {**environment(), "commit": "abc1234", "cpu": "Some CPU", "threads": 2, "cores": 4}
    line = describe(env)
    assert line.startswith(f"commit abc1234 · mpirouter {env['mpirouter_version']} · Some CPU (4 cores), 2 threads · torch ")
    assert " · cpu · " in line and line.endswith("UTC")
    old = {"command": "x", "date": "2026-11-23 03:04 UTC", "commit": "1b3dc7f", "machine": "x86_64  1 threads", "python": "3.11.7",
           "torch": "2.13.0+cpu", "platform": "Linux", "cores": 2}  # a session file from before provenance.py
    assert describe(old) == "commit 1b3dc7f · x86_64 1 threads (2 cores) · torch 2.13.0+cpu · 2026-11-23 03:04 UTC"
