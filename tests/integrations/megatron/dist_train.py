"""A tiny Megatron GPTModel with MPI routers trained by N gloo processes (a test worker).

    torchrun --standalone --nproc_per_node=N tests/integrations/megatron/dist_train.py OUT.pt

Data parallel N with expert parallelism N (N = 2: each rank holds 2 of the 4 experts; the alltoall dispatcher
moves the tokens), Megatron's DDP wrapper and `finalize_model_grads` (gradient all-reduce with Megatron's scaling,
expert-bias update), a torch AdamW on the gradient buffers (Megatron's optimizer does not run on CPU). Each rank
reads its 1/N of every global batch of 8 sequences; the loss each rank logs is the mean over the data-parallel group.
Rank 0 saves the first step's reduced gradients (`main_grad`) of every router weight R and of every expert's fc1 and
fc2 in global expert order, which must not depend on N, and every rank's losses, expert biases and replicated
(non-expert) weights.
"""

from __future__ import annotations

import re
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import mcore_shims  # noqa: E402

mcore_shims.stub_triton_kernels()

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mpirouter.integrations.megatron import MPIConfig, mpi_layer_spec  # noqa: E402

V, S, E, STEPS = 64, 16, 4, 30


def global_init(model: GPTModel, rank: int, world: int) -> None:
    """Weights that do not depend on the expert-parallel layout: each parameter drawn from a seed of its name in the
    one-process model (a local expert i of rank r is global expert r·e + i), norms at 1."""
    for name, p in model.named_parameters():
        m = re.search(r"local_experts\.(\d+)\.", name)
        if m:
            local = E // world
            name = name.replace(m.group(0), f"local_experts.{rank * local + int(m.group(1))}.")
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        with torch.no_grad():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.05)


def first_grads(model: GPTModel, world: int) -> dict[str, torch.Tensor]:
    """The reduced gradients after the first step: R of each layer, and fc1/fc2 of every expert in global order."""
    out = {"grad_R": torch.stack([layer.mlp.router.weight.main_grad.clone() for layer in model.decoder.layers])}
    for name in ("linear_fc1", "linear_fc2"):
        mine = torch.stack([torch.stack([getattr(e, name).weight.main_grad for e in layer.mlp.experts.local_experts])
                            for layer in model.decoder.layers])  # (layers, local experts, ...)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine.contiguous())
        out[f"grad_{name}"] = torch.cat(every, dim=1)
    return out


def main(out: str) -> None:
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    with mcore_shims.cpu_megatron(expert_parallel=world):
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=E, moe_router_topk=2,
                                   ffn_hidden_size=16, moe_ffn_hidden_size=16, gated_linear_unit=True, use_cpu_initialization=True,
                                   moe_token_dispatcher_type="alltoall", add_bias_linear=False, moe_router_dtype="fp32",
                                   params_dtype=torch.float32, moe_router_score_function="sigmoid",
                                   moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-2,
                                   moe_aux_loss_coeff=0.0, expert_model_parallel_size=world, hidden_dropout=0.0,
                                   attention_dropout=0.0)
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        spec = mpi_layer_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False), MPIConfig())
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=V, max_sequence_length=S)
        global_init(model, rank, world)
        ddp = DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(), module=model)
        params = [p for p in ddp.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]
        per_rank = 8 // world
        pos = torch.arange(S)[None].expand(per_rank, -1)
        gen = torch.Generator().manual_seed(0)
        losses, biases = [], []
        ddp.train()
        for _ in range(STEPS):
            ids = ((torch.randint(0, V, (8, 1), generator=gen) + torch.arange(S + 1)) % V)[rank * per_rank:(rank + 1) * per_rank]
            ddp.zero_grad_buffer()
            loss = ddp(ids[:, :-1], pos, attention_mask=mask, labels=ids[:, 1:]).mean()
            loss.backward()
            finalize_model_grads([ddp])
            if not losses:
                first = first_grads(model, world)
            for p in params:
                p.grad = p.main_grad
            opt.step()
            logged = loss.detach().clone()
            dist.all_reduce(logged)  # the data-parallel mean Megatron-LM logs (EP ranks are DP ranks of the dense weights)
            losses.append(logged / world)
            biases.append(torch.stack([layer.mlp.router.expert_bias.clone() for layer in model.decoder.layers]))
        replicated = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "local_experts" not in n])
        mine = {"losses": torch.stack(losses), "biases": torch.stack(biases), "replicated": replicated}
        every = {k: [torch.empty_like(v) for _ in range(world)] for k, v in mine.items()}
        for k, v in mine.items():
            dist.all_gather(every[k], v)
        if rank == 0:
            torch.save({**{k: torch.stack(v) for k, v in every.items()}, **first}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
