"""Side-by-side speed of the MoE layer, its baselines, and the MPI router's share of a training step.

    mpirouter bench                                   # CPU: shapes tiny,small,fine, 3 repeats x 5 reps (2 cores: ~3 min)
    mpirouter bench --device cuda                     # GPU: bf16 autocast, + shape large, router share at preset large
    mpirouter bench --shapes small --reps 7 --repeat 5
    mpirouter bench --precision bf16                  # CPU in bf16: + fp32 ceiling, + fp32-vs-bf16 steps (tiny, small)

Everything in one table is measured in the same process. One *repeat* times every variant `reps`
times, interleaved rep by rep in a rotating order, and keeps each variant's median; `--repeat N`
runs N such repeats back to back (round-robin again, so drift hits every variant alike). The table
gives the median of the N repeat medians with their min–max, and each ratio computed within a
repeat, then summarized the same way: one noisy repeat cannot make a tie look like a speedup
(docs/performance.md: these machines vary by ±5-15% from run to run). Each variant is first run until
its time settles (`warm_up`); one that fails, or runs out of GPU memory, is listed as skipped with why.

Rows per shape (forward + backward of one MoE layer, router included):
    sorted/loop        this package, dispatch="loop"
    sorted/grouped_mm  this package, dispatch="grouped_mm" (skipped, with the reason, where it cannot run)
    hf-qwen3           Hugging Face transformers' Qwen3-MoE sparse MoE block (if transformers is installed),
                       built with from_config (its default experts implementation) and holding the same weights
    naive              HF-Mixtral-4.x-style loop over experts, one nn.Linear per expert matrix
    dense              a dense SwiGLU over T*K rows (same matmul FLOPs, no routing)
"= auto" marks the path dispatch="auto" takes here (`core.dispatch.choose_dispatch`). "% ceil" is achieved
FLOP/s (`moe_flops`) as a share of a square matmul timed in the same rotation: fp32 2048³ on CPU,
bf16 8192³ on CUDA (where every variant runs under bf16 autocast and is timed with CUDA events).
Under bf16 (any device) a float32 matmul of the same size is timed in the rotation too, and the
table after the router share sets a training step in fp32 beside bf16 (`bench_precision`). On a CPU
without bf16 kernels every bf16 GEMM is emulated in float32 (`core.precision`), as in training.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import statistics
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..common.provenance import describe, environment
from ..core.dispatch import grouped_mm_fallback_reason
from ..core.model import PRESETS, MoELM, preset_config
from ..core.dispatch import choose_dispatch
from ..core.experts import moe_flops
from ..core.moe import MoE, MoEConfig
from ..core.routing import route
from ..core.precision import autocast, bf16_matmuls, native_bf16_matmul
from ..core.routers import RouterConfig, parse_router_name
from ..optim import OptimConfig, build_optimizer
from ..optim.config import OPTIMIZERS
from ..trainer.device import StepTimer, autocast_dtype, resolve_device, use_device
from ..trainer.evaluation import router_cost_ms
from ..trainer.step import train_step
from .bench_precision import DEFAULT_STEP_PRESETS, bench_step_precision
from .bench_routers import bench_router_designs, print_router_designs
from .timing import Spread, fmt_ms, fmt_range, free_memory, is_out_of_memory, one_line, skip_reason, time_interleaved, warm_up


@dataclass(frozen=True)
class BenchShape:
    """One MoE layer shape."""

    dim: int
    num_experts: int
    top_k: int
    hidden: int
    tokens: int


# tiny/small/fine: one narrow, one wide and one fine-grained (many small experts) layer;
# large: a layer of the `large` preset at 16 sequences of 1024 tokens (a GPU shape).
SHAPES: dict[str, BenchShape] = {
    "debug": BenchShape(64, 4, 2, 64, 256),
    "tiny": BenchShape(256, 8, 2, 512, 4096),
    "small": BenchShape(512, 16, 2, 1024, 8192),
    "fine": BenchShape(512, 64, 8, 256, 8192),
    "large": BenchShape(1024, 64, 8, 512, 16384),
}
DEFAULT_SHAPES = {"cpu": "tiny,small,fine", "cuda": "tiny,small,fine,large"}
DEFAULT_ROUTER_PRESET = {"cpu": "tiny", "cuda": "large"}
CEILING_N = {"cpu": 2048, "cuda": 8192}
BASELINE, CEILING, CEILING_FP32, HF = "sorted/loop", "ceiling", "ceiling-fp32", "hf-qwen3"


# ----------------------------------------------------------------------------- summaries (pure)


@dataclass(frozen=True)
class Summary:
    """One variant over the repeats: its time, and its time ÷ the baseline's within each repeat."""

    ms: Spread
    ratio: Spread


