"""bf16 autocast, and bf16 matmuls emulated on CPUs that have no bf16 kernels.

    with bf16_matmuls(device, amp):        # what train_step, evaluate and bench enter (amp: torch.bfloat16 or None)
        with autocast(device, amp):
            loss = model(x, y).loss
        loss.backward()                    # the backward's matmuls are emulated too (a dispatch mode)

bf16 autocast runs matmuls with bf16 operands; a GPU (and a CPU with AVX512-BF16 or AMX, through
oneDNN) multiplies them, accumulates in float32 and rounds the result to bf16. A CPU without those
instructions (AVX2 only, e.g. the AMD EPYC Zen 3 these machines sometimes are) falls back to torch's
reference kernels, which keep the numerics but are slow: on such a machine (2 threads, torch 2.13,
docs/precision.md) `x @ W` took up to 100x float32's time, a bf16 training step of the `tiny` preset
16x, and a float32 step with the Muon optimizer (its Newton-Schulz iteration is bf16) 13x.

`EmulateBF16Matmuls` computes those GEMMs in float32 on the bf16 operands and rounds the result to bf16.
Products of bf16 numbers are exact in float32 and the bf16 kernels accumulate in float32, so the result
is the same up to summation order (against torch's reference kernels: equal but for one bf16 rounding
step in under 1% of the entries, tests/core/test_precision.py), at float32's speed plus the casts.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_MATMULS = (aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten._grouped_mm)
"""The GEMMs autocast, the MoE layers and Muon call. Only their `default` and `out` overloads are emulated (the loop
dispatch writes with torch.mm(..., out=buffer)); attention is not: torch's own bf16 attention kernel rounds the
softmax probabilities to bf16 before multiplying by V, as GPU kernels do, which an emulation in float32 would not."""
_EMULATED_OVERLOADS = ("default", "out")


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_kernels() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: its bf16 GEMMs are the reference ones
        return False


def native_bf16_matmul(device: torch.device | str) -> bool:
    """Whether bf16 GEMMs run on fast kernels on `device`: always on CUDA; on a CPU when oneDNN has bf16 kernels
    for it (AVX512-BF16, AMX-BF16, or AVX512 with bf16 conversion)."""
    return torch.device(device).type != "cpu" or _cpu_has_bf16_kernels()


def _floats(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def is_bf16_cpu_gemm(func, args: tuple, kwargs: dict) -> bool:
    """Whether `func(*args, **kwargs)` is a GEMM that `EmulateBF16Matmuls` computes in float32: an emulated overload
    whose floating tensors (operands, bias, `out`) are all bf16 on the CPU. Anything else (mixed dtypes included)
    runs as it is, and fails where torch would."""
    floats = _floats(args, kwargs)
    return (func.overloadpacket in _MATMULS and func._overloadname in _EMULATED_OVERLOADS and bool(floats)
            and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in floats))


def bf16_gemm_in_float32(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """`func(*args, **kwargs)`, a bf16 GEMM (`is_bf16_cpu_gemm`), computed with its bf16 tensors in float32 and the
    result rounded to `out_dtype` (bf16 unless given); an `out=` tensor is resized if need be and gets the result."""
    named = {**dict(zip((a.name for a in func._schema.arguments), args)), **kwargs}
    out, out_dtype = named.pop("out", None), named.pop("out_dtype", None) or torch.bfloat16
    up = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v for k, v in named.items()}
    result = func.overloadpacket.default(**up).to(out_dtype)
    if out is None:
        return result
    if out.shape != result.shape:
        out.resize_(result.shape)
    return out.copy_(result)


class EmulateBF16Matmuls(TorchDispatchMode):
    """While active: every bf16 GEMM on the CPU (`is_bf16_cpu_gemm`) runs through `bf16_gemm_in_float32`.

    A dispatch mode sits below autograd, so autograd saves the bf16 operands and the backward's matmuls come
    here too, exactly as a bf16 run saves and multiplies them on a GPU. Everything else runs as it is.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_bf16_cpu_gemm(func, args, kwargs):
            return bf16_gemm_in_float32(func, args, kwargs)
        return func(*args, **kwargs)


def autocast(device: torch.device | str, amp: torch.dtype | None) -> torch.autocast:
    """`torch.autocast` to `amp` on the device's type; off when `amp` is None (float32). Around the forward only."""
    return torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None)


def bf16_matmuls(device: torch.device | str, amp: torch.dtype | None = torch.bfloat16,
                 emulate: bool | None = None) -> contextlib.AbstractContextManager:
    """`EmulateBF16Matmuls` when `amp` is bf16 and `device` is a CPU without bf16 kernels, else nothing.

    Enter it around the forward and the backward (the trainer's step, evaluation and bench do; the Muon
    optimizers enter it around their bf16 Newton-Schulz iteration). `emulate`: force it on or off; None: as the
    innermost `bf16_emulation` block says, else `not native_bf16_matmul(device)`."""
    if emulate is None:
        emulate = _forced[-1] if _forced else not native_bf16_matmul(device)
    return EmulateBF16Matmuls() if amp == torch.bfloat16 and emulate else contextlib.nullcontext()


_forced: list[bool] = []
"""The `bf16_emulation` blocks entered, innermost last."""


@contextlib.contextmanager
def bf16_emulation(on: bool) -> Iterator[None]:
    """Inside the block `bf16_matmuls` emulates (on) or runs torch's own bf16 kernels (off) whatever the hardware:
    `mpirouter bench --torch-bf16-kernels` times both, and tests that stand in for CUDA (native bf16) turn it off."""
    _forced.append(on)
    try:
        yield
    finally:
        _forced.pop()


def describe_bf16(device: torch.device | str, amp: torch.dtype | None) -> str | None:
    """One sentence for a run's log when bf16 matmuls are emulated here; None otherwise."""
    if amp != torch.bfloat16 or native_bf16_matmul(device):
        return None
    return ("bf16 on a CPU without bf16 matmul kernels: matmuls run in float32 on the bf16 operands and are rounded to "
            "bf16 (a bf16 GEMM's numerics, faster than torch's own kernels here but slower than precision=fp32; "
            "compile=true does not compile under this emulation)")
