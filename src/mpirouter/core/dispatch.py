"""Which grouped expert matmul runs: `torch._grouped_mm` or the loop (`moe._LoopGroupedLinear`).

`torch._grouped_mm` on CUDA (torch 2.9 to 2.13, `_grouped_mm_cuda` in aten/src/ATen/native/cuda/
GroupedBlas.cpp) is one kernel only for bf16 operands on compute capability 9.x (Hopper) and 10.x
(datacenter Blackwell). Everywhere else (SM 8.x, SM 12.x, fp32 or fp16 on any GPU) it runs
`_grouped_mm_fallback`: the offsets copied to the host (a synchronization per call: three per layer
forward, more in its backward), then one matmul per expert, which is the loop's work plus the syncs.
dispatch="auto" therefore takes grouped_mm only where it is the kernel, and an explicit
dispatch="grouped_mm" on CUDA is refused where it would be the fallback.

Known bug of the SM 10.x kernel (pytorch#172439, open when this was written): its backward gives experts
that received no tokens nonzero weight gradients (they should be exactly zero); on SM 9.x they are
zero. Choose dispatch="loop" on a B200/GB200 until that is fixed in the torch you run.
"""

from __future__ import annotations

from typing import Literal

import torch

Dispatch = Literal["auto", "loop", "grouped_mm"]

GROUPED_MM_KERNEL_MAJORS = (9, 10)
"""Compute capability majors where `torch._grouped_mm` runs its bf16 kernel rather than the fallback."""


def _grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm_fallback_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `torch._grouped_mm` would run its syncing fallback for operands of `dtype` on CUDA `device`; None
    where it runs its one kernel, and on CPU (where the fallback reads no device, so it costs no sync)."""
    if device.type != "cuda":
        return None
    if dtype != torch.bfloat16:
        return (f"torch._grouped_mm runs {str(dtype).removeprefix('torch.')} on CUDA only through its fallback "
                f"(the offsets read to the host, then one matmul per expert); its kernel is bf16 only")
    major, minor = torch.cuda.get_device_capability(device)
    if major not in GROUPED_MM_KERNEL_MAJORS:
        return (f"torch._grouped_mm has its bf16 kernel only on compute capability 9.x/10.x; on this {major}.{minor} GPU "
                f"it runs its fallback (the offsets read to the host, then one matmul per expert)")
    return None


def choose_dispatch(device: torch.device, dtype: torch.dtype) -> Literal["loop", "grouped_mm"]:
    """What dispatch="auto" runs for operands of `dtype` on `device`.

    CUDA: `torch._grouped_mm` where it is one real kernel, bf16 on compute capability 9.x or 10.x
    (H100/H200, B200; see the module docstring for the open SM 10.x gradient bug); elsewhere torch
    runs it as a fallback loop of matmuls that syncs, and the loop here is as fast. That choice also
    makes a CUDA step free of host reads: the loop needs the expert boundaries on the host (one read
    per layer), grouped_mm takes them as a device tensor.
    CPU: the loop. Measured against grouped_mm on two CPUs (`mpirouter bench`, results/bench/):
    tied within run-to-run noise at the tiny, small and fine shapes; fp32 grouped_mm also does
    not compile on CPU (its meta function accepts only bf16).
    """
    if device.type == "cuda" and _grouped_mm_available() and grouped_mm_fallback_reason(device, dtype) is None:
        return "grouped_mm"
    return "loop"


def _grouped_mm_aligned(x_MI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    size = x_MI.element_size()
    return (x_MI.shape[1] * size) % 16 == 0 and (w_EOI.shape[1] * size) % 16 == 0


def resolve_dispatch(x_MI: torch.Tensor, w_EOI: torch.Tensor, impl: Dispatch) -> Literal["loop", "grouped_mm"]:
    """The path `grouped_linear` takes: "auto" asks `choose_dispatch`; grouped_mm falls back to the loop where
    a row is not a multiple of 16 bytes (the kernel's stride rule). The rule depends only on {D, F} and
    the dtype, so one answer holds for all three expert matmuls of a layer.

    An explicit "grouped_mm" on CUDA where torch would run its fallback is a ValueError: it would be the
    loop's work plus host syncs in every matmul, silently (`grouped_mm_fallback_reason`)."""
    if impl == "auto":
        impl = choose_dispatch(x_MI.device, x_MI.dtype)
    if impl == "grouped_mm":
        if not _grouped_mm_available():
            raise RuntimeError("dispatch='grouped_mm' needs torch._grouped_mm (torch >= 2.8); use dispatch='loop'")
        slow = grouped_mm_fallback_reason(x_MI.device, x_MI.dtype)
        if slow is not None:
            raise ValueError(f"dispatch='grouped_mm' refused: {slow}; use dispatch='auto' or 'loop'")
        if not _grouped_mm_aligned(x_MI, w_EOI):
            return "loop"
    return impl


__all__ = ["Dispatch", "GROUPED_MM_KERNEL_MAJORS", "choose_dispatch", "grouped_mm_fallback_reason", "resolve_dispatch"]
