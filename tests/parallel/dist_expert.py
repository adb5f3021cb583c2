"""Per-rank checks of expert parallelism and the global balance loss (run by test_expert.py under torchrun, 2 ranks).

Every rank builds the same float64 MoE layer (D=16, F=8, E=4, K=2) and a 1-process reference copy of
it, runs its share of a global batch through the parallel layer and the whole batch through the
reference, and records max |parallel - reference| / max |reference| for each compared tensor. The
errors are max-reduced over ranks and rank 0 writes them, with a few facts, to OUT/results.json.

    python -m torch.distributed.run --nproc_per_node=2 dist_expert.py OUT
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mpirouter.core.model import ModelConfig, MoELM
from mpirouter.core.moe import MoE, MoEConfig, MoEOutput, local_shard
from mpirouter.core.routers import MPI_FAMILY, RouterConfig, RowsPerStep
from mpirouter.parallel.expert import EXPERT_PARAMS, dp_ep_mesh, expert_parameters, reduce_expert_grads, shard_experts

D, E, B, S = 16, 4, 2, 5
"""Width, experts, sequences per rank, sequence length."""

errors: dict[str, float] = {}
facts: dict[str, object] = {}


def make(kind: str, num_experts: int = E, scope: str = "global") -> MoE:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=num_experts, top_k=2, hidden=8, aux_loss_coef=0.05, z_loss_coef=0.01, aux_loss_scope=scope,
                    router=RouterConfig(kind=kind))
    return MoE(D, cfg).double()


def reference_of(moe: MoE) -> MoE:
    """The same weights in one process, balance loss over its whole batch ("batch" scope)."""
    ref = copy.deepcopy(moe)
    ref.config = dataclasses.replace(ref.config, aux_loss_scope="batch")
    return ref


def record(key: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """max |got - want| relative to max |scale| (default: want), the worst over the calls with this key."""
    scale = want if scale is None else scale
    err = ((got.detach() - want.detach()).abs().max() / scale.detach().abs().max().clamp_min(1e-300)).item()
    errors[key] = max(errors.get(key, 0.0), err)


def loss_of(out: MoEOutput, c: torch.Tensor) -> torch.Tensor:
    """Per-token mean of a fixed readout plus the layer's balance and z losses."""
    return (out.out * c).sum(-1).mean() + out.stats.aux_loss + out.stats.z_loss


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def expert_slice(moe: MoE) -> slice:
    size, rank = moe.ep.size, moe.ep.rank
    L = moe.config.num_experts // size
    return slice(rank * L, (rank + 1) * L)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (W·B sequences) and the readout weights, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    W = dist.get_world_size()
    return torch.randn(W * B, S, D, generator=g, dtype=torch.float64), torch.randn(W * B, S, D, generator=g, dtype=torch.float64)


def against_reference(tag: str, kind: str, mesh, x_g: torch.Tensor, c_g: torch.Tensor, craft=None) -> MoE:
    """Outputs, loss, gradients, rows, alignment and one SGD step + post_step of the parallel layer vs the reference."""
    moe = make(kind)
    if craft is not None:
        craft(moe)
    ref = reference_of(moe)
    shard_experts(moe, mesh)
    rank, W = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * B, (rank + 1) * B)
    x = x_g[mine].clone().requires_grad_(True)
    out = moe(x)
    loss = loss_of(out, c_g[mine])
    loss.backward()
    reduce_expert_grads(moe)
    x_ref = x_g.clone().requires_grad_(True)
    out_ref = ref(x_ref)
    loss_ref = loss_of(out_ref, c_g)
    loss_ref.backward()

    ex = expert_slice(moe)
    record(f"{tag}/out", out.out, out_ref.out[mine], out_ref.out)
    record(f"{tag}/loss", mean_over_ranks(loss), loss_ref)
    record(f"{tag}/grad x", x.grad / W, x_ref.grad[mine], x_ref.grad)  # the loss is the mean over ranks
    for name in EXPERT_PARAMS:
        g_ref = ref.get_parameter(name).grad
        record(f"{tag}/grad {name}", local_shard(moe.get_parameter(name).grad), g_ref[ex], g_ref)
    with torch.no_grad():
        rows = moe.router_rows()
        record(f"{tag}/rows", rows, ref.router_rows())
        record(f"{tag}/out with given rows", moe(x, rows_ED=rows).out, out.out)
        for k, v in moe.alignment().items():
            record(f"{tag}/alignment {k}", v, ref.alignment()[k])
    # one SGD step on DTensor parameters, then the post-step hook (mpi-inplace: R projected on local shards)
    for m in (moe, ref):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
        m.post_step()
    for name in EXPERT_PARAMS:
        p_ref = ref.get_parameter(name)
        record(f"{tag}/after step {name}", local_shard(moe.get_parameter(name)).detach(), p_ref[ex], p_ref)
    return moe


