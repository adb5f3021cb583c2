"""A CPU stand-in for CUDA's sync check (`torch.cuda.set_sync_debug_mode("error")`): what inside a block would make
the host wait for the device on a GPU.

    with SyncProxy() as proxy:
        train_step(...)
    assert proxy.found == []

It records (1) Python reads of a tensor's value (`.item()`, `bool(t)`, `.tolist()`, `.numpy()`, `.cpu()`,
`.to("cpu")`), and (2) aten ops that read to the host on CUDA or whose output size depends on the data:
`nonzero`, `bincount`, `unique`, `masked_select`, `repeat_interleave` without an output size, indexing or
index_put with a boolean mask (`x[mask]`, `x[mask] = 0`: CUDA computes the mask's nonzero), and float32
`torch._grouped_mm` (no fast CUDA kernel: its fallback reads the offsets to the host, group by group).
The aten ops are seen through a TorchDispatchMode, so also when called from C++.

It cannot see a move to the CPU through a torch.device (on this CPU stand-in every device is the CPU, so
`.to(device)` is a no-op here); the GPU tier (`tests/gpu/`) checks the real thing. Used by tests/trainer/test_step.py,
tests/integrations/test_hf_counts.py, tests/integrations/titan/test_titan_counts.py and the 2-rank script
tests/trainer/dist_sync.py.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpirouter.core import precision

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
SYNCING_OPS = ("_local_scalar_dense", "bincount", "nonzero", "masked_select", "unique", "_unique2", "unique_dim",
               "unique_consecutive", "_unique")
MASK_INDEXING = ("index", "index_put", "index_put_", "_index_put_impl_")


def _is_cpu_target(args, kwargs) -> bool:
    """Whether `Tensor.to(...)` names the CPU as a string ("cpu"): a device object could be the tensor's own device
    (on this CPU stand-in every device is the CPU), a literal "cpu" is a move to the host wherever the code runs."""
    targets = [a for a in args if isinstance(a, str)] + [kwargs.get("device")]
    return any(isinstance(t, str) and torch.device(t).type == "cpu" for t in targets)


class SyncProxy(TorchDispatchMode):
    """Records what would synchronize with the host on CUDA (module docstring); `found` lists it, in order.

    `active`: record only while it is true (set it around the part of a larger run under test, e.g. a hook).
    """

    def __init__(self, active: bool = True):
        super().__init__()
        self.active = active
        self.found: list[str] = []
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self.active:
            pass
        elif name in SYNCING_OPS:
            self.found.append(name)
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:  # its output size is read from the data
            self.found.append("repeat_interleave without output_size")
        elif name in MASK_INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.found.append(f"{name} with a boolean mask")
        elif name == "_grouped_mm" and args and args[0].dtype == torch.float32:
            self.found.append("_grouped_mm in float32")
        return func(*args, **kwargs)

    def __enter__(self):
        for name in HOST_READS:
            real = getattr(torch.Tensor, name)
            self._saved[name] = real

            def spy(tensor, *a, _real=real, _name=name, **k):
                if self.active:
                    self.found.append(f"Tensor.{_name}")
                return _real(tensor, *a, **k)

            setattr(torch.Tensor, name, spy)
        real_to = torch.Tensor.to
        self._saved["to"] = real_to

        def to_spy(tensor, *a, **k):
            if self.active and _is_cpu_target(a, k):
                self.found.append('Tensor.to("cpu")')
            return real_to(tensor, *a, **k)

        torch.Tensor.to = to_spy
        # on CUDA bf16 GEMMs are native: the stand-in must see the code's own ops, not the float32 GEMMs by which
        # mpirouter.core.precision emulates bf16 on a CPU without bf16 kernels (they would read as float32 grouped_mm)
        self._native = precision.bf16_emulation(False)
        self._native.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        self._saved.clear()
        self._native.__exit__(*exc)
        return super().__exit__(*exc)
