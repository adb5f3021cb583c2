"""torchrun --nproc_per_node=2 tests/parallel/dist_wrap.py OUT_DIR: the step-0 gradients of `parallelize`d models.

Each rank builds the debug model from one seed, wraps it (DDP; FSDP2; FSDP2 + EP=2), runs one
micro-batch of its share of a global batch through `train_step`'s parallel path up to the
gradients, and rank 0 saves every strategy's whole gradients (and the one-process gradients over
the whole global batch) to OUT_DIR/grads.pt for tests/parallel/test_wrap.py.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mpirouter.core.model import MoELM, preset_config
from mpirouter.parallel.config import DistConfig
from mpirouter.parallel.env import init_distributed
from mpirouter.parallel.wrap import parallelize

GLOBAL_BATCH, SEQ = 8, 32


def model(scope: str = "global") -> MoELM:
    """The debug model; "global" balances over every rank's tokens (a collective), "batch" is the same loss in one process."""
    torch.manual_seed(0)
    return MoELM(preset_config("debug", vocab_size=256, max_seq_len=SEQ, moe=dict(aux_loss_scope=scope)))


def whole(g: torch.Tensor) -> torch.Tensor:
    return g.full_tensor() if isinstance(g, DTensor) else g


def grads(strategy: str, ep: int, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    ctx = init_distributed(DistConfig(strategy=strategy, ep=ep), torch.device("cpu"))
    m = model()
    par = parallelize(m, ctx)
    local = idx.chunk(ctx.world_size)[ctx.rank]
    with par.micro_batch(last=True):
        par.forward(local[:, :-1], local[:, 1:]).loss.backward()
    par.finish_gradients()
    return {n: whole(p.grad).clone() for n, p in m.named_parameters()}


def main() -> None:
    out = Path(sys.argv[1])
    idx = torch.randint(0, 256, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    results = {name: grads(s, ep, idx) for name, s, ep in (("ddp", "ddp", 1), ("fsdp", "fsdp", 1), ("fsdp-ep2", "fsdp", 2))}
    if dist.get_rank() == 0:
        one = model("batch")  # "global" would wait in an all-reduce for the other rank
        one(idx[:, :-1], idx[:, 1:]).loss.backward()
        results["one"] = {n: p.grad.clone() for n, p in one.named_parameters()}
        torch.save(results, out / "grads.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
