"""The load-balancing loss E · Σ_i f_i P_i (`load_balancing_loss`) and the per-token expert
probabilities P it uses (`_probs`); plain tensor functions, shared by the router hooks and the metrics."""

from __future__ import annotations

import torch


def _probs(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """Per-token expert probabilities P (T, E) in float32 for the load-balancing loss."""
    if score == "sigmoid":  # DeepSeek-V3's balance loss: sigmoid scores normalised over all experts
        s_TE = logits_TE.float().sigmoid()
        return s_TE / s_TE.sum(-1, keepdim=True)
    return logits_TE.float().softmax(-1)


def load_balancing_loss(
    logits: list[torch.Tensor],
    indices: list[torch.Tensor],
    num_experts: int,
    score: str = "softmax",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' load-balancing loss E · Σ_i f_i P_i, pooled over layers (as its `load_balancing_loss_func`).

    f_i: routed slots to expert i per token (sums to K), from the choices the router actually made
    (so DeepSeek-V3's group-limited, bias-corrected choice counts as made); P_i: mean probability
    (softmax, or sigmoid scores normalised over experts for sigmoid routers). Padding (mask 0) is excluded.
    Equals transformers' value for the softmax models when their top-k is plain top-k.
    """
    count_E = probs_E = rows = 0.0
    for logits_TE, idx_TK in zip(logits, indices):
        p_TE = _probs(logits_TE, score)
        hits_TE = torch.zeros_like(p_TE).scatter_add_(1, idx_TK, torch.ones_like(idx_TK, dtype=p_TE.dtype))
        w_T1 = None
        if attention_mask is not None and attention_mask.numel() == p_TE.shape[0]:
            w_T1 = attention_mask.reshape(-1, 1).to(p_TE)
        if w_T1 is None:
            count_E, probs_E, rows = count_E + hits_TE.sum(0), probs_E + p_TE.sum(0), rows + p_TE.shape[0]
        else:
            count_E, probs_E, rows = count_E + (hits_TE * w_T1).sum(0), probs_E + (p_TE * w_T1).sum(0), rows + w_T1.sum()
    return num_experts * ((count_E / rows) * (probs_E / rows)).sum()
