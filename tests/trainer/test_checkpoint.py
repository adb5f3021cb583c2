"""Checkpoints: never non-finite, readable by the group, no leftovers after a failed save, fallback past a corrupt one."""

import os
import shutil
import stat

import pytest
import torch

import mpirouter.trainer.checkpoint as ckpt
from mpirouter.core.model import MoELM, preset_config


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return MoELM(preset_config("debug"))


def test_weights_file_follows_the_umask_like_other_outputs(tmp_path, model):
    old = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, model, {}, {"step": 1})
    finally:
        os.umask(old)
    for name in (ckpt.WEIGHTS, ckpt.CONFIG, ckpt.STATE):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o644, name


def test_non_finite_weights_are_never_checkpointed(tmp_path, model):
    ckpt.save_checkpoint(tmp_path, 1, model, {}, {"step": 1})
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.NonFiniteWeightsError, match="not finite at step 2"):
        ckpt.save_checkpoint(tmp_path, 2, model, {}, {"step": 2})
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_0000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def test_failed_save_removes_its_temporary_folder(tmp_path, model, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 1, model, {}, {"step": 1})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError, match="no space left on device: writing the checkpoint of step 2"):
        ckpt.save_checkpoint(tmp_path, 2, model, {}, {"step": 2})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]


@pytest.mark.parametrize("victim", [ckpt.WEIGHTS, ckpt.STATE], ids=["weights", "train-state"])
def test_corrupt_checkpoint_is_a_clear_error_or_falls_back_to_the_previous(tmp_path, model, victim):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, {"step": step})
    (tmp_path / "checkpoints" / "step_0000002" / victim).write_bytes(b"\0garbage" * 10)
    with pytest.raises(ckpt.CorruptCheckpointError, match="step_0000002 is unreadable"):
        ckpt.load_checkpoint(tmp_path)
    said = []
    config, _, state = ckpt.load_checkpoint(tmp_path, fallback=True, say=said.append)
    assert config == {"step": 1} and state["step"] == 1
    assert "step_0000002" in said[0] and "step_0000001" in said[-1]


def test_last_finite_checkpoint_skips_a_legacy_checkpoint_with_nan(tmp_path, model):
    ckpt.save_checkpoint(tmp_path, 1, model, {}, None)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    bad = tmp_path / "checkpoints" / "step_0000002"
    bad.mkdir()
    ckpt.save_file(ckpt.model_tensors(model), str(bad / ckpt.WEIGHTS))  # as older versions could write it
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text(bad.name)
    assert ckpt.last_finite_checkpoint(tmp_path).name == "step_0000001"


def test_rotation_deletes_only_its_own_step_folders(tmp_path, model):
    root = tmp_path / "checkpoints"
    for name in ("step_0000001.old-20260101-000000", "step_0000001.corrupt-20260101-000000", "step_notes"):
        (root / name).mkdir(parents=True)
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, {}, None, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001.corrupt-20260101-000000",
                                                      "step_0000001.old-20260101-000000", "step_0000003", "step_notes"]


def test_missing_train_state_falls_back_like_a_corrupt_one(tmp_path, model):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, {"step": step})
    (tmp_path / "checkpoints" / "step_0000002" / ckpt.STATE).unlink()
    skipped = []
    config, _, state = ckpt.load_checkpoint(tmp_path, fallback=True, say=lambda _: None, skipped=skipped)
    assert state["step"] == 1 and config == {"step": 1}
    assert [p.name for p in skipped] == ["step_0000002"]
    assert ckpt.set_aside(skipped)[0].name.startswith("step_0000002.corrupt-")
    assert [p.name for p in ckpt.step_folders(tmp_path / "checkpoints")] == ["step_0000001"]


def test_weights_that_do_not_fit_the_config_are_one_clear_error(model):
    other = MoELM(preset_config("debug", dim=32))
    with pytest.raises(ValueError, match="checkpoint weights do not match its config.json .*size mismatch"):
        ckpt.load_model_tensors(other, ckpt.model_tensors(model))


def test_a_complete_checkpoint_newer_than_latest_is_used(tmp_path, model):
    """A crash between renaming a checkpoint into place and updating `latest` leaves it complete."""
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, {"step": step})
    (tmp_path / "checkpoints" / ckpt.LATEST).write_text("step_0000001")
    skipped = []
    config, _, _ = ckpt.load_checkpoint(tmp_path, fallback=True, say=lambda _: None, skipped=skipped)
    assert config == {"step": 2} and skipped == []


def test_step_numbers_past_seven_digits_sort_and_rotate_by_number(tmp_path, model):
    for step in (9_999_999, 10_000_000, 10_000_001):
        ckpt.save_checkpoint(tmp_path, step, model, {}, None, keep=2)
    assert [p.name for p in ckpt.step_folders(tmp_path / "checkpoints")] == ["step_10000000", "step_10000001"]


def test_a_save_that_fails_for_want_of_space_says_so_in_one_line(tmp_path, model, monkeypatch):
    """Issue #22 row 11: torch.save reports a short write as a RuntimeError with no errno ("unexpected pos")."""
    ckpt.save_checkpoint(tmp_path, 1, model, {}, {"step": 1})

    def short_write(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 531712 vs 531604")

    monkeypatch.setattr(ckpt.torch, "save", short_write)
    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: real(path)._replace(free=4096))  # a full file system
    with pytest.raises(OSError, match="no space left on device: writing the checkpoint of step 2 to .* previous checkpoints "
                                      "are intact") as raised:
        ckpt.save_checkpoint(tmp_path, 2, model, {}, {"step": 2})
    assert raised.value.errno == 28
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def test_other_save_failures_are_not_called_a_full_disk(tmp_path, model, monkeypatch):
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        ckpt.save_checkpoint(tmp_path, 1, model, {}, {"step": 1})


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_real_full_disk_is_one_line_and_loses_nothing(small_disk, tmp_path, capsys, command):
    """Issue #22 row 11 on a 2 MB tmpfs: train's third checkpoint, or an export, does not fit."""
    from mpirouter.cli import main

    disk = small_disk("2m" if command == "train" else "300k")
    fast = ["--preset", "debug", "--set", "progress=false", "--set", "eval_every=0", "--set", "ckpt_every=5",
            "--set", "ckpt_keep=50", "--set", "model.max_seq_len=16"]
    run = disk / "r" if command == "train" else tmp_path / "r"
    code = main(["train", *fast, "--steps", "60", "--batch-size", "2", "--out", str(run)])
    if command == "export":
        assert code == 0
        code = main(["export", str(run), "--out", str(disk / "e")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"mpirouter {command}: error: no space left on device: "), err
    if command == "train":
        kept = ckpt.step_folders(run / "checkpoints")
        assert kept and not list((run / "checkpoints").glob(".tmp-*"))
        ckpt.verify_checksums(kept[-1])
    else:
        assert sorted(p.name for p in disk.iterdir()) == []
