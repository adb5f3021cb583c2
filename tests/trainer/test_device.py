"""`--device cuda:N` in one process, without a GPU (monkeypatched torch.cuda): the step timer's CUDA events are
recorded on cuda:N, and train() makes cuda:N the current device before anything runs there."""

from __future__ import annotations

import pytest
import torch

from mpirouter.core.model import preset_config
from mpirouter.trainer.config import TrainConfig
from mpirouter.trainer.device import StepTimer, use_device
from mpirouter.trainer.loop import train


class FakeEvent:
    """torch.cuda.Event without a GPU: keeps the stream it was recorded on; every interval is 5 ms."""

    def __init__(self, enable_timing: bool = False):
        self.stream = "never recorded"

    def record(self, stream=None) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "FakeEvent") -> float:
        return 5.0


def fake_stream(device=None):
    """torch.cuda.current_stream without a GPU: names the device it belongs to (None: the current one)."""
    return ("stream", "current" if device is None else torch.device(device).index)


def test_step_timer_records_its_events_on_its_own_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", fake_stream)
    timer = StepTimer(torch.device("cuda", 1))
    for _ in range(2):
        timer.start()
        timer.stop()
    assert [(a.stream, b.stream) for a, b in timer._pending] == [(("stream", 1), ("stream", 1))] * 2
    assert timer.read() == [0.005, 0.005] and timer.read() == []


def test_use_device_sets_only_an_indexed_cuda_device(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    for device in ("cuda:1", "cuda:0", "cuda", "cpu"):
        use_device(torch.device(device))
    assert calls == [torch.device("cuda", 1), torch.device("cuda", 0)]


def test_train_on_cuda_1_makes_it_the_current_device_first(cuda_set_device_stops, tmp_path):
    cfg = TrainConfig(model=preset_config("debug"), preset="debug", steps=1, device="cuda:1", out_dir=str(tmp_path / "run"),
                      progress=False)
    with pytest.raises(cuda_set_device_stops.stop):
        train(cfg)
    assert cuda_set_device_stops == [torch.device("cuda", 1)]
    assert not (tmp_path / "run").exists()  # before the run folder is claimed, data read or a model built