def full_tensor_pitfall(mesh, x_g, c_g) -> None:
    """G's gradient when φ is computed from `full_tensor()` of the stacks (wrong) vs from the local shards (ours)."""
    rank = dist.get_rank()
    mine = slice(rank * B, (rank + 1) * B)
    moe = make("mpi")
    ref = reference_of(moe)
    shard_experts(moe, mesh)
    rows_wrong = moe.router.rows(moe.w_gate.full_tensor(), moe.w_up.full_tensor(), moe.router.weight.full_tensor())
    loss_of(moe(x_g[mine], rows_ED=rows_wrong), c_g[mine]).backward()
    reduce_expert_grads(moe)
    loss_of(ref(x_g), c_g).backward()
    ex = expert_slice(moe)
    record("full_tensor pitfall/grad w_gate (wrong path)", local_shard(moe.w_gate.grad), ref.w_gate.grad[ex], ref.w_gate.grad)
    record("full_tensor pitfall/rows (wrong path)", rows_wrong, ref.router_rows())


def rows_per_step(mesh, x_g, c_g) -> None:
    """φ once for two micro-batches (`RowsPerStep`) under EP = the reference's two micro-batches on the global batch."""
    rank, W = dist.get_rank(), dist.get_world_size()
    moe = make("mpi")
    ref = reference_of(moe)
    shard_experts(moe, mesh)
    shared = RowsPerStep([moe.router_rows()], micro_batches=B)
    for i in range(B):  # micro-batch i: sequence i of every rank
        j = rank * B + i
        loss = loss_of(moe(x_g[j:j + 1], rows_ED=shared.for_micro_batch(i)[0]), c_g[j:j + 1]) / B
        loss.backward()
        idx = torch.arange(W) * B + i
        (loss_of(ref(x_g[idx]), c_g[idx]) / B).backward()
    reduce_expert_grads(moe)
    ex = expert_slice(moe)
    for name in EXPERT_PARAMS:
        g_ref = ref.get_parameter(name).grad
        record(f"rows per step/grad {name}", local_shard(moe.get_parameter(name).grad), g_ref[ex], g_ref)


def route_all_to_rank0(moe: MoE) -> None:
    """Linear router rows that send every token (first feature 10) to experts 0 and 1, both on rank 0."""
    with torch.no_grad():
        moe.router.weight[:, 0] = torch.tensor([3.0, 3.0, -3.0, -3.0], dtype=moe.router.weight.dtype)


def rank_without_tokens(mesh, x_g, c_g) -> None:
    """Rank 1 brings no tokens: the collectives still match, rank 0 gets the reference on its own tokens.

    Losses are summed over ranks here (rank 1's is 0), so the gradients are the plain sum over ranks.
    """
    rank = dist.get_rank()
    moe = make("mpi")
    ref = reference_of(moe)
    shard_experts(moe, mesh)
    x0, c0 = x_g[:B], c_g[:B]
    x = x0 if rank == 0 else x0[:0]
    out = moe(x)
    ((out.out * (c0 if rank == 0 else c0[:0])).sum() + out.stats.aux_loss + out.stats.z_loss).backward()
    reduce_expert_grads(moe, world_size=1)
    out_ref = ref(x0)
    ((out_ref.out * c0).sum() + out_ref.stats.aux_loss + out_ref.stats.z_loss).backward()
    if rank == 0:
        record("rank without tokens/out", out.out, out_ref.out)
    else:
        errors.setdefault("rank without tokens/out", 0.0)  # every rank reduces the same keys
        facts["empty rank stats are zero"] = all(v.item() == 0.0 for v in (out.stats.aux_loss, out.stats.z_loss, out.stats.entropy))
    ex = expert_slice(moe)
    for name in EXPERT_PARAMS:
        g_ref = ref.get_parameter(name).grad
        record(f"rank without tokens/grad {name}", local_shard(moe.get_parameter(name).grad), g_ref[ex], g_ref)


