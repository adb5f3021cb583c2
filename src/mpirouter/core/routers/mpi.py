"""The Manifold Power Iteration (MPI) router's math as pure functions: power step, retraction, scale.

Paper: Wu, Lv, Xie, Lin, "Redesign Mixture-of-Experts Routers with Manifold Power
Iteration", arXiv 2606.12397. Equation numbers below refer to docs/method.md.

Shape legend (suffixes on tensor names):
    T  tokens (batch * sequence, flattened)
    D  model width (router input size)
    E  number of experts (N in the paper)
    F  expert hidden size (h in the paper)

    power step   r̂_i = R_i G_iᵀ G_i                      (two batched mat-vecs, no SVD)
    retraction   φ_i = C · r̂_i / ‖r̂_i‖₂,   C = C' / sqrt(E)
    logits       l = x φᵀ
"""

from __future__ import annotations

import math

import torch

from ...common.config import check_number

MPI_FAMILY: tuple[str, ...] = ("linear", "mpi", "power", "retract", "mpi-inplace")
"""The router kinds `router_rows` computes: MPI and its ablations (the integrations take these)."""

EXPERT_KINDS: tuple[str, ...] = ("mpi", "power")
"""The MPI-family kinds whose rows are computed from the expert matrices (the others need only R)."""

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
    raise ValueError(f"unknown router kind {kind!r}; choose one of {', '.join(MPI_FAMILY)}")


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
