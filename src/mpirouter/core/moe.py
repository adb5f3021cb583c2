"""Dropless token-choice Mixture-of-Experts layer with SwiGLU experts stored as stacked tensors.

Shape legend (suffixes on tensor names):
    B  batch (sequences)          S  sequence length
    T  tokens = B * S             D  model width
    E  number of experts          F  expert hidden size
    K  experts per token (top-k)  M  routed slots = T * K, sorted by expert

Expert i computes y_i(x) = D_i (silu(G_i x) * (U_i x)) with
    w_gate_EFD[i] = G_i,  w_up_EFD[i] = U_i  (nn.Linear layout: out x in),  w_down_EDF[i] = D_i.

Dispatch sorts the T*K routed slots by expert so each expert multiplies one contiguous
block of rows (no Python loop over tokens, no capacity, no dropped tokens).

Beside the routed experts, `n_shared` always-on shared experts (DeepSeek-MoE) add one dense SwiGLU of
width n_shared·F to every token's output. Scores are a softmax over the experts or an independent sigmoid
per expert (DeepSeek-V3); balance comes from the auxiliary loss, from an aux-loss-free expert bias that
acts on selection only and is updated after each optimizer step from the batch's load, or from both.

Expert parallelism plugs in through `MoE.ep` (an `ExpertSharding`, `parallel.expert.ExpertParallel`):
then the expert stacks and R are DTensors sharded over the experts, the layer computes φ for its
local experts and gathers the rows, and the plan moves the routed slots to their experts' ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..common.config import check_number, from_dict, show_value
from .dispatch import Dispatch, choose_dispatch, grouped_mm_fallback_reason, resolve_dispatch
from .routers import Router, RouterConfig, alignment, select_target

AuxScope = Literal["sequence", "batch", "global"]
ScoreFunc = Literal["softmax", "sigmoid"]
Balance = Literal["aux", "bias", "both"]

SCORE_FUNCS: tuple[str, ...] = get_args(ScoreFunc)


def check_score_func(score_func: object) -> None:
    """Raise ValueError naming `score_func` and its choices unless it is one of `SCORE_FUNCS`."""
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {', '.join(SCORE_FUNCS)}, got {show_value(score_func)}")


@dataclass
class MoEConfig:
    """One MoE feed-forward layer."""

    num_experts: int = 8
    """Number of routed experts E."""
    top_k: int = 2
    """Experts chosen per token K."""
    hidden: int = 256
    """Hidden size F of each SwiGLU expert."""
    renormalize: bool = True
    """Rescale the chosen top-k scores to sum to 1."""
    score_func: ScoreFunc = "softmax"
    """Router scores: a softmax over all experts, or an independent sigmoid per expert (DeepSeek-V3).
    Top-k picks the largest scores; with `renormalize` their weights are scaled to sum to 1."""
    balance: Balance = "aux"
    """Load balancing: "aux" the auxiliary loss (aux_loss_coef), "bias" DeepSeek-V3's aux-loss-free
    expert bias (bias_update_rate; no loss), "both"."""
    aux_loss_coef: float = 0.01
    """Coefficient of the load-balancing loss coef * E * Σ_i f_i P_i (0 disables it; unused when balance="bias")."""
    bias_update_rate: float = 1e-3
    """Step u of the expert-bias update b_i += u · sign(mean load − load_i) after each optimizer step
    (DeepSeek-V3's bias update speed; unused when balance="aux")."""
    n_shared: int = 0
    """Shared experts: always-on SwiGLU experts of width `hidden` beside the routed ones (DeepSeek-MoE); 0: none."""
    aux_loss_scope: AuxScope = "sequence"
    """Compute f and P per sequence and average (the reference code), over the micro-batch, or with f
    over the global batch of all data-parallel ranks ("global", Megatron-Core's global aux loss)."""
    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss mean(logsumexp(logits)^2) (0 disables it)."""
    dispatch: Dispatch = "auto"
    """Grouped expert matmul: loop (slices in one autograd.Function), grouped_mm, or auto (`core.dispatch`:
    grouped_mm for bf16 on CUDA compute capability 9.x/10.x, else the loop). An explicit grouped_mm is refused
    on CUDA where torch would run its syncing fallback (fp32, fp16, other GPUs). SM 10.x: pytorch#172439."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """How the router rows are produced (linear, mpi, ...)."""

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = from_dict(RouterConfig, self.router, "router")
        elif not isinstance(self.router, RouterConfig):
            raise ValueError(f"router must be a RouterConfig or a dict of its fields, got {show_value(self.router)}")
        check_number("num_experts", self.num_experts, integer=True, ge=1)
        check_number("top_k", self.top_k, integer=True, ge=1, le=self.num_experts, upper_name=f"num_experts={self.num_experts}")
        check_number("hidden (expert hidden size)", self.hidden, integer=True, ge=1)
        check_number("aux_loss_coef", self.aux_loss_coef, ge=0)
        check_number("bias_update_rate", self.bias_update_rate, gt=0)
        check_number("n_shared (shared experts)", self.n_shared, integer=True, ge=0)
        check_score_func(self.score_func)
        if self.balance not in ("aux", "bias", "both"):
            raise ValueError(f"balance must be 'aux', 'bias' or 'both', got {show_value(self.balance)}")
        check_number("z_loss_coef", self.z_loss_coef, ge=0)
        if self.aux_loss_scope not in ("sequence", "batch", "global"):
            raise ValueError(f"aux_loss_scope must be 'sequence', 'batch' or 'global', got {self.aux_loss_scope!r}")
        if self.dispatch not in ("auto", "loop", "grouped_mm"):
            raise ValueError(f"dispatch must be auto, loop or grouped_mm, got {self.dispatch!r}")

    @property
    def uses_aux_loss(self) -> bool:
        return self.balance in ("aux", "both") and self.aux_loss_coef > 0

    @property
    def uses_expert_bias(self) -> bool:
        return self.balance in ("bias", "both")


class Routing(NamedTuple):
    """Top-k routing decision for T tokens."""

    probs_TE: torch.Tensor
    """Each token's distribution over all experts, float32: the softmax, or the sigmoid scores normalized
    to sum 1 (the P_i of the balance loss, as in DeepSeek-V3's sequence-wise loss)."""
    weights_TK: torch.Tensor
    """Combine weights of the chosen experts, float32."""
    experts_TK: torch.Tensor
    """Indices of the chosen experts."""


@dataclass
class MoEStats:
    """Per-layer routing statistics of one forward pass (losses keep their graph)."""

    tokens_per_expert_E: torch.Tensor
    """Routed slots per expert (int64)."""
    max_vio: torch.Tensor
    """(max load - mean load) / mean load for this batch."""
    aux_loss: torch.Tensor
    """Load-balancing loss, already multiplied by its coefficient."""
    z_loss: torch.Tensor
    """Router z-loss, already multiplied by its coefficient."""
    entropy: torch.Tensor
    """Mean entropy (nats) of the router distribution over all experts."""


class MoEOutput(NamedTuple):
    out: torch.Tensor
    stats: MoEStats


# ----------------------------------------------------------------------------- pure functions


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
                      w_down_EDF: torch.Tensor, impl: Literal["loop", "grouped_mm"], bounds: list[int] | None) -> torch.Tensor:
    """SwiGLU of every expert on its block of expert-sorted rows: D_e (silu(G_e x) * (U_e x)).

    `impl` already resolved (`resolve_dispatch`); `bounds` = `expert_bounds(counts_E)` for the loop
    path, computed by the caller so that its host read stays one per layer.
    """
    h_MF = F.silu(grouped_linear(x_MD, w_gate_EFD, counts_E, impl, bounds)) * grouped_linear(x_MD, w_up_EFD, counts_E, impl, bounds)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropless SwiGLU MoE: sort slots by expert, grouped matmuls, weighted combine.

    Returns (out_TD, tokens_per_expert_E).
    """
    E = w_gate_EFD.shape[0]
    K = routing.experts_TK.shape[1]
    flat_experts_M = routing.experts_TK.reshape(-1)
    order_M = torch.argsort(flat_experts_M, stable=True)
    counts_E = tokens_per_expert(flat_experts_M, E)
    x_MD, w_gate_EFD, w_up_EFD, w_down_EDF = autocast_operands(x_TD.index_select(0, order_M // K), w_gate_EFD, w_up_EFD, w_down_EDF)
    impl = resolve_dispatch(x_MD, w_gate_EFD, impl)
    bounds = expert_bounds(counts_E) if impl == "loop" else None
    y_MD = expert_ffn_sorted(x_MD, counts_E, w_gate_EFD, w_up_EFD, w_down_EDF, impl, bounds)
    return combine_slots(y_MD, order_M, routing.weights_TK), counts_E


# ----------------------------------------------------------------------------- module


class ExpertSharding(Protocol):
    """What a `MoE` needs from an expert-parallel plan (`parallel.expert.ExpertParallel` is one).

    Shape suffix L: this rank's local experts, E / size of them.
    """

    size: int
    """Ranks in the expert-parallel group."""

    def gather_rows(self, rows_LD: torch.Tensor) -> torch.Tensor:
        """(L, ...) per rank -> (E, ...) in expert order; backward: SUM reduce-scatter."""
        ...

    def run_experts(self, x_TD: torch.Tensor, routing: Routing, w_gate_LFD: torch.Tensor, w_up_LFD: torch.Tensor,
                    w_down_LDF: torch.Tensor, impl: Dispatch) -> tuple[torch.Tensor, torch.Tensor]:
        """`moe_forward_sorted` with the experts spread over the group: (out_TD, tokens_per_expert_E)."""
        ...


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its experts under expert parallelism), differentiable; a plain tensor as it is."""
    to_local = getattr(t, "to_local", None)  # duck-typed: core does not import DTensor
    return t if to_local is None else to_local()


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


