"""Side-by-side speed of the MoE layer, its baselines, and the MPI router's share of a training step.

    mpirouter bench                       # all preset shapes, 2-core CPU: ~2 minutes
    mpirouter bench --shapes small --reps 7

Everything in one table is measured in the same process, interleaved rep by rep, and reported
as medians (docs/performance.md: these machines are noisy by ±5-15%; trust ratios, not ms).

Rows per shape (forward + backward of one MoE layer, router included):
    sorted/loop        this package, dispatch="loop"
    sorted/grouped_mm  this package, dispatch="grouped_mm" (if torch has it)
    naive              HF-Mixtral-style loop over experts, one nn.Linear per expert matrix
    dense              a dense SwiGLU over T*K rows (same matmul FLOPs, no routing): the ceiling
and "% mm" is achieved FLOP/s as a share of a 2048³ fp32 torch.mm timed in the same rotation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .moe import MoE, MoEConfig, moe_flops, route
from .provenance import describe, environment
from .routers import RouterConfig


@dataclass(frozen=True)
class BenchShape:
    """One MoE layer shape."""

    dim: int
    num_experts: int
    top_k: int
    hidden: int
    tokens: int


# tiny/small/fine: one narrow, one wide and one fine-grained (many small experts) layer.
SHAPES: dict[str, BenchShape] = {
    "debug": BenchShape(64, 4, 2, 64, 256),
    "tiny": BenchShape(256, 8, 2, 512, 4096),
    "small": BenchShape(512, 16, 2, 1024, 8192),
    "fine": BenchShape(512, 64, 8, 256, 8192),
}


class NaiveMoE(nn.Module):
    """The HF transformers 4.x Mixtral block: a Python loop over experts with nn.Linear weights."""

    def __init__(self, moe: MoE):
        super().__init__()
        E, Fh, D = moe.w_gate.shape
        self.top_k = moe.config.top_k
        self.gate = nn.Linear(D, E, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(D, Fh, bias=False) for _ in range(E))
        self.w3 = nn.ModuleList(nn.Linear(D, Fh, bias=False) for _ in range(E))
        self.w2 = nn.ModuleList(nn.Linear(Fh, D, bias=False) for _ in range(E))
        with torch.no_grad():
            self.gate.weight.copy_(moe.router.weight)
            for e in range(E):
                self.w1[e].weight.copy_(moe.w_gate[e])
                self.w3[e].weight.copy_(moe.w_up[e])
                self.w2[e].weight.copy_(moe.w_down[e])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        routing = route(self.gate(x_TD), self.top_k)
        out_TD = torch.zeros_like(x_TD)
        for e in range(len(self.w1)):
            tok, slot = torch.where(routing.experts_TK == e)
            if tok.numel():
                xe = x_TD[tok]
                ye = self.w2[e](F.silu(self.w1[e](xe)) * self.w3[e](xe)) * routing.weights_TK[tok, slot, None]
                out_TD = out_TD.index_add(0, tok, ye)
        return out_TD


CEILING, CEILING_N = "mm 2048^3", 2048


def _median_ms(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def mm_ceiling_gflops(n: int = 2048, reps: int = 5) -> float:
    """Median fp32 GFLOP/s of an n³ torch.mm: the throughput ceiling for this machine, right now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n**3 / _median_ms(lambda: torch.mm(a, b), reps) / 1e6


