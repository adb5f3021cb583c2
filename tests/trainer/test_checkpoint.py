"""Checkpoints: never non-finite, readable by the group, no leftovers after a failed save, fallback past a corrupt one."""

import os
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
    with pytest.raises(OSError, match="No space left"):
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
