"""Per-rank script of tests/optim/test_optim_dist.py: every optimizer under FSDP2 and DDP (2 ranks, gloo).

    torchrun --nproc_per_node=2 tests/optim/dist_optim.py OUT_DIR

For each case (tests/optim/test_optim_dist.py CASES): the debug model (mpi router) trained 3
steps with global batch 8 (4 + 4 over the ranks) under FSDP2 (``fully_shard`` per block and on
the root) and under DDP, full parameters gathered at the end; the 1-process reference over the
same global batch is computed here too, each rank taking every other case (a process that never
touches torch.distributed). Also a torch.distributed.checkpoint round trip of the FSDP2 run's
optimizer after step 2 into a fresh model and optimizer (another seed), whose step 3 must equal the
unbroken run's, and the communication of `on_whole_matrices` on sharded stacks and matrices.
Writes OUT_DIR/rank{R}.pt; the test compares.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.nn.parallel import DistributedDataParallel

from mpirouter.core.model import MoELM, preset_config
from mpirouter.optim import (
    OptimConfig,
    build_optimizer,
    hyperball_radii,
    load_hyperball_radii,
    hyperball_radius,
    hyperball_step,
    newton_schulz,
    on_whole_matrices,
    resolve_lrs,
    torch_optimizers,
)

STEPS, GLOBAL_BATCH, SEQ, VOCAB = 3, 8, 32, 256
SAVE_AFTER = 2  # the checkpoint round trip saves after this many steps and replays the next one

# name -> (OptimConfig fields, model overrides); the variant: uneven expert shards (E = 3 over 2
# ranks: 2 + 1 experts), the router as E rows, radii from the initial weights (state that only
# `hyperball_radii` carries across the checkpoint: the fresh model has another seed)
CASES: dict[str, tuple[dict, dict]] = {
    "adamw": (dict(name="adamw"), {}),
    "muon": (dict(name="muon"), {}),
    "adamh": (dict(name="adamh"), {}),
    "muonh": (dict(name="muonh"), {}),
    "muonh-rows-init-E3": (dict(name="muonh", router="rows", hyperball_radius="init", hyperball_radius_mult=1.5),
                           dict(moe=dict(num_experts=3))),
}


def make(case: str, seed: int = 0) -> tuple[MoELM, OptimConfig]:
    optim_kw, model_kw = CASES[case]
    cfg = OptimConfig(**optim_kw)
    lr, adam_lr = resolve_lrs(cfg)
    torch.manual_seed(seed)
    return MoELM(preset_config("debug", vocab_size=VOCAB, **model_kw)), OptimConfig(**optim_kw, lr=lr, adam_lr=adam_lr)


def batches() -> torch.Tensor:
    """(STEPS, GLOBAL_BATCH, SEQ + 1) token ids: the same on every rank and in the reference."""
    return torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(123))


def train_step(model, forward, opt, idx: torch.Tensor) -> None:
    forward(idx[:, :-1], idx[:, 1:]).loss.backward()  # clip skipped
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.post_step()


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def reference(case: str, data: torch.Tensor) -> dict:
    """One process, the whole global batch each step."""
    model, cfg = make(case)
    opt = build_optimizer(model, cfg)
    init = full_params(model)
    for step in range(STEPS):
        train_step(model, model, opt, data[step])
    return {"init": init, "final": full_params(model)}


def fsdp_model(case: str, seed: int = 0):
    model, cfg = make(case, seed)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, build_optimizer(model, cfg)


def checkpoint_state(model, opt) -> dict:
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, torch_optimizers(opt)),
            "hyperball": hyperball_radii(model, opt)}


def fsdp_run(case: str, data: torch.Tensor, rank: int, ckpt_dir: Path) -> dict:
    """FSDP2 run; its state after SAVE_AFTER steps goes through DCP into a fresh model + optimizer
    (seed 1), which replays the next step; max |difference| of that step's parameters."""
    local = data[:, rank * GLOBAL_BATCH // 2:(rank + 1) * GLOBAL_BATCH // 2]
    model, opt = fsdp_model(case)
    types = sorted({type(o).__name__ for o in torch_optimizers(opt)})
    experts_here = [b.ffn.w_gate.to_local().shape[0] for b in model.blocks]
    for step in range(SAVE_AFTER):
        train_step(model, model, opt, local[step])
    dcp.save(checkpoint_state(model, opt), checkpoint_id=str(ckpt_dir))
    saved = full_params(model)
    plain_loads = None
    if rank == 0:  # the same checkpoint into an unsharded model and optimizer, as a one-process resume does
        plain, plain_cfg = make(case, seed=1)
        plain_opt = build_optimizer(plain, plain_cfg)
        state = checkpoint_state(plain, plain_opt)
        dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
        set_model_state_dict(plain, state["model"])
        set_optimizer_state_dict(plain, torch_optimizers(plain_opt), state["optim"])
        load_hyperball_radii(plain, plain_opt, state["hyperball"])
        plain_loads = all(torch.equal(p.detach(), saved[n]) for n, p in plain.named_parameters())
    train_step(model, model, opt, local[SAVE_AFTER])
    after = full_params(model)
    fresh, fresh_opt = fsdp_model(case, seed=1)
    state = checkpoint_state(fresh, fresh_opt)
    dcp.load(state, checkpoint_id=str(ckpt_dir))
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, torch_optimizers(fresh_opt), state["optim"])
    load_hyperball_radii(fresh, fresh_opt, state["hyperball"])
    train_step(fresh, fresh, fresh_opt, local[SAVE_AFTER])
    replay = full_params(fresh)
    for step in range(SAVE_AFTER + 1, STEPS):
        train_step(model, model, opt, local[step])
    dcp_diff = max((after[n] - replay[n]).abs().max().item() for n in after)
    return {"final": full_params(model), "dcp_max_abs_diff": dcp_diff, "torch_optimizers": types, "experts_here": experts_here,
            "plain_loads": plain_loads}


