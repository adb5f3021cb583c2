"""X-MoE's cosine router (Chi et al., "On the Representation Collapse of Sparse Mixture of Experts",
arXiv 2204.09179, §3): route in a low-dimensional space by cosine similarity, with a learnable temperature.

    s_i(x) = cos(W x, e_i) / τ = (W x)·e_i / (‖W x‖ ‖e_i‖ τ)

Shape legend: T tokens, D model width, E experts, P the routing dimension d_e.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CosineConfig

NORM_EPS = 1e-4
"""Floor of ‖W x‖ and ‖e_i‖ in the normalization (X-MoE's code normalizes with eps 1e-4)."""


def cosine_logits(x_TD: torch.Tensor, proj_PD: torch.Tensor, emb_EP: torch.Tensor, temperature: torch.Tensor,
                  min_temperature: float) -> torch.Tensor:
    """X-MoE's routing scores s = cos(W x, e_i) / τ (arXiv 2204.09179, §3.2), float32 (T, E).

    τ is clamped from below at `min_temperature` (X-MoE's code), which bounds the logits by 1/τ_min.
    """
    h_TP = F.normalize(F.linear(x_TD.float(), proj_PD.float()), dim=-1, eps=NORM_EPS)
    e_EP = F.normalize(emb_EP.float(), dim=-1, eps=NORM_EPS)
    return (h_TP @ e_EP.t()) / temperature.float().clamp_min(min_temperature)


class CosineRouter(nn.Module):
    """Parameters: `proj` W (P, D), `weight` the expert embeddings e (E, P), `temperature` τ (shape (1,)).

    `weight` is named as a linear router's R so the optimizer's router group treats both alike.
    """

    computes_rows = False
    """Its logits are no x·φᵀ: there are no rows to share across micro-batches or fold."""

    def __init__(self, dim: int, num_experts: int, config: CosineConfig):
        super().__init__()
        self.dim, self.num_experts, self.cosine = dim, num_experts, config
        self.proj = nn.Parameter(torch.empty(config.dim, dim))
        self.weight = nn.Parameter(torch.empty(num_experts, config.dim))
        # shape (1,), not a scalar: FSDP2's fully_shard refuses 0-dim parameters
        self.temperature = nn.Parameter(torch.full((1,), config.init_temperature))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """W ~ N(0, 0.02) like the model's other matrices; e orthogonal with gain 0.1 (X-MoE's code); τ = τ₀."""
        nn.init.normal_(self.proj, std=0.02)
        nn.init.orthogonal_(self.weight, gain=0.1)
        self.temperature.fill_(self.cosine.init_temperature)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the temperature became shape (1,) (commits cf3feec..a852a61) hold a scalar
        key = prefix + "temperature"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x_TD: torch.Tensor, rows_ED: torch.Tensor | None = None) -> torch.Tensor:
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:
            raise ValueError(f"CosineRouter expects x of shape (tokens, dim={self.dim}), got {tuple(x_TD.shape)}")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return cosine_logits(x_TD, self.proj, self.weight, self.temperature, self.cosine.min_temperature)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, kind=cosine, routing_dim={self.cosine.dim}"
