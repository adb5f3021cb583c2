"""torchrun --nproc_per_node=2 tests/parallel/dist_wrap.py OUT_DIR: the step-0 gradients of `parallelize`d models.

Each rank builds the debug model from one seed, wraps it (DDP; FSDP2; FSDP2 + EP=2), runs one
micro-batch of its share of a global batch through `train_step`'s parallel path up to the
gradients, and rank 0 saves every strategy's whole gradients (and the one-process gradients over
the whole global batch) to OUT_DIR/grads.pt for tests/parallel/test_wrap.py. The "+features"
strategies use sigmoid scores, aux loss and expert bias, and a shared expert; they also save every
layer's expert bias after the post-step update (from the load of the whole global batch).
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


FEATURES = dict(score_func="sigmoid", balance="both", n_shared=1, bias_update_rate=0.01)


def model(scope: str = "global", **moe) -> MoELM:
    """The debug model; "global" balances over every rank's tokens (a collective), "batch" is the same loss in one process."""
    torch.manual_seed(0)
    return MoELM(preset_config("debug", vocab_size=256, max_seq_len=SEQ, moe=dict(aux_loss_scope=scope, **moe)))


def whole(g: torch.Tensor) -> torch.Tensor:
    return g.full_tensor() if isinstance(g, DTensor) else g


def grads(strategy: str, ep: int, idx: torch.Tensor, moe: dict) -> dict[str, torch.Tensor]:
    ctx = init_distributed(DistConfig(strategy=strategy, ep=ep), torch.device("cpu"))
    m = model(**moe)
    par = parallelize(m, ctx)
    local = idx.chunk(ctx.world_size)[ctx.rank]
    with par.micro_batch(last=True):
        par.forward(local[:, :-1], local[:, 1:]).loss.backward()
    par.finish_gradients()
    out = {n: whole(p.grad).clone() for n, p in m.named_parameters()}
    m.post_step()
    return out | {f"bias{i}": layer.expert_bias.clone() for i, layer in enumerate(m.moe_layers()) if hasattr(layer, "expert_bias")}


def main() -> None:
    out = Path(sys.argv[1])
    idx = torch.randint(0, 256, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    layouts = (("ddp", "ddp", 1), ("fsdp", "fsdp", 1), ("fsdp-ep2", "fsdp", 2))
    results = {name: grads(s, ep, idx, {}) for name, s, ep in layouts}
    results |= {f"{name}+features": grads(s, ep, idx, FEATURES) for name, s, ep in layouts}
    solo = dist.new_group([0])  # every rank must create it; the one-process bias update all-reduces over rank 0 alone
    if dist.get_rank() == 0:
        for name, moe in (("one", {}), ("one+features", FEATURES)):
            one = model("batch", **moe)  # "global" would wait in an all-reduce for the other rank
            for layer in one.moe_layers():
                layer.balance_group = solo
            one(idx[:, :-1], idx[:, 1:]).loss.backward()
            results[name] = {n: p.grad.clone() for n, p in one.named_parameters()}
            one.post_step()
            results[name] |= {f"bias{i}": layer.expert_bias.clone() for i, layer in enumerate(one.moe_layers()) if hasattr(layer, "expert_bias")}
        torch.save(results, out / "grads.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
