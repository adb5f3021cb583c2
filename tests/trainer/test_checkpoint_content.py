"""Checkpoints damaged in content, not in size (issue #22 rows 8-10): NaN weights, bytes changed in place, a stale `latest`.

Every reader (train --resume, sample, inspect, export) falls back to the previous checkpoint and says so;
train --resume also sets the damaged one aside, so a later resume does not meet it again.
"""

import json
import os
import shutil
import struct

import pytest

import mpirouter.trainer.checkpoint as ckpt
from mpirouter.cli import main

FAST = ["--preset", "debug", "--steps", "4", "--batch-size", "2", "--set", "eval_every=0", "--set", "ckpt_every=2",
        "--set", "progress=false", "--set", "model.max_seq_len=16", "--set", "ckpt_keep=3"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A one-process run with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("content")
    assert main(["train", *FAST, "--out", str(root / "one")]) == 0
    return root


@pytest.fixture
def run(made, tmp_path):
    shutil.copytree(made / "one", tmp_path / "run")
    return tmp_path / "run"


def overwrite_tensor_bytes(path, byte=b"\xff"):
    """Bytes after the safetensors header replaced, size kept (0xFF... is NaN as float32)."""
    with open(path, "r+b") as f:
        header = struct.unpack("<Q", f.read(8))[0]
        size = os.path.getsize(path) - 8 - header
        f.seek(8 + header)
        f.write(byte * size)


def newest(run):
    return run / "checkpoints" / "step_0000004"


def cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


DAMAGE = {"nan-weights": "its weights are not all finite", "changed-bytes": "model.safetensors does not match its sha256",
          "finite-garbage-without-checksums": None}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("command", ["sample", "inspect", "export"])
def test_readers_fall_back_past_damaged_weights_and_say_so(run, tmp_path, capsys, command, damage):
    """Row 8: NaN weights gave a traceback in sample and a LinAlgError in inspect."""
    weights = newest(run) / ckpt.WEIGHTS
    if damage != "changed-bytes":  # as a checkpoint from before sha256.json: only the values can tell
        (newest(run) / ckpt.CHECKSUMS).unlink()
    overwrite_tensor_bytes(weights, b"\x01" if damage == "finite-garbage-without-checksums" else b"\xff")
    argv = {"sample": ["sample", str(run), "--tokens", "4"], "inspect": ["inspect", str(run), "--batches", "1"],
            "export": ["export", str(run), "--out", str(tmp_path / "exp")]}[command]
    code, _, err = cli(argv, capsys)
    assert code == 0
    if DAMAGE[damage]:
        assert f"step_0000004 is unreadable (ValueError: {DAMAGE[damage]}" in err and f"using {run}/checkpoints/step_0000002" in err
    else:  # nothing can tell finite garbage from weights: the newest is used
        assert err == ""
    if command == "export":
        source = json.loads((tmp_path / "exp" / "export.json").read_text())["step"]
        assert source == (2 if DAMAGE[damage] else 4)
    assert newest(run).is_dir()  # readers leave the run as it is


def test_resume_sets_a_nan_checkpoint_aside_and_continues_from_the_previous(run, capsys):
    """Row 8: `train --resume` reloaded the NaN step, stopped with exit 3, and every later resume did the same."""
    (newest(run) / ckpt.CHECKSUMS).unlink()
    overwrite_tensor_bytes(newest(run) / ckpt.WEIGHTS)
    code, out, err = cli(["train", "--resume", "--out", str(run), "--steps", "6"], capsys)
    assert code == 0, err
    assert "set the unreadable checkpoint aside as" in out and "falling back to" in out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert any(n.startswith("step_0000004.corrupt-") for n in names) and "step_0000006" in names


def test_bytes_changed_in_place_fail_the_checksum(run, capsys):
    """Bytes changed inside the weights (finite garbage, size kept) are caught by sha256.json, not trained on."""
    sums = json.loads((newest(run) / ckpt.CHECKSUMS).read_text())
    assert set(sums) == {ckpt.WEIGHTS, ckpt.STATE}
    overwrite_tensor_bytes(newest(run) / ckpt.WEIGHTS, b"\x01")
    said = []
    _, _, state = ckpt.load_checkpoint(run, fallback=True, say=said.append)
    assert state["step"] == 2 and "model.safetensors does not match its sha256" in said[0]


def test_non_finite_optimizer_state_counts_as_damaged(run):
    import torch

    state_file = newest(run) / ckpt.STATE
    state = torch.load(state_file, weights_only=False)
    first = next(iter(state["optimizer"]["state"].values()))
    first["exp_avg"].fill_(float("nan"))
    torch.save(state, state_file)
    (newest(run) / ckpt.CHECKSUMS).unlink()  # the damage is in the values, not caught by a hash
    _, _, state = ckpt.load_checkpoint(run, fallback=True, say=lambda _: None)
    assert state["step"] == 2


@pytest.mark.parametrize("command", ["sample", "inspect", "export"])
def test_a_latest_naming_a_deleted_folder_falls_back_to_the_newest_existing(run, tmp_path, capsys, command):
    """Row 9: the newest step folder deleted, `latest` still naming it: "no checkpoint found"."""
    shutil.rmtree(newest(run))
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"
    assert ckpt.resolve_checkpoint(run).name == "step_0000002"
    argv = {"sample": ["sample", str(run), "--tokens", "4"], "inspect": ["inspect", str(run), "--batches", "1"],
            "export": ["export", str(run), "--out", str(tmp_path / "exp")]}[command]
    assert cli(argv, capsys)[0] == 0


def test_a_sharded_checkpoint_with_a_damaged_shard_falls_back_in_one_process(tmp_path, capsys):
    """Row 10 in one process: bytes changed inside a DCP shard (size kept) gave an UnpicklingError traceback."""
    run = tmp_path / "sharded"
    _write_sharded_run(run)
    shard = next((run / "checkpoints" / "step_0000004" / ckpt.DCP_DIR).glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        f.write(b"\x13\x37" * 64)
    for argv in (["sample", str(run), "--tokens", "4"], ["inspect", str(run), "--batches", "1"]):
        code, _, err = cli(argv, capsys)
        assert code == 0 and "does not match its sha256" in err and "using" in err


def _write_sharded_run(run):
    """Checkpoints at steps 2 and 4 in the sharded (DCP) layout, written in this process (no process group)."""
    import dataclasses
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from mpirouter.common.config import to_dict
    from mpirouter.core.model import MoELM, preset_config
    from mpirouter.trainer.config import TrainConfig

    cfg = TrainConfig(model=preset_config("debug", max_seq_len=16), preset="debug", steps=4, out_dir=str(run))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=256))
    config = to_dict(cfg)
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    for step in (2, 4):
        tmp = ckpt.temporary_folder(run, step)
        with warnings.catch_warnings():  # DCP warns that it saves in one process: that is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(tmp / ckpt.DCP_DIR), no_dist=True)
        torch.save({"step": step, "world_size": 2}, tmp / ckpt.STATE)
        (tmp / ckpt.CONFIG).write_text(json.dumps(config))
        ckpt.write_checksums(tmp, {f"{ckpt.DCP_DIR}/{f.name}": ckpt.file_sha256(f) for f in (tmp / ckpt.DCP_DIR).iterdir()})
        ckpt.publish(tmp, keep=3)


@pytest.mark.parametrize("failure", ["out-of-memory", "permission-denied"])
def test_a_load_that_fails_for_this_machine_sets_nothing_aside(run, capsys, monkeypatch, failure):
    """Out of memory or a refused read says nothing about the checkpoint: reported, and every checkpoint kept."""
    import torch

    error = torch.OutOfMemoryError("CUDA out of memory") if failure == "out-of-memory" else PermissionError(13, "Permission denied", "x")

    def fails(*a, **k):
        raise error

    monkeypatch.setattr(ckpt, "load_model_tensors" if failure == "out-of-memory" else "load_file", fails)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, _, err = cli(["train", "--resume", "--out", str(run), "--steps", "6"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert ("out of memory" if failure == "out-of-memory" else "Permission denied") in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
