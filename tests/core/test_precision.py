"""core.precision: bf16 matmuls emulated in float32 give a bf16 GEMM's numerics, and every GEMM of a step is caught.

The references: float64 products rounded once to bf16 (what a bf16 GEMM with float32 accumulation computes, up to
the float32 sums' rounding), and torch's own bf16 kernels on this CPU. On a CPU without bf16 kernels those are
torch's reference kernels, which accumulate in float32 like the emulation: there the two differ only where the
float32 sums' order flips a rounding (one bf16 step, in under 1% of the entries).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.experts import grouped_linear
from mpirouter.core.moe import MoE, MoEConfig
from mpirouter.core.precision import EmulateBF16Matmuls, autocast, bf16_emulation, bf16_matmuls, describe_bf16, native_bf16_matmul
from mpirouter.core.routers import RouterConfig
from mpirouter.optim.muon import newton_schulz

BF16 = torch.bfloat16
NATIVE = native_bf16_matmul("cpu")


def bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(BF16)


def assert_like_torch(emulated: torch.Tensor, torch_own: torch.Tensor) -> None:
    """Where torch's bf16 kernels are its reference ones (float32 accumulation, as emulated, summed in another
    order): at most one bf16 rounding step apart, and equal in at least 99% of the entries. Where oneDNN's kernels
    run (another blocking): within bf16 rounding."""
    if NATIVE:
        torch.testing.assert_close(emulated, torch_own, rtol=2**-7, atol=1e-2)
        return
    e, t = emulated.float(), torch_own.float()
    ulp = torch.exp2(torch.floor(torch.log2(torch.maximum(e.abs(), t.abs()).clamp_min(2.0**-126))) - 7)
    assert ((e - t).abs() <= ulp).all()
    assert (e != t).float().mean() <= 0.01


MATMULS = {
    "mm": lambda a, b, c: torch.mm(a, b),
    "mm-transposed": lambda a, b, c: torch.mm(a, b.t().contiguous().t()),
    "linear": lambda a, b, c: F.linear(a, b.t()),
    "addmm": lambda a, b, c: torch.addmm(c, a, b, beta=0.5, alpha=2.0),
    "bmm": lambda a, b, c: torch.bmm(a[None].expand(3, -1, -1), b[None].expand(3, -1, -1)),
    "baddbmm": lambda a, b, c: torch.baddbmm(c[None], a[None], b[None], beta=0.5),
    "mm-out": lambda a, b, c: torch.mm(a, b, out=torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)),
}


@pytest.mark.parametrize("op", MATMULS)
def test_each_matmul_is_a_bf16_gemm(op):
    torch.manual_seed(0)
    a, b, c = bf16(33, 200), bf16(200, 17), bf16(33, 17)
    with EmulateBF16Matmuls():
        emulated = MATMULS[op](a, b, c)
    torch_own = MATMULS[op](a, b, c)
    assert emulated.dtype == BF16
    assert_like_torch(emulated, torch_own)
    reference = MATMULS[op](a.double(), b.double(), c.double()).to(BF16)  # float64 products, rounded once
    torch.testing.assert_close(emulated, reference, rtol=2**-7, atol=1e-3)


class _GemmDtypes(TorchDispatchMode):
    """The dtypes every GEMM reaching the kernels receives. Entered before the emulation, so below it on the mode
    stack: it sees what the emulation passes on."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.addmm, torch.ops.aten._grouped_mm):
            self.seen.append((str(func), args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dispatch", ["loop", "grouped_mm"])
def test_a_bf16_moe_step_multiplies_only_in_float32_under_the_emulation(dispatch):
    """Forward and backward of an MoE layer under bf16 autocast: the GEMMs that reach the kernels are float32 ones
    (the loop's mm(out=) and the grouped_mm path included), and the gradients equal torch's own bf16 kernels'."""
    torch.manual_seed(0)
    moe = MoE(64, MoEConfig(num_experts=4, top_k=2, hidden=64, dispatch=dispatch, router=RouterConfig(kind="mpi")))
    x = torch.randn(2, 32, 64)
    grads = {}
    for emulate in (True, False):
        moe.zero_grad(set_to_none=True)
        spy = _GemmDtypes()
        with spy, bf16_matmuls("cpu", emulate=emulate):
            with autocast("cpu", BF16):
                out, _ = moe(x)
            out.float().square().sum().backward()
        grads[emulate] = [p.grad for p in moe.parameters()]
        kinds = {name for name, _ in spy.seen}
        if emulate:
            assert spy.seen and {dt for _, dt in spy.seen} == {torch.float32}, spy.seen
            if dispatch == "loop":
                assert "aten.mm.default" in kinds  # the loop's mm(out=buffer), recomputed as a float32 mm
        else:
            assert BF16 in {dt for _, dt in spy.seen}  # the check sees bf16 GEMMs when they are not emulated
    for emulated, torch_own in zip(grads[True], grads[False]):
        assert_like_torch(emulated, torch_own)


def test_a_bf16_model_step_equals_torch_kernels():
    torch.manual_seed(0)
    model = MoELM(preset_config("debug"))
    idx = torch.randint(model.config.vocab_size, (2, 64))
    results = {}
    for emulate in (True, False):
        model.zero_grad(set_to_none=True)
        with bf16_matmuls("cpu", emulate=emulate):
            with autocast("cpu", BF16):
                loss = model(idx, idx).loss
            loss.backward()
        results[emulate] = (loss.detach(), [p.grad for p in model.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=2e-3)
    for emulated, torch_own in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(emulated, torch_own, rtol=0.05, atol=2e-3)


def test_grouped_mm_in_bf16_is_emulated_too():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    torch.manual_seed(0)
    counts_E = torch.tensor([5, 0, 17, 3])
    x_MI, w_EOI = bf16(25, 32), bf16(4, 16, 32)
    with EmulateBF16Matmuls():
        emulated = grouped_linear(x_MI, w_EOI, counts_E, "grouped_mm")
    assert_like_torch(emulated, grouped_linear(x_MI, w_EOI, counts_E, "grouped_mm"))


def test_newton_schulz_runs_emulated_and_equals_torch_kernels(monkeypatch):
    """The Muon optimizers' bf16 iteration enters the emulation itself (13x faster on a CPU without bf16 kernels)."""
    torch.manual_seed(0)
    g = torch.randn(3, 24, 40)
    with _GemmDtypes() as spy:
        emulated = newton_schulz(g)
    assert spy.seen and ({dt for _, dt in spy.seen} == {torch.float32}) is not NATIVE, spy.seen
    monkeypatch.setattr("mpirouter.optim.muon.bf16_matmuls", lambda *a, **k: contextlib.nullcontext())
    assert_like_torch(emulated, newton_schulz(g))


@pytest.mark.parametrize("device,amp,expected", [("cpu", None, False), ("cpu", BF16, not NATIVE), ("meta", BF16, False)],
                         ids=["fp32", "bf16-cpu", "bf16-non-cpu"])
def test_the_emulation_is_used_only_for_bf16_on_a_cpu_without_kernels(device, amp, expected):
    assert isinstance(bf16_matmuls(device, amp), EmulateBF16Matmuls) is expected
    assert (describe_bf16(device, amp) is not None) is expected
    assert isinstance(bf16_matmuls(device, amp, emulate=False), contextlib.nullcontext)
    assert isinstance(bf16_matmuls(device, None, emulate=True), contextlib.nullcontext)


def test_bf16_emulation_blocks_force_it_either_way_innermost_first():
    with bf16_emulation(True):
        assert isinstance(bf16_matmuls("cpu"), EmulateBF16Matmuls)
        with bf16_emulation(False):
            assert isinstance(bf16_matmuls("cpu"), contextlib.nullcontext)
        assert isinstance(bf16_matmuls("cpu", None), contextlib.nullcontext)  # float32: nothing to emulate
    assert isinstance(bf16_matmuls("cpu"), EmulateBF16Matmuls) is not NATIVE


def test_attention_runs_torch_own_bf16_kernel():
    """Not emulated: torch's bf16 attention rounds the softmax probabilities to bf16 before P·V, as GPU kernels do."""
    torch.manual_seed(0)
    q, k, v = (bf16(2, 4, 16, 8).requires_grad_() for _ in range(3))
    with EmulateBF16Matmuls():
        emulated = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(emulated, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_grouped_mm_out_dtype_and_bias_keywords():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    torch.manual_seed(0)
    x_MI, w_EIO, offs = bf16(24, 32), bf16(3, 32, 16), torch.tensor([8, 8, 24], dtype=torch.int32)
    with EmulateBF16Matmuls():
        emulated = torch._grouped_mm(x_MI, w_EIO, offs=offs, out_dtype=torch.bfloat16)
    assert emulated.dtype == BF16
    assert_like_torch(emulated, torch._grouped_mm(x_MI, w_EIO, offs=offs, out_dtype=torch.bfloat16))


def test_an_out_tensor_of_another_shape_is_resized_as_torch_does():
    torch.manual_seed(0)
    a, b = bf16(5, 7), bf16(7, 3)
    out = torch.empty(0, dtype=BF16)
    with EmulateBF16Matmuls():
        torch.mm(a, b, out=out)
    assert out.shape == (5, 3)
    assert_like_torch(out, torch.mm(a, b))


@pytest.mark.parametrize("call", [lambda a, b: torch.mm(a, b.float()),
                                  lambda a, b: torch.mm(a, b, out=torch.empty(a.shape[0], b.shape[1]))],
                         ids=["mixed-operands", "float32-out"])
def test_what_torch_refuses_is_refused_under_the_emulation_too(call):
    """Mixed dtypes are not emulated: they reach torch's kernel and fail there as on a GPU, not silently pass on CPU."""
    a, b = bf16(4, 6), bf16(6, 2)
    with pytest.raises(RuntimeError) as native:
        call(a, b)
    with EmulateBF16Matmuls(), pytest.raises(RuntimeError) as emulated:
        call(a, b)
    assert type(emulated.value) is type(native.value)
