"""Online k-means router (geometric coupling, arXiv 2605.12476): each expert's row is a running average
of the hidden states routed to it, tokens are routed by cosine similarity, and nothing is learned by
gradient.

The paper's abstract fixes the three facts above; the update's form and the weights are our choices
(docs/zoo.md): an exponential moving average of the unit-normalized states routed to each expert
(all top-k assignments, pooled over the global batch of the optimizer step), and combine weights from
a softmax of cos/τ with a fixed τ, as for a softmax router.

    logits    l_ti = cos(x_t, c_i) / τ
    update    c_i ← (1 − m) c_i + m · mean{ x_t / ‖x_t‖ : t routed to i }      (experts with no token keep c_i)

Shape legend: T tokens, D model width, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import KMeansConfig

NORM_EPS = 1e-12


def kmeans_logits(x_TD: torch.Tensor, centroids_ED: torch.Tensor, temperature: float) -> torch.Tensor:
    """cos(x_t, c_i) / τ, float32 (T, E); no gradient reaches the centroids (they are statistics)."""
    x_TD = F.normalize(x_TD.float(), dim=-1, eps=NORM_EPS)
    c_ED = F.normalize(centroids_ED.detach().float(), dim=-1, eps=NORM_EPS)
    return (x_TD @ c_ED.t()) / temperature


def routed_sums(x_TD: torch.Tensor, experts_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ of x_t/‖x_t‖ over the slots routed to each expert (E, D), slot counts (E,)), float32, no graph."""
    x_TD = F.normalize(x_TD.detach().float(), dim=-1, eps=NORM_EPS)
    K = experts_TK.shape[-1]
    flat_M = experts_TK.reshape(-1)
    sums_ED = x_TD.new_zeros(num_experts, x_TD.shape[-1]).index_add_(0, flat_M, x_TD.repeat_interleave(K, dim=0))
    counts_E = x_TD.new_zeros(num_experts).index_add_(0, flat_M, x_TD.new_ones(flat_M.shape))
    return sums_ED, counts_E


def centroid_update(centroids_ED: torch.Tensor, sums_ED: torch.Tensor, counts_E: torch.Tensor, momentum: float) -> torch.Tensor:
    """c_i ← (1 − m) c_i + m · sums_i / counts_i where counts_i > 0; c_i unchanged elsewhere."""
    seen_E1 = (counts_E > 0).unsqueeze(-1)
    mean_ED = sums_ED / counts_E.clamp_min(1).unsqueeze(-1)
    return torch.where(seen_E1, (1 - momentum) * centroids_ED + momentum * mean_ED, centroids_ED)


class KMeansRouter(nn.Module):
    """Holds the centroids c (E, D) as a float32 buffer (saved with the weights) and the step's sums.

    `accumulate` adds a training forward's routed states; `post_step` (after each optimizer step) sums
    them over the ranks of `group` (an all-reduce: every rank calls it) and moves the centroids.
    """

    computes_rows = False

    def __init__(self, dim: int, num_experts: int, config: KMeansConfig):
        super().__init__()
        self.dim, self.num_experts, self.kmeans = dim, num_experts, config
        self.register_buffer("centroids", torch.empty(num_experts, dim))
        # plain attributes, not buffers: each rank's sums are its own until post_step reduces them
        self._sums_ED: torch.Tensor | None = None
        self._counts_E: torch.Tensor | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit centroids (a zero start would leave every cosine 0 and the first batch's order to decide)."""
        self.centroids.copy_(F.normalize(torch.randn_like(self.centroids), dim=-1))
        self._sums_ED = self._counts_E = None

    def forward(self, x_TD: torch.Tensor, rows_ED: torch.Tensor | None = None) -> torch.Tensor:
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:
            raise ValueError(f"KMeansRouter expects x of shape (tokens, dim={self.dim}), got {tuple(x_TD.shape)}")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return kmeans_logits(x_TD, self.centroids, self.kmeans.temperature)

    @torch.no_grad()
    def accumulate(self, x_TD: torch.Tensor, experts_TK: torch.Tensor) -> None:
        sums_ED, counts_E = routed_sums(x_TD, experts_TK, self.num_experts)
        if self._sums_ED is None:
            self._sums_ED, self._counts_E = sums_ED, counts_E
        else:
            self._sums_ED, self._counts_E = self._sums_ED + sums_ED, self._counts_E + counts_E

    @torch.no_grad()
    def post_step(self, group: dist.ProcessGroup | None = None) -> None:
        if self._sums_ED is None:
            if not (dist.is_available() and dist.is_initialized()):
                return
            # a rank that saw no training forward still joins the all-reduce
            self._sums_ED, self._counts_E = torch.zeros_like(self.centroids), self.centroids.new_zeros(self.num_experts)
        stats = torch.cat([self._sums_ED, self._counts_E.unsqueeze(-1)], dim=-1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats, group=group)
        self.centroids.copy_(centroid_update(self.centroids, stats[:, :-1], stats[:, -1], self.kmeans.momentum))
        self._sums_ED = self._counts_E = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, kind=kmeans, momentum={self.kmeans.momentum:g}"
