"""The parametrization that makes a router's `weight` computed: `_RouterRows` returns φ(R, G)
(`mpi`, `power`, `retract`, or R itself for `mpi-inplace`) from the stored float32 parameter R."""

from __future__ import annotations

import torch
from torch import nn

from ...core.routers import EXPERT_KINDS, router_rows
from .state import _Layer


class _RouterRows(nn.Module):
    """Parametrization of `router.weight`: φ(R, G) in float32, cast to the router's dtype.

    `dtype_probe` is a non-persistent empty buffer: `model.to(dtype)` casts it, so the rows follow
    the model's dtype. The layer (and so the experts) is held as a plain reference, not a submodule,
    so the expert weights stay where they are in the module tree and in the state dict.
    """

    def __init__(self, layer: _Layer, kind: str, scale: float, target: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.kind, self.scale, self.target = kind, scale, target
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)
        object.__setattr__(self, "_layer", layer)

    def forward(self, r_ED: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=r_ED.device.type, enabled=False):
            mats = self._layer.mats(self.target) if self.kind in EXPERT_KINDS else ()
            phi_ED = router_rows(self.kind, r_ED, *mats, scale=self.scale)
        return phi_ED.to(self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, target={self.target}, C={self.scale:.4g}, dtype={self.dtype_probe.dtype}"
