"""A training step in float32 beside the same step under bf16 autocast: what bf16 buys on this machine.

    mpirouter bench --precision bf16                        # CPU: + this table at presets tiny and small
    mpirouter bench --precision bf16 --step-presets debug,tiny --torch-bf16-kernels   # + torch's own bf16 kernels

`bench.run_bench` prints the table. Variants, timed interleaved (`timing.time_interleaved`) on one model and
one AdamW optimizer (`trainer.step.train_step`, the trainer's step: forward, backward, clip, optimizer):
    fp32                 no autocast
    bf16                 bf16 autocast as the trainer runs it: on a CPU without bf16 kernels its matmuls are
                         emulated in float32 (`core.precision`), elsewhere they run on the bf16 kernels
    bf16-torch-kernels   (--torch-bf16-kernels, a CPU without bf16 kernels only) torch's own bf16 kernels there:
                         the path a bf16 run took before the emulation
    fp32-torch-kernels   (the same, with --step-optimizer muon or muonh) a float32 step whose optimizer's bf16
                         Newton-Schulz iteration runs on torch's own bf16 kernels
`--step-optimizer` (default adamw) picks the optimizer.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..core.model import MoELM, preset_config
from ..core.precision import bf16_emulation, native_bf16_matmul
from ..core.routers import RouterConfig
from ..optim import OptimConfig, build_optimizer
from ..trainer.device import StepTimer
from ..trainer.step import train_step
from .timing import time_interleaved

FP32, BF16, BF16_TORCH, FP32_TORCH = "fp32", "bf16", "bf16-torch-kernels", "fp32-torch-kernels"
DEFAULT_STEP_PRESETS = {"cpu": "tiny,small", "cuda": "small,medium"}
"""Presets of the table when `--precision bf16` (or auto on CUDA) and no `--step-presets` is given."""


def step_variants(device: torch.device, torch_kernels: bool, optimizer: str = "adamw") -> dict[str, tuple[torch.dtype | None, bool | None]]:
    """name -> (autocast dtype, forced bf16 emulation or None for the trainer's choice)."""
    variants: dict[str, tuple[torch.dtype | None, bool | None]] = {FP32: (None, None), BF16: (torch.bfloat16, None)}
    if torch_kernels and not native_bf16_matmul(device):
        variants[BF16_TORCH] = (torch.bfloat16, False)
        if optimizer.startswith("muon"):
            variants[FP32_TORCH] = (None, False)
    return variants


def bench_step_precision(preset: str, reps: int = 5, repeat: int = 3, device: torch.device | str = "cpu",
                         torch_kernels: bool = False, optimizer: str = "adamw", batch_size: int = 16, seed: int = 0) -> dict:
    """Each variant's training step of `preset` (MPI router, `optimizer`), interleaved: per-repeat median ms, and per
    repeat the ratio of each variant's median to fp32's (> 1: slower than fp32)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    cfg = preset_config(preset, moe=dict(router=RouterConfig(kind="mpi")))
    model = MoELM(cfg).to(device)
    opt = build_optimizer(model, OptimConfig(name=optimizer))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len + 1), generator=gen).to(device)
    batch = [(idx[:, :-1], idx[:, 1:])]
    variants = step_variants(device, torch_kernels, optimizer)

    def run(amp: torch.dtype | None, emulate: bool | None) -> Callable[[StepTimer], None]:
        def one(timer: StepTimer) -> None:
            timer.start()
            if emulate is None:
                train_step(model, model, opt, batch, amp, grad_clip=1.0)
            else:
                with bf16_emulation(emulate):
                    train_step(model, model, opt, batch, amp, grad_clip=1.0)
            timer.stop()
        return one

    ms = time_interleaved({name: run(*v) for name, v in variants.items()}, device, reps, repeat)
    ratios = {name: [t / f for t, f in zip(ms[name], ms[FP32])] for name in ms if name != FP32}
    return {"preset": preset, "optimizer": optimizer, "tokens": batch_size * cfg.max_seq_len, "batch_size": batch_size, "repeats_ms": ms,
            "ratio_to_fp32": ratios, "bf16_matmuls": "native" if native_bf16_matmul(device) else "emulated"}
