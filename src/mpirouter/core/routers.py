"""MoE routers that follow their experts: the Manifold Power Iteration (MPI) router and its ablations.

Paper: Wu, Lv, Xie, Lin, "Redesign Mixture-of-Experts Routers with Manifold Power
Iteration", arXiv 2606.12397. Equation numbers below refer to docs/method.md.

Shape legend (suffixes on tensor names):
    T  tokens (batch * sequence, flattened)
    D  model width (router input size)
    E  number of experts (N in the paper)
    F  expert hidden size (h in the paper)

The math lives in pure functions (tensor in, tensor out); `Router` only holds the
parameter R and calls them.

    power step   r̂_i = R_i G_iᵀ G_i                      (two batched mat-vecs, no SVD)
    retraction   φ_i = C · r̂_i / ‖r̂_i‖₂,   C = C' / sqrt(E)
    logits       l = x φᵀ
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..common.config import check_number

RouterKind = Literal["linear", "mpi", "power", "retract", "mpi-inplace"]
PowerTarget = Literal["gate", "up", "gate_up"]

ROUTER_KINDS: tuple[str, ...] = get_args(RouterKind)
POWER_TARGETS: tuple[str, ...] = get_args(PowerTarget)

EXPERT_KINDS: tuple[str, ...] = ("mpi", "power")
"""The router kinds whose rows are computed from the expert matrices (the others need only R)."""

# Rows whose norm is at or below this are treated as degenerate (see `retract`).
DEGENERATE_NORM = 1e-20


# ----------------------------------------------------------------------------- pure math


def mpi_scale(num_experts: int, scale_prime: float = 1.0) -> float:
    """The retraction radius C = C' / sqrt(N) (docs/method.md, eq. 5).

    Dividing by sqrt(N) keeps the logit scale independent of the number of experts;
    the authors' code hard-codes C = 0.125, i.e. C' = 1 at N = 64.
    """
    check_number("num_experts", num_experts, integer=True, ge=1)
    check_number("MPI scale C'", scale_prime, gt=0)
    return scale_prime / math.sqrt(num_experts)


def power_step(r_ED: torch.Tensor, *mats_EFD: torch.Tensor) -> torch.Tensor:
    """One power-iteration step per expert: r̂_i = R_i (Σ_m M_iᵀ M_i) (docs/method.md, eq. 4).

    With one matrix M = G this is r̂ = R Gᵀ G. Several matrices give the step through their
    row-concatenation [M_1; M_2; ...] (e.g. gate and up projections) without copying them.
    Each product is a batched mat-vec, so the cost is linear in the expert weights.
    """
    if not mats_EFD:
        raise ValueError("power_step needs at least one expert matrix")
    out_ED = None
    for m_EFD in mats_EFD:
        if m_EFD.dim() != 3 or m_EFD.shape[0] != r_ED.shape[0] or m_EFD.shape[2] != r_ED.shape[1]:
            raise ValueError(
                f"expert matrix shape {tuple(m_EFD.shape)} does not match router rows "
                f"{tuple(r_ED.shape)}: expected (E, F, D) = ({r_ED.shape[0]}, F, {r_ED.shape[1]})"
            )
        u_E1F = torch.bmm(r_ED.unsqueeze(1), m_EFD.transpose(1, 2))  # R_i G_iᵀ
        step_ED = torch.bmm(u_E1F, m_EFD).squeeze(1)  # (R_i G_iᵀ) G_i
        out_ED = step_ED if out_ED is None else out_ED + step_ED
    return out_ED


def retract(v_ED: torch.Tensor, scale: float) -> torch.Tensor:
    """Retraction onto the sphere of radius C: φ_i = C · v_i / ‖v_i‖₂ (docs/method.md, eq. 5).

    A degenerate row (norm ≤ 1e-20, e.g. an all-zero router row, or one orthogonal to its
    expert's row space) maps to the zero row with zero gradient instead of NaN or an
    exploding 1/eps gradient: that expert simply gets logit 0. A row with NaN (or inf) in it
    is not degenerate: it stays non-finite, so broken weights show up as NaN logits instead
    of a valid-looking logit 0.
    """
    norm_E1 = torch.linalg.vector_norm(v_ED, dim=-1, keepdim=True)
    # written as ~(norm <= eps), not norm > eps: a NaN norm must count as "ok" and propagate
    ok_E1 = ~(norm_E1 <= DEGENERATE_NORM)
    safe_norm_E1 = torch.where(ok_E1, norm_E1, torch.ones_like(norm_E1))
    return torch.where(ok_E1, v_ED * (scale / safe_norm_E1), torch.zeros_like(v_ED))


def mpi_rows(r_ED: torch.Tensor, *mats_EFD: torch.Tensor, scale: float) -> torch.Tensor:
    """MPI router rows φ = C · normalize(R Gᵀ G), batched over experts, in float32.

    Computed in float32 whatever the dtype of R and G (bf16 expert weights are upcast),
    and differentiable into both R and the expert matrices.
    """
    r_ED = r_ED.float()
    mats_EFD = tuple(m.float() for m in mats_EFD)
    return retract(power_step(r_ED, *mats_EFD), scale)


def router_rows(kind: str, r_ED: torch.Tensor, *mats_EFD: torch.Tensor, scale: float) -> torch.Tensor:
    """The rows φ (E, D) in float32 that router `kind` multiplies tokens with (docs/method.md, eqs. 4-5).

    linear / mpi-inplace: R itself; retract: C·normalize(R); power: R Gᵀ G; mpi: C·normalize(R Gᵀ G).
    `mats_EFD` are the expert matrices of the power target (ignored by the kinds that do not use them).
    """
    if kind in ("linear", "mpi-inplace"):
        return r_ED.float()
    if kind == "retract":
        return retract(r_ED.float(), scale)
    if not mats_EFD:
        raise ValueError(f"router kind {kind!r} needs the expert gate weights")
    if kind == "power":
        return power_step(r_ED.float(), *(m.float() for m in mats_EFD))
    if kind == "mpi":
        return mpi_rows(r_ED, *mats_EFD, scale=scale)
    raise ValueError(f"unknown router kind {kind!r}; choose one of {', '.join(ROUTER_KINDS)}")


def riemannian_ascent_step(v_D: torch.Tensor, a_DD: torch.Tensor) -> torch.Tensor:
    """One Riemannian gradient-ascent step of ρ(v) = vᵀAv on the unit sphere, step 1/ρ(v).

    v' = normalize(v + (1/ρ) (I − v vᵀ) A v) with v a unit vector (docs/method.md,
    eq. 6). Since ρ v + (I − v vᵀ) A v = A v, this equals normalize(A v): one MPI step.
    Kept as a separate reference so the tests can check that identity.
    """
    av_D = a_DD @ v_D
    rho = v_D @ av_D
    tangent_D = av_D - (v_D @ av_D) * v_D
    step_D = v_D + tangent_D / rho
    return step_D / step_D.norm()


def concat_rows(*mats_EFD: torch.Tensor) -> torch.Tensor:
    """[M_1; M_2; ...] per expert, detached float32 (E, ΣF, D): the matrix whose spectrum `power_step` iterates."""
    return torch.cat([m.detach().float() for m in mats_EFD], dim=1)


def top_singular_directions(w_EFD: torch.Tensor) -> torch.Tensor:
    """Top right-singular vector of each expert matrix (rows of Vᵀ), shape (E, D), float32.

    Exact SVD; meant for evaluation, not for the training hot path. The sign is arbitrary.
    """
    _, _, vh_EDD = torch.linalg.svd(w_EFD.detach().float(), full_matrices=False)
    return vh_EDD[:, 0, :]


def alignment(r_ED: torch.Tensor, *mats_EFD: torch.Tensor) -> torch.Tensor:
    """Sign-free alignment |cos(r_i, v_i)| of each router row with its expert's top singular direction.

    v_i is the top right-singular vector of M_i (or of [M_1; M_2; ...] when several matrices
    are given, matching `power_step`). A random direction in R^D scores about sqrt(2/(π D)).
    Returns shape (E,), float32.
    """
    w_EFD = concat_rows(*mats_EFD)
    v_ED = top_singular_directions(w_EFD)
    r_ED = r_ED.detach().float()
    cos_E = (r_ED * v_ED).sum(-1) / (r_ED.norm(dim=-1) * v_ED.norm(dim=-1)).clamp_min(1e-30)
    return cos_E.abs()


def relative_gain(r_ED: torch.Tensor, *mats_EFD: torch.Tensor) -> torch.Tensor:
    """How much each expert amplifies its router direction, relative to the most it can: ‖M_i r̂_i‖ / σ₁(M_i).

    1 on the top right-singular direction; σ₂/σ₁ on the second; √(Σσ²/D)/σ₁ on average for a random
    direction. Unlike `alignment` it stays meaningful when σ₂ ≈ σ₁ (a nearly flat top of the spectrum,
    where "the" top direction is ill-defined): it is √(ρ(r̂))/σ₁ with ρ the Rayleigh quotient of
    MᵀM (docs/method.md, eq. 10), the quantity one MPI step increases. Returns (E,), float32.
    """
    w_EFD = concat_rows(*mats_EFD)
    r_ED = r_ED.detach().float()
    unit_ED = r_ED / r_ED.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    gain_E = torch.bmm(w_EFD, unit_ED.unsqueeze(-1)).squeeze(-1).norm(dim=-1)
    return gain_E / torch.linalg.matrix_norm(w_EFD, ord=2)


def random_alignment_baseline(dim: int) -> float:
    """Expected |cos| between a fixed and a uniformly random direction in R^dim: ≈ sqrt(2/(π dim))."""
    return math.sqrt(2.0 / (math.pi * dim))


# ----------------------------------------------------------------------------- module


@dataclass
class RouterConfig:
    """How router rows are produced from the router parameter R and the expert weights."""

    kind: RouterKind = "mpi"
    """linear | mpi (power+retract every forward, differentiable) | power | retract | mpi-inplace."""
    scale_prime: float = 1.0
    """C' in C = C'/sqrt(E): the retraction radius, scale-free in the number of experts."""
    target: PowerTarget = "gate"
    """Which expert matrix drives the power step: gate (G), up (U) or gate_up ([G; U])."""

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {self.kind!r}; choose one of {', '.join(ROUTER_KINDS)}")
        if self.target not in POWER_TARGETS:
            raise ValueError(f"unknown power target {self.target!r}; choose one of {', '.join(POWER_TARGETS)}")
        check_number("scale_prime (C')", self.scale_prime, gt=0)


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

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def computes_rows(self) -> bool:
        """Whether φ is computed from R in the forward pass (mpi, power, retract), rather than being R itself."""
        return self.config.kind in ("mpi", "power", "retract")

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
        uses_experts = kind in EXPERT_KINDS
        if uses_experts and w_gate_EFD is None:
            raise ValueError(f"router kind {kind!r} needs the expert gate weights")
        mats = select_target(self.config.target, w_gate_EFD, w_up_EFD) if uses_experts else ()
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
        """A plain `linear` router whose weight is φ computed once: identical logits, vanilla cost."""
        folded = Router(self.dim, self.num_experts, RouterConfig(kind="linear", scale_prime=self.config.scale_prime))
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


# ----------------------------------------------------------------------------- φ once per optimizer step


class _AddAccumulatedGrad(torch.autograd.Function):
    """Identity on φ whose backward adds the gradient the earlier micro-batches left on a detached copy."""

    @staticmethod
    def forward(ctx, phi_ED: torch.Tensor, leaf_ED: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf_ED
        return phi_ED.view_as(phi_ED)

    @staticmethod
    def backward(ctx, g_ED: torch.Tensor):
        earlier = ctx.leaf.grad
        return (g_ED if earlier is None else g_ED + earlier), None


class RowsPerStep:
    """φ computed once per optimizer step and shared by its `micro_batches` micro-batches.

        shared = RowsPerStep([m.router_rows() for m in moe_layers], micro_batches=4)
        for i in range(4):
            model(x[i], y[i], router_rows=shared.for_micro_batch(i)).loss.backward()

    Micro-batches 0..n-2 read a detached copy of φ, on which their backward passes accumulate
    ∂L/∂φ. The last one reads φ itself through an identity whose backward adds that accumulated
    gradient, so the backward through φ's graph (into R, G, U) runs once, inside the last
    micro-batch's backward: where DDP/FSDP hooks expect every parameter's gradient. The
    gradients equal recomputing φ per micro-batch, up to the order of summation.

    Each micro-batch must call `.backward()` (not `torch.autograd.grad`, which leaves the copy's
    gradient empty), and the last one's loss must depend on the rows it was given; the rows of the
    last micro-batch can be taken once.
    """

    def __init__(self, rows: list[torch.Tensor], micro_batches: int):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.rows, self.micro_batches = rows, micro_batches
        self.detached = [r.detach().requires_grad_(r.requires_grad) for r in rows]
        self._last_taken = False

    def for_micro_batch(self, i: int) -> list[torch.Tensor]:
        """The rows micro-batch `i` (0-based) routes with."""
        if not 0 <= i < self.micro_batches:
            raise ValueError(f"micro-batch {i} is outside 0..{self.micro_batches - 1}")
        if i < self.micro_batches - 1:
            return self.detached
        if self._last_taken:  # a second graph through the identity would add the earlier gradients twice
            raise RuntimeError("the last micro-batch's rows were already taken; make a new RowsPerStep for the next step")
        self._last_taken = True
        return [_AddAccumulatedGrad.apply(r, d) if r.requires_grad else r for r, d in zip(self.rows, self.detached)]
