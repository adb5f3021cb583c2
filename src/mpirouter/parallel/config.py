"""`DistConfig`: how a training job is spread over processes (data parallelism and expert parallelism).

    torchrun --nproc_per_node=2 -m mpirouter train --set dist.strategy=fsdp --set dist.ep=2 ...

One process (no torchrun) ignores it except for validation; under torchrun every rank builds the
same config and `parallel.env.init_distributed` turns it into process groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..common.config import check_number

Strategy = Literal["ddp", "fsdp"]
MIN_TIMEOUT_S = 10.0
"""Shortest dist.timeout_s: below it, a healthy job's start (processes joining, a first collective that waits
for the slowest rank to load its data) can fail with a store timeout instead of running."""
Backend = Literal["auto", "gloo", "nccl"]


@dataclass
class DistConfig:
    """Data and expert parallelism of a job launched by torchrun."""

    strategy: Strategy = "ddp"
    """ddp: every rank holds all weights and all-reduces gradients; fsdp: FSDP2 `fully_shard` per
    transformer block and on the root (weights, gradients and optimizer state sharded over ranks)."""
    ep: int = 1
    """Expert-parallel degree K: the expert stacks are sharded over K ranks (a dp x ep mesh with
    dp = world_size / K); tokens travel to their experts' ranks by all-to-all. 1: no expert parallelism."""
    backend: Backend = "auto"
    """Process-group backend; auto: nccl when training on CUDA, gloo on CPU."""
    timeout_s: float = 600.0
    """A collective that waits longer than this fails (a dead rank gives an error on the others, not a hang).
    A job refuses less than MIN_TIMEOUT_S (`parallel.env.init_distributed`): starting it must fit in it."""

    def __post_init__(self) -> None:
        if self.strategy not in ("ddp", "fsdp"):
            raise ValueError(f"dist.strategy must be ddp or fsdp, got {self.strategy!r}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"dist.backend must be auto, gloo or nccl, got {self.backend!r}")
        check_number("dist.ep", self.ep, integer=True, ge=1)
        check_number("dist.timeout_s", self.timeout_s, gt=0)  # the minimum is a job's: saved runs with less still load
