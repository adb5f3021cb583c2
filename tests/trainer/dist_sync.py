"""torchrun --nproc_per_node=2 tests/trainer/dist_sync.py: what a 2-rank training step would read on the host.

Run by tests/trainer/test_step.py (issue #23 item 5). Each rank builds the debug model (grouped_mm dispatch), wraps
it (DDP, then FSDP2), builds the real optimizer (AdamW with the fused kernel CUDA picks), runs one warm-up step and
then one step of `train_step`'s parallel path under bf16 autocast inside tests/sync_proxy.py's SyncProxy. Rank 0
prints {"ddp": [rank 0's findings, rank 1's], "fsdp": [...]} as JSON on the last line.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the proxy
from sync_proxy import SyncProxy  # noqa: E402

import mpirouter.optim.build as build  # noqa: E402
from mpirouter.core.model import MoELM, preset_config  # noqa: E402
from mpirouter.optim import OptimConfig  # noqa: E402
from mpirouter.parallel.config import DistConfig  # noqa: E402
from mpirouter.parallel.env import init_distributed  # noqa: E402
from mpirouter.parallel.wrap import parallelize  # noqa: E402
from mpirouter.trainer.step import train_step  # noqa: E402


def findings(strategy: str) -> list[str]:
    ctx = init_distributed(DistConfig(strategy=strategy), torch.device("cpu"))
    torch.manual_seed(0)
    model = MoELM(preset_config("debug", vocab_size=256, max_seq_len=32, moe=dict(dispatch="grouped_mm")))
    par = parallelize(model, ctx)
    opt = build.build_optimizer(model, OptimConfig())
    g = torch.Generator().manual_seed(1 + ctx.rank)
    batches = [(torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g))]
    train_step(model, par.forward, opt, batches, torch.bfloat16, 1.0, par)  # warm-up outside the check
    with SyncProxy() as proxy:
        train_step(model, par.forward, opt, batches, torch.bfloat16, 1.0, par)
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, proxy.found)
    return everyone


if __name__ == "__main__":
    build.fused_adamw_supported = lambda params: True  # CPU's default AdamW reads its step count on the host
    result = {strategy: findings(strategy) for strategy in ("ddp", "fsdp")}
    if dist.get_rank() == 0:
        print(json.dumps(result))
    dist.destroy_process_group()
