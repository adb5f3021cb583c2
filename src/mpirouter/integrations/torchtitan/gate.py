"""`MPIGate`: torchtitan's router gate Linear with computed rows φ = C·normalize(R W1ᵀ W1).

Shape legend (torchtitan's suffixes):
    B batch    L sequence    D model width    E experts    F expert hidden size
    e experts held by this rank (E / EP under expert parallelism, else E)

The gate keeps torchtitan's parameter `weight` (E, D), now read as R, so state-dict keys, FSDP
sharding and the optimizer are unchanged. Its forward returns x·φᵀ in float32; the rest of
torchtitan's `TokenChoiceTopKRouter` (softmax or sigmoid scores, expert bias for selection,
group-limited routing, route_norm, route_scale) runs untouched on those logits.

Under expert parallelism the experts' weights are DTensors sharded Shard(0) over the EP group.
Each rank computes φ for its own experts from the matching rows of R, then all-gathers the rows
with an autograd all-gather whose backward is a SUM reduce-scatter, so every expert's W1 and R
rows receive the router-path gradient of every rank's tokens. `full_tensor()` on the expert stack
would keep only this rank's contribution in the backward (tests/integrations/titan/test_titan_ep.py
measures the difference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torchtitan.distributed.spmd_types import spmd_sparse_mesh
from torchtitan.models.common.linear import Linear

from ...core.routers import EXPERT_KINDS, mpi_scale, router_rows

GateKind = Literal["mpi", "power", "retract", "linear"]
GateTarget = Literal["gate", "up", "gate_up"]

GATE_KINDS: tuple[str, ...] = get_args(GateKind)
GATE_TARGETS: tuple[str, ...] = get_args(GateTarget)


class LocalExperts(NamedTuple):
    """This rank's slice of an expert stack: rows [offset, offset + e) of E, and the group that holds the rest."""

    w_eFD: torch.Tensor
    offset: int
    group: dist.ProcessGroup | None
    """The expert-parallel group to all-gather over; None when this rank holds every expert."""


def local_experts(w_EFD: torch.Tensor, num_experts: int) -> LocalExperts:
    """The local expert slice of an expert stack with its global offset, under any of torchtitan's SPMD backends.

    partial_dtensor / full_dtensor: a DTensor sharded Shard(0) on one mesh dimension is expert
    parallelism. spmd_types (torchtitan's default): the parameter is the plain local shard, and the
    "ep" axis is on torchtitan's registered sparse mesh. Any other sharding (tensor parallelism on F
    or D) is refused, because φ_i needs each expert's whole matrix.
    """
    if not isinstance(w_EFD, DTensor):
        if w_EFD.shape[0] == num_experts:
            return LocalExperts(w_EFD, 0, None)
        mesh = spmd_sparse_mesh()
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        if "ep" not in names or w_EFD.shape[0] * mesh.size(names.index("ep")) != num_experts:
            raise ValueError(f"MPI router: {w_EFD.shape[0]} local experts of {num_experts}, and no expert-parallel "
                             "mesh that explains it")
        dim = names.index("ep")
        return LocalExperts(w_EFD, mesh.get_local_rank(dim) * w_EFD.shape[0], mesh.get_group(dim))
    mesh, placements = w_EFD.device_mesh, w_EFD.placements
    on_experts = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    other = [p for p in placements if p.is_shard() and not (isinstance(p, Shard) and p.dim == 0)]
    if other or len(on_experts) > 1:
        raise ValueError(f"MPI router: expert weights sharded as {placements} over {mesh}; only expert "
                         "parallelism (Shard(0) on one mesh dimension) is supported")
    local_eFD = w_EFD.to_local()
    if not on_experts:
        return LocalExperts(local_eFD, 0, None)
    dim = on_experts[0]
    if w_EFD.shape[0] % mesh.size(dim):
        raise ValueError(f"MPI router: {w_EFD.shape[0]} experts do not split evenly over expert parallelism {mesh.size(dim)}")
    return LocalExperts(local_eFD, mesh.get_local_rank(dim) * local_eFD.shape[0], mesh.get_group(dim))