def ddp_run(case: str, data: torch.Tensor, rank: int) -> dict:
    local = data[:, rank * GLOBAL_BATCH // 2:(rank + 1) * GLOBAL_BATCH // 2]
    model, cfg = make(case)
    ddp = DistributedDataParallel(model)
    opt = build_optimizer(model, cfg)
    for step in range(STEPS):
        train_step(model, ddp, opt, local[step])
    return {"final": full_params(model)}


def whole_matrix_checks() -> dict:
    """Newton-Schulz (`on_whole_matrices`) and the Hyperball rule on DTensors sharded Shard(0): the
    unsharded results, and what they communicate. E = 3 and E = 1 stacks: uneven shards (2 + 1
    and 1 + 0 experts), so a rank may hold no matrix at all."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gen = torch.Generator().manual_seed(7)
    out = {}
    for name, shape in {"matrix": (96, 64), "stack-E3": (3, 48, 32), "stack-E1": (1, 48, 32)}.items():
        x, w, u = (torch.randn(*shape, generator=gen) for _ in range(3))
        if u.dim() == 3:
            u[0] = 0.0  # an expert without tokens: a zero update
        xd, wd, ud = (distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in (x, w, u))  # same on every rank: slice locally
        with CommDebugMode() as comm:
            od = on_whole_matrices(newton_schulz, xd)
        r, rd = hyperball_radius(w, "init"), hyperball_radius(wd, "init")
        hd = hyperball_step(wd, ud, 0.05, rd)
        out[name] = {"ns_equal": torch.equal(od.full_tensor(), newton_schulz(x)), "ns_collectives": comm.get_total_counts(),
                     "ns_placements": tuple(od.placements), "local_rows": od.to_local().shape[0],
                     "radius_err": (rd.full_tensor() - r).abs().max().item(), "radius_placements": tuple(rd.placements),
                     "hyperball_err": (hd.full_tensor() - hyperball_step(w, u, 0.05, r)).abs().max().item()}
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "this script checks 2 ranks"
    data = batches()
    results: dict = {"whole_matrices": whole_matrix_checks(), "cases": {}}
    for i, case in enumerate(CASES):
        res = {"fsdp": fsdp_run(case, data, rank, out_dir / f"ckpt-{case}"), "ddp": ddp_run(case, data, rank)}
        if i % world == rank:
            res["ref"] = reference(case, data)
        results["cases"][case] = res
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
