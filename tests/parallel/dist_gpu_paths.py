"""torchrun --nproc_per_node=2 tests/parallel/dist_gpu_paths.py OUT_DIR: what a CUDA job runs that CPU defaults skip.

Two GPU-only paths, taken here on 2 CPU ranks (gloo); tests/parallel/test_gpu_paths.py reads OUT_DIR/rank{R}.pt.

- Optimizer kernels (`cuda_kernels`): on CUDA, AdamW runs torch's fused kernel (`build.fused_adamw_supported`)
  and torch.optim.Adam (AdamH's base) its foreach kernels (torch's default there); both take a param
  group's tensors as one list, which must not mix plain tensors and DTensors (expert parallelism under
  DDP: DTensor expert stacks beside plain attention matrices); FSDP2 + EP mixes DTensors of two meshes.
  Every optimizer x {ddp, fsdp} x {ep 1, ep 2}: `STEPS` steps with CUDA's kernels, with a round trip of
  the optimizer state through `get/set_optimizer_state_dict` after the first, against the same run with
  CPU's for-loop kernels.
- FSDP2's bf16 compute weights (`parallelize(..., param_dtype=torch.bfloat16)` under bf16 autocast, as the
  trainer runs it on a GPU): the router rows φ each MoE layer routes with, captured inside the forward,
  against φ computed in float32 from the same weights outside it; also φ inside `Parallelized.whole`.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.optim.optimizer as torch_optimizer
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import mpirouter.optim.build as build
from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.routers import router_rows
from mpirouter.optim import OptimConfig, build_optimizer, resolve_lrs, torch_optimizers
from mpirouter.parallel.config import DistConfig
from mpirouter.parallel.env import init_distributed
from mpirouter.parallel.wrap import parallelize

VOCAB, SEQ, LOCAL_BATCH, STEPS = 256, 16, 2, 2
OPTIMIZERS: dict[str, dict] = {
    "adamw": dict(name="adamw"),
    "muon": dict(name="muon"),
    "adamh": dict(name="adamh"),
    "muonh": dict(name="muonh"),
    "muonh-router-adamw": dict(name="muonh", router="adamw"),
}
LAYOUTS = (("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2))
ROUTER_KINDS = ("mpi", "linear")


@contextlib.contextmanager
def cuda_kernels():
    """The optimizer kernels a CUDA job gets, on CPU: `fused_adamw_supported` without its CUDA condition
    (fused AdamW on CPU: float32, torch >= 2.4) and torch's default foreach choice with CPU counted in."""
    fused, devices = build.fused_adamw_supported, torch_optimizer._get_foreach_kernels_supported_devices
    build.fused_adamw_supported = lambda params: bool(params) and all(p.is_floating_point() for p in params)
    torch_optimizer._get_foreach_kernels_supported_devices = lambda: [*devices(), "cpu"]
    try:
        yield
    finally:
        build.fused_adamw_supported, torch_optimizer._get_foreach_kernels_supported_devices = fused, devices


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, VOCAB, (2 * LOCAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    local = idx.chunk(2)[rank]
    return local[:, :-1], local[:, 1:]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def train(optim: str, strategy: str, ep: int, forced: bool) -> dict:
    """`STEPS` steps of the debug model on `strategy` x `ep`; the parameters the Adam-family optimizers update,
    before and after."""
    ctx = init_distributed(DistConfig(strategy=strategy, ep=ep), torch.device("cpu"))
    cfg = OptimConfig(**OPTIMIZERS[optim])
    lr, adam_lr = resolve_lrs(cfg)
    cfg = OptimConfig(**OPTIMIZERS[optim], lr=lr, adam_lr=adam_lr)
    torch.manual_seed(0)
    model = MoELM(preset_config("debug", vocab_size=VOCAB, max_seq_len=SEQ))
    par = parallelize(model, ctx)
    x, y = batch(ctx.rank)
    out: dict = {"error": None, "init": {n: full(p) for n, p in model.named_parameters()}}
    with cuda_kernels() if forced else contextlib.nullcontext():
        opt = build_optimizer(model, cfg)
        out["kernels"] = [(type(o).__name__, o.defaults.get("fused"), o.defaults.get("foreach")) for o in torch_optimizers(opt)]
        out["groups"] = [(g["name"], len(g["params"])) for g in opt.param_groups]
        try:
            for step in range(STEPS):
                with par.micro_batch(last=True):
                    par.forward(x, y).loss.backward()
                par.finish_gradients()
                opt.step()
                opt.zero_grad(set_to_none=True)
                model.post_step()
                if step == 0:  # through the name-keyed form a sharded checkpoint holds
                    state = get_optimizer_state_dict(model, torch_optimizers(opt))
                    out["state_groups"] = len(state["param_groups"])
                    set_optimizer_state_dict(model, torch_optimizers(opt), state)
        except Exception as e:  # every rank fails alike (same layout): record it, go on with the next case
            out["error"] = error_line(e)
            if ctx.rank == 0:
                traceback.print_exc()
            return out
    names = {id(p): n for n, p in model.named_parameters()}
    adam = {names[id(p)] for o in torch_optimizers(opt) if isinstance(o, torch.optim.Adam) for g in o.param_groups for p in g["params"]}
    out["final"] = {n: full(p) for n, p in model.named_parameters() if n in adam}
    out["init"] = {n: w for n, w in out["init"].items() if n in adam}
    return out


def optimizer_cases() -> dict:
    """Every optimizer in every layout with CUDA's kernels against CPU's: ‖W_cuda − W_cpu‖ / ‖W_cpu − W_0‖, worst parameter."""
    results = {}
    for optim in OPTIMIZERS:
        for strategy, ep in LAYOUTS:
            case = f"{optim} {strategy} ep{ep}"
            forced = train(optim, strategy, ep, forced=True)
            default = train(optim, strategy, ep, forced=False)
            res = {k: v for k, v in forced.items() if k not in ("init", "final")}
            res["default_groups"] = default["groups"]
            if forced["error"] is None:
                ref, init = default["final"], default["init"]
                res["adam_params"] = len(ref)
                res["max_diff"] = max(((forced["final"][n] - ref[n]).norm() / (ref[n] - init[n]).norm()).item() for n in ref)
            results[case] = res
    return results


def phi_cases() -> dict:
    """FSDP2 with bf16 compute weights under bf16 autocast: φ inside the forward vs φ in float32 from the same weights."""
    results = {}
    for kind in ROUTER_KINDS:
        for ep in (1, 2):
            ctx = init_distributed(DistConfig(strategy="fsdp", ep=ep), torch.device("cpu"))
            torch.manual_seed(0)
            model = MoELM(preset_config("debug", vocab_size=VOCAB, max_seq_len=SEQ, moe=dict(router=dict(kind=kind))))
            par = parallelize(model, ctx, param_dtype=torch.bfloat16)
            layers = model.moe_layers()
            seen: dict[int, torch.Tensor] = {}
            for i, moe in enumerate(layers):
                moe.router.register_forward_pre_hook(
                    lambda mod, args, kwargs, i=i: seen.__setitem__(i, kwargs["rows_ED"].detach().clone()), with_kwargs=True)
            x, y = batch(ctx.rank)
            res: dict = {"error": None}
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = par.forward(x, y).loss
                loss.backward()
                par.finish_gradients()
                res["grads_finite"] = all(bool(full(p.grad).isfinite().all()) for p in model.parameters() if p.grad is not None)
                ref = [router_rows(kind, full(m.router.weight), full(m.w_gate), scale=m.router.scale) for m in layers]
                res["forward_err"] = max(((seen[i] - r).norm() / r.norm()).item() for i, r in enumerate(ref))
                # φ from bf16-rounded weights: the size of the error this guards against
                bf16 = [router_rows(kind, full(m.router.weight).bfloat16(), full(m.w_gate).bfloat16(), scale=m.router.scale) for m in layers]
                res["bf16_err"] = max(((b - r).norm() / r.norm()).item() for b, r in zip(bf16, ref))
                whole = []
                for m, r in zip(layers, ref):
                    with par.whole(m):  # e.g. the trainer's alignment: the layer's weights whole, float32
                        whole.append(((full(m.router_rows()) - r).norm() / r.norm()).item())
                res["whole_err"] = max(whole)
                if kind == "mpi" and ep == 1:
                    try:
                        par.forward(x, y)
                        res["without_autocast"] = None
                    except RuntimeError as e:
                        res["without_autocast"] = str(e)
            except Exception as e:
                res["error"] = error_line(e)
                if ctx.rank == 0:
                    traceback.print_exc()
            results[f"{kind} ep{ep}"] = res
    return results


def nested_unit_gradients(rank: int) -> dict:
    """With a MoE layer a unit of its own inside its block's (param_dtype float32: the unit structure of bf16,
    no rounding), two micro-batches' gradients equal DDP's: relative error per parameter."""
    grads = {}
    for strategy in ("ddp", "fsdp"):
        ctx = init_distributed(DistConfig(strategy=strategy), torch.device("cpu"))
        torch.manual_seed(0)
        model = MoELM(preset_config("debug", vocab_size=VOCAB, max_seq_len=SEQ))
        par = parallelize(model, ctx, param_dtype=torch.float32 if strategy == "fsdp" else None)
        x, y = batch(rank)
        for micro in range(2):
            with par.micro_batch(last=micro == 1):
                par.forward(x[micro:micro + 1], y[micro:micro + 1]).loss.backward()
        grads[strategy] = {n: full(p.grad) for n, p in model.named_parameters()}
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    errs = {n: ((grads["fsdp"][n] - g).norm() / g.norm()).item() for n, g in grads["ddp"].items()}
    return {"units": units, "max_err": max(errs.values()), "worst": max(errs, key=errs.get)}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    ctx = init_distributed(DistConfig(), torch.device("cpu"))
    with cuda_kernels():  # the switch does what a CUDA job gets: fused AdamW, foreach Adam
        probe = [torch.nn.Parameter(torch.ones(2))]
        switched = (build.fused_adamw_supported(probe), torch_optimizer._default_to_fused_or_foreach(probe, False))
    results = {"switch": switched, "optimizers": optimizer_cases(), "phi": phi_cases(),
               "nested": nested_unit_gradients(ctx.rank)}
    torch.save(results, out / f"rank{ctx.rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
