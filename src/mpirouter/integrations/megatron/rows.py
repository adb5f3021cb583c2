"""Where Megatron-Core keeps each expert's fc1 gate and up rows, and φ from them (pure functions on tensors).

Shape legend (this package's suffixes):
    D hidden size    E experts    e experts held by this rank (E / EP)    F expert hidden size (ffn_hidden)

Megatron's expert fc1 weight is [2F, D] for a gated unit (SwiGLU): rows [:F] are the gate (activated), rows
[F:] the up projection (megatron/core/transformer/mlp.py, `glu`); without a gated unit it is [F, D], all gate.
`SequentialMLP` holds it per local expert at `local_experts[i].linear_fc1.weight`, `TEGroupedMLP` at
`linear_fc1.weight{i}`. Both give (e, F, D) stacks here, in local expert order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ...core.routers import EXPERT_KINDS, mpi_scale, router_rows

Kind = Literal["mpi", "power", "retract", "linear"]
Target = Literal["gate", "up", "gate_up"]
KINDS: tuple[str, ...] = get_args(Kind)
TARGETS: tuple[str, ...] = get_args(Target)


@dataclass(frozen=True)
class MPIConfig:
    """How the router's rows φ are made from its weight R (E, D) and the experts' fc1 rows."""

    kind: Kind = "mpi"
    """mpi: C·normalize(R Wᵀ W) | power: R Wᵀ W | retract: C·normalize(R) | linear: R (Megatron's own router)."""
    target: Target = "gate"
    """W of the power step: the fc1 gate rows, the up rows, or both ([gate; up])."""
    scale_prime: float = 1.0
    """C' in the retraction radius C = C'/sqrt(E)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MPI router kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if self.target not in TARGETS:
            raise ValueError(f"MPI router target {self.target!r}: choose one of {', '.join(TARGETS)}")
        if not (isinstance(self.scale_prime, (int, float)) and self.scale_prime > 0):
            raise ValueError(f"MPI router scale_prime must be > 0, got {self.scale_prime!r}")

    @property
    def uses_experts(self) -> bool:
        return self.kind in EXPERT_KINDS


def fc1_weights(experts: torch.nn.Module) -> list[torch.Tensor]:
    """Each local expert's fc1 weight ([2F, D] or [F, D]), as stored, in local expert order."""
    local = getattr(experts, "local_experts", None)
    if local is not None:  # SequentialMLP
        return [expert.linear_fc1.weight for expert in local]
    fc1 = getattr(experts, "linear_fc1", None)
    n = getattr(experts, "num_local_experts", None)
    if fc1 is not None and n is not None and all(hasattr(fc1, f"weight{i}") for i in range(n)):  # TEGroupedMLP
        return [getattr(fc1, f"weight{i}") for i in range(n)]
    raise ValueError(f"MPI router: experts of type {type(experts).__name__} keep their fc1 weights where this router "
                     "does not look (supported: SequentialMLP, TEGroupedMLP with one weight per expert)")


def target_rows(fc1_FD: list[torch.Tensor], target: str, gated: bool) -> tuple[torch.Tensor, ...]:
    """The (e, F, D) stacks of the power target from the local experts' fc1 weights (gate rows first when gated)."""
    w_eXD = torch.stack(fc1_FD)  # a copy in the forward; its backward hands each expert its slice of the gradient
    if not gated:
        if target != "gate":
            raise ValueError(f"MPI router target {target!r} needs a gated unit (gated_linear_unit=True): "
                             "without one fc1 has no up projection")
        return (w_eXD,)
    f = w_eXD.shape[1] // 2
    gate, up = w_eXD[:, :f], w_eXD[:, f:]
    return {"gate": (gate,), "up": (up,), "gate_up": (gate, up)}[target]


def local_rows(cfg: MPIConfig, r_eD: torch.Tensor, mats_eFD: tuple[torch.Tensor, ...], num_experts: int) -> torch.Tensor:
    """φ (e, D) in float32 of this rank's experts, from their rows of R and their target matrices; the radius
    C = C'/sqrt(E) counts all `num_experts` (docs/method.md, eqs. 4-5; `core.routers.router_rows`)."""
    return router_rows(cfg.kind, r_eD, *mats_eFD, scale=mpi_scale(num_experts, cfg.scale_prime))
