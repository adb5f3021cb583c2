"""TrainConfig.deterministic: train() runs with torch's deterministic algorithms (and what they need on CUDA)
and restores the previous settings when it returns; CUBLAS_WORKSPACE_CONFIG stays set, as documented."""

from __future__ import annotations

import dataclasses
import os
import warnings

import pytest
import torch

import mpirouter.trainer.loop as loop
from mpirouter.common.config import from_dict, to_dict
from mpirouter.core.model import preset_config
from mpirouter.trainer.config import TrainConfig, check_resume_config
from mpirouter.trainer.data import DataConfig, prepare_data
from mpirouter.trainer.device import deterministic_algorithms

CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


@pytest.fixture(scope="module")
def data():
    full = prepare_data(DataConfig(), seq_len=32)
    return dataclasses.replace(full, train_ids=full.train_ids[:50_000], val_ids=full.val_ids[:1024])


@pytest.fixture
def no_cublas_config(monkeypatch):
    """CUBLAS_WORKSPACE_CONFIG unset for the test, and as it was afterwards (train() leaves it set)."""
    monkeypatch.setenv(CUBLAS, "")  # records the original value (or its absence) for the undo
    monkeypatch.delenv(CUBLAS)


def settings() -> tuple:
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)


def cfg_for(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(model=preset_config("debug", max_seq_len=32), preset="debug", steps=3, batch_size=4, eval_every=0,
                       eval_batches=1, eval_batch_size=4, log_every=1, out_dir=str(tmp_path / "run"), progress=False, **kw)


def test_a_deterministic_run_steps_in_deterministic_mode_and_restores_the_settings(monkeypatch, tmp_path, data,
                                                                                   no_cublas_config):
    seen = []
    real_step = loop.train_step

    def step(*args, **kwargs):
        seen.append((*settings(), os.environ.get(CUBLAS)))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", step)
    before = settings()
    assert before[0] is False
    result = loop.train(cfg_for(tmp_path, deterministic=True), data=data)
    assert result.step == 3 and seen == [(True, False, True, False, ":4096:8")] * 3
    assert settings() == before  # restored
    assert os.environ[CUBLAS] == ":4096:8"  # left set: cuBLAS reads it once, when CUDA first does a matmul


def test_the_default_run_leaves_the_settings_alone(monkeypatch, tmp_path, data, no_cublas_config):
    seen = []
    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", lambda *a, **k: seen.append(settings()) or real_step(*a, **k))
    loop.train(cfg_for(tmp_path), data=data)
    assert seen and all(s[0] is False for s in seen) and CUBLAS not in os.environ


def test_settings_are_restored_after_a_failure_and_a_user_setting_is_kept(tmp_path, no_cublas_config):
    with pytest.raises(ValueError, match="stop_at"):
        loop.train(cfg_for(tmp_path, deterministic=True), stop_at=0)
    assert settings()[0] is False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with deterministic_algorithms(True):
            assert settings()[:2] == (True, False)
        assert settings()[:2] == (True, True)  # the caller's own setting, warn_only included, comes back
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_cublas_config_already_set_is_kept(monkeypatch):
    monkeypatch.setenv(CUBLAS, ":16:8")
    with deterministic_algorithms(True):
        assert os.environ[CUBLAS] == ":16:8"


def test_cuda_initialized_before_the_config_is_set_is_warned_about(monkeypatch, no_cublas_config):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="CUBLAS_WORKSPACE_CONFIG"), deterministic_algorithms(True):
        pass
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.delenv(CUBLAS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with deterministic_algorithms(True):
            pass


def test_the_field_is_a_checked_boolean_that_older_configs_lack_and_a_resume_may_change():
    assert TrainConfig().deterministic is False
    with pytest.raises(ValueError, match=r'^deterministic must be a boolean \(true or false\), got "yes"$'):
        TrainConfig(deterministic="yes")
    saved = to_dict(TrainConfig())
    del saved["deterministic"]  # a config.json written before the field existed
    assert from_dict(TrainConfig, saved).deterministic is False
    check_resume_config(saved, TrainConfig(deterministic=True))  # how the run is run, like device and compile
