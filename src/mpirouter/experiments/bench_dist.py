"""Step time of the distributed trainer against one process, side by side, and its gradient-sync share.

    mpirouter bench --dist                                   # CPU: 1 process vs DDP x 2 vs FSDP2 x 2, preset tiny
    mpirouter bench --dist --nproc 1 --device cuda           # GPU: 1 process vs FSDP2 on 1 GPU (NCCL)

Every variant trains the same model on the same global batch (`--batch-size`, split over the
ranks) with AdamW, through the trainer's own step (`trainer.step.train_step`); each runs in a fresh
process (`torchrun` for the distributed ones), one after the other in a rotating order, `--repeat`
times, and a variant's figure is the median step time of its run. Ratios are taken within a repeat.

"sync share" (DDP) is the part of a step that waits for the gradient all-reduce: each DDP run
alternates blocks of steps with and without it (`no_sync`), and the share is 1 - (step without) /
(step with). What overlaps with the backward is not counted: it is the exposed cost. FSDP2 has no
such split (without its reduce-scatter its sharded gradients stay empty and the optimizer skips
them, so the two steps would not do the same work); its row shows "n/a".

On a 2-core CPU machine each rank gets one core (torchrun's OMP_NUM_THREADS=1) and the one-process
baseline gets both (`torch.set_num_threads(2)`): the comparison is per machine, not per core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Sequence

import torch

from ..common.provenance import describe, environment
from ..core.model import MoELM, preset_config
from ..optim import OptimConfig, build_optimizer
from ..parallel.config import DistConfig
from ..parallel.env import init_distributed, rank_device, shutdown
from ..parallel.wrap import parallelize
from ..trainer.device import StepTimer, autocast_dtype, resolve_device
from ..trainer.step import train_step
from .bench import summarize
from .timing import Spread

SINGLE = "1 process"
RESULT_PREFIX = "BENCH_DIST_RESULT "


def variants(nproc: int, device: str) -> list[tuple[str, int, str | None]]:
    """(name, processes, strategy) to compare: one process, then DDP and FSDP2 over `nproc` (FSDP2 only on CUDA)."""
    strategies = ["fsdp"] if device.startswith("cuda") else ["ddp", "fsdp"]
    return [(SINGLE, 1, None)] + [(f"{s} x {nproc}", nproc, s) for s in strategies]


def worker(preset: str, batch_size: int, steps: int, warmup: int, device_name: str, strategy: str | None) -> dict:
    """Time `steps` training steps (after `warmup`) in this process or as this rank of a torchrun job."""
    device = rank_device(resolve_device(device_name))
    ctx = init_distributed(DistConfig(strategy=strategy), device) if strategy else None
    world = 1 if ctx is None else ctx.world_size
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the {world} processes")
    torch.manual_seed(0)
    cfg = preset_config(preset, vocab_size=256)
    model = MoELM(cfg).to(device)
    par = parallelize(model, ctx, param_dtype=torch.bfloat16 if device.type == "cuda" else None) if ctx else None
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-4))
    amp = autocast_dtype("auto", device)
    gen = torch.Generator().manual_seed(1 + (ctx.rank if ctx else 0))
    local = batch_size // world
    x = torch.randint(0, 256, (local, cfg.max_seq_len), generator=gen).to(device)
    timer = StepTimer(device)
    forward = par.forward if par else model

    def run(n: int, sync: bool) -> list[float]:
        for _ in range(n):
            timer.start()
            if par is not None and not sync:
                with par.micro_batch(last=False):  # the step without gradient reduction
                    out = forward(x, x)
                    out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                train_step(model, forward, optimizer, [(x, x)], amp, 1.0, par)
            timer.stop()
        return timer.read()  # sync point: after the block

    run(warmup, True)
    synced, unsynced = [], []
    for _ in range(3):  # alternate blocks, so drift hits both alike
        synced += run(steps, True)
        if strategy == "ddp":
            unsynced += run(steps, False)
    step = statistics.median(synced)
    result = {"step_ms": 1000 * step, "tokens_per_s": batch_size * cfg.max_seq_len / step,
              "sync_share": 1 - statistics.median(unsynced) / step if unsynced else (None if par is not None else 0.0),
              "env": environment(str(device)), "world_size": world}
    shutdown(ctx)
    return result


def launch(name: str, nproc: int, strategy: str | None, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh process (torchrun for the distributed ones) and return rank 0's result."""
    inner = ["-m", "mpirouter.experiments.bench_dist", "--preset", args.preset, "--batch-size", str(args.batch_size),
             "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    env = dict(os.environ)
    if strategy is None:
        cmd = [sys.executable, *inner]
        env["OMP_NUM_THREADS"] = str(os.cpu_count() or 1)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *inner,
               "--strategy", strategy]
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr).strip().splitlines()[-8:]
        raise RuntimeError(f"bench variant {name!r} failed (exit {done.returncode}): " + " | ".join(tail))
    return json.loads(lines[0][len(RESULT_PREFIX):])


def run_bench_dist(args: argparse.Namespace, say=print) -> dict:
    """Every variant `args.repeat` times in a rotating order; the table and the numbers."""
    names = variants(args.nproc, args.device)
    step_ms: dict[str, list[float]] = {n: [] for n, _, _ in names}
    share: dict[str, list[float]] = {n: [] for n, _, _ in names}
    env = None
    for r in range(args.repeat):
        for name, nproc, strategy in names[r % len(names):] + names[:r % len(names)]:
            res = launch(name, nproc, strategy, args)
            step_ms[name].append(res["step_ms"])
            share[name].append(res["sync_share"])
            env = env or res["env"]
    table = summarize(step_ms, baseline=SINGLE)
    say(f"mpirouter bench --dist: preset {args.preset}, global batch {args.batch_size} x {preset_config(args.preset).max_seq_len} "
        f"tokens, AdamW, {args.repeat} repeats of {3 * args.steps} steps per variant")
    say(f"{describe(env)}")
    say(f"{'variant':<14}{'step ms (min-max)':>26}{'x 1 process':>22}{'sync share':>14}")
    for name, s in table.items():
        shares = [v for v in share[name] if v is not None]
        sync = f"{100 * Spread.of(shares).median:>10.0f} %" if shares else f"{'n/a':>12}"
        say(f"{name:<14}{s.ms.median:>10.1f} ({s.ms.min:.1f}-{s.ms.max:.1f}){'':>4}{s.ratio.median:>10.2f} "
            f"({s.ratio.min:.2f}-{s.ratio.max:.2f}){sync}")
    return {"args": vars(args), "env": env, "step_ms": step_ms, "sync_share": share,
            "ratio_median": {n: s.ratio.median for n, s in table.items()}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model preset")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences), split over the ranks")
    p.add_argument("--steps", type=int, default=10, help="timed steps per block (3 blocks with sync, 3 without)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", default="cpu", help="cpu | cuda")


def main(argv: Sequence[str] | None = None) -> int:
    """python -m mpirouter.experiments.bench_dist [--strategy ddp|fsdp]: one variant's worker (`launch` runs it)."""
    p = argparse.ArgumentParser(description=main.__doc__)
    add_arguments(p)
    p.add_argument("--strategy", default=None, choices=["ddp", "fsdp"])
    a = p.parse_args(argv)
    if a.strategy is None:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = worker(a.preset, a.batch_size, a.steps, a.warmup, a.device, a.strategy)
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
