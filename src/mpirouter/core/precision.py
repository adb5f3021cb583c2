"""bf16 autocast, and bf16 matmuls emulated on CPUs that have no bf16 kernels.

    with bf16_matmuls(device, amp):        # what train_step, evaluate and bench enter (amp: torch.bfloat16 or None)
        with autocast(device, amp):
            loss = model(x, y).loss
        loss.backward()                    # the backward's matmuls are emulated too (a dispatch mode)

bf16 autocast runs matmuls with bf16 operands; a GPU (and a CPU with AVX512-BF16 or AMX, through
oneDNN) multiplies them, accumulates in float32 and rounds the result to bf16. A CPU without those
instructions (AVX2 only, e.g. the AMD EPYC Zen 3 these machines sometimes are) falls back to torch's
reference kernels, which keep the numerics but are slow. Measured on such a machine (2 threads, torch
2.13, docs/precision.md): `x @ W.T` 7x and `x @ W` 100x float32's time, a training step of the `tiny`
preset 13x, a Muon optimizer step (bf16 Newton-Schulz, also in float32 runs) 28x.

`EmulateBF16Matmuls` computes those ops in float32 on the bf16 operands and rounds the result to bf16.
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
"""The GEMMs autocast and the MoE layers call (torch.mm(..., out=buffer) included: the loop dispatch's)."""
_ROUNDED_OUTPUTS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: (0,),  # (out, logsumexp): logsumexp stays float32
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (0, 1, 2),  # (grad_q, grad_k, grad_v)
}
"""Attention's CPU kernels (ops whose bf16 path multiplies through the same reference GEMMs), and which of their
outputs are bf16 in the kernel's own bf16 path."""


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


def bf16_op_in_float32(func, args: tuple, kwargs: dict, rounded: tuple[int, ...] | None = None):
    """`func(*args, **kwargs)` computed with its bf16 tensor arguments in float32, its result rounded to bf16.

    `rounded`: which outputs of a tuple-returning op are bf16 (None: the single output); an `out=` tensor gets
    the rounded result copied in, as the op itself would write it."""
    up = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args)
    kw = dict(kwargs)
    out = kw.pop("out", None)
    result = (func.overloadpacket.default if out is not None else func)(*up, **kw)
    if rounded is None:
        result = result.to(torch.bfloat16)
        return out.copy_(result) if out is not None else result
    return tuple(r.to(torch.bfloat16) if i in rounded else r for i, r in enumerate(result))


class EmulateBF16Matmuls(TorchDispatchMode):
    """While active: GEMMs (and CPU attention) that get a bf16 CPU tensor run through `bf16_op_in_float32`.

    A dispatch mode sits below autograd, so autograd saves the bf16 operands and the backward's matmuls come
    here too, exactly as a bf16 run saves and multiplies them on a GPU. Everything else runs as it is.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        matmul = func.overloadpacket in _MATMULS
        if (matmul or func in _ROUNDED_OUTPUTS) and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 and a.device.type == "cpu" for a in args):
            return bf16_op_in_float32(func, args, kwargs, None if matmul else _ROUNDED_OUTPUTS[func])
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
    return ("bf16 on a CPU without bf16 matmul kernels (no AVX512-BF16/AMX): matmuls and attention run in float32 on the "
            "bf16 operands and are rounded to bf16 (a bf16 GEMM's numerics at about float32's speed; precision=fp32 is "
            "faster still here)")
