"""What a torchrun job prints when something goes wrong (issue #22 rows 10, 11, 12, 20): one line, once, no traceback.

Each test launches 2 ranks (gloo on CPU, a few seconds). A run's own messages start with "mpirouter";
torchrun adds its own summary of a failed job after them, which is not ours to shape.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from mpirouter.trainer import checkpoint as ckpt

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def train_args(text_corpus) -> list[str]:
    return ["train", "--preset", "debug", "--batch-size", "2", "--data", str(text_corpus(40_000)), "--set", "progress=false",
            "--set", "eval_every=0", "--set", "model.max_seq_len=16"]


def ours(output: str) -> list[str]:
    """The lines our processes printed: ours start with "mpirouter <command>" or "warning:", a rank's traceback
    with "[rankN]:" (torchrun's own warnings and its summary of a failed job are left out)."""
    return [line for line in output.splitlines()
            if line.startswith(("mpirouter train", "mpirouter compare", "mpirouter [rank", "[rank", "warning:"))]


def test_a_bad_setting_is_printed_once_not_once_per_rank(torchrun, tmp_path, train_args):
    """Row 20: every rank printed the same bad-input line (rank 0's, then "[rank 1]")."""
    done = torchrun("-m", 2, "mpirouter", *train_args, "--steps", "2", "--set", "model.moe.top_k=99", "--out", str(tmp_path / "r"),
                    check=False)
    assert done.returncode != 0
    assert ours(done.stdout) == ["mpirouter train: error: model.moe: top_k must be in [1, num_experts=4], got 99"]
    assert not (tmp_path / "r").exists()


def test_a_rank_that_cannot_write_its_shard_is_named_once(torchrun, tmp_path, train_args):
    """Row 12: one rank's folder read-only gave a CheckpointException traceback on both ranks."""
    run = tmp_path / "r"
    done = torchrun(HERE / "dist_faults.py", 2, "1", str(errno.EACCES), *train_args, "--steps", "4", "--set", "ckpt_every=2",
                    "--out", str(run), check=False)
    lines = ours(done.stdout)
    assert done.returncode != 0 and len(lines) == 1, done.stdout[-3000:]
    assert lines[0].startswith("mpirouter train: error: rank 1: cannot write the checkpoint of step 2 (Permission denied: ")
    assert "__1_0.distcp" in lines[0] and "previous checkpoints are intact" in lines[0]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name != "latest"]  # the temporary folder went too


def test_a_full_disk_under_torchrun_is_one_line_and_keeps_the_previous_checkpoint(torchrun, small_disk, train_args):
    """Row 11: a full disk during a save gave RuntimeError/CheckpointException tracebacks."""
    run = small_disk("5m") / "r"
    done = torchrun("-m", 2, "mpirouter", *train_args, "--steps", "200", "--set", "ckpt_every=10", "--set", "model.max_seq_len=64",
                    "--out", str(run), check=False)
    lines = ours(done.stdout)
    assert done.returncode != 0 and len(lines) == 1, done.stdout[-3000:]
    assert lines[0].startswith("mpirouter train: error: no space left on device: ") and "--resume" in lines[0]
    kept = ckpt.step_folders(run / "checkpoints")
    assert kept and not list((run / "checkpoints").glob(".tmp-*"))
    ckpt.verify_checksums(kept[-1])  # what is left is whole


@pytest.fixture(scope="module")
def sharded_run(torchrun, tmp_path_factory, train_args) -> Path:
    run = tmp_path_factory.mktemp("sharded") / "r"
    torchrun("-m", 2, "mpirouter", *train_args, "--steps", "4", "--set", "ckpt_every=2", "--set", "ckpt_keep=2", "--out", str(run))
    return run


@pytest.mark.parametrize("damage", ["changed-bytes", "unpicklable-without-checksums"])
def test_a_damaged_shard_is_set_aside_and_the_job_resumes_from_the_previous(torchrun, sharded_run, tmp_path, damage):
    """Row 10: bytes flipped inside a DCP shard (size unchanged) gave UnpicklingError/CheckpointException on both ranks."""
    run = tmp_path / "r"
    shutil.copytree(sharded_run, run)
    newest = ckpt.step_folders(run / "checkpoints")[-1]
    shard = newest / ckpt.DCP_DIR / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "changed-bytes":  # inside the tensors: finite garbage that only the checksum can tell
        data[len(data) // 2: len(data) // 2 + 64] = b"\x13\x37" * 32
    else:  # the head of the shard (pickled items) and no sha256.json, as a checkpoint written before it
        data[:200] = b"\xfc" * 200
        (newest / ckpt.CHECKSUMS).unlink()
    shard.write_bytes(bytes(data))
    done = torchrun("-m", 2, "mpirouter", "train", "--resume", "--out", str(run), "--steps", "6", check=False)
    assert done.returncode == 0 and "Traceback" not in done.stdout, done.stdout[-3000:]
    assert "warning: checkpoint" in done.stdout and "could not be loaded" in done.stdout and "set it aside" in done.stdout
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert any(n.startswith(newest.name + ".corrupt-") for n in names) and "step_0000006" in names