def bench_moe_layer(shape: BenchShape, reps: int = 5, seed: int = 0) -> dict[str, float]:
    """Median fwd+bwd ms of each implementation at one shape, timed interleaved."""
    torch.manual_seed(seed)
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    base_cfg = dict(num_experts=shape.num_experts, top_k=shape.top_k, hidden=shape.hidden, aux_loss_coef=0.0)
    loop = MoE(shape.dim, MoEConfig(**base_cfg, dispatch="loop", router=RouterConfig(kind="linear")))
    impls["sorted/loop"] = lambda x: loop(x.unsqueeze(0)).out
    if hasattr(torch, "_grouped_mm"):
        grouped = MoE(shape.dim, MoEConfig(**base_cfg, dispatch="grouped_mm", router=RouterConfig(kind="linear")))
        grouped.load_state_dict(loop.state_dict())
        impls["sorted/grouped_mm"] = lambda x: grouped(x.unsqueeze(0)).out
    naive = NaiveMoE(loop)
    impls["naive"] = naive
    dense = nn.ModuleDict(dict(g=nn.Linear(shape.dim, shape.hidden, bias=False), u=nn.Linear(shape.dim, shape.hidden, bias=False),
                               d=nn.Linear(shape.hidden, shape.dim, bias=False)))
    impls["dense"] = lambda x: dense["d"](F.silu(dense["g"](x)) * dense["u"](x))

    x_TD = torch.randn(shape.tokens, shape.dim)
    x_dense = torch.randn(shape.tokens * shape.top_k, shape.dim)
    a_mm, b_mm = torch.randn(CEILING_N, CEILING_N), torch.randn(CEILING_N, CEILING_N)
    impls[CEILING] = lambda _: torch.mm(a_mm, b_mm)
    times: dict[str, list[float]] = {k: [] for k in impls}

    def run(name: str) -> float:
        x = (x_dense if name == "dense" else x_TD).clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = impls[name](x)
        if name != CEILING:
            out.backward(torch.ones_like(out))
        return time.perf_counter() - t0

    for name in impls:  # warm-up (allocator, first-call costs)
        run(name)
    names = list(impls)
    for rep in range(reps):
        # rotate the order so no implementation always runs right after the same neighbour
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(run(name))
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def bench_router_share(preset: str = "tiny", reps: int = 5, batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """Full training step (fwd+bwd+AdamW) of a preset model with the linear vs the MPI router, interleaved.

    Also times the MPI rows φ alone (forward + backward over all layers), the part MPI adds.
    """
    from .model import MoELM, preset_config
    from .train import router_cost_ms

    models, opts = {}, {}
    for kind in ("linear", "mpi"):
        torch.manual_seed(seed)
        cfg = preset_config(preset, moe=dict(router=RouterConfig(kind=kind)))
        models[kind] = MoELM(cfg)
        opts[kind] = torch.optim.AdamW(models[kind].parameters(), lr=1e-4)
    seq = models["linear"].config.max_seq_len
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, models["linear"].config.vocab_size, (batch_size, seq + 1), generator=gen)

    def step(kind: str) -> float:
        t0 = time.perf_counter()
        out = models[kind](idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        opts[kind].step()
        opts[kind].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {k: [] for k in models}
    for k in models:
        step(k)
    for _ in range(reps):
        for k in models:
            times[k].append(step(k))
    lin, mpi = (1000 * statistics.median(times[k]) for k in ("linear", "mpi"))
    phi = router_cost_ms(models["mpi"], reps=max(3, reps))
    return {"step_ms_linear": lin, "step_ms_mpi": mpi, "mpi_rows_ms": phi, "mpi_rows_share": phi / mpi,
            "step_ratio": mpi / lin, "tokens": batch_size * seq}


def run_bench(shapes: list[str], reps: int = 5, router_preset: str | None = "tiny", printer=print) -> dict:
    """Run the benchmark, print the tables, return the numbers."""
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown bench shape {s!r}; choose from {', '.join(SHAPES)}")
    torch.manual_seed(0)
    ceiling = mm_ceiling_gflops()
    env = environment("cpu")
    printer(f"`mpirouter bench --shapes {','.join(shapes)} --reps {reps} --router-preset {router_preset or ''}` · {describe(env)}")
    printer(f"fp32 mm 2048^3 at start: {ceiling:.1f} GFLOP/s (median)")
    results: dict = {"env": env, "mm_gflops_start": ceiling, "shapes": {}}
    for name in shapes:
        shape = SHAPES[name]
        ms = bench_moe_layer(shape, reps=reps)
        # the ceiling timed in the same rotation as the implementations: same machine state
        ceiling = 2 * CEILING_N**3 / (ms.pop(CEILING) / 1000) / 1e9
        flops = moe_flops(shape.tokens, shape.top_k, shape.dim, shape.hidden)
        printer(f"\nMoE layer fwd+bwd, shape {name}: d={shape.dim} E={shape.num_experts} k={shape.top_k} "
                f"F={shape.hidden} T={shape.tokens} (median of {reps}; mm ceiling in the same rotation: {ceiling:.1f} GFLOP/s)")
        printer(f"  {'implementation':<20}{'ms':>9}{'% mm':>8}{'vs naive':>10}")
        for impl, t in ms.items():
            pct = 100 * flops / (t / 1000) / (ceiling * 1e9)
            printer(f"  {impl:<20}{t:>9.1f}{pct:>7.0f}%{ms['naive'] / t:>9.2f}x")
        results["shapes"][name] = {"ms": ms, "mm_gflops": ceiling,
                                   "pct_of_mm": {k: 100 * flops / (t / 1000) / (ceiling * 1e9) for k, t in ms.items()}}
    if router_preset:
        r = bench_router_share(router_preset, reps=reps)
        printer(f"\nTraining step of preset {router_preset!r} ({r['tokens']} tokens, fwd+bwd+AdamW, median of {reps}):")
        printer(f"  linear router {r['step_ms_linear']:.1f} ms | mpi router {r['step_ms_mpi']:.1f} ms "
                f"(ratio {r['step_ratio']:.3f}) | MPI rows φ fwd+bwd {r['mpi_rows_ms']:.2f} ms = {100 * r['mpi_rows_share']:.2f}% of the step")
        results["router"] = r
    return results
