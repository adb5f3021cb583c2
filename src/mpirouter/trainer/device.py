"""Devices, precision, deterministic kernels, and step timing without host-device synchronization.

    timer = StepTimer(device); timer.start(); ...step...; timer.stop(); seconds = timer.read()  # read: at log time only

On CUDA a step is queued asynchronously, so host wall time around it measures the launches,
not the work, unless the host waits (a synchronization per step, which costs more than a
small model's step). `StepTimer` records CUDA events around each step instead and reads
them back only when asked, which is once per logging interval.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Iterator

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
    """bf16 autocast for 'bf16', and for 'auto' on a GPU; None (float32) otherwise.

    'auto' stays float32 on every CPU (docs/precision.md has the measurements): where the CPU has no bf16
    kernels a bf16 step is slower than float32 even emulated (`core.precision`), and where it has them (AMX)
    no training step has yet been measured faster in bf16 (`mpirouter bench --precision bf16` measures it)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def use_device(device: torch.device) -> None:
    """Make a CUDA `device` with an index the current device of this process (one process; torchrun's ranks
    get theirs in `init_distributed`). It stays current after the caller returns, as under torchrun.

    Tensors placed on cuda:N run there whatever the current device is, but what takes no tensor
    argument does not: CUDA events, `torch.cuda.synchronize()`, memory statistics, the current stream
    (and torch's own `getCurrentDeviceProperties()`). With cuda:0 current they would time, wait on
    and report a GPU that does no work.
    """
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """While the block runs (when `enabled`): `torch.use_deterministic_algorithms(True)` with what it needs on
    CUDA; the previous settings are restored after it. `TrainConfig.deterministic` says why.

    CUBLAS_WORKSPACE_CONFIG=:4096:8 (unless already set) is left set afterwards: cuBLAS reads it when it
    creates its first handle and torch checks it at every cuBLAS call of deterministic mode, so it must be
    in the environment before CUDA does any matmul in this process (warned about when CUDA is already up).
    cudnn.deterministic (and no cudnn.benchmark) covers cuDNN; SDPA needs nothing more in torch 2.13: in
    this mode flash attention runs its deterministic backward, memory-efficient attention runs without
    split keys, and cuDNN attention is not selected.
    """
    if not enabled:
        yield
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():
            warnings.warn("deterministic: CUDA was initialized before CUBLAS_WORKSPACE_CONFIG was set; if cuBLAS already "
                          "ran in this process its results may still vary (set CUBLAS_WORKSPACE_CONFIG=:4096:8 before "
                          "starting Python)", stacklevel=3)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


class StepTimer:
    """Per-step durations: CUDA events on a GPU (no synchronization until `read`), wall time on CPU.

    The events are recorded on `device`'s current stream, not the current device's: on cuda:1 with
    cuda:0 current, events on cuda:0 would time an idle GPU.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._pending: list = []
        self._t0: float | object | None = None

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> None:
        if self.cuda:
            self._t0 = self._event()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError("StepTimer.stop() without start()")
        if self.cuda:
            end = self._event()
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