def summarize(repeat_ms: Mapping[str, Sequence[float]], baseline: str = BASELINE) -> dict[str, Summary]:
    """Per variant: the median and min–max of its per-repeat times, and of time ÷ baseline's time taken
    repeat by repeat (repeat i of every variant ran in the same rotation, so they share its drift)."""
    if baseline not in repeat_ms:
        raise ValueError(f"baseline {baseline!r} is not among the variants {', '.join(repeat_ms)}")
    base = repeat_ms[baseline]
    out = {}
    for name, ms in repeat_ms.items():
        if len(ms) != len(base):
            raise ValueError(f"{name} has {len(ms)} repeats, {baseline} has {len(base)}")
        out[name] = Summary(Spread.of(ms), Spread.of([t / b for t, b in zip(ms, base)]))
    return out


def pct_of_ceiling(repeat_ms: Sequence[float], ceiling_flops_s: Sequence[float], flops: float) -> Spread:
    """Achieved FLOP/s as a % of the ceiling measured in the same repeat, over the repeats."""
    return Spread.of([100.0 * flops / (t / 1000.0) / c for t, c in zip(repeat_ms, ceiling_flops_s)])


# ----------------------------------------------------------------------------- variants


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
                out_TD = out_TD.index_add(0, tok, ye.to(out_TD.dtype))
        return out_TD


def hf_qwen3_block(moe: MoE) -> nn.Module:
    """transformers' Qwen3-MoE sparse MoE block at `moe`'s shape, holding `moe`'s weights (router included).

    Built the way a user gets it: a 1-layer `Qwen3MoeModel` from `AutoModel.from_config` (no download),
    which picks transformers' default experts implementation, then its layer's block. ImportError
    when transformers, or its Qwen3-MoE, is missing.
    """
    from transformers import AutoModel, Qwen3MoeConfig  # optional dependency: callers skip this baseline without it

    E, Fh, D = moe.w_gate.shape
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=Fh, intermediate_size=Fh, num_experts=E,
                         num_experts_per_tok=moe.config.top_k, norm_topk_prob=moe.config.renormalize, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=16, vocab_size=16, decoder_sparse_step=1,
                         mlp_only_layers=[])
    block = AutoModel.from_config(cfg).layers[0].mlp
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers 5: stacked (E, 2F, D) [gate; up] and (E, D, F)
            experts.gate_up_proj.copy_(torch.cat([moe.w_gate, moe.w_up], dim=1))
            experts.down_proj.copy_(moe.w_down)
        else:  # transformers 4: one Qwen3MoeMLP per expert
            for e, mlp in enumerate(experts):
                mlp.gate_proj.weight.copy_(moe.w_gate[e])
                mlp.up_proj.weight.copy_(moe.w_up[e])
                mlp.down_proj.weight.copy_(moe.w_down[e])
    return block


