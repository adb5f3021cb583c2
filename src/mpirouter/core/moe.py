"""Dropless token-choice Mixture-of-Experts layer with SwiGLU experts stored as stacked tensors.

Shape legend (suffixes on tensor names):
    B  batch (sequences)          S  sequence length
    T  tokens = B * S             D  model width
    E  number of experts          F  expert hidden size
    K  experts per token (top-k)  L  Autonomy-of-Experts' low rank

The layer holds the router (`core.routers`), the experts (`core.experts` computes them) and the
balance state; the routing math is in `core.routing`. Beside the routed experts, `n_shared` always-on
shared experts (DeepSeek-MoE) add one dense SwiGLU of width n_shared·F to every token's output. Scores
are a softmax over the experts or an independent sigmoid per expert (DeepSeek-V3); balance comes from
the auxiliary loss, from an aux-loss-free expert bias that acts on selection only and is updated after
each optimizer step from the batch's load, or from both.

Router kinds beside MPI (docs/zoo.md): `aoe` factorizes the experts' gate projections (w_gate holds B_e,
(E, F, L)); `remoe` routes each token to a variable number of experts; `kmeans` keeps centroids updated
after each step; the ERC and SimBal losses add to `MoEStats.router_loss`.

Expert parallelism plugs in through `MoE.ep` (an `ExpertSharding`, `parallel.expert.ExpertParallel`):
then the expert stacks and R are DTensors sharded over the experts, the layer computes φ for its
local experts and gathers the rows, and the plan moves the routed slots to their experts' ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..common.config import check_number, from_dict, show_value
from .dispatch import Dispatch
from .experts import SharedExperts, moe_forward_slots, moe_forward_sorted
from .routers import (
    ROW_KINDS,
    UNFOLDABLE_WHY,
    Router,
    RouterConfig,
    aoe_hidden,
    aoe_low_rank,
    alignment,
    build_router,
    erc_activation_norms,
    erc_loss,
    erc_noise_bound,
    erc_proxies,
    l1_coef_step,
    relu_gates,
    relu_slots,
    remoe_l1,
    select_target,
    simbal_loss,
    target_sparsity,
)
from .routing import (
    AuxScope,
    Balance,
    Routing,
    ScoreFunc,
    check_score_func,
    expert_bias_update,
    load_balance_loss,
    max_violation,
    route,
    router_entropy,
    router_z_loss,
)


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
    """The router: its kind (linear, mpi, ..., the coupling designs) and their settings."""

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
        if self.router.kind == "remoe" and self.balance != "aux":
            raise ValueError(f"router kind 'remoe' balances through its load-weighted L1 penalty (balance='aux'); it has "
                             f"no top-k for an expert bias to steer, got balance={self.balance!r}")

    @property
    def uses_aux_loss(self) -> bool:
        """The Switch balance loss is on (never for remoe, whose L1 penalty balances instead)."""
        return self.balance in ("aux", "both") and self.aux_loss_coef > 0 and self.router.kind != "remoe"

    @property
    def uses_expert_bias(self) -> bool:
        return self.balance in ("bias", "both")


def expert_shapes(dim: int, config: MoEConfig) -> tuple[int, int]:
    """(hidden size F, gate projection input size) of the layer's experts: (hidden, D), or for Autonomy-of-Experts
    (F', L) with F' widened so each expert keeps the 3·D·F parameters of an unfactorized one (`aoe.match_params`)."""
    if config.router.kind != "aoe":
        return config.hidden, dim
    low = aoe_low_rank(dim, config.router.aoe.low_rank)
    return (aoe_hidden(dim, config.hidden, low) if config.router.aoe.match_params else config.hidden), low


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
    router_loss: torch.Tensor | None = None
    """The router's own losses, already multiplied by their coefficients: ERC, SimBal, ReMoE's λ·L1 (None: none)."""


class MoEOutput(NamedTuple):
    out: torch.Tensor
    stats: MoEStats


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


def _rng_devices(t: torch.Tensor) -> list:
    return [t.device] if t.device.type == "cuda" else []


def _reseed_fork() -> None:
    """Inside a `fork_rng`: move to a stream of its own, derived from the current state. The fork starts where the
    global stream goes on, so drawing from it directly would repeat the next parameters' values (correlated weights)."""
    torch.manual_seed((int(torch.randint(0, 2**62, (), device="cpu")) * 6364136223846793005 + 1442695040888963407) % 2**63)


class MoE(nn.Module):
    """Dropless top-k MoE FFN: router + E SwiGLU experts in stacked parameters.

    forward(x_BSD) -> MoEOutput(out_BSD, MoEStats). Losses in the stats are already scaled by
    their coefficients; add them to the training loss.

    `ep`: the expert-parallel plan (None: all experts here); set by `parallel.expert.shard_experts`,
    which also turns w_gate, w_up, w_down and router.weight into DTensors sharded over the experts.
    Under it every forward, `router_rows` and `alignment` are collectives of the EP group.
    `balance_group`: the process group whose ranks the "global" balance loss, the expert-bias load and
    the step statistics of `kmeans` and `remoe` span (None: the default group, i.e. all ranks).

    State kept in buffers (saved with the weights, so a resumed run continues exactly): `expert_bias` (E,)
    with `config.uses_expert_bias`; the k-means centroids (`router.centroids`); ReMoE's L1 coefficient
    `l1_coef`; the ERC noise's seed and step counter `erc_seed`, `erc_step`. Each training forward adds its
    statistics (load, routed states, gate density) until `post_step` uses them.
    """

    ep: ExpertSharding | None
    balance_group: dist.ProcessGroup | None

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        check_number("dim", dim, integer=True, ge=1)
        self.dim, self.config = dim, config
        E = config.num_experts
        Fh, gate_in = expert_shapes(dim, config)
        if config.router.kind in ROW_KINDS:
            self.router = build_router(dim, E, config.router)
        else:
            # built on a forked generator, then the draw `Router.__init__` makes: the stream stays a linear layer's
            with torch.random.fork_rng(devices=[]):
                _reseed_fork()
                self.router = build_router(dim, E, config.router)
            torch.empty(E, dim).normal_()
        self.w_gate = nn.Parameter(torch.empty(E, Fh, gate_in))
        self.w_up = nn.Parameter(torch.empty(E, Fh, dim))
        self.w_down = nn.Parameter(torch.empty(E, dim, Fh))
        self.shared = SharedExperts(dim, config.n_shared, config.hidden) if config.n_shared > 0 else None
        if config.uses_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(E))
        kind = config.router.kind
        if kind == "remoe":
            self.register_buffer("l1_coef", torch.tensor(config.router.remoe.init_l1_coef, dtype=torch.float64))
        if config.router.erc.enabled:
            self.register_buffer("erc_seed", torch.zeros((), dtype=torch.int64))
            self.register_buffer("erc_step", torch.zeros((), dtype=torch.int64))
            # (seed, step) as host ints, read from the buffers once after init or a load, then kept in step
            self._erc_counter: list[int] | None = None
            self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_erc_counter", None))
        # plain attributes, not buffers: DDP broadcasts buffers from rank 0, and each rank's statistics are its own
        self._load_E: torch.Tensor | None = None
        self._gates_2: torch.Tensor | None = None  # remoe: (active gates, all gates) of the step
        self.ep = None
        self.balance_group = None
        self.reset_parameters()

    @property
    def kind(self) -> str:
        return self.config.router.kind

    def reset_parameters(self, out_std: float | None = None) -> None:
        """Initialize the experts and the router (the model's `init_weights` calls this).

        A layer draws from the global generator exactly what a linear-router layer of the same shape
        draws; parameters a design adds or reshapes are drawn from a fork of the generator, reseeded so they
        repeat no other parameter's values, and every other parameter of the model starts as in the linear
        run of the same seed (paired comparisons).
        """
        down_std = 0.02 if out_std is None else out_std
        E, D, F = self.config.num_experts, self.dim, self.config.hidden
        own_experts = self.w_gate.shape == (E, F, D) and self.w_up.shape == (E, F, D)
        own_router = isinstance(self.router, Router)
        # gate/up: 0.02 as in GPT-2/torchtitan; down is a residual output, scaled by the caller.
        # router rows: 0.02 (torchtitan); MPI variants only use the rows' directions.
        with torch.no_grad():
            if own_experts:
                nn.init.normal_(self.w_gate, std=0.02)
                nn.init.normal_(self.w_up, std=0.02)
                nn.init.normal_(self.w_down, std=down_std)
            else:
                for shape in ((E, F, D), (E, F, D), (E, D, F)):
                    torch.empty(shape, device=self.w_up.device).normal_()
            if own_router:
                nn.init.normal_(self.router.weight, std=0.02)
            else:
                torch.empty(E, D, device=self.w_up.device).normal_()
            with torch.random.fork_rng(devices=_rng_devices(self.w_up)):
                _reseed_fork()
                self._reset_design(down_std, own_experts, own_router)
        if self.shared is not None:
            nn.init.normal_(self.shared.w_gate, std=0.02)
            nn.init.normal_(self.shared.w_up, std=0.02)
            nn.init.normal_(self.shared.w_down, std=down_std)
        if self.config.uses_expert_bias:
            self.expert_bias.zero_()
        self._load_E = self._gates_2 = None
        if own_router:
            self.router.inplace_update(local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.router.weight))

    @torch.no_grad()
    def _reset_design(self, down_std: float, own_experts: bool, own_router: bool) -> None:
        """The parameters and state a design adds to a linear-router layer (under a forked generator)."""
        cfg = self.config.router
        if not own_experts:
            nn.init.normal_(self.w_gate, std=0.02)
            nn.init.normal_(self.w_up, std=0.02)
            nn.init.normal_(self.w_down, std=down_std)
        if not own_router:
            self.router.reset_parameters()
        elif cfg.simbal.enabled and cfg.simbal.orthogonal_init:
            nn.init.orthogonal_(self.router.weight)
        if self.kind == "remoe":
            self.l1_coef.fill_(cfg.remoe.init_l1_coef)
        if cfg.erc.enabled:
            self.erc_seed.fill_(int(torch.randint(0, 2**62, (), device="cpu")))
            self.erc_step.zero_()
            self._erc_counter = None

    def router_rows(self) -> torch.Tensor:
        """The effective router rows φ (E, D), float32, with their graph to R and the experts (rows-based kinds).

        Under expert parallelism each rank computes the rows of its local experts from its shards of
        R and G (φ_i needs only R_i and G_i) and all-gathers them; the gather's backward is a SUM
        reduce-scatter, so each G_i gets the router-path gradient of every rank's tokens.
        (`full_tensor()` on the expert stack instead would keep only this rank's.)
        """
        if not isinstance(self.router, Router):
            raise ValueError(f"router kind {self.kind!r} has no rows φ")
        if self.ep is None:
            return self.router.rows(self.w_gate, self.w_up)
        rows_LD = self.router.rows(local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.router.weight))
        return self.ep.gather_rows(rows_LD)

    def _needs_collectives(self) -> bool:
        """Whether a forward talks to other ranks: then it must run even with no tokens, or the others hang."""
        cfg = self.config
        global_aux = cfg.aux_loss_scope == "global" and cfg.uses_aux_loss and dist.is_available() and dist.is_initialized()
        return self.ep is not None or global_aux or self._global_remoe_load()

    def _global_remoe_load(self) -> bool:
        """ReMoE's L1 load weights come from the global batch (aux_loss_scope "global" under torch.distributed)."""
        return (self.kind == "remoe" and self.config.aux_loss_scope == "global" and self.config.router.remoe.balance_refined
                and dist.is_available() and dist.is_initialized())

    def forward(self, x_BSD: torch.Tensor, rows_ED: torch.Tensor | None = None) -> MoEOutput:
        """`rows_ED`: φ computed beforehand (once per optimizer step, `routers.RowsPerStep`); None computes it here."""
        cfg = self.config
        if x_BSD.dim() != 3 or x_BSD.shape[-1] != self.dim:  # shapes only: no tensor read
            raise ValueError(f"MoE expects x of shape (batch, seq, dim={self.dim}), got {tuple(x_BSD.shape)}")
        B, S, D = x_BSD.shape
        T = B * S
        training = self.training and torch.is_grad_enabled()
        counting = cfg.uses_expert_bias and training
        if counting and self._load_E is None:
            # set before any early return: a rank without tokens still joins post_step's all-reduce
            self._load_E = torch.zeros(cfg.num_experts, dtype=torch.int64, device=x_BSD.device)
        if T == 0 and not self._needs_collectives():
            return self._empty_output(x_BSD) if rows_ED is None else self._empty_output_with_rows(x_BSD, rows_ED)
        x_TD = x_BSD.reshape(T, D)
        rows = isinstance(self.router, Router)
        if rows and rows_ED is None:
            rows_ED = self.router_rows()
        logits_TE, cache_TEL = self._logits(x_TD, rows_ED)
        router_loss = self._router_losses(rows_ED) if rows else None
        if self.kind == "remoe":
            out_TD, counts_E, probs_TE, l1 = self._relu_experts(x_TD, logits_TE, training)
            router_loss = l1 if router_loss is None else router_loss + l1
        else:
            routing = route(logits_TE, cfg.top_k, cfg.renormalize, cfg.score_func, self.expert_bias if cfg.uses_expert_bias else None)
            probs_TE = routing.probs_TE
            if self.ep is None:
                out_TD, counts_E = moe_forward_sorted(x_TD, routing, self.w_gate, self.w_up, self.w_down, cfg.dispatch, cache_TEL)
            else:
                experts = (local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.w_down))
                out_TD, counts_E = self.ep.run_experts(x_TD, routing, *experts, cfg.dispatch)
            if self.kind == "kmeans" and training:
                self.router.accumulate(x_TD, routing.experts_TK)
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
                entropy=router_entropy(probs_TE.detach()) if per_token else zero.detach().clone(),
                router_loss=router_loss,
            )
        return MoEOutput(out_TD.view(B, S, D).to(x_BSD.dtype), stats)

    def _logits(self, x_TD: torch.Tensor, rows_ED: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(router logits (T, E) float32, Autonomy-of-Experts' cache A_e x (T, E, L) or None)."""
        if self.kind == "aoe":
            return self.router.scores(x_TD)
        return self.router(x_TD, rows_ED=rows_ED), None

    def router_work(self, x_TD: torch.Tensor) -> torch.Tensor:
        """A scalar depending on everything the router computes for tokens `x_TD` (φ, the logits, its own
        losses), to time forward + backward: the router's cost (`trainer.evaluation.router_cost_ms`)."""
        rows_ED = self.router_rows() if isinstance(self.router, Router) else None
        out = self._logits(x_TD, rows_ED)[0].sum()
        extra = self._router_losses(rows_ED) if rows_ED is not None else None
        return out if extra is None else out + extra

    def _router_losses(self, rows_ED: torch.Tensor) -> torch.Tensor | None:
        """ERC and SimBal, scaled by their coefficients (None when neither is on). They depend on the weights only.

        In float32 with autocast off, like the rows themselves: SimBal's ‖RRᵀ − I‖₁ near orthogonality and ERC's
        margins are differences bf16 would round away."""
        with torch.autocast(device_type=rows_ED.device.type, enabled=False):
            return self._router_losses_fp32(rows_ED)

    def _router_losses_fp32(self, rows_ED: torch.Tensor) -> torch.Tensor | None:
        cfg = self.config.router
        loss = None
        if cfg.erc.enabled:
            eps_E = cfg.erc.noise * erc_noise_bound(rows_ED)
            proxies_ED = erc_proxies(rows_ED, eps_E, self._erc_uniform(rows_ED))
            loss = cfg.erc.coef * erc_loss(erc_activation_norms(proxies_ED, self.w_gate), cfg.erc.margin)
        if cfg.simbal.enabled:
            term = cfg.simbal.coef * simbal_loss(self.router.weight)
            loss = term if loss is None else loss + term
        return loss

    def _erc_uniform(self, like_ED: torch.Tensor) -> torch.Tensor:
        """U(0, 1)^(E×D) for this optimizer step's proxies: a function of (erc_seed, erc_step), so every rank
        and every micro-batch of a step draws the same noise, and a resumed run the noise it would have drawn."""
        if self._erc_counter is None:
            self._erc_counter = [int(self.erc_seed), int(self.erc_step)]  # host read once after init or load
        seed, step = self._erc_counter
        gen = torch.Generator(device=like_ED.device).manual_seed((seed + 1_000_003 * step) % 2**63)
        return torch.rand(like_ED.shape, generator=gen, device=like_ED.device, dtype=torch.float32)

    def _relu_experts(self, x_TD: torch.Tensor, logits_TE: torch.Tensor, training: bool):
        """ReMoE: (out_TD, counts_E, probs_TE, λ·L1) with each token sent to the experts whose ReLU gate is positive."""
        cfg = self.config
        gates_TE = relu_gates(logits_TE)
        tokens_M, experts_M, weights_M = relu_slots(gates_TE)
        out_TD, counts_E = moe_forward_slots(x_TD, tokens_M, experts_M, weights_M, self.w_gate, self.w_up, self.w_down, cfg.dispatch)
        if training:
            seen = torch.stack([counts_E.sum(), torch.full((), gates_TE.numel(), dtype=counts_E.dtype, device=counts_E.device)]).detach()
            self._gates_2 = seen if self._gates_2 is None else self._gates_2 + seen
        load_E, tokens = counts_E, gates_TE.shape[0]
        if self._global_remoe_load():
            # the load weights f from the global batch: the ranks' mean penalty is then the global batch's, as for the
            # "global" balance loss (without it, each rank's own micro-batch, as the "batch" scope)
            both = self._all_reduce(torch.cat([counts_E, torch.full((1,), tokens, dtype=counts_E.dtype, device=counts_E.device)]).detach())
            load_E, tokens = both[:-1], both[-1]
        l1 = self.l1_coef.float() * remoe_l1(gates_TE, load_E, cfg.top_k, cfg.router.remoe.balance_refined, tokens)
        probs_TE = gates_TE / (gates_TE.sum(-1, keepdim=True) + 1e-20)
        return out_TD, counts_E, probs_TE, l1

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

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, group=self.balance_group)
        return t

    @torch.no_grad()
    def post_step(self) -> None:
        """Hook run after every optimizer step: the `mpi-inplace` router update, the expert-bias update, the
        k-means centroids, ReMoE's L1 coefficient and the ERC noise's step.

        Under expert parallelism each rank updates its own rows of R from its own experts (no communication).
        The statistics are summed over the ranks of `balance_group` first (all-reduces, so every rank must call
        this after every step), which keeps every rank's state identical.
        """
        kind = self.kind
        if isinstance(self.router, Router):
            self.router.inplace_update(local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.router.weight))
        if self.config.uses_expert_bias and self._load_E is not None:
            load_E = self._all_reduce(self._load_E.clone())  # int64: exact
            self.expert_bias.copy_(expert_bias_update(self.expert_bias, load_E, self.config.bias_update_rate))
            self._load_E = None
        if kind == "kmeans":
            self.router.post_step(self.balance_group)
        if kind == "remoe":
            seen = self._gates_2 if self._gates_2 is not None else torch.zeros(2, dtype=torch.int64, device=self.l1_coef.device)
            if self._gates_2 is not None or (dist.is_available() and dist.is_initialized()):
                seen = self._all_reduce(seen.clone())
                sparsity = 1 - seen[0].double() / seen[1].double().clamp_min(1)
                target = target_sparsity(self.config.num_experts, self.config.top_k)
                new = l1_coef_step(self.l1_coef, sparsity, target, self.config.router.remoe.l1_update)
                # no forward anywhere this step (seen[1] == 0): keep λ
                self.l1_coef.copy_(torch.where(seen[1] > 0, new, self.l1_coef))
            self._gates_2 = None
        if self.config.router.erc.enabled:
            self.erc_step.add_(1)
            if self._erc_counter is not None:
                self._erc_counter[1] += 1

    @torch.no_grad()
    def alignment(self) -> dict[str, torch.Tensor]:
        """|cos| of raw R and of the effective rows φ with each expert's top singular direction, shape (E,) each.

        k-means scores its centroids (both entries); cosine and aoe have no rows in the experts' input
        space and score NaN. Under expert parallelism each rank scores its local experts and the scores
        are gathered: a collective, every rank of the EP group must call it.
        """
        if self.kind == "kmeans":
            score = alignment(self.router.centroids, self.w_gate)
            return {"phi": score, "raw": score.clone()}
        if not isinstance(self.router, Router):
            nan_E = torch.full((self.config.num_experts,), float("nan"), device=self.w_up.device)
            return {"phi": nan_E, "raw": nan_E.clone()}
        w_gate_LFD, w_up_LFD, r_LD = local_shard(self.w_gate), local_shard(self.w_up), local_shard(self.router.weight)
        mats = select_target(self.router.config.target, w_gate_LFD, w_up_LFD)
        scores = {"phi": alignment(self.router.rows(w_gate_LFD, w_up_LFD, r_LD), *mats), "raw": alignment(r_LD, *mats)}
        if self.ep is None:
            return scores
        return {k: self.ep.gather_rows(v.unsqueeze(-1)).squeeze(-1) for k, v in scores.items()}

    @torch.no_grad()
    def fold_router(self) -> None:
        """Replace the router by a plain linear router with weight φ (zero inference overhead).

        Refused (ValueError) for kinds that do not reduce to a linear router (`routers.UNFOLDABLE_WHY`).
        """
        if self.kind in UNFOLDABLE_WHY:
            raise ValueError(f"cannot fold a {self.kind!r} router into a linear one: {UNFOLDABLE_WHY[self.kind]}")
        if self.ep is not None:
            raise RuntimeError("fold_router needs the full expert stacks: fold an unsharded copy of the model "
                               "(load its checkpoint without expert parallelism)")
        self.router = self.router.fold(self.w_gate, self.w_up)
        # a new config: the old one is shared with the other layers and the caller's ModelConfig
        self.config = dataclasses.replace(self.config, router=self.router.config)
        for name in ("erc_seed", "erc_step"):  # training-only state of a loss the folded router no longer has
            if name in self._buffers:
                del self._buffers[name]


__all__ = ["ExpertSharding", "MoE", "MoEConfig", "MoEOutput", "MoEStats", "expert_shapes", "local_shard"]
