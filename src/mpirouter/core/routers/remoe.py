"""ReMoE (Wang, Chen, Zhu, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing",
arXiv 2412.14711, §3): ReLU gates in place of softmax + top-k, steered to a target sparsity by an
L1 penalty whose coefficient a controller adapts after every step.

    gates      G(x) = ReLU(x Rᵀ)                  (its values are the combine weights; no renormalization)
    L1         L_reg = Σ_i f_i · mean_t G_ti,  f_i = E / (K T) · #{t : G_ti > 0}   (f: no gradient)
    controller λ ← λ · α^sign(S_target − S),  S = 1 − nnz(G) / (T E),  S_target = 1 − K / E

Each token uses a variable number of experts; the layer stays dropless. Shape legend: T tokens,
E experts, M the routed (token, expert) slots.
"""

from __future__ import annotations

import torch


def relu_gates(logits_TE: torch.Tensor) -> torch.Tensor:
    """G = ReLU(x Rᵀ) (ReMoE eq. 4), float32."""
    return torch.relu(logits_TE.float())


def relu_slots(gates_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The active (token, expert) pairs and their weights: (tokens_M, experts_M, weights_M), token-major.

    Their number depends on the data: on CUDA, finding them is a host read per layer (as any dropless
    variable-k routing is; ReMoE's Megatron code does the same).
    """
    tokens_M, experts_M = torch.nonzero(gates_TE > 0, as_tuple=True)
    return tokens_M, experts_M, gates_TE[tokens_M, experts_M]


def remoe_l1(gates_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int, refined: bool = True,
             total_tokens: int | torch.Tensor | None = None) -> torch.Tensor:
    """ReMoE's L1 penalty Σ_i f_i · mean_t G_ti (eq. 9 with its load-balancing refinement; f_i = 1 without it).

    f_i = E / (K T) · count_i is expert i's load relative to top-k's even share, detached: busy experts'
    gates are pushed down harder. `counts_E` and `total_tokens` (None: this batch's T) may span more tokens
    than `gates_TE` holds, e.g. the global batch of all data-parallel ranks (f from the global load, the
    mean over this rank's tokens). Not multiplied by λ here; 0 for no tokens.
    """
    T, E = gates_TE.shape
    mean_E = gates_TE.float().sum(0) / max(T, 1)
    if not refined:
        return mean_E.sum()
    total = max(T if total_tokens is None else total_tokens, 1) if not isinstance(total_tokens, torch.Tensor) \
        else total_tokens.float().clamp_min(1)
    f_E = counts_E.detach().float() * E / (top_k * total)
    return (f_E * mean_E).sum()


def target_sparsity(num_experts: int, top_k: int) -> float:
    """S_target = 1 − K / E: the fraction of zero gates at which ReMoE matches top-k's compute."""
    return 1.0 - top_k / num_experts


def l1_coef_step(coef: torch.Tensor, sparsity: torch.Tensor, target: float, alpha: float) -> torch.Tensor:
    """λ · α^sign(S_target − S) (ReMoE eq. 10): raise the penalty while too dense, lower it while too sparse."""
    return coef * torch.pow(alpha, torch.sign(target - sparsity)).to(coef.dtype)
