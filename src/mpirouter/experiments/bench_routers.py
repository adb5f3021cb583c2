"""The router designs side by side: a training step and the router's own work per design, timed interleaved.

    mpirouter bench --designs all --shapes '' --router-preset ''           # tiny preset on CPU, large on CUDA
    mpirouter bench --designs linear,mpi,cosine --designs-preset small

One model per design, built from the same seed (`core.moe.MoE` keeps the shared parameters paired), each with
its own AdamW; every repeat times a full training step (`trainer.step.train_step`: fwd+bwd, clip, AdamW,
post-step) of each design, rotating design by design, then each design's router work for the step's tokens
(`trainer.evaluation.router_cost_ms`: φ, the logits and the router's own losses, forward + backward).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..core.model import MoELM, preset_config
from ..core.routers import RouterConfig, parse_router_name
from ..optim import OptimConfig, build_optimizer
from ..trainer.device import StepTimer
from ..trainer.evaluation import router_cost_ms
from ..trainer.step import train_step
from .timing import Spread, fmt_range, time_interleaved

DESIGNS: tuple[str, ...] = ("linear", "mpi", "linear+erc", "mpi+erc", "linear+simbal", "svd", "cosine", "kmeans", "aoe", "remoe")
"""`--designs all`: every router kind beside the MPI ablations, and the ERC / SimBal losses on linear and mpi."""


def design_config(name: str) -> RouterConfig:
    """The RouterConfig of a router name such as "mpi+erc"."""
    kind, addons = parse_router_name(name)
    return RouterConfig(kind=kind, **{a: {"enabled": True} for a in addons})


def bench_router_designs(preset: str, designs: list[str], reps: int = 5, repeat: int = 3, device: torch.device | str = "cpu",
                         amp: torch.dtype | None = None, batch_size: int = 16, seed: int = 0) -> dict:
    """Per design: parameter counts, step ms, step ÷ linear's (per repeat), router ms and its share of the step."""
    if "linear" not in designs:
        designs = ["linear", *designs]
    device = torch.device(device)
    models = {}
    for name in designs:
        torch.manual_seed(seed)
        cfg = preset_config(preset, moe=dict(router=design_config(name)))
        model = MoELM(cfg).to(device)
        models[name] = (model, build_optimizer(model, OptimConfig(name="adamw")))
    gen = torch.Generator().manual_seed(seed)
    vocab, seq = cfg.vocab_size, cfg.max_seq_len
    idx = torch.randint(0, vocab, (batch_size, seq + 1), generator=gen).to(device)
    batch = [(idx[:, :-1], idx[:, 1:])]

    def step(name: str) -> Callable[[StepTimer], None]:
        model, opt = models[name]

        def run(timer: StepTimer) -> None:
            timer.start()
            train_step(model, model, opt, batch, amp, grad_clip=1.0)
            timer.stop()
        return run

    steps: dict[str, list[float]] = {n: [] for n in designs}
    router: dict[str, list[float]] = {n: [] for n in designs}
    for i in range(repeat):
        one = time_interleaved({n: step(n) for n in designs}, device, reps, 1, warmup=i == 0)
        for n in designs:
            steps[n] += one[n]
            router[n].append(router_cost_ms(models[n][0], batch_size * seq, reps=max(3, reps), amp=amp))
    out = {}
    for n in designs:
        ratio = [a / b for a, b in zip(steps[n], steps["linear"])]
        share = [r / s for r, s in zip(router[n], steps[n])]
        out[n] = {"params": models[n][0].num_params(), "step_ms": dataclasses.asdict(Spread.of(steps[n])),
                  "step_ratio": dataclasses.asdict(Spread.of(ratio)), "router_ms": dataclasses.asdict(Spread.of(router[n])),
                  "router_share": dataclasses.asdict(Spread.of(share)), "repeats": {"step_ms": steps[n], "router_ms": router[n]}}
    return {"preset": preset, "tokens": batch_size * seq, "batch_size": batch_size, "designs": out}


def print_router_designs(r: dict, printer=print) -> None:
    """The designs table of `bench_router_designs`' result."""
    printer(f"\nRouter designs, preset {r['preset']!r} ({r['batch_size']} x {r['tokens'] // r['batch_size']} = {r['tokens']} tokens, "
            f"one model per design, fwd+bwd+clip+AdamW, designs interleaved step by step):")
    printer("| design | params total | params active | step ms | step / linear | router ms | router share |")
    printer("|---|---|---|---|---|---|---|")
    for name, d in r["designs"].items():
        sp = {k: Spread(**d[k]) for k in ("step_ms", "step_ratio", "router_ms", "router_share")}
        printer(f"| {name} | {d['params']['total']:,} | {d['params']['active']:,} | {fmt_range(sp['step_ms'])} | "
                f"{fmt_range(sp['step_ratio'], lambda v: f'{v:.3f}')} | {fmt_range(sp['router_ms'])} | "
                f"{fmt_range(sp['router_share'], lambda v: f'{100 * v:.2f}', '%')} |")
