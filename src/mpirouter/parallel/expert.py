"""Expert parallelism (EP) for the built-in `MoE`: the experts sharded over ranks, the tokens sent to them.

Shape legend (as in core/moe.py, plus):
    P  ranks in the expert-parallel group    L  local experts of one rank, E / P
    R  routed slots a rank receives for its local experts, from all P ranks

    mesh = dp_ep_mesh(ep=2, device_type="cpu")     # ("dp", "ep") over all ranks (or the job's mesh, parallel.env)
    shard_experts(model, mesh)                      # before DDP/FSDP and the optimizer are built
    loss.backward(); reduce_expert_grads(model)     # after backward, before clipping and the step

The loss each rank backpropagates is its own (a mean over its tokens); the job's loss is the mean
over ranks. Every forward, `router_rows` and `alignment` of a sharded layer is a collective of its
EP group, and so is the backward through them: all ranks run them in the same order.

What changes in each MoE layer:
- w_gate, w_up, w_down and the router weight R (E, D) become DTensor Parameters sharded Shard(0)
  over the "ep" dimension: rank r of the EP group holds experts [r·L, (r+1)·L). Optimizers and
  `torch.distributed.checkpoint` see the global shapes; the forward works on `.to_local()` views.
- Router rows: each rank computes φ_i for its local experts from its shards of R and G (φ_i needs
  only R_i and G_i) and all-gathers the (E, D) rows with an autograd all-gather whose backward is a
  SUM reduce-scatter, so G_i and R_i receive the router-path gradient of every rank's tokens.
  Never `full_tensor()` on the expert stack: its backward keeps only this rank's contribution
  (measured before this module was written: a 4e-2 error in G's gradient; tests/parallel/test_expert.py
  checks the difference).
- Tokens: routed locally over all E experts, slots sorted by expert (so by destination rank), sent
  with an autograd all-to-all, run through the local experts' grouped matmul, sent back, combined.
- Gradients: after backward a shard's gradient sums the contributions of every rank of its EP group;
  `reduce_expert_grads` adds the data-parallel replicas and divides by the world size, which is what
  DDP does for the dense weights (so DDP/FSDP must ignore these parameters: `expert_parameters`).
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from ..common.config import check_number
from ..core.dispatch import Dispatch, resolve_dispatch
from ..core.experts import autocast_operands, combine_slots, expert_ffn_sorted, inverse_permutation
from ..core.moe import MoE, local_shard
from ..core.routers import MPI_FAMILY
from ..core.routing import Routing, tokens_per_expert

EXPERT_PARAMS = ("w_gate", "w_up", "w_down", "router.weight")
"""The parameters of a MoE layer that expert parallelism shards (the rest stays with DDP/FSDP)."""


class ExpertParallel:
    """The expert-parallel plan of a model: its EP group (a 1-D mesh) and the group of its replicas.

    Set as `moe.ep` on every sharded layer (`shard_experts`); implements `core.moe.ExpertSharding`.
    """

    def __init__(self, mesh: DeviceMesh, dp_group: dist.ProcessGroup | None = None):
        if mesh.ndim != 1:
            raise ValueError(f"ExpertParallel needs a 1-D mesh over the expert-parallel ranks, got a {mesh.ndim}-D one (slice it: mesh['ep'])")
        self.mesh = mesh
        self.group = mesh.get_group()
        self.size = mesh.size()
        self.rank = mesh.get_local_rank()
        self.dp_group = dp_group
        """Ranks that hold the same experts as this one (None: no replicas, dp = 1)."""

    def __repr__(self) -> str:
        dp = 1 if self.dp_group is None else dist.get_world_size(self.dp_group)
        return f"ExpertParallel(ep={self.size}, rank={self.rank}, dp={dp})"

    def gather_rows(self, rows_LD: torch.Tensor) -> torch.Tensor:
        """Every rank's rows in expert order, (L, ...) -> (E, ...); backward: SUM reduce-scatter."""
        gathered = funcol.all_gather_single_autograd(rows_LD.contiguous(), 0, self.group)
        return funcol.wait_tensor(gathered)  # a plain tensor: RowsPerStep detaches and re-leafs it

    def run_experts(self, x_TD: torch.Tensor, routing: Routing, w_gate_LFD: torch.Tensor, w_up_LFD: torch.Tensor,
                    w_down_LDF: torch.Tensor, impl: Dispatch = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """`core.experts.moe_forward_sorted` with this rank holding experts [rank·L, (rank+1)·L): (out_TD, tokens_per_expert_E).

        Slots sorted by expert are in destination-rank order, so one all-to-all sends them; they
        arrive grouped by source rank, then local expert, and are regrouped by local expert for the
        grouped matmul. Works with empty splits (a rank receiving nothing for some or all experts).
        """
        T, K = routing.experts_TK.shape
        P, L = self.size, w_gate_LFD.shape[0]
        E = P * L
        flat_experts_M = routing.experts_TK.reshape(-1)
        order_M = torch.argsort(flat_experts_M, stable=True)
        counts_E = tokens_per_expert(flat_experts_M, E)
        # recv_PL[s, l]: slots rank s sends to local expert l here (counts_E is ordered by rank, then local expert)
        recv_PL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_PL, counts_E, group=self.group)
        recv_PL = recv_PL.view(P, L)
        # One host read of the counts per layer, EP only: the all-to-all takes its split sizes on the host.
        host = torch.cat([counts_E, recv_PL.reshape(-1)]).tolist()
        sent, received = host[:E], host[E:]
        send_splits = [sum(sent[s * L:(s + 1) * L]) for s in range(P)]
        recv_splits = [sum(received[s * L:(s + 1) * L]) for s in range(P)]
        local_counts = [sum(received[s * L + l] for s in range(P)) for l in range(L)]

        x_MD, w_gate_LFD, w_up_LFD, w_down_LDF = autocast_operands(x_TD.index_select(0, order_M // K), w_gate_LFD, w_up_LFD, w_down_LDF)
        x_RD = funcol.wait_tensor(funcol.all_to_all_single_autograd(x_MD, recv_splits, send_splits, self.group))
        expert_R = torch.repeat_interleave(torch.arange(L, device=x_RD.device).repeat(P), recv_PL.reshape(-1), output_size=x_RD.shape[0])
        by_expert_R = torch.argsort(expert_R, stable=True)
        impl = resolve_dispatch(x_RD, w_gate_LFD, impl)
        bounds = list(itertools.accumulate(local_counts, initial=0)) if impl == "loop" else None
        y_RD = expert_ffn_sorted(x_RD.index_select(0, by_expert_R), recv_PL.sum(0), w_gate_LFD, w_up_LFD, w_down_LDF, impl, bounds)
        y_RD = y_RD.index_select(0, inverse_permutation(by_expert_R))
        y_MD = funcol.wait_tensor(funcol.all_to_all_single_autograd(y_RD, send_splits, recv_splits, self.group))
        return combine_slots(y_MD, order_M, routing.weights_TK), counts_E


# ----------------------------------------------------------------------------- applying it to a model


def check_expert_split(num_experts: int, ep: int) -> None:
    """Refuse an expert count that the expert-parallel degree does not divide (every rank holds E / ep experts)."""
    if num_experts % ep:
        raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel degree ep={ep}")


def dp_ep_mesh(ep: int, device_type: str = "cpu") -> DeviceMesh:
    """The 2-D ("dp", "ep") mesh over all ranks: EP groups of `ep` consecutive ranks, dp = world / ep of them."""
    check_number("ep", ep, integer=True, ge=1)
    world = dist.get_world_size()
    if world % ep:
        raise ValueError(f"the expert-parallel degree ep={ep} does not divide the world size {world}")
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("dp", "ep"))


def split_mesh(mesh: DeviceMesh) -> tuple[DeviceMesh, dist.ProcessGroup | None]:
    """(EP mesh, replica group) from a 2-D ("dp", "ep") mesh, or from a 1-D mesh spanning all ranks (no replicas)."""
    if mesh.ndim == 1:
        if mesh.size() != dist.get_world_size():
            raise ValueError(f"a 1-D expert mesh must span all {dist.get_world_size()} ranks, got {mesh.size()}; pass a 2-D ('dp', 'ep') mesh")
        return mesh, None
    names = mesh.mesh_dim_names
    if mesh.ndim != 2 or names is None or set(names) != {"dp", "ep"}:
        raise ValueError(f"expected a 1-D mesh or a 2-D mesh named ('dp', 'ep'), got shape {tuple(mesh.shape)} named {names}")
    dp = mesh["dp"]
    return mesh["ep"], dp.get_group() if dp.size() > 1 else None


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(qualified name, layer) of every MoE layer in `model` (the model itself when it is one)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> ExpertParallel:
    """Shard the experts and the router rows R of every MoE layer of `model` over the mesh's "ep" dimension.

    Each of `EXPERT_PARAMS` becomes a DTensor Parameter Shard(0) over the EP mesh (scattered from
    the EP group's first rank, so its ranks agree), and `moe.ep` is set. Call on every rank, before
    wrapping the model in DDP/FSDP and before building the optimizer.
    """
    ep_mesh, dp_group = split_mesh(mesh)
    layers = moe_layers(model)
    if not layers:
        raise ValueError("shard_experts found no MoE layer in the model")
    for name, moe in layers:  # all checks before any change
        if moe.ep is not None:
            raise ValueError(f"MoE layer {name or '(the model)'} is already expert-parallel")
        check_expert_split(moe.config.num_experts, ep_mesh.size())
        router = moe.config.router
        if router.kind not in MPI_FAMILY or router.addons:
            raise ValueError(f"expert parallelism serves the routers {', '.join(MPI_FAMILY)} without added losses; "
                             f"router {router.name!r} needs every expert on each rank (train it with ep=1)")
    plan = ExpertParallel(ep_mesh, dp_group)
    for _, moe in layers:
        for owner, attr in ((moe, "w_gate"), (moe, "w_up"), (moe, "w_down"), (moe.router, "weight")):
            p = getattr(owner, attr)
            setattr(owner, attr, nn.Parameter(distribute_tensor(p.detach(), ep_mesh, [Shard(0)]), requires_grad=p.requires_grad))
        moe.ep = plan
    return plan


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The expert-parallel parameters by qualified name: what DDP/FSDP must leave to `reduce_expert_grads`."""
    out = {}
    for name, moe in moe_layers(model):
        if moe.ep is not None:
            prefix = f"{name}." if name else ""
            out.update({prefix + p: moe.get_parameter(p) for p in EXPERT_PARAMS})
    return out


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, world_size: int | None = None) -> None:
    """Make the expert-parallel gradients what one process gets on the global batch, loss = mean over ranks.

    After backward a shard's gradient already sums the contributions of the tokens of every rank of
    its EP group (through the all-to-all's and the rows' all-gather's backward); this adds those of
    the replicas holding the same experts (all-reduce SUM over `ep.dp_group`, one per dtype) and
    divides by `world_size` (default: all ranks), as DDP averages the dense weights' gradients.
    Call on every rank after backward and before clipping. A missing gradient counts as zeros.
    """
    W = dist.get_world_size() if world_size is None else world_size
    by_group: dict[dist.ProcessGroup | None, list[torch.Tensor]] = {}
    for _, moe in moe_layers(model):
        if moe.ep is None:
            continue
        for name in EXPERT_PARAMS:
            p = moe.get_parameter(name)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_group.setdefault(moe.ep.dp_group, []).append(local_shard(p.grad))
    for group, grads in by_group.items():
        if group is not None:
            for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
                same = [g for g in grads if g.dtype == dtype]
                flat = torch.cat([g.reshape(-1) for g in same])
                dist.all_reduce(flat, group=group)
                for g, part in zip(same, flat.split([g.numel() for g in same])):
                    g.copy_(part.view_as(g))
        for g in grads:
            g.div_(W)
