"""EP gradients of a torchtitan MPI model vs one process over the same global batch (a test worker).

    torchrun --standalone --nproc_per_node=2 tests/integrations/titan/dist_ep_grads.py BACKEND OUT.json [pitfall]

BACKEND is torchtitan's spmd_backend (spmd_types, its default, or partial_dtensor). Every rank builds
the same tiny Qwen3-MoE with MPI routers; a reference copy runs the whole global batch in one
process; the other copy is parallelized by torchtitan itself (`Module.parallelize`: experts sharded
over EP=2, tokens dispatched by all-to-all) and runs this rank's half. Dense gradients are summed
over the ranks as FSDP does with torchtitan's settings (the loss is divided by the global token count,
gradient division off). Rank 0 writes, per parameter, max|g - g_ref| / max|g_ref|.

`pitfall` swaps the EP all-gather of the router rows for a whole-expert-stack gather whose backward
keeps only this rank's share (what `DTensor.full_tensor()` does), to show the test can tell.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from cpu_shims import patch_device_module  # noqa: E402

patch_device_module()  # before torchtitan's dispatcher and mesh modules are imported

import torch.nn.functional as F  # noqa: E402
from tiny import VOCAB, tiny_qwen3_moe  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torchtitan.config import ParallelismConfig  # noqa: E402
from torchtitan.distributed import utils as dist_utils  # noqa: E402
from torchtitan.distributed.parallel_dims import ParallelDims  # noqa: E402

from mpirouter.core.routers import router_rows  # noqa: E402
from mpirouter.integrations.torchtitan import gate as gate_module  # noqa: E402
from mpirouter.integrations.torchtitan import to_mpi  # noqa: E402


class _GatherKeepLocalGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward keeps this rank's slice: `full_tensor()`'s backward."""

    @staticmethod
    def forward(ctx, local, group, offset):
        out = local.new_empty((local.shape[0] * dist.get_world_size(group), *local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        ctx.offset, ctx.rows = offset, local.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.offset:ctx.offset + ctx.rows], None, None


def pitfall_rows(kind, r_ED, mats_EFD, scale):
    """φ from whole gathered expert stacks, as `full_tensor()` would give them (wrong expert gradients)."""
    r_ED = gate_module.plain(r_ED)
    whole = []
    for m in mats_EFD:
        part = gate_module.local_experts(m, r_ED.shape[0])
        whole.append(part.w_eFD if part.group is None else _GatherKeepLocalGrad.apply(part.w_eFD, part.group, part.offset))
    return router_rows(kind, r_ED, *whole, scale=scale)


def loss_sum(model, tokens_BL: torch.Tensor) -> torch.Tensor:
    logits = model(tokens_BL[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens_BL[:, 1:].reshape(-1), reduction="sum")


def full_grad(param: torch.nn.Parameter, num_experts: int) -> torch.Tensor:
    grad = param.grad
    if isinstance(grad, DTensor):
        return grad.full_tensor()
    if grad.dim() == 3 and grad.shape[0] != num_experts:  # spmd_types: the plain EP shard of an expert stack
        return gate_module.whole_experts(grad, num_experts)
    total = grad.clone()
    dist.all_reduce(total)  # a dense gradient: summed over ranks, as FSDP does with division off
    return total


def main() -> None:
    backend, out_path = sys.argv[1], Path(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "pitfall":
        gate_module.gathered_rows = pitfall_rows
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dist_utils.set_spmd_backend(backend)
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=1, pp=1, ep=world, world_size=world, spmd_backend=backend)
    dims.build_mesh()

    num_experts = 8
    config = to_mpi(tiny_qwen3_moe(num_experts=num_experts, top_k=2))
    torch.manual_seed(0)
    reference = config.build()
    reference.init_states(buffer_device=torch.device("cpu"))
    # what the trainer does with its parallelism settings: EP token dispatch, sharding plans
    config.update_from_config(config=SimpleNamespace(parallelism=ParallelismConfig(
        expert_parallel_degree=world, spmd_backend=backend)))
    model = config.build()
    model.load_state_dict(reference.state_dict())
    tokens_BL = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(1))
    n_targets = tokens_BL[:, 1:].numel()

    (loss_sum(reference, tokens_BL) / n_targets).backward()

    model.parallelize(dims)
    share = tokens_BL.shape[0] // world
    with dist_utils.get_spmd_context(parallel_dims=dims)():
        (loss_sum(model, tokens_BL[rank * share:(rank + 1) * share]) / n_targets).backward()

    errors = {}
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        want, got = ref_params[name].grad, full_grad(param, num_experts)
        errors[name] = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    if rank == 0:
        out_path.write_text(json.dumps(errors, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
