"""CPU shims for torchtitan 0.3.0's trainer (test-only; the product code has none of them).

torchtitan's trainer assumes an accelerator. Each function below works around one such
assumption, names the torchtitan line it targets, and changes nothing else; all of them must run
before torchtitan's trainer is imported.
"""

from __future__ import annotations

import sys
import types
from datetime import timedelta

import torch
import torch.distributed as dist

# torchtitan modules that copy `device_type` / `device_module` out of tools/utils.py at import
# (`from torchtitan.tools.utils import device_module, device_type`): they must not be imported
# before patch_device_module has run, or they keep the CUDA values.
_COPIES_DEVICE_MODULE = (
    "torchtitan.components.metrics",
    "torchtitan.distributed.utils",
    "torchtitan.distributed.parallel_dims",
    "torchtitan.models.common.token_dispatcher",
    "torchtitan.tools.profiler",
)


def _cpu_device_module() -> types.SimpleNamespace:
    """The parts of the `torch.cuda` API that torchtitan calls on its `device_module`, for CPU.

    `torch.cpu` itself lacks get_device_name, get_device_properties, memory_stats,
    reset_peak_memory_stats and empty_cache (used by DeviceMemoryMonitor, components/metrics.py),
    and its current_device() returns the string "cpu", which set_pg_timeouts
    (distributed/utils.py) passes to barrier(device_ids=[...]) where an int is needed.
    """
    return types.SimpleNamespace(
        set_device=lambda device: None,
        current_device=lambda: 0,
        device_count=lambda: 1,
        synchronize=lambda device=None: None,
        get_device_name=lambda device=None: "cpu",
        get_device_properties=lambda device=None: types.SimpleNamespace(total_memory=1 << 30),
        memory_stats=lambda device=None: {},
        reset_peak_memory_stats=lambda device=None: None,
        empty_cache=lambda: None,
    )


def patch_device_module() -> None:
    """Make torchtitan pick device "cpu" (and so backend gloo) instead of "cuda".

    tools/utils.py `get_device_info()` returns `_get_available_device_type() or "cuda"`, so without
    an accelerator torchtitan still uses "cuda": trainer.py `Trainer.__init__` calls
    `device_module.set_device(...)` on torch.cuda (fails on a CPU build), init_distributed
    (distributed/utils.py `_get_distributed_backend`) asks for nccl, and the model is materialised
    with `to_empty(device="cuda")`.
    """
    already = [m for m in _COPIES_DEVICE_MODULE if m in sys.modules]
    if already:
        raise RuntimeError(f"patch_device_module must run before these are imported: {already}")
    from torchtitan.tools import utils

    utils.device_type, utils.device_module = "cpu", _cpu_device_module()


def patch_set_timeout() -> None:
    """Provide `torch.distributed.set_timeout`, which torchtitan calls and this torch lacks.

    trainer.py `train()` calls distributed/utils.py `set_pg_timeouts` after the first step, which
    calls `torch.distributed.set_timeout(timeout, group)`; torch 2.13 has only the method
    `ProcessGroup.set_timeout`.
    """
    if hasattr(dist, "set_timeout"):
        return

    def set_timeout(timeout: timedelta, group: dist.ProcessGroup | None = None) -> None:
        (group if group is not None else dist.distributed_c10d._get_default_group()).set_timeout(timeout)

    dist.set_timeout = set_timeout


def patch_fsdp_sum_reduction() -> None:
    """Make FSDP reduce gradients with SUM, the one reduction gloo has for this.

    distributed/fsdp.py `apply_fsdp_to_decoder` calls `disable_fsdp_gradient_division`, which sets
    `gradient_divide_factor=1.0` (the loss is already divided by the global token count). FSDP2 then
    reduce-scatters with `ReduceOp.PREMUL_SUM(1.0)` (torch `_get_gradient_divide_factors`), which
    gloo does not implement. Forcing SUM reduction gives the same numbers (it divides by the factor,
    1.0, afterwards).
    """
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.distributed import fsdp

    disable_division = fsdp.disable_fsdp_gradient_division

    def disable_division_with_sum(model: torch.nn.Module) -> None:
        disable_division(model)
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)

    fsdp.disable_fsdp_gradient_division = disable_division_with_sum
