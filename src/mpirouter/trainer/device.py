"""Devices, precision and step timing without host-device synchronization.

    timer = StepTimer(device); timer.start(); ...step...; timer.stop(); seconds = timer.read()  # read: at log time only

On CUDA a step is queued asynchronously, so host wall time around it measures the launches,
not the work, unless the host waits (a synchronization per step, which costs more than a
small model's step). `StepTimer` records CUDA events around each step instead and reads
them back only when asked, which is once per logging interval.
"""

from __future__ import annotations

import time

import torch

from .config import parse_device


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if available else cpu; a named device must exist on this machine."""
    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU for 'auto'/'bf16'; None (float32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class StepTimer:
    """Per-step durations: CUDA events on a GPU (no synchronization until `read`), wall time on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list = []
        self._t0: float | object | None = None

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() without start()")
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._t0, end))
        else:
            self._pending.append(time.perf_counter() - self._t0)
        self._t0 = None

    def read(self) -> list[float]:
        """Seconds of each step stopped since the last read (on CUDA this waits for the last of them)."""
        pending, self._pending = self._pending, []
        if not self.cuda:
            return pending
        if pending:
            pending[-1][1].synchronize()  # sync point: once per logging interval
        return [start.elapsed_time(end) / 1000.0 for start, end in pending]
