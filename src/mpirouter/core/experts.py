"""Dropless expert computation on stacked SwiGLU weights: sort the routed slots by expert, grouped matmuls,
weighted combine (no Python loop over tokens, no capacity, no dropped tokens).

Shape legend (suffixes on tensor names):
    T  tokens                     D  model width
    E  number of experts          F  expert hidden size
    K  experts per token (top-k)  M  routed slots = T * K (or any number, `moe_forward_slots`), sorted by expert

Expert i computes y_i(x) = D_i (silu(G_i x) * (U_i x)) with
    w_gate_EFD[i] = G_i,  w_up_EFD[i] = U_i  (nn.Linear layout: out x in),  w_down_EDF[i] = D_i.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import Dispatch, resolve_dispatch
from .routing import Routing, tokens_per_expert

class _LoopGroupedLinear(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ W_eᵀ for contiguous row blocks, as one autograd node.

    One node for all experts avoids what per-expert `W[e]` selects cost under autograd: each
    select's backward materializes a zero gradient the size of the whole stack
    (docs/performance.md). Here the weight gradient is written block by block.
    """

    @staticmethod
    def forward(ctx, x_MI: torch.Tensor, w_EOI: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        out_MO = x_MI.new_empty(x_MI.shape[0], w_EOI.shape[1])
        for e in range(w_EOI.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                torch.mm(x_MI[lo:hi], w_EOI[e].t(), out=out_MO[lo:hi])
        ctx.save_for_backward(x_MI, w_EOI)
        ctx.bounds = bounds
        return out_MO

    @staticmethod
    def backward(ctx, g_MO: torch.Tensor):
        x_MI, w_EOI = ctx.saved_tensors
        bounds = ctx.bounds
        g_MO = g_MO.contiguous()
        dx_MI = torch.empty_like(x_MI) if ctx.needs_input_grad[0] else None
        dw_EOI = torch.empty_like(w_EOI) if ctx.needs_input_grad[1] else None
        for e in range(w_EOI.shape[0]):
            lo, hi = bounds[e], bounds[e + 1]
            if dx_MI is not None and hi > lo:
                torch.mm(g_MO[lo:hi], w_EOI[e], out=dx_MI[lo:hi])
            if dw_EOI is not None:
                if hi > lo:
                    torch.mm(g_MO[lo:hi].t(), x_MI[lo:hi], out=dw_EOI[e])
                else:
                    dw_EOI[e].zero_()
        return dx_MI, dw_EOI, None


def expert_bounds(counts_E: torch.Tensor) -> list[int]:
    """Row offsets [0, c0, c0+c1, ...] on the host: the loop path's one host read (and graph break) per layer."""
    return [0] + torch.cumsum(counts_E, 0).tolist()


def grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor, impl: Dispatch = "auto",
                   bounds: list[int] | None = None) -> torch.Tensor:
    """Per-expert linear map of expert-sorted rows: rows of expert e are multiplied by W_eᵀ.

    `counts_E` gives how many consecutive rows belong to each expert. impl="grouped_mm" uses
    `torch._grouped_mm` (one kernel on GPU); "loop" uses `_LoopGroupedLinear`; "auto" asks
    `choose_dispatch` (see `resolve_dispatch`). `bounds`: `expert_bounds(counts_E)` when the
    caller already has them (the loop path needs them on the host).
    """
    dev = x_MI.device.type
    if torch.is_autocast_enabled(dev):
        # custom Functions and _grouped_mm are not on autocast's op lists: cast like F.linear would
        # (a no-op when the caller has cast already, as `moe_forward_sorted` does)
        dt = torch.get_autocast_dtype(dev)
        x_MI, w_EOI = x_MI.to(dt), w_EOI.to(dt)
    impl = resolve_dispatch(x_MI, w_EOI, impl)
    if impl == "grouped_mm":
        offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
        return torch._grouped_mm(x_MI, w_EOI.transpose(-2, -1), offs=offsets_E)
    return _LoopGroupedLinear.apply(x_MI, w_EOI, bounds if bounds is not None else expert_bounds(counts_E))


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors cast to the autocast dtype when autocast is on for their device, else as they are.

    One cast of the routed rows (gate and up share it) and one per weight, not one per matmul;
    callers cast the rows after gathering them, so the gather's backward still adds the K copies'
    gradients in the input's precision.
    """
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) for t in tensors)


def expert_ffn_sorted(x_MD: torch.Tensor, counts_E: torch.Tensor, w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor,
                      w_down_EDF: torch.Tensor, impl: Literal["loop", "grouped_mm"], bounds: list[int] | None,
                      gate_in_MI: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of every expert on its block of expert-sorted rows: D_e (silu(G_e x) * (U_e x)).

    `impl` already resolved (`resolve_dispatch`); `bounds` = `expert_bounds(counts_E)` for the loop
    path, computed by the caller so that its host read stays one per layer. `gate_in_MI`: what the gate
    projection reads instead of x (Autonomy-of-Experts' cached A_e x, with w_gate_EFD = B_e of shape (E, F, L)).
    """
    gate_in_MI = x_MD if gate_in_MI is None else gate_in_MI
    h_MF = F.silu(grouped_linear(gate_in_MI, w_gate_EFD, counts_E, impl, bounds)) * grouped_linear(x_MD, w_up_EFD, counts_E, impl, bounds)
    return grouped_linear(h_MF, w_down_EDF, counts_E, impl, bounds)


def inverse_permutation(order_M: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[i]] = i: `y.index_select(0, inv)` undoes `x.index_select(0, order)`."""
    inverse_M = torch.empty_like(order_M)
    inverse_M[order_M] = torch.arange(order_M.numel(), device=order_M.device)
    return inverse_M


def combine_slots(y_MD: torch.Tensor, order_M: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Weighted sum over each token's K slots, from slot outputs in expert-sorted order `order_M`.

    Gathers the slots back into (T, K) order with the inverse permutation rather than index_add,
    so it is deterministic on GPU.
    """
    T, K = weights_TK.shape
    y_TKD = y_MD.index_select(0, inverse_permutation(order_M)).view(T, K, y_MD.shape[-1])
    return (y_TKD * weights_TK.to(y_TKD.dtype).unsqueeze(-1)).sum(1)


def moe_forward_sorted(
    x_TD: torch.Tensor,
    routing: Routing,
    w_gate_EFD: torch.Tensor,
    w_up_EFD: torch.Tensor,
    w_down_EDF: torch.Tensor,
    impl: Dispatch = "auto",
    cache_TEL: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropless SwiGLU MoE: sort slots by expert, grouped matmuls, weighted combine.

    `cache_TEL`: Autonomy-of-Experts' A_e x_t for every token and expert; each slot's gate projection
    continues from its expert's entry. Returns (out_TD, tokens_per_expert_E).
    """
    E = w_gate_EFD.shape[0]
    K = routing.experts_TK.shape[1]
    flat_experts_M = routing.experts_TK.reshape(-1)
    order_M = torch.argsort(flat_experts_M, stable=True)
    counts_E = tokens_per_expert(flat_experts_M, E)
    tokens_M = order_M // K
    x_MD, w_gate_EFD, w_up_EFD, w_down_EDF = autocast_operands(x_TD.index_select(0, tokens_M), w_gate_EFD, w_up_EFD, w_down_EDF)
    gate_in_ML = None if cache_TEL is None else autocast_operands(cache_TEL[tokens_M, flat_experts_M[order_M]])[0]
    impl = resolve_dispatch(x_MD, w_gate_EFD, impl)
    bounds = expert_bounds(counts_E) if impl == "loop" else None
    y_MD = expert_ffn_sorted(x_MD, counts_E, w_gate_EFD, w_up_EFD, w_down_EDF, impl, bounds, gate_in_ML)
    return combine_slots(y_MD, order_M, routing.weights_TK), counts_E


def moe_forward_slots(x_TD: torch.Tensor, tokens_M: torch.Tensor, experts_M: torch.Tensor, weights_M: torch.Tensor,
                      w_gate_EFD: torch.Tensor, w_up_EFD: torch.Tensor, w_down_EDF: torch.Tensor,
                      impl: Dispatch = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dropless SwiGLU MoE over any set of (token, expert, weight) slots: a variable number of experts per
    token (ReMoE's ReLU routing). out_t = Σ over t's slots of weight · y_expert(x_t); a token without slots
    gets 0. Returns (out_TD, tokens_per_expert_E).
    """
    E = w_gate_EFD.shape[0]
    order_M = torch.argsort(experts_M, stable=True)
    counts_E = tokens_per_expert(experts_M, E)
    tokens_M = tokens_M.index_select(0, order_M)
    x_MD, w_gate_EFD, w_up_EFD, w_down_EDF = autocast_operands(x_TD.index_select(0, tokens_M), w_gate_EFD, w_up_EFD, w_down_EDF)
    impl = resolve_dispatch(x_MD, w_gate_EFD, impl)
    bounds = expert_bounds(counts_E) if impl == "loop" else None
    y_MD = expert_ffn_sorted(x_MD, counts_E, w_gate_EFD, w_up_EFD, w_down_EDF, impl, bounds)
    y_MD = y_MD * weights_M.index_select(0, order_M).to(y_MD.dtype).unsqueeze(-1)
    return y_MD.new_zeros(x_TD.shape[0], y_MD.shape[-1]).index_add(0, tokens_M, y_MD), counts_E


class SharedExperts(nn.Module):
    """`n` always-on SwiGLU experts of hidden size F, stored as one SwiGLU of width n·F (the sum of the
    n experts' outputs equals it with their weights concatenated, and it is one matmul, not n).

    Shape suffix H = n·F. Replicated under expert parallelism, like a dense FFN.
    """

    def __init__(self, dim: int, n: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n * hidden, dim))
        self.w_up = nn.Parameter(torch.empty(n * hidden, dim))
        self.w_down = nn.Parameter(torch.empty(dim, n * hidden))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x_TD, self.w_gate)) * F.linear(x_TD, self.w_up), self.w_down)


