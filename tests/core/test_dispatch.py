"""The CUDA dispatch choice without a GPU: a monkeypatched compute capability across GPU generations and dtypes."""

from __future__ import annotations

import pytest
import torch

from mpirouter.core import dispatch
from mpirouter.core.dispatch import choose_dispatch, grouped_mm_fallback_reason, resolve_dispatch

CUDA = torch.device("cuda")
CAPABILITIES = [(8, 0), (9, 0), (10, 0), (12, 0)]  # A100, H100/H200, B200, RTX 50xx / RTX PRO 6000
DTYPES = [torch.bfloat16, torch.float32, torch.float16]


class Operand:
    """What `resolve_dispatch` reads of a tensor (device, dtype, shape, element size), for a CUDA tensor without a GPU."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device = CUDA):
        self.shape, self.dtype, self.device = (rows, cols), dtype, device

    def element_size(self) -> int:
        return self.dtype.itemsize


@pytest.fixture
def capability(monkeypatch):
    """Set the compute capability every CUDA device reports."""
    def set_to(cap: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    return set_to


def one_kernel(cap: tuple[int, int], dtype: torch.dtype) -> bool:
    """torch's `_grouped_mm_cuda` fast path: bf16 on SM 9.x/10.x (GroupedBlas.cpp, torch 2.9-2.13)."""
    return dtype == torch.bfloat16 and cap[0] in (9, 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cap", CAPABILITIES, ids=lambda c: f"sm{c[0]}{c[1]}")
def test_auto_takes_grouped_mm_only_where_torch_runs_its_kernel(capability, cap, dtype):
    capability(cap)
    expected = "grouped_mm" if one_kernel(cap, dtype) else "loop"
    assert choose_dispatch(CUDA, dtype) == expected
    assert resolve_dispatch(Operand(64, 64, dtype), Operand(32, 64, dtype), "auto") == expected
    assert choose_dispatch(torch.device("cpu"), dtype) == "loop"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cap", CAPABILITIES, ids=lambda c: f"sm{c[0]}{c[1]}")
def test_explicit_grouped_mm_is_refused_where_torch_would_run_its_syncing_fallback(capability, cap, dtype):
    capability(cap)
    x, w = Operand(64, 64, dtype), Operand(32, 64, dtype)
    if one_kernel(cap, dtype):
        assert resolve_dispatch(x, w, "grouped_mm") == "grouped_mm"
        assert grouped_mm_fallback_reason(CUDA, dtype) is None
        return
    with pytest.raises(ValueError, match="dispatch='grouped_mm' refused: torch._grouped_mm") as e:
        resolve_dispatch(x, w, "grouped_mm")
    assert "\n" not in str(e.value) and "fallback" in str(e.value) and "use dispatch='auto' or 'loop'" in str(e.value)
    assert ("9.x/10.x" in str(e.value)) == (dtype == torch.bfloat16)  # the GPU is the reason, or else the dtype
    assert resolve_dispatch(x, w, "loop") == "loop"


def test_explicit_grouped_mm_on_cpu_still_runs_in_any_dtype():
    """On CPU the fallback reads no device (nothing to sync), and the host-read guard of the step test uses it."""
    for dtype in DTYPES:
        cpu = torch.device("cpu")
        assert resolve_dispatch(Operand(64, 64, dtype, cpu), Operand(32, 64, dtype, cpu), "grouped_mm") == "grouped_mm"
        assert grouped_mm_fallback_reason(cpu, dtype) is None


def test_rows_not_a_multiple_of_16_bytes_still_take_the_loop_on_a_kernel_gpu(capability):
    capability((9, 0))
    assert resolve_dispatch(Operand(64, 12, torch.bfloat16), Operand(32, 12, torch.bfloat16), "grouped_mm") == "loop"