class MoE(nn.Module):
    """Dropless top-k MoE FFN: router + E SwiGLU experts in stacked parameters.

    forward(x_BSD) -> MoEOutput(out_BSD, MoEStats). Losses in the stats are already scaled by
    their coefficients; add them to the training loss.

    `ep`: the expert-parallel plan (None: all experts here); set by `parallel.expert.shard_experts`,
    which also turns w_gate, w_up, w_down and router.weight into DTensors sharded over the experts.
    Under it every forward, `router_rows` and `alignment` are collectives of the EP group.
    `balance_group`: the process group whose ranks the "global" balance loss and the expert-bias load
    span (None: the default group, i.e. all ranks).

    With `config.uses_expert_bias` the layer holds `expert_bias` (E,), a float32 buffer saved with the
    weights, and adds up the routed slots of every training forward until `post_step` updates the bias.
    """

    ep: ExpertSharding | None
    balance_group: dist.ProcessGroup | None

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        check_number("dim", dim, integer=True, ge=1)
        self.dim, self.config = dim, config
        E, Fh = config.num_experts, config.hidden
        self.router = Router(dim, E, config.router)
        self.w_gate = nn.Parameter(torch.empty(E, Fh, dim))
        self.w_up = nn.Parameter(torch.empty(E, Fh, dim))
        self.w_down = nn.Parameter(torch.empty(E, dim, Fh))
        self.shared = SharedExperts(dim, config.n_shared, Fh) if config.n_shared > 0 else None
        if config.uses_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E))
        # a plain attribute, not a buffer: DDP broadcasts buffers from rank 0, and each rank's load is its own
        self._load_E: torch.Tensor | None = None
        self.ep = None
        self.balance_group = None
        self.reset_parameters()

    def reset_parameters(self, out_std: float | None = None) -> None:
        """Initialize the experts and the router (the model's `init_weights` calls this)."""
        # gate/up: 0.02 as in GPT-2/torchtitan; down is a residual output, scaled by the caller.
        nn.init.normal_(self.w_gate, std=0.02)
        nn.init.normal_(self.w_up, std=0.02)
        nn.init.normal_(self.w_down, std=0.02 if out_std is None else out_std)
        # router rows: 0.02 (torchtitan); MPI variants only use the rows' directions.
        nn.init.normal_(self.router.weight, std=0.02)
        if self.shared is not None:
            nn.init.normal_(self.shared.w_gate, std=0.02)
            nn.init.normal_(self.shared.w_up, std=0.02)
            nn.init.normal_(self.shared.w_down, std=0.02 if out_std is None else out_std)
        if self.config.uses_expert_bias:
            self.expert_bias.zero_()
        self._load_E = None
        self.post_step()

    def router_rows(self) -> torch.Tensor:
        """The effective router rows φ (E, D), float32, with their graph to R and the experts.

        Under expert parallelism each rank computes the rows of its local experts from its shards of
        R and G (φ_i needs only R_i and G_i) and all-gathers them; the gather's backward is a SUM
        reduce-scatter, so each G_i gets the router-path gradient of every rank's tokens.
        (`full_tensor()` on the expert stack instead would keep only this rank's.)
        """
        if self.ep is None:
            return self.router.rows(self.w_gate, self.w_up)
        rows_LD = self.router.rows(local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.router.weight))
        return self.ep.gather_rows(rows_LD)

    def _needs_collectives(self) -> bool:
        """Whether a forward talks to other ranks: then it must run even with no tokens, or the others hang."""
        cfg = self.config
        global_aux = cfg.aux_loss_scope == "global" and cfg.uses_aux_loss and dist.is_available() and dist.is_initialized()
        return self.ep is not None or global_aux

    def forward(self, x_BSD: torch.Tensor, rows_ED: torch.Tensor | None = None) -> MoEOutput:
        """`rows_ED`: φ computed beforehand (once per optimizer step, `routers.RowsPerStep`); None computes it here."""
        cfg = self.config
        if x_BSD.dim() != 3 or x_BSD.shape[-1] != self.dim:  # shapes only: no tensor read
            raise ValueError(f"MoE expects x of shape (batch, seq, dim={self.dim}), got {tuple(x_BSD.shape)}")
        B, S, D = x_BSD.shape
        T = B * S
        counting = cfg.uses_expert_bias and self.training and torch.is_grad_enabled()
        if counting and self._load_E is None:
            # set before any early return: a rank without tokens still joins post_step's all-reduce
            self._load_E = torch.zeros(cfg.num_experts, dtype=torch.int64, device=x_BSD.device)
        if T == 0 and not self._needs_collectives():
            return self._empty_output(x_BSD) if rows_ED is None else self._empty_output_with_rows(x_BSD, rows_ED)
        x_TD = x_BSD.reshape(T, D)
        if rows_ED is None:
            rows_ED = self.router_rows()
        logits_TE = self.router(x_TD, rows_ED=rows_ED)
        routing = route(logits_TE, cfg.top_k, cfg.renormalize, cfg.score_func, self.expert_bias if cfg.uses_expert_bias else None)
        if self.ep is None:
            out_TD, counts_E = moe_forward_sorted(x_TD, routing, self.w_gate, self.w_up, self.w_down, cfg.dispatch)
        else:
            experts = (local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.w_down))
            out_TD, counts_E = self.ep.run_experts(x_TD, routing, *experts, cfg.dispatch)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD).to(out_TD.dtype)
        if counting:
            # the load of the whole optimizer step (all micro-batches), read by post_step; no host read
            self._load_E = self._load_E + counts_E.detach()
        zero = logits_TE.new_zeros(())
        # means over no tokens would be NaN: a rank without tokens that still takes part reports zeros
        per_token = T > 0
        aux = zero
        if cfg.uses_aux_loss and (per_token or cfg.aux_loss_scope == "global"):
            probs_BSE, experts_BSK = routing.probs_TE.view(B, S, cfg.num_experts), routing.experts_TK.view(B, S, cfg.top_k)
            aux = load_balance_loss(probs_BSE, experts_BSK, cfg.aux_loss_coef, cfg.aux_loss_scope, self.balance_group)
        z = router_z_loss(logits_TE, cfg.z_loss_coef) if cfg.z_loss_coef > 0 and per_token else zero
        with torch.no_grad():
            stats = MoEStats(
                tokens_per_expert_E=counts_E.detach(),
                max_vio=max_violation(counts_E),
                aux_loss=aux,
                z_loss=z,
                entropy=router_entropy(routing.probs_TE.detach()) if per_token else zero.detach().clone(),
            )
        return MoEOutput(out_TD.view(B, S, D).to(x_BSD.dtype), stats)

    def _empty_output(self, x_BSD: torch.Tensor) -> MoEOutput:
        """No tokens: an empty output and zero stats (the losses' means over no tokens would be NaN)."""
        zero = torch.zeros((), device=x_BSD.device, dtype=torch.float32)
        stats = MoEStats(
            tokens_per_expert_E=torch.zeros(self.config.num_experts, device=x_BSD.device, dtype=torch.int64),
            max_vio=zero.clone(),
            aux_loss=zero.clone(),
            z_loss=zero.clone(),
            entropy=zero.clone(),
        )
        # x * 0 rather than new zeros: it stays on x's graph, so a caller's backward through the output works
        return MoEOutput(x_BSD * 0, stats)

    def _empty_output_with_rows(self, x_BSD: torch.Tensor, rows_ED: torch.Tensor) -> MoEOutput:
        """`_empty_output`, with the given rows on the output's graph: the last micro-batch's backward must
        reach them (`RowsPerStep` delivers the earlier micro-batches' ∂L/∂φ through it)."""
        out, stats = self._empty_output(x_BSD)
        return MoEOutput(out + (rows_ED.sum() * 0).to(out.dtype), stats)

    @torch.no_grad()
    def post_step(self) -> None:
        """Hook run after every optimizer step (and at init): the `mpi-inplace` router update, and the expert-bias update.

        Under expert parallelism each rank updates its own rows of R from its own experts (no communication).
        The bias update sums the step's load over the ranks of `balance_group` first (an all-reduce, so every
        rank must call this after every step), which keeps every rank's bias identical.
        """
        self.router.inplace_update(local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.router.weight))
        if self.config.uses_expert_bias and self._load_E is not None:
            load_E = self._load_E.clone()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(load_E, group=self.balance_group)  # int64: exact
            self.expert_bias.copy_(expert_bias_update(self.expert_bias, load_E, self.config.bias_update_rate))
            self._load_E = None

    @torch.no_grad()
    def alignment(self) -> dict[str, torch.Tensor]:
        """|cos| of raw R and of the effective rows φ with each expert's top singular direction, shape (E,) each.

        Under expert parallelism each rank scores its local experts and the scores are gathered:
        a collective, every rank of the EP group must call it.
        """
        w_gate_LFD, w_up_LFD, r_LD = local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.router.weight)
        mats = select_target(self.router.config.target, w_gate_LFD, w_up_LFD)
        scores = {"phi": alignment(self.router.rows(w_gate_LFD, w_up_LFD, r_LD), *mats), "raw": alignment(r_LD, *mats)}
        if self.ep is None:
            return scores
        return {k: self.ep.gather_rows(v.unsqueeze(-1)).squeeze(-1) for k, v in scores.items()}

    @torch.no_grad()
    def fold_router(self) -> None:
        """Replace the router by a plain linear router with weight φ (zero inference overhead)."""
        if self.ep is not None:
            raise RuntimeError("fold_router needs the full expert stacks: fold an unsharded copy of the model "
                               "(load its checkpoint without expert parallelism)")
        self.router = self.router.fold(self.w_gate, self.w_up)
        # a new config: the old one is shared with the other layers and the caller's ModelConfig
        self.config = dataclasses.replace(self.config, router=self.router.config)


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


__all__ = [
    "Balance",
    "ExpertSharding",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoEStats",
    "Routing",
    "SCORE_FUNCS",
    "ScoreFunc",
    "SharedExperts",
    "autocast_operands",
    "check_score_func",
    "choose_dispatch",
    "combine_slots",
    "expert_bias_update",
    "expert_bounds",
    "expert_ffn_sorted",
    "grouped_linear",
    "grouped_mm_fallback_reason",
    "inverse_permutation",
    "load_balance_loss",
    "local_shard",
    "max_violation",
    "moe_flops",
    "moe_forward_sorted",
    "naive_moe_reference",
    "resolve_dispatch",
    "route",
    "router_entropy",
    "router_z_loss",
    "tokens_per_expert",
]