def plain(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a replicated DTensor (the router weight R), else `t`; gradients flow through."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective over its mesh; for metrics and folding, never in a step), else `t`."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_experts(w_EFD: torch.Tensor, num_experts: int) -> torch.Tensor:
    """All E experts of an expert stack (collectives; for metrics and folding, never in a step).

    `whole` undoes FSDP's sharding; under the spmd_types backend the EP shard is a plain tensor,
    gathered here over the expert-parallel group.
    """
    w_EFD = whole(w_EFD)
    if w_EFD.shape[0] == num_experts:
        return w_EFD
    part = local_experts(w_EFD, num_experts)
    out = w_EFD.new_empty((num_experts, *w_EFD.shape[1:]))
    dist.all_gather_into_tensor(out, w_EFD.contiguous(), group=part.group)
    return out


def gathered_rows(kind: str, r_ED: torch.Tensor, mats_EFD: tuple[torch.Tensor, ...], scale: float) -> torch.Tensor:
    """φ (E, D) in float32 for every expert, from R (E, D) and the experts' matrices (possibly EP-sharded).

    Each rank computes the rows of its own experts (φ_i needs only R_i and W_i) and the rows are
    all-gathered in expert order; the all-gather's backward is a SUM reduce-scatter (docs/torchtitan.md).
    """
    r_ED = plain(r_ED)
    if kind not in EXPERT_KINDS:
        return router_rows(kind, r_ED, scale=scale)
    parts = [local_experts(m, r_ED.shape[0]) for m in mats_EFD]
    first = parts[0]
    if any(p.offset != first.offset or p.w_eFD.shape[0] != first.w_eFD.shape[0] for p in parts):
        raise ValueError("MPI router: the gate and up expert stacks are sharded differently")
    e = first.w_eFD.shape[0]
    phi_eD = router_rows(kind, r_ED[first.offset:first.offset + e], *(p.w_eFD for p in parts), scale=scale)
    if first.group is None:
        return phi_eD
    return funcol.wait_tensor(funcol.all_gather_single_autograd(phi_eD.contiguous(), 0, first.group))


class MPIGate(Linear):
    """torchtitan's router gate with logits x·φ(R, W)ᵀ in float32; R is the stored `weight` (E, D).

    The expert weights are read through a plain reference set by `MPIMoE` (`bind_experts`), not a
    submodule, so they stay where they are in the module tree, the state dict and FSDP's units.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        kind: GateKind = "mpi"
        """mpi: C·normalize(R Wᵀ W) | power: R Wᵀ W | retract: C·normalize(R) | linear: R (the stock router)."""
        target: GateTarget = "gate"
        """Expert matrix W of the power step: gate (w1), up (w3) or gate_up ([w1; w3])."""
        scale_prime: float = 1.0
        """C' in the retraction radius C = C'/sqrt(E)."""

        def __post_init__(self) -> None:
            if self.kind not in GATE_KINDS:
                raise ValueError(f"MPI router kind {self.kind!r}: choose one of {', '.join(GATE_KINDS)}")
            if self.target not in GATE_TARGETS:
                raise ValueError(f"MPI router target {self.target!r}: choose one of {', '.join(GATE_TARGETS)}")
            if not (isinstance(self.scale_prime, (int, float)) and self.scale_prime > 0):
                raise ValueError(f"MPI router scale_prime must be > 0, got {self.scale_prime!r}")
            if self.bias:
                raise ValueError("MPI router: the gate has no bias (φ replaces the whole weight)")

    def __init__(self, config: Config):
        super().__init__(config)
        self.kind, self.target = config.kind, config.target
        self.scale = mpi_scale(config.out_features, config.scale_prime)
        object.__setattr__(self, "_experts", None)

    def bind_experts(self, experts: torch.nn.Module) -> None:
        """Read the power-step matrices from `experts` (torchtitan's `GroupedExperts`: w1_EFD, w3_EFD)."""
        object.__setattr__(self, "_experts", experts)

    def matrices(self) -> tuple[torch.Tensor, ...]:
        """The expert matrices of the power target, as stored (DTensors under expert parallelism)."""
        if self._experts is None:
            raise RuntimeError("MPIGate has no experts bound: build it inside MPIMoE")
        w1, w3 = self._experts.w1_EFD, self._experts.w3_EFD
        return {"gate": (w1,), "up": (w3,), "gate_up": (w1, w3)}[self.target]

    def rows(self) -> torch.Tensor:
        """φ (E, D), float32, differentiable into R and the expert matrices (a collective under EP)."""
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            mats = self.matrices() if self.kind in EXPERT_KINDS else ()
            return gathered_rows(self.kind, self.weight, mats, self.scale)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        # float32 logits whatever the activation dtype: top-k is sensitive to rounding, as in torchtitan
        with torch.autocast(device_type=x_BLD.device.type, enabled=False):
            return F.linear(x_BLD.float(), self.rows())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kind={self.kind}, target={self.target}, C={self.scale:.4g}"
