"""Timing for the benchmarks: warm-up until a variant's time settles, then variants interleaved rep by rep.

    ms = time_interleaved({"a": run_a, "b": run_b}, device, reps=5, repeat=3)   # each run(timer) starts/stops timer

Out of GPU memory (torch's error or cuBLAS failing to allocate) drops a variant with the reason instead of ending
the benchmark (`dropped`). Used by bench.py (MoE layer, router share) and bench_precision.py (fp32 vs bf16 steps).
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..trainer.device import StepTimer

WARMUP_MIN, WARMUP_MAX, WARMUP_SETTLED = 2, 5, 0.10
"""Warm-up runs of each variant: at least WARMUP_MIN, then until two consecutive runs differ by at most WARMUP_SETTLED
of the later one, at most WARMUP_MAX. The first pays one-time costs (allocator growth, cuBLAS handles and heuristics,
kernel loading, autotuning); on a GPU the second can still pay some (the caching allocator settling)."""



@dataclass(frozen=True)
class Spread:
    """Median and range of one figure over repeats."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("a spread needs at least one value")
        return cls(statistics.median(values), min(values), max(values))

    @property
    def pct(self) -> float:
        """Half the range as a percentage of the median: ±pct% around it."""
        return 50.0 * (self.max - self.min) / self.median if self.median else 0.0


def fmt_ms(v: float) -> str:
    """Milliseconds with three significant digits or so."""
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def fmt_range(s: Spread, fmt: Callable[[float], str] = fmt_ms, unit: str = "") -> str:
    """"median [min–max]" of a spread, each figure formatted by `fmt`."""
    return f"{fmt(s.median)}{unit} [{fmt(s.min)}–{fmt(s.max)}]"

def one_line(e: BaseException, limit: int = 160) -> str:
    """An exception as one line of at most `limit` characters (its type's name when it has no message)."""
    return (" ".join(str(e).split()) or type(e).__name__)[:limit]


def is_out_of_memory(e: BaseException) -> bool:
    """A failed GPU allocation: torch's OutOfMemoryError, or cuBLAS/cuDNN failing to allocate their workspace,
    which reaches Python as a plain RuntimeError ("CUBLAS_STATUS_ALLOC_FAILED", "... out of memory")."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and ("CUBLAS_STATUS_ALLOC_FAILED" in str(e) or "out of memory" in str(e).lower())


def skip_reason(e: BaseException) -> str:
    return f"out of memory: {one_line(e)}" if is_out_of_memory(e) else f"failed: {one_line(e)}"


def free_memory(device: torch.device) -> None:
    """After a failed run: drop its tensors (outside the except block, where the traceback no longer holds them)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(run: Callable[[StepTimer], None], device: torch.device) -> int:
    """Run `run` until its time settles (WARMUP_MIN to WARMUP_MAX times); returns how many runs it took."""
    timer, last = StepTimer(device), None
    for n in range(1, WARMUP_MAX + 1):
        run(timer)
        t = timer.read()[-1]  # on CUDA one synchronization per warm-up run, none while timing
        if n >= WARMUP_MIN and abs(t - last) <= WARMUP_SETTLED * t:
            return n
        last = t
    return WARMUP_MAX


def time_interleaved(runs: Mapping[str, Callable[[StepTimer], None]], device: torch.device, reps: int,
                     repeat: int, warmup: bool = True, dropped: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Per name, the median ms of each repeat. Each run starts and stops the timer it is given around
    its timed region; names rotate rep by rep (and on across repeats). On CUDA the timers are CUDA
    events, read (one synchronization) once per repeat. `warmup`: `warm_up` each name first. `dropped`:
    a run that runs out of memory is dropped (its reason put there, absent from the result), the others
    go on; None: it raises."""
    names = list(runs)
    timers = {n: StepTimer(device) for n in names}
    if warmup:
        for n in names:
            warm_up(runs[n], device)
    out: dict[str, list[float]] = {n: [] for n in names}
    gone: set[str] = set()
    turn = 0
    for _ in range(repeat):
        for _ in range(reps):
            for n in names[turn % len(names):] + names[: turn % len(names)]:
                if n in gone:
                    continue
                try:
                    runs[n](timers[n])
                    continue
                except RuntimeError as e:
                    if dropped is None or not is_out_of_memory(e):
                        raise
                    dropped[n] = skip_reason(e)
                gone.add(n)
                free_memory(device)
            turn += 1
        for n in names:
            if n not in gone:
                out[n].append(1000.0 * statistics.median(timers[n].read()))
    return {n: ms for n, ms in out.items() if n not in gone}
