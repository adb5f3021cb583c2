"""The expert–router coupling (ERC) loss (Lv et al., arXiv 2512.23447, §3): proxies of the router rows,
perturbed by bounded noise, go through every expert's gate projection; margin losses make expert i
respond most to proxy i and proxy i excite expert i most. Its cost depends on E and D, not on the batch.

    proxies   r̃_i = φ_i ⊙ δ_i,  δ_i ~ U(1 − ε_i, 1 + ε_i)^D,  ε_i = ‖φ_i − φ_j‖ / (2‖φ_i‖), j nearest   (eq. 4)
    M[i, j]   = ‖G_j r̃_i‖₂          (the gate pre-activation of expert j on proxy i)
    L_ERC     = 1/E² Σ_i Σ_{j≠i} [ReLU(M[i, j] − α M[i, i]) + ReLU(M[j, i] − α M[i, i])]                (eq. 3)

Shape legend: E experts, D model width, F expert hidden size.
"""

from __future__ import annotations

import torch


def erc_noise_bound(rows_ED: torch.Tensor) -> torch.Tensor:
    """ε_i = min_{j≠i} ‖φ_i − φ_j‖ / (2‖φ_i‖) (ERC eq. 4), the largest noise keeping proxy i nearer its own row."""
    rows_ED = rows_ED.detach().float()
    dist_EE = torch.cdist(rows_ED, rows_ED)
    dist_EE = dist_EE + torch.diag(torch.full_like(dist_EE[0], float("inf")))
    return dist_EE.min(-1).values / (2 * rows_ED.norm(dim=-1).clamp_min(1e-30))


def erc_proxies(rows_ED: torch.Tensor, eps_E: torch.Tensor, uniform_ED: torch.Tensor) -> torch.Tensor:
    """r̃_i = φ_i ⊙ (1 + ε_i (2u − 1)) for u ~ U(0, 1)^(E×D) given: the noise has no gradient, φ keeps its graph."""
    return rows_ED * (1 + eps_E.unsqueeze(-1) * (2 * uniform_ED - 1))


def erc_activation_norms(proxies_ED: torch.Tensor, w_gate_EFD: torch.Tensor) -> torch.Tensor:
    """M[i, j] = ‖G_j r̃_i‖₂, (E, E) float32: every proxy through every expert's gate projection."""
    act_EEF = torch.einsum("id,jfd->ijf", proxies_ED.float(), w_gate_EFD.float())
    return torch.linalg.vector_norm(act_EEF, dim=-1)


def erc_loss(m_EE: torch.Tensor, margin: float) -> torch.Tensor:
    """(1/E²) Σ_{i≠j} ReLU(M[i, j] − α M[i, i]) + ReLU(M[j, i] − α M[i, i]) (ERC eq. 3)."""
    E = m_EE.shape[0]
    diag_E = m_EE.diagonal()
    off_EE = 1 - torch.eye(E, dtype=m_EE.dtype, device=m_EE.device)
    row_EE = torch.relu(m_EE - margin * diag_E.unsqueeze(1))   # [i, j]: M[i, j] − α M[i, i]
    col_EE = torch.relu(m_EE - margin * diag_E.unsqueeze(0))   # [j, i]: M[j, i] − α M[i, i]
    return ((row_EE + col_EE) * off_EE).sum() / (E * E)
