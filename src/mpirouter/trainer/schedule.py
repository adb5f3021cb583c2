"""The learning-rate schedule: linear warmup, then cosine, warmup-stable-decay (WSD) or constant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..common.config import check_number


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine / WSD / constant."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine decay to min_lr_ratio; wsd = warmup-stable-decay (linear decay over the last decay_fraction)."""
    warmup_steps: int = 50
    """Linear warmup from 0 to the peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    decay_fraction: float = 0.2
    """WSD only: share of the steps spent decaying."""

    def __post_init__(self) -> None:
        check_number("schedule.warmup_steps", self.warmup_steps, integer=True, ge=0)
        check_number("schedule.min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_number("schedule.decay_fraction", self.decay_fraction, gt=0, le=1)


def lr_multiplier(step: int, total_steps: int, sched: ScheduleConfig) -> float:
    """Learning-rate multiplier in [0, 1] for optimizer step `step` (0-based)."""
    if sched.warmup_steps > 0 and step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return 1.0
    lo = sched.min_lr_ratio
    if sched.kind == "cosine":
        span = max(1, total_steps - sched.warmup_steps)
        t = min(1.0, (step - sched.warmup_steps) / span)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
    decay_steps = max(1, int(round(sched.decay_fraction * total_steps)))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - lo) * min(1.0, (step - decay_start + 1) / decay_steps)
