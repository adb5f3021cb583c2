"""An MPI MoELayer under Megatron's expert parallelism vs one process over the same global batch (a test worker).

    torchrun --standalone --nproc_per_node=N tests/integrations/megatron/dist_ep.py OUT.pt [pitfall]

Every rank makes the same global weights (R and 4 experts' fc1/fc2, from one seed) and builds an MPI MoELayer
with expert parallelism N (alltoall dispatcher): it holds experts N_rank·4/N .. and copies theirs in. Rank r runs
rows r·8/N .. of the 8 sequence positions of a global batch. The loss is a weighted sum over tokens, so gradients
add up across ranks: R's gradient is summed over ranks here (Megatron's DDP all-reduces it), each expert's stays on
its rank. Rank 0 saves the whole output, R's gradient and every expert's fc1/fc2 gradient in global expert order.

`pitfall` replaces the all-gather of φ (whose backward sums every rank's gradient of the rows) by one whose backward
keeps only this rank's own gradient of its rows: the router-path gradient of the other rank's tokens is lost.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import mcore_shims  # noqa: E402

mcore_shims.stub_triton_kernels()

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mpirouter.integrations.megatron import MPIConfig, mpi_layer_spec  # noqa: E402
from mpirouter.integrations.megatron import router as router_module  # noqa: E402

E, D, F, S, B = 4, 32, 16, 8, 2


class _GatherKeepingOwnGrad(torch.autograd.Function):
    """All-gather forward; backward: this rank's slice of its own gradient, nothing from the other ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        r = ctx.group.rank()
        return g[r * ctx.n:(r + 1) * ctx.n], None


def main(out: str, pitfall: bool) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if pitfall:
        router_module.gather_from_sequence_parallel_region = lambda x, group: _GatherKeepingOwnGrad.apply(x, group)
    with mcore_shims.cpu_megatron(expert_parallel=world):
        config = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=4, num_moe_experts=E, moe_router_topk=2,
                                   ffn_hidden_size=F, moe_ffn_hidden_size=F, gated_linear_unit=True, use_cpu_initialization=True,
                                   moe_token_dispatcher_type="alltoall", add_bias_linear=False, moe_router_dtype="fp32",
                                   params_dtype=torch.float32, moe_aux_loss_coeff=0.0, expert_model_parallel_size=world)
        moe = mpi_layer_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False), MPIConfig(target="gate_up")
                             ).submodules.mlp(config=config)
        gen = torch.Generator().manual_seed(0)
        r_ED = torch.randn(E, D, generator=gen) * 0.1
        fc1, fc2 = torch.randn(E, 2 * F, D, generator=gen) * 0.1, torch.randn(E, D, F, generator=gen) * 0.1
        x = torch.randn(S, B, D, generator=gen)
        w = torch.randn(S, B, D, generator=gen)
        local = E // world
        with torch.no_grad():
            moe.router.weight.copy_(r_ED)
            for i, expert in enumerate(moe.experts.local_experts):
                expert.linear_fc1.weight.copy_(fc1[rank * local + i])
                expert.linear_fc2.weight.copy_(fc2[rank * local + i])
        rows = slice(rank * S // world, (rank + 1) * S // world)
        y, _ = moe(x[rows].clone())
        (y * w[rows]).sum().backward()
        parts = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts, y.detach().contiguous())
        grad_r = moe.router.weight.grad.clone()
        dist.all_reduce(grad_r)
        grads = {}
        for name in ("linear_fc1", "linear_fc2"):
            mine = torch.stack([getattr(e, name).weight.grad for e in moe.experts.local_experts])
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine.contiguous())
            grads[name] = torch.cat(every)
        if rank == 0:
            torch.save({"out": torch.cat(parts), "grad_R": grad_r, **grads}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "pitfall" in sys.argv[2:])