class _SeenOps(TorchFunctionMode):
    """Records the names of the torch functions and custom ops a region calls."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(str(getattr(func, "_qualified_op_name", None) or getattr(func, "__name__", func)))
        return func(*args, **(kwargs or {}))


def hf_implementation(block: nn.Module, x_BSD: torch.Tensor, amp: torch.dtype | None) -> str:
    """Which experts implementation the block was configured with and which kernel one forward actually ran."""
    chosen = getattr(getattr(block.experts, "config", None), "_experts_implementation", None) or "eager"
    with torch.no_grad(), bf16_matmuls(x_BSD.device, amp), autocast(x_BSD.device, amp), _SeenOps() as seen:
        block(x_BSD)
    if "_grouped_mm" in seen.names or "grouped_mm" in seen.names:
        ran = "torch._grouped_mm"
    elif any("grouped_mm_fallback" in n for n in seen.names):
        ran = "transformers' grouped_mm fallback (a loop of torch.mm)"
    else:
        ran = "a Python loop over experts"
    return f"experts_implementation={chosen!r}, ran {ran}"


def grouped_mm_skip_reason(shape: BenchShape, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why dispatch="grouped_mm" cannot run (or would silently run the loop) here; None when it runs."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    fallback = grouped_mm_fallback_reason(device, dtype)
    if fallback is not None:  # it would time the loop's work plus host syncs, and dispatch="grouped_mm" refuses it
        return f"dispatch='grouped_mm' refuses it here: {fallback}; {BASELINE} is the same per-expert work"
    if (shape.dim * dtype.itemsize) % 16 or (shape.hidden * dtype.itemsize) % 16:
        return f"rows of d={shape.dim} / F={shape.hidden} are not multiples of 16 bytes: grouped_mm would run the loop"
    return None


def auto_dispatch(shape: BenchShape, device: torch.device, dtype: torch.dtype) -> str:
    """The variant dispatch="auto" amounts to at this shape (`choose_dispatch`, then the 16-byte row rule)."""
    impl = choose_dispatch(device, dtype)
    return "sorted/loop" if impl == "loop" or grouped_mm_skip_reason(shape, device, dtype) else "sorted/grouped_mm"


class Variant(NamedTuple):
    fn: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    params: list[nn.Parameter]
    backward: bool = True
    fp32: bool = False
    """Run without autocast (the float32 ceiling beside a bf16 table)."""


def _dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).removeprefix("torch."))


def _first(out):
    """The hidden states of an HF MoE block (transformers 4 returns them with the router logits)."""
    return out[0] if isinstance(out, tuple) else out


def build_variants(shape: BenchShape, device: torch.device, amp: torch.dtype | None, ceiling_n: int, hf: bool = True,
                   seed: int = 0) -> tuple[dict[str, Variant], dict[str, str], list[str]]:
    """The timed variants at one shape, the ones skipped (name -> reason), and notes for the table."""
    torch.manual_seed(seed)
    dtype = amp or torch.float32
    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}
    notes: list[str] = []
    x_TD = torch.randn(shape.tokens, shape.dim, device=device)
    base_cfg = dict(num_experts=shape.num_experts, top_k=shape.top_k, hidden=shape.hidden, aux_loss_coef=0.0)
    loop = MoE(shape.dim, MoEConfig(**base_cfg, dispatch="loop", router=RouterConfig(kind="linear"))).to(device)
    variants[BASELINE] = Variant(lambda x: loop(x.unsqueeze(0)).out, x_TD, list(loop.parameters()))
    reason = grouped_mm_skip_reason(shape, device, dtype)
    if reason is None:
        grouped = MoE(shape.dim, MoEConfig(**base_cfg, dispatch="grouped_mm", router=RouterConfig(kind="linear"))).to(device)
        grouped.load_state_dict(loop.state_dict())
        variants["sorted/grouped_mm"] = Variant(lambda x: grouped(x.unsqueeze(0)).out, x_TD, list(grouped.parameters()))
    else:
        skipped["sorted/grouped_mm"] = reason
    if hf:
        try:
            # its grouped_mm does not follow autocast (it casts the tokens to the weights' dtype): weights in `dtype`
            block = hf_qwen3_block(loop).to(device, dtype)
            ran = hf_implementation(block, x_TD[None, :256], amp)
        except ImportError as e:
            skipped[HF] = f"transformers or its Qwen3-MoE is not installed: {one_line(e)}"
        except RuntimeError as e:
            skipped[HF] = f"its forward fails here: {one_line(e)}"
        else:
            notes.append(f"{HF}: transformers {importlib.metadata.version('transformers')} {type(block).__name__} "
                         f"(AutoModel.from_config, our weights in {_dtype(dtype)}), {ran}")
            variants[HF] = Variant(lambda x: _first(block(x.unsqueeze(0))), x_TD, list(block.parameters()))
    naive = NaiveMoE(loop).to(device)
    variants["naive"] = Variant(naive, x_TD, list(naive.parameters()))
    dense = nn.ModuleDict(dict(g=nn.Linear(shape.dim, shape.hidden, bias=False), u=nn.Linear(shape.dim, shape.hidden, bias=False),
                               d=nn.Linear(shape.hidden, shape.dim, bias=False))).to(device)
    x_dense = torch.randn(shape.tokens * shape.top_k, shape.dim, device=device)
    variants["dense"] = Variant(lambda x: dense["d"](F.silu(dense["g"](x)) * dense["u"](x)), x_dense, list(dense.parameters()))
    a_mm, b_mm = (torch.randn(ceiling_n, ceiling_n, device=device, dtype=dtype) for _ in range(2))
    variants[CEILING] = Variant(lambda _: torch.mm(a_mm, b_mm), a_mm, [], backward=False)
    if amp is not None:  # what the lower precision buys over float32 matmuls, timed in the same rotation
        a32, b32 = a_mm.float(), b_mm.float()
        variants[CEILING_FP32] = Variant(lambda _: torch.mm(a32, b32), a32, [], backward=False, fp32=True)
    return variants, skipped, notes


def _layer_run(v: Variant, device: torch.device, amp: torch.dtype | None) -> Callable[[StepTimer], None]:
    amp = None if v.fp32 else amp

    def run(timer: StepTimer) -> None:
        for p in v.params:
            p.grad = None
        x = v.x.detach().requires_grad_(v.backward)
        timer.start()
        with bf16_matmuls(device, amp):  # emulated where the CPU has no bf16 kernels, as in training
            with autocast(device, amp):
                out = v.fn(x)
            if v.backward:
                out.backward(torch.ones_like(out))
        timer.stop()
    return run


def bench_moe_layer(shape: BenchShape, reps: int = 5, repeat: int = 3, device: torch.device | str = "cpu",
                    amp: torch.dtype | None = None, ceiling_n: int | None = None, hf: bool = True, seed: int = 0) -> dict:
    """Every variant's fwd+bwd at one shape, timed interleaved: per-repeat medians, their summary, % of ceiling.

    A variant that fails to run, or runs out of GPU memory (in its warm-up or while timed), is skipped with
    the reason; the baseline and the ceiling only for out of memory (then the table has no ratios, or no
    % of ceiling), any other failure of theirs raises."""
    device = torch.device(device)
    dtype = amp or torch.float32
    ceiling_n = ceiling_n or CEILING_N.get(device.type, 2048)
    result = {"shape": dataclasses.asdict(shape), "dtype": _dtype(dtype), "reps": reps, "repeat": repeat,
              "ms": {}, "repeats_ms": {}, "summary": {}, "pct_of_ceiling": {}, "ceiling": None, "warmup_runs": {},
              "auto": auto_dispatch(shape, device, dtype), "skipped": {}, "notes": []}
    try:
        variants, skipped, notes = build_variants(shape, device, amp, ceiling_n, hf, seed)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        result["skipped"][BASELINE] = skip_reason(e)
    if result["skipped"]:  # nothing was built
        free_memory(device)
        return result
    result.update(skipped=skipped, notes=notes)
    runs = {n: _layer_run(v, device, amp) for n, v in variants.items()}
    for n in list(runs):  # the baseline first: without it there is no table
        try:
            result["warmup_runs"][n] = warm_up(runs[n], device)
        except RuntimeError as e:  # NotImplementedError and out of memory included
            if n in (BASELINE, CEILING) and not is_out_of_memory(e):
                raise
            skipped[n] = skip_reason(e)
        if n in skipped:
            del runs[n], variants[n]
            free_memory(device)
            if n == BASELINE:
                return result
    ms = time_interleaved(runs, device, reps, repeat, warmup=False, dropped=skipped)
    if BASELINE not in ms:
        return result
    ceiling_ms, ceiling_fp32_ms = ms.pop(CEILING, None), ms.pop(CEILING_FP32, None)
    summary = summarize(ms)
    result.update(ms={n: s.ms.median for n, s in summary.items()}, repeats_ms=ms,
                  summary={n: dataclasses.asdict(s) for n, s in summary.items()})
    if ceiling_ms is not None:
        ceiling = [2.0 * ceiling_n**3 / (t / 1000.0) for t in ceiling_ms]
        flops = moe_flops(shape.tokens, shape.top_k, shape.dim, shape.hidden)
        result["pct_of_ceiling"] = {n: pct_of_ceiling(t, ceiling, flops).median for n, t in ms.items()}
        emulated = " (emulated in float32)" if amp is not None and not native_bf16_matmul(device) else ""
        result["ceiling"] = {"name": f"{_dtype(dtype)} mm {ceiling_n}^3{emulated}",
                             "gflops": dataclasses.asdict(Spread.of([c / 1e9 for c in ceiling])),
                             "gflops_repeats": [c / 1e9 for c in ceiling]}
    if ceiling_fp32_ms is not None:
        fp32 = [2.0 * ceiling_n**3 / (t / 1000.0) / 1e9 for t in ceiling_fp32_ms]
        result["ceiling_fp32"] = {"name": f"fp32 mm {ceiling_n}^3", "gflops": dataclasses.asdict(Spread.of(fp32)), "gflops_repeats": fp32}
    return result


def _set_router_kind(model: MoELM, config: RouterConfig) -> None:
    """Switch every router's computation: `linear` and `mpi` share the parameter R (E, D) and differ only in
    how φ is made from it, so one model serves both (on a GPU the `large` preset's weights and AdamW
    state fit once, not twice), and both kinds step the very same weights."""
    for moe in model.moe_layers():
        moe.router.config = config


def bench_router_share(preset: str = "tiny", reps: int = 5, repeat: int = 3, device: torch.device | str = "cpu",
                       amp: torch.dtype | None = None, batch_size: int = 16, seed: int = 0) -> dict:
    """A full training step (`trainer.step.train_step`: fwd+bwd, clip, AdamW, post-step) of a preset model
    with the linear vs the MPI router, interleaved, and the MPI rows φ alone (`router_cost_ms`: forward +
    backward over all layers, the part MPI adds), each repeat."""
    device = torch.device(device)
    torch.manual_seed(seed)
    cfg = preset_config(preset, moe=dict(router=RouterConfig(kind="mpi")))
    model = MoELM(cfg).to(device)
    kinds = {"linear": dataclasses.replace(cfg.moe.router, kind="linear"), "mpi": cfg.moe.router}
    opt = build_optimizer(model, OptimConfig(name="adamw"))
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len + 1), generator=gen).to(device)
    batch = [(idx[:, :-1], idx[:, 1:])]

    def step(kind: str) -> Callable[[StepTimer], None]:
        def run(timer: StepTimer) -> None:
            _set_router_kind(model, kinds[kind])
            timer.start()
            train_step(model, model, opt, batch, amp, grad_clip=1.0)
            timer.stop()
        return run

    steps: dict[str, list[float]] = {k: [] for k in kinds}
    rows = []
    for i in range(repeat):
        one = time_interleaved({k: step(k) for k in kinds}, device, reps, 1, warmup=i == 0)  # later repeats run warm
        for k in kinds:
            steps[k] += one[k]
        _set_router_kind(model, kinds["mpi"])
        rows.append(router_cost_ms(model, reps=max(3, reps)))
    ratio = [m / lin for m, lin in zip(steps["mpi"], steps["linear"])]
    share = [r / m for r, m in zip(rows, steps["mpi"])]
    spread = {"step_ms_linear": Spread.of(steps["linear"]), "step_ms_mpi": Spread.of(steps["mpi"]), "mpi_rows_ms": Spread.of(rows),
              "mpi_rows_share": Spread.of(share), "step_ratio": Spread.of(ratio)}
    return {**{k: s.median for k, s in spread.items()}, "spread": {k: dataclasses.asdict(s) for k, s in spread.items()},
            "repeats": {"step_ms_linear": steps["linear"], "step_ms_mpi": steps["mpi"], "mpi_rows_ms": rows},
            "preset": preset, "tokens": batch_size * cfg.max_seq_len, "batch_size": batch_size}


def bench_router_share_fitting(preset: str, reps: int, repeat: int, device: torch.device, amp: torch.dtype | None,
                               batch_size: int = 16) -> dict:
    """`bench_router_share`, halving the batch while a GPU runs out of memory (the result says so); when even
    one sequence does not fit, {"preset", "skipped": reason} instead of the figures."""
    first = batch_size
    while True:
        try:
            result = bench_router_share(preset, reps, repeat, device, amp, batch_size)
            result["batch_halved_from"] = first if batch_size != first else None
            return result
        except RuntimeError as e:  # torch's OutOfMemoryError, or cuBLAS failing to allocate its workspace
            if device.type != "cuda" or not is_out_of_memory(e):
                raise
            reason = skip_reason(e)
        free_memory(device)  # outside the except block: the traceback's frames (the model) are gone by now
        if batch_size == 1:
            return {"preset": preset, "skipped": f"{reason} (batch size 1)"}
        batch_size //= 2


# ----------------------------------------------------------------------------- the command


def _flops(s: Spread) -> str:
    """A ceiling in GFLOP/s (CPU) or TFLOP/s (GPU): median [min–max] unit."""
    k, unit = (1000, "TFLOP/s") if s.median >= 10_000 else (1, "GFLOP/s")
    return f"{s.median / k:.0f} [{s.min / k:.0f}–{s.max / k:.0f}] {unit}"


def print_layer_table(name: str, r: dict, printer=print) -> None:
    """The table of one shape from `bench_moe_layer`'s result."""
    s = BenchShape(**r["shape"])
    ceiling = (f"ceiling {r['ceiling']['name']} in the same rotation: {_flops(Spread(**r['ceiling']['gflops']))}"
               if r["ceiling"] else f"no ceiling ({CEILING} skipped)")
    if r.get("ceiling_fp32"):
        ceiling += f" ({r['ceiling_fp32']['name']}: {_flops(Spread(**r['ceiling_fp32']['gflops']))})"
    printer(f"\nMoE layer fwd+bwd, shape {name}: d={s.dim} E={s.num_experts} k={s.top_k} F={s.hidden} T={s.tokens}, {r['dtype']}; "
            f"{ceiling}")
    if r["summary"]:
        printer(f"  {'variant':<24}{'ms [min–max]':<26}{'±':>6}{'% ceil':>8}   {'t/loop [min–max]'}")
    for n, summ in r["summary"].items():
        ms, ratio = Spread(**summ["ms"]), Spread(**summ["ratio"])
        label = n + (" = auto" if n == r["auto"] else "")
        rat = "1 (baseline)" if n == BASELINE else fmt_range(ratio, lambda v: f"{v:.2f}")
        pct = f"{r['pct_of_ceiling'][n]:>7.0f}%" if n in r["pct_of_ceiling"] else f"{'–':>8}"
        printer(f"  {label:<24}{fmt_range(ms):<26}{ms.pct:>5.1f}%{pct}   {rat}")
    for n, why in r["skipped"].items():
        printer(f"  {n}: skipped ({why})")
    for note in r["notes"]:
        printer(f"  {note}")


