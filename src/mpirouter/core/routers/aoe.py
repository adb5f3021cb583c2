"""Autonomy-of-Experts (Lv et al., arXiv 2501.13074, §3): no router; each expert's gate projection is
factorized, W_g,i = B_i A_i, experts are ranked by the norm of their own x·A_iᵀ, and the chosen ones
continue from that cached product.

    cache    c_ti = A_i x_t                      (all experts, one (E·L) × D matmul)
    logits   l_ti = ‖c_ti‖₂                      (softmax over all experts, then top-k)
    expert   y_i(x) = D_i (silu(B_i c_i) ⊙ U_i x)

Shape legend: T tokens, D model width, E experts, L the low rank d_low, F the experts' hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from ...common.config import check_number


def aoe_low_rank(dim: int, low_rank: int) -> int:
    """d_low: `low_rank`, or D // 3 when it is 0 (AoE's 732M model: 256 at d_model 768)."""
    return low_rank if low_rank > 0 else max(1, dim // 3)


def aoe_hidden(dim: int, hidden: int, low_rank: int) -> int:
    """The hidden size F' at which an AoE expert (D·L + L·F' + 2·D·F' parameters) has the 3·D·F of an
    unfactorized SwiGLU expert: F' = (3DF − L·D) / (L + 2D), rounded (AoE §3, parameter matching)."""
    check_number("AoE hidden size", hidden, integer=True, ge=1)
    return max(1, round((3 * dim * hidden - low_rank * dim) / (low_rank + 2 * dim)))


def aoe_scores(x_TD: torch.Tensor, w_in_ELD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits ‖A_i x_t‖₂ (T, E) in float32, cache A_i x_t (T, E, L)) for every expert.

    The cache is the experts' own first matmul, so it runs at the experts' precision: under bf16 autocast it is
    bf16, and the ranking norms are taken of it (upcast) rather than of a separate float32 product."""
    E, L, D = w_in_ELD.shape
    cache_TEL = (x_TD @ w_in_ELD.reshape(E * L, D).t()).view(-1, E, L)
    return torch.linalg.vector_norm(cache_TEL.float(), dim=-1), cache_TEL


class AoERouter(nn.Module):
    """Holds the experts' first factors A (E, L, D) as `w_in`: part of the experts, it is what ranks them.

    The MoE layer calls `scores` and keeps the cache for the chosen experts (`MoE.forward`).
    """

    computes_rows = False

    def __init__(self, dim: int, num_experts: int, low_rank: int):
        super().__init__()
        self.dim, self.num_experts, self.low_rank = dim, num_experts, low_rank
        self.w_in = nn.Parameter(torch.empty(num_experts, low_rank, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A ~ N(0, 0.02), as the unfactorized gate projections it replaces."""
        nn.init.normal_(self.w_in, std=0.02)

    def scores(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:
            raise ValueError(f"AoERouter expects x of shape (tokens, dim={self.dim}), got {tuple(x_TD.shape)}")
        return aoe_scores(x_TD, self.w_in.to(x_TD.dtype) if torch.is_autocast_enabled(x_TD.device.type) else self.w_in)

    def forward(self, x_TD: torch.Tensor, rows_ED: torch.Tensor | None = None) -> torch.Tensor:
        return self.scores(x_TD)[0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, kind=aoe, low_rank={self.low_rank}"
