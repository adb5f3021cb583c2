"""Per-rank script of tests/parallel/test_zoo_ddp.py: the router designs of docs/zoo.md under DDP (2 ranks, gloo, CPU).

    torchrun --nproc_per_node=2 tests/parallel/dist_zoo.py OUT_DIR

For every case of CASES: the debug model built from seed 0, wrapped by `parallelize` (DDP), trained STEPS optimizer
steps by the trainer's own `train_step` (its parallel path: `no_sync` for the first micro-batch, gradients averaged
in the last, then the optimizer step and `post_step`, where kmeans and remoe all-reduce their step statistics),
each rank on its half of every micro-batch of a fixed global batch. Each rank writes OUT_DIR/rank{R}.pt: per case
the logged values of every step (`StepOutput.read`: means over the ranks), the initial and final parameters and
the final persistent buffers. The test runs `run_case` without torch.distributed over the whole global batch
(the one-process reference) and compares.

Also imported by the test (nothing here runs on import).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mpirouter.core.model import MoELM, preset_config
from mpirouter.optim import OptimConfig, build_optimizer
from mpirouter.trainer.step import train_step

STEPS, MICRO, GLOBAL_MICRO_BATCH, SEQ, VOCAB = 3, 2, 4, 16, 256
LR = 1e-2

# aux_loss_scope="global" wherever a balance loss is on: f_i from the expert counts of every rank (an all-reduce),
# so the rank mean of the losses is the loss of the whole micro-batch, and the gradient DDP averages is its gradient.
# Without torch.distributed (the reference) "global" is "batch" over the whole micro-batch: the same loss.
# remoe has no balance loss (its λ·L1 balances; balance must be "aux"); under "global" its L1 term's load weights f_i
# come from every rank's tokens (an all-reduce), so its rank mean is the one-process term. "remoe" runs at ReMoE's
# λ₀ = 1e-8, "remoe-l1" at λ₀ = 1e-2, where the L1 term moves the weights well above the tolerances (the controller
# λ ← λ·1.2^±1 uses the all-reduced gate density: equal exactly).
GLOBAL = dict(aux_loss_scope="global")
CASES: dict[str, dict] = {
    "svd": dict(router=dict(kind="svd"), **GLOBAL),
    "cosine": dict(router=dict(kind="cosine"), **GLOBAL),
    "kmeans": dict(router=dict(kind="kmeans", kmeans=dict(momentum=0.2)), **GLOBAL),
    "aoe": dict(router=dict(kind="aoe"), **GLOBAL),
    "remoe": dict(router=dict(kind="remoe"), balance="aux", **GLOBAL),
    "linear+erc": dict(router=dict(kind="linear", erc=dict(enabled=True)), **GLOBAL),
    "linear+simbal": dict(router=dict(kind="linear", simbal=dict(enabled=True)), **GLOBAL),
    "remoe-l1": dict(router=dict(kind="remoe", remoe=dict(init_l1_coef=1e-2)), balance="aux", **GLOBAL),
    # aux-loss-free balance: the expert bias, updated from the all-reduced load (a control with another state buffer)
    "kmeans+bias": dict(router=dict(kind="kmeans", kmeans=dict(momentum=0.2)), balance="bias", bias_update_rate=0.01),
}


def make(case: str) -> MoELM:
    torch.manual_seed(0)
    return MoELM(preset_config("debug", vocab_size=VOCAB, max_seq_len=SEQ, moe=CASES[case]))


def global_batches() -> torch.Tensor:
    """(STEPS, MICRO, GLOBAL_MICRO_BATCH, SEQ + 1) token ids: the same in every process."""
    return torch.randint(0, VOCAB, (STEPS, MICRO, GLOBAL_MICRO_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(7))


def params(model: MoELM) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def buffers(model: MoELM) -> dict[str, torch.Tensor]:
    """The persistent buffers (the state a checkpoint keeps): centroids, l1_coef, erc_seed/erc_step, expert_bias."""
    names = set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    return {n: b.detach().clone() for n, b in model.named_buffers() if n in names}


def run_case(case: str, rank: int = 0, world: int = 1, ctx=None) -> dict:
    """Train `case` STEPS steps on this process's share (rank of world) of every global micro-batch; ctx: the job."""
    from mpirouter.parallel.wrap import parallelize

    model = make(case)
    par = parallelize(model, ctx) if ctx is not None else None
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=LR, adam_lr=LR))
    init = params(model)
    data = global_batches()
    share = GLOBAL_MICRO_BATCH // world
    logged = []
    for step in range(STEPS):
        micro = [data[step, i, rank * share:(rank + 1) * share] for i in range(MICRO)]
        out = train_step(model, par.forward if par else model, opt, [(x[:, :-1], x[:, 1:]) for x in micro], None, 0.0, par)
        logged.append(out.read(ctx))
    return {"init": init, "final": params(model), "buffers": buffers(model), "logged": logged}


def main() -> None:
    from mpirouter.parallel.config import DistConfig
    from mpirouter.parallel.env import init_distributed

    import torch.distributed as dist

    out = Path(sys.argv[1])
    only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    ctx = init_distributed(DistConfig(strategy="ddp"), torch.device("cpu"))
    results = {case: run_case(case, ctx.rank, ctx.world_size, ctx) for case in only}
    torch.save(results, out / f"rank{ctx.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