def global_balance_loss(x_g) -> None:
    """No EP: each rank's balance loss alone, gradients averaged over ranks as DDP does, vs one process on the whole batch."""
    rank, W = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * B, (rank + 1) * B)
    for scope in ("global", "batch"):
        moe = make("mpi", scope=scope)
        ref = reference_of(moe)
        aux = moe(x_g[mine]).stats.aux_loss
        aux.backward()
        ref_aux = ref(x_g).stats.aux_loss
        ref_aux.backward()
        record(f"balance {scope}/loss", mean_over_ranks(aux), ref_aux)
        for name in ("router.weight", "w_gate"):
            record(f"balance {scope}/grad {name}", mean_over_ranks(moe.get_parameter(name).grad), ref.get_parameter(name).grad)


def whole_model(mesh) -> None:
    """`shard_experts` on a MoELM (a dense block, then two MoE blocks): its loss and every gradient, the dense
    ones averaged over ranks as DDP would, against the unsharded model on the global batch."""
    rank, W = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    moe_cfg = MoEConfig(num_experts=E, top_k=2, hidden=8, aux_loss_coef=0.05, z_loss_coef=0.01, aux_loss_scope="global")
    model = MoELM(ModelConfig(vocab_size=32, dim=D, n_layers=3, n_heads=2, max_seq_len=S, n_dense_layers=1, moe=moe_cfg)).double()
    ref = copy.deepcopy(model)
    for m in ref.moe_layers():
        m.config = dataclasses.replace(m.config, aux_loss_scope="batch")
    shard_experts(model, mesh)
    sharded = expert_parameters(model)
    facts["whole model expert parameters"] = sorted(sharded)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(32, (W * B, S + 1), generator=g)
    mine = slice(rank * B, (rank + 1) * B)
    out = model(idx[mine, :-1], idx[mine, 1:])
    out.loss.backward()
    reduce_expert_grads(model)
    out_ref = ref(idx[:, :-1], idx[:, 1:])
    out_ref.loss.backward()
    record("whole model/loss", mean_over_ranks(out.loss), out_ref.loss)
    experts = {id(p) for p in sharded.values()}
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        if id(p) in experts:
            L = E // W
            record(f"whole model/grad {name.partition('ffn.')[2]}", local_shard(p.grad), p_ref.grad[rank * L:(rank + 1) * L], p_ref.grad)
        else:
            record("whole model/grad dense", mean_over_ranks(p.grad), p_ref.grad)


def indivisible_experts(mesh) -> None:
    moe = make("mpi", num_experts=3)
    try:
        shard_experts(moe, mesh)
    except ValueError as e:
        facts["indivisible message"] = str(e)
    facts["indivisible left unsharded"] = moe.ep is None and not hasattr(moe.w_gate, "to_local")


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    ep2, dp2 = dp_ep_mesh(2), dp_ep_mesh(1)  # (dp=1, ep=2) and (dp=2, ep=1)
    x_g, c_g = batch()
    for kind in MPI_FAMILY:
        against_reference(f"ep2 {kind}", kind, ep2, x_g, c_g)
    against_reference("dp2 mpi", "mpi", dp2, x_g, c_g)
    x_skew = x_g.clone()
    x_skew[..., 0] = 10.0
    moe = against_reference("ep2 linear all to rank 0", "linear", ep2, x_skew, c_g, craft=route_all_to_rank0)
    counts = moe(x_skew[:B]).stats.tokens_per_expert_E
    facts["all to rank 0 counts"] = counts.tolist()
    full_tensor_pitfall(ep2, x_g, c_g)
    rows_per_step(ep2, x_g, c_g)
    rank_without_tokens(ep2, x_g, c_g)
    global_balance_loss(x_g)
    whole_model(ep2)
    indivisible_experts(ep2)

    keys = sorted(errors)
    worst = torch.tensor([errors[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    flags = [f for f in ("empty rank stats are zero",) if f in facts]
    gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, {k: facts[k] for k in flags})
    if dist.get_rank() == 0:
        for other in gathered:
            facts.update(other)
        (out_dir / "results.json").write_text(json.dumps({"errors": dict(zip(keys, worst.tolist())), "facts": facts}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
