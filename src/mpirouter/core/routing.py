"""Routing and load balance as pure functions: scores, top-k, the expert bias, the balance and z losses,
MaxVio and entropy (docs/method.md, eqs. 2, 7-8, 11-12).

Shape legend (suffixes on tensor names):
    B  batch (sequences)          S  sequence length
    T  tokens = B * S             E  number of experts
    K  experts per token (top-k)
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
import torch.distributed as dist

from ..common.config import show_value

AuxScope = Literal["sequence", "batch", "global"]
ScoreFunc = Literal["softmax", "sigmoid"]
Balance = Literal["aux", "bias", "both"]

SCORE_FUNCS: tuple[str, ...] = get_args(ScoreFunc)


def check_score_func(score_func: object) -> None:
    """Raise ValueError naming `score_func` and its choices unless it is one of `SCORE_FUNCS`."""
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {', '.join(SCORE_FUNCS)}, got {show_value(score_func)}")


class Routing(NamedTuple):
    """Top-k routing decision for T tokens."""

    probs_TE: torch.Tensor
    """Each token's distribution over all experts, float32: the softmax, or the sigmoid scores normalized
    to sum 1 (the P_i of the balance loss, as in DeepSeek-V3's sequence-wise loss)."""
    weights_TK: torch.Tensor
    """Combine weights of the chosen experts, float32."""
    experts_TK: torch.Tensor
    """Indices of the chosen experts."""


def route(logits_TE: torch.Tensor, top_k: int, renormalize: bool = True, score_func: ScoreFunc = "softmax",
          bias_E: torch.Tensor | None = None) -> Routing:
    """Scores in float32, top-k, optional renormalization (docs/method.md, eqs. 2 and 11–12).

    score_func="softmax": s = softmax(l) over all experts; "sigmoid": s_i = σ(l_i) per expert (DeepSeek-V3).
    `bias_E` (aux-loss-free balancing): the experts are the top-k of s + b, their weights come from s
    alone, so the bias steers selection and never the output's scale.
    """
    if not 1 <= top_k <= logits_TE.shape[-1]:  # plain comparison: this runs in every layer's forward
        raise ValueError(f"top_k must be in [1, num_experts={logits_TE.shape[-1]}], got {top_k}")
    check_score_func(score_func)  # a string compare, no tensor read
    if score_func == "softmax":
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    else:
        scores_TE = torch.sigmoid(logits_TE.float())
    if bias_E is None:
        weights_TK, experts_TK = torch.topk(scores_TE, top_k, dim=-1)
    else:
        experts_TK = torch.topk(scores_TE + bias_E.float(), top_k, dim=-1).indices
        weights_TK = scores_TE.gather(-1, experts_TK)
    if renormalize:
        # sigmoid weights can all underflow to 0: DeepSeek-V3's 1e-20 keeps the division finite
        denom_T1 = weights_TK.sum(-1, keepdim=True)
        weights_TK = weights_TK / (denom_T1 if score_func == "softmax" else denom_T1 + 1e-20)
    probs_TE = scores_TE if score_func == "softmax" else scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
    return Routing(probs_TE, weights_TK, experts_TK)


def expert_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free bias step b_i ← b_i + u · sign(mean_j load_j − load_i) (docs/method.md, eq. 12).

    Overloaded experts lose selection priority, underloaded ones gain it; an expert exactly at the
    mean keeps its bias. `load_E`: routed slots per expert over the whole step's batch (all ranks).
    """
    load_E = load_E.to(bias_E.dtype)
    return bias_E + rate * torch.sign(load_E.mean() - load_E)


def tokens_per_expert(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed slots per expert, shape (E,), int64.

    A scatter-add into a fixed (E,) buffer rather than `bincount`: bincount's output size depends
    on the data, which on CUDA costs two host reads (its min and max) per call.
    """
    flat_M = experts_TK.reshape(-1)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=flat_M.device)
    return counts_E.scatter_add_(0, flat_M, torch.ones_like(flat_M, dtype=torch.int64))


def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """MaxVio = (max_i load_i - mean load) / mean load (docs/method.md, eq. 8); 0 means perfectly even."""
    load_E = load_E.float()
    mean = load_E.mean()
    return (load_E.max() - mean) / mean.clamp_min(1e-12)


def load_balance_loss(probs_BSE: torch.Tensor, experts_BSK: torch.Tensor, coef: float, scope: AuxScope = "sequence",
                      group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Switch-style balance loss coef · E · Σ_i f_i P_i (docs/method.md, eq. 7).

    f_i: fraction of routed slots sent to expert i (no gradient); P_i: mean probability of
    expert i. scope="sequence" computes both per sequence and averages over the batch, as the
    reference code does; scope="batch" pools all tokens. Equals `coef` at perfectly even routing.

    scope="global" (Megatron-Core's global aux loss): f_i from the expert counts summed over the
    ranks of `group` (an all-reduce with no gradient; None: the default group), P_i this rank's
    own mean. With equal token counts per rank the global P_i is the mean over ranks of the local
    ones, so the mean over ranks of this loss is the "batch"-scope loss of the concatenated global
    batch, and so is its gradient: the rank average that DDP applies to gradients is the gradient
    of that mean. Without torch.distributed initialized it equals "batch". A collective: every
    rank of the group must call it, even with no tokens (then its P_i and its loss are 0).
    """
    B, S, E = probs_BSE.shape
    if scope == "global":
        counts_E = tokens_per_expert(experts_BSK.reshape(-1), E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_E, group=group)  # int64: exact counts at any batch size
        f_E = counts_E.float() / counts_E.sum().clamp_min(1)
        p_E = probs_BSE.float().reshape(B * S, E).sum(0) / max(B * S, 1)
        return coef * E * (f_E * p_E).sum()
    if scope == "batch":
        probs_BSE, experts_BSK = probs_BSE.reshape(1, B * S, E), experts_BSK.reshape(1, B * S, -1)
    K = experts_BSK.shape[-1]
    counts_BE = torch.zeros(probs_BSE.shape[0], E, device=probs_BSE.device, dtype=torch.float32)
    counts_BE.scatter_add_(1, experts_BSK.flatten(1), torch.ones_like(experts_BSK.flatten(1), dtype=torch.float32))
    f_BE = counts_BE / (experts_BSK.shape[1] * K)
    p_BE = probs_BSE.float().mean(dim=1)
    return coef * E * (f_BE * p_BE).sum(-1).mean()


def router_z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    """ST-MoE router z-loss coef · mean(logsumexp(l)²): keeps logits from drifting large."""
    return coef * torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Mean entropy in nats of the router distribution over all experts."""
    return -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1).mean()