def naive_moe_reference(x_TD, routing: Routing, w_gate_EFD, w_up_EFD, w_down_EDF) -> torch.Tensor:
    """Per-expert loop in the HF-Mixtral style (index tokens of each expert, run its FFN).

    A test reference on stacked weights; `mpirouter bench` times `bench.NaiveMoE` instead, which
    holds one nn.Linear per expert like HF transformers 4.x (indexing a stacked Parameter per expert
    under autograd would make the baseline artificially slow).
    """
    out_TD = torch.zeros_like(x_TD)
    for e in range(w_gate_EFD.shape[0]):
        tok_idx, slot_idx = torch.where(routing.experts_TK == e)
        if tok_idx.numel() == 0:
            continue
        x_e = x_TD[tok_idx]
        y_e = F.linear(F.silu(F.linear(x_e, w_gate_EFD[e])) * F.linear(x_e, w_up_EFD[e]), w_down_EDF[e])
        out_TD = out_TD.index_add(0, tok_idx, y_e * routing.weights_TK[tok_idx, slot_idx, None].to(y_e.dtype))
    return out_TD


def moe_flops(tokens: int, top_k: int, dim: int, hidden: int, backward: bool = True) -> float:
    """Matmul FLOPs of the expert FFNs: 2·3·T·K·D·F forward, ×3 with backward (docs/performance.md)."""
    return (18.0 if backward else 6.0) * tokens * top_k * dim * hidden
