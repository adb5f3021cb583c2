"""Spectral diagnostics of router rows against their experts: top singular directions, alignment, gain.

Shape legend: E experts, F expert hidden size, D model width (docs/method.md, eqs. 9-10).
"""

from __future__ import annotations

import math

import torch

from .mpi import power_step, retract

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


def exact_rows(r_ED: torch.Tensor, *mats_EFD: torch.Tensor, scale: float) -> torch.Tensor:
    """The `svd` router's rows: φ_i = C · s_i v₁(M_i), MPI's converged limit (docs/method.md, eqs. 4-6), float32.

    v₁ is the top right-singular vector of M_i ([M_1; M_2; ...] for several matrices) from an exact SVD,
    and s_i = sign⟨R_i, v₁⟩ (+1 at 0) the sign that power iteration started from R_i converges to, so R only
    fixes which side of the direction routes. Forward: exactly C·s_i·v₁. Backward: one power step taken from
    the (detached) exact direction, C·normalize(s_i v₁ M_iᵀM_i), which equals C·s_i·v₁ in value; its
    gradient into M_i is MPI's evaluated at the fixed point, bounded where the SVD's own gradient is not
    (it divides by σ₁² − σ_j², unbounded as the top of the spectrum flattens). R gets no gradient.
    """
    with torch.no_grad():
        v_ED = top_singular_directions(concat_rows(*mats_EFD))
        sign_E1 = torch.where((v_ED * r_ED.float()).sum(-1, keepdim=True) < 0, -1.0, 1.0)
        start_ED = sign_E1 * v_ED
    return retract(power_step(start_ED, *(m.float() for m in mats_EFD)), scale)
