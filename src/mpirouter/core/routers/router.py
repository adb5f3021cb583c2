"""The rows-based router: logits x·φᵀ with rows φ (E, D) made from R and, for some kinds, the experts.

Serves MPI and its ablations (docs/method.md, eqs. 4-5), `svd` (the exact top singular direction, MPI's
converged limit) and `remoe` (R itself, read through ReLU gates by the MoE layer).

Shape legend: T tokens, D model width, E experts, F expert hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...common.config import check_number
from .config import ROW_KINDS, PowerTarget, RouterConfig
from .mpi import EXPERT_KINDS, mpi_rows, mpi_scale, router_rows
from .aoe import AoERouter, aoe_low_rank
from .cosine import CosineRouter
from .kmeans import KMeansRouter
from .spectral import exact_rows


def select_target(target: str, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The expert matrices that drive the power step for a `PowerTarget`."""
    if target == "gate":
        return (w_gate_EFD,)
    if w_up_EFD is None:
        raise ValueError(f"power target {target!r} needs the up projection")
    return (w_up_EFD,) if target == "up" else (w_gate_EFD, w_up_EFD)


class Router(nn.Module):
    """Token-choice router with rows R (E, D) kept in float32; `kind` picks how logits use R.

    Drop-in for one's own MoE code: pass the expert gate (and up) weights stacked as (E, F, D)
    (nn.Linear layout per expert). `linear` and `mpi-inplace` ignore them in forward.

        router = Router(dim=512, num_experts=64, config=RouterConfig(kind="mpi"))
        logits_TE = router(x_TD, w_gate_EFD)
    """

    def __init__(self, dim: int, num_experts: int, config: RouterConfig | None = None):
        super().__init__()
        check_number("dim", dim, integer=True, ge=1)
        self.config = config or RouterConfig()
        self.dim, self.num_experts = dim, num_experts
        self.scale = mpi_scale(num_experts, self.config.scale_prime)
        # float32 whatever the model dtype: the rows' direction is what MPI iterates on.
        self.weight = nn.Parameter(torch.empty(num_experts, dim, dtype=torch.float32))
        nn.init.normal_(self.weight, std=dim**-0.5)
        if self.config.kind not in ROW_KINDS:
            raise ValueError(f"Router serves the kinds {', '.join(ROW_KINDS)}; build a {self.config.kind!r} router "
                             f"with build_router")
        if self.config.kind == "svd":
            # R only fixes the sign of each exact direction (`exact_rows`): it receives no gradient
            self.weight.requires_grad_(False)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def computes_rows(self) -> bool:
        """Whether φ is computed from R in the forward pass (mpi, power, retract), rather than being R itself."""
        return self.config.kind in ("mpi", "power", "retract", "svd")

    def rows(self, w_gate_EFD: torch.Tensor | None = None, w_up_EFD: torch.Tensor | None = None,
             r_ED: torch.Tensor | None = None) -> torch.Tensor:
        """The effective router rows φ (E, D) in float32 that multiply the tokens.

        `r_ED`: the rows of R to use instead of `self.weight`; under expert parallelism each rank passes
        its local shard of R with the matching shards of the experts (φ_i needs only R_i and G_i).
        """
        # float32 even under bf16 autocast: the power step's direction is sensitive to rounding
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            return self._rows(w_gate_EFD, w_up_EFD, self.weight if r_ED is None else r_ED)

    def _rows(self, w_gate_EFD: torch.Tensor | None, w_up_EFD: torch.Tensor | None, r_ED: torch.Tensor) -> torch.Tensor:
        kind = self.config.kind
        uses_experts = kind in EXPERT_KINDS or kind == "svd"
        if uses_experts and w_gate_EFD is None:
            raise ValueError(f"router kind {kind!r} needs the expert gate weights")
        mats = select_target(self.config.target, w_gate_EFD, w_up_EFD) if uses_experts else ()
        if kind == "svd":
            return exact_rows(r_ED, *mats, scale=self.scale)
        if kind == "remoe":
            return r_ED.float()
        return router_rows(kind, r_ED, *mats, scale=self.scale)

    def forward(
        self,
        x_TD: torch.Tensor,
        w_gate_EFD: torch.Tensor | None = None,
        w_up_EFD: torch.Tensor | None = None,
        rows_ED: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Router logits (T, E) in float32; `rows_ED` passes φ computed beforehand (`RowsPerStep`)."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:  # shapes only: no tensor read
            raise ValueError(f"Router expects x of shape (tokens, dim={self.dim}), got {tuple(x_TD.shape)}")
        if rows_ED is None:
            rows_ED = self.rows(w_gate_EFD, w_up_EFD)
        # float32 logits even under bf16 autocast: the top-k choice is sensitive to rounding, and this matmul is small
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.float(), rows_ED)

    @torch.no_grad()
    def inplace_update(self, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor | None = None,
                       r_ED: torch.Tensor | None = None) -> None:
        """`mpi-inplace`: R ← C · normalize(R Gᵀ G), no gradient through the step. Call after each optimizer step.

        `r_ED`: the tensor to update instead of `self.weight` (a rank's local shard of R, written in place).
        """
        if self.config.kind != "mpi-inplace":
            return
        r_ED = self.weight if r_ED is None else r_ED
        mats = select_target(self.config.target, w_gate_EFD, w_up_EFD)
        r_ED.copy_(mpi_rows(r_ED, *mats, scale=self.scale))

    @torch.no_grad()
    def fold(self, w_gate_EFD: torch.Tensor | None = None, w_up_EFD: torch.Tensor | None = None) -> "Router":
        """A plain `linear` router whose weight is φ computed once: identical logits, vanilla cost.

        A `remoe` router stays `remoe` (its rows are R already; its ReLU gate is part of the kind). The
        training-only losses (erc, simbal) are dropped.
        """
        kind = "remoe" if self.config.kind == "remoe" else "linear"
        folded = Router(self.dim, self.num_experts, RouterConfig(kind=kind, scale_prime=self.config.scale_prime))
        folded.to(self.weight.device)
        folded.weight.copy_(self.rows(w_gate_EFD, w_up_EFD))
        return folded

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={self.dim}, num_experts={self.num_experts}, kind={c.kind}, target={c.target}, C={self.scale:.4g}"


class MPIRouter(Router):
    """The paper's router: φ = C · normalize(R Gᵀ G) recomputed in every forward pass."""

    def __init__(self, dim: int, num_experts: int, scale_prime: float = 1.0, target: PowerTarget = "gate"):
        super().__init__(dim, num_experts, RouterConfig(kind="mpi", scale_prime=scale_prime, target=target))


def build_router(dim: int, num_experts: int, config: RouterConfig) -> nn.Module:
    """The router module of `config.kind`: `Router` for the rows-based kinds, else the design's own module."""
    if config.kind in ROW_KINDS:
        return Router(dim, num_experts, config)
    if config.kind == "cosine":
        return CosineRouter(dim, num_experts, config.cosine)
    if config.kind == "kmeans":
        return KMeansRouter(dim, num_experts, config.kmeans)
    return AoERouter(dim, num_experts, aoe_low_rank(dim, config.aoe.low_rank))