def run_bench(shapes: list[str] | None = None, reps: int = 5, repeat: int = 3, router_preset: str | None = None,
              device: str = "auto", precision: str = "auto", ceiling_n: int | None = None, hf: bool = True, printer=print,
              step_presets: list[str] | None = None, torch_bf16_kernels: bool = False, step_optimizer: str = "adamw",
              designs: list[str] | None = None, designs_preset: str | None = None) -> dict:
    """Run the benchmark, print the tables, return the numbers.

    shapes None: DEFAULT_SHAPES of the device; router_preset None: DEFAULT_ROUTER_PRESET of the device,
    "" skips the training-step measurement. step_presets (bf16 only): the fp32-vs-bf16 step table
    (`bench_precision`), None: its DEFAULT_STEP_PRESETS. designs: router names for the designs table
    (`bench_routers`; None or empty: skipped) at `designs_preset` (None: the router preset's default).
    ValueError for bad arguments (before anything is timed).
    """
    dev = resolve_device(device)
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if reps < 1 or repeat < 1:
        raise ValueError(f"reps and repeat must be >= 1, got {reps} and {repeat}")
    shapes = shapes if shapes is not None else DEFAULT_SHAPES[dev.type].split(",")
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown bench shape {s!r}; choose from {', '.join(SHAPES)}")
    router_preset = DEFAULT_ROUTER_PRESET[dev.type] if router_preset is None else router_preset
    if router_preset and router_preset not in PRESETS:
        raise ValueError(f"router preset {router_preset!r} is not one of {', '.join(PRESETS)} ('' to skip)")
    amp = autocast_dtype(precision, dev)
    if step_presets is None:
        step_presets = DEFAULT_STEP_PRESETS[dev.type].split(",") if amp is not None else []
    for p in step_presets:
        if p not in PRESETS:
            raise ValueError(f"step preset {p!r} is not one of {', '.join(PRESETS)}")
    if step_optimizer not in OPTIMIZERS:
        raise ValueError(f"step optimizer {step_optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if (step_presets or torch_bf16_kernels or step_optimizer != "adamw") and amp is None:
        raise ValueError("--step-presets, --torch-bf16-kernels and --step-optimizer compare fp32 with bf16: pass --precision bf16")
    designs = list(designs or [])
    for name in designs:
        parse_router_name(name)
    designs_preset = designs_preset or DEFAULT_ROUTER_PRESET[dev.type]
    if designs and designs_preset not in PRESETS:
        raise ValueError(f"designs preset {designs_preset!r} is not one of {', '.join(PRESETS)}")
    use_device(dev)  # CUDA events and syncs act on the current device: with --device cuda:1, make it cuda:1
    env = environment(str(dev))
    preset_arg = router_preset or "''"
    command = (f"mpirouter bench --device {dev} --precision {precision} --shapes {','.join(shapes) or chr(39) * 2} --reps {reps} "
               f"--repeat {repeat} --router-preset {preset_arg}" + (f" --step-presets {','.join(step_presets) or chr(39) * 2}" if amp else "")
               + (" --torch-bf16-kernels" if torch_bf16_kernels else "") + (f" --step-optimizer {step_optimizer}" if amp else "")
               + (f" --designs {','.join(designs)} --designs-preset {designs_preset}" if designs else ""))
    printer(f"`{command}` · {describe(env)}")
    timing = "CUDA events" if dev.type == "cuda" else "wall clock"
    printer(f"Figures: median [min–max] over {repeat} repeat(s) of each repeat's median of {reps} rep(s), variants interleaved "
            f"rep by rep; ±: half that range / median; t/loop: time ÷ {BASELINE}'s, per repeat. "
            f"{'bf16 autocast' if amp else 'fp32'}, {timing}.")
    if amp is not None and not native_bf16_matmul(dev):
        printer("This CPU has no bf16 matmul kernels (oneDNN's need AVX512/AMX): bf16 matmuls are emulated in float32 and "
                "rounded to bf16, as in training (core.precision); attention runs torch's own bf16 kernel.")
    results: dict = {"env": env, "command": command, "device": str(dev), "precision": precision, "reps": reps, "repeat": repeat,
                     "shapes": {}}
    for name in shapes:
        r = bench_moe_layer(SHAPES[name], reps=reps, repeat=repeat, device=dev, amp=amp, ceiling_n=ceiling_n, hf=hf)
        print_layer_table(name, r, printer)
        results["shapes"][name] = r
    if router_preset:
        results["router"] = bench_router_share_fitting(router_preset, reps, repeat, dev, amp)
        print_router_share(router_preset, results["router"], printer)
    for preset in step_presets:
        r = bench_step_precision(preset, reps, repeat, dev, torch_bf16_kernels, step_optimizer)
        results.setdefault("step_precision", {})[preset] = r
        print_step_precision(r, printer)
    if designs:
        results["designs"] = bench_router_designs(designs_preset, designs, reps, repeat, dev, amp)
        print_router_designs(results["designs"], printer)
    return results


def print_router_share(preset: str, r: dict, printer=print) -> None:
    if "skipped" in r:
        printer(f"\nTraining step of preset {preset!r}: skipped ({r['skipped']})")
        return
    sp = {k: Spread(**v) for k, v in r["spread"].items()}
    halved = f"; batch halved from {r['batch_halved_from']} to fit in GPU memory" if r["batch_halved_from"] else ""
    printer(f"\nTraining step of preset {preset!r} ({r['batch_size']} x {r['tokens'] // r['batch_size']} = {r['tokens']} tokens, "
            f"fwd+bwd+clip+AdamW, one model with the router kind switched between steps{halved}):")
    printer(f"  linear router {fmt_range(sp['step_ms_linear'])} ms | mpi router {fmt_range(sp['step_ms_mpi'])} ms | "
            f"mpi/linear {fmt_range(sp['step_ratio'], lambda v: f'{v:.3f}')}")
    printer(f"  MPI rows φ fwd+bwd {fmt_range(sp['mpi_rows_ms'])} ms = {fmt_range(sp['mpi_rows_share'], lambda v: f'{100 * v:.2f}', '%')} "
            f"of the mpi step")


def print_step_precision(r: dict, printer=print) -> None:
    """The fp32-vs-bf16 training-step table of `bench_precision.bench_step_precision`'s result."""
    printer(f"\nTraining step of preset {r['preset']!r} in fp32 and bf16 ({r['batch_size']} x {r['tokens'] // r['batch_size']} "
            f"tokens, mpi router, fwd+bwd+clip+{r['optimizer']}, one model, variants interleaved; bf16 matmuls {r['bf16_matmuls']}):")
    for name, ms in r["repeats_ms"].items():
        ratio = r["ratio_to_fp32"].get(name)
        rat = "1 (baseline)" if ratio is None else fmt_range(Spread.of(ratio), lambda v: f"{v:.2f}")
        printer(f"  {name:<20}{fmt_range(Spread.of(ms)):<26} ms   t/fp32 {rat}")
