"""The GPU tier: bf16 numerics against float32 on CPU, the CUDA dispatch, a step with zero host syncs, a short run;
and its CPU twin: the checks that need no CUDA also run with device cpu in `make test`.

    pytest -m gpu                      # the CUDA cases, on a machine with CUDA; everywhere else they skip
    pytest tests/gpu -k cpu            # the CPU twin: bf16 autocast on this CPU (core.precision emulates bf16
                                       # matmuls where the CPU has no bf16 kernels, with the same numerics)

The twin of the sync check is tests/trainer/test_step.py (the sync proxy runs a bf16 step on CPU).

Tolerances: bf16 has an 8-bit mantissa (relative rounding 2^-8 ≈ 0.4%) and the expert matmuls
accumulate over D or F terms, so outputs are compared in relative Frobenius norm: 2% for the
MoE output and its input gradient, 3% for weight gradients (a sum over all tokens), and 0.02
absolute (nats) for a model's loss. The router logits stay float32 under autocast, so the
top-k choice matches the CPU's except at near-ties; the data here is random, where ties are rare.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.dispatch import choose_dispatch
from mpirouter.core.experts import grouped_linear
from mpirouter.core.moe import MoE, MoEConfig
from mpirouter.core.precision import autocast, bf16_matmuls, native_bf16_matmul
from mpirouter.core.routers import RouterConfig
from mpirouter.optim import OptimConfig, build_optimizer
from mpirouter.trainer.config import TrainConfig
from mpirouter.trainer.device import StepTimer
from mpirouter.trainer.loop import train
from mpirouter.trainer.schedule import ScheduleConfig
from mpirouter.trainer.step import NonFiniteWatch, train_step

NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NEEDS_CUDA)]
"""Where a check needs no CUDA: bf16 autocast on this CPU, and on the GPU."""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def hopper_or_later() -> bool:
    """SM 9.x/10.x: where torch's fast grouped_mm kernel runs (core/dispatch.py); SM 12.x falls back."""
    return torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "mpi"])
def test_bf16_moe_layer_matches_fp32_on_cpu(kind, device):
    torch.manual_seed(0)
    cpu = MoE(256, MoEConfig(num_experts=8, top_k=2, hidden=512, router=RouterConfig(kind=kind)))
    gpu = copy.deepcopy(cpu).to(device)
    x = torch.randn(4, 128, 256)
    x_cpu, x_gpu = x.clone().requires_grad_(), x.to(device).requires_grad_()
    out_cpu, _ = cpu(x_cpu)
    g = torch.randn_like(out_cpu)
    with bf16_matmuls(device):
        with autocast(device, torch.bfloat16):
            out_gpu, _ = gpu(x_gpu)
        out_gpu.float().backward(g.to(device))
    out_cpu.backward(g)
    assert rel_err(out_gpu.cpu(), out_cpu) < 0.02
    assert rel_err(x_gpu.grad.cpu(), x_cpu.grad) < 0.02
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        assert rel_err(p_gpu.grad.cpu(), p_cpu.grad) < 0.03, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["debug", "tiny"])
def test_bf16_model_loss_matches_fp32_on_cpu(preset, device):
    torch.manual_seed(0)
    cpu = MoELM(preset_config(preset))
    gpu = copy.deepcopy(cpu).to(device)
    idx = torch.randint(cpu.config.vocab_size, (4, 64))
    loss_cpu = cpu(idx, idx).lm_loss
    with bf16_matmuls(device):
        with autocast(device, torch.bfloat16):
            loss_gpu = gpu(idx.to(device), idx.to(device)).lm_loss
        loss_gpu.backward()
    loss_cpu.backward()
    assert abs(loss_gpu.item() - loss_cpu.item()) < 0.02
    assert rel_err(gpu.tok_emb.weight.grad.cpu(), cpu.tok_emb.weight.grad) < 0.05


@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=NEEDS_CUDA)])
def test_auto_dispatch_on_this_gpu(_):
    expected = "grouped_mm" if hopper_or_later() and hasattr(torch, "_grouped_mm") else "loop"
    assert choose_dispatch(CUDA, torch.bfloat16) == expected
    assert choose_dispatch(CUDA, torch.float32) == "loop"


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_mm_matches_the_loop_in_bf16(device):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    torch.manual_seed(0)
    counts_E = torch.tensor([5, 0, 17, 3, 40, 1, 0, 6], device=device)
    x_MI = torch.randn(int(counts_E.sum()), 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    w_EOI = torch.randn(8, 64, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    outs, grads = {}, {}
    for impl in ("loop", "grouped_mm"):
        with bf16_matmuls(device):
            out = grouped_linear(x_MI, w_EOI, counts_E, impl)
            gx, gw = torch.autograd.grad(out.float().square().sum(), [x_MI, w_EOI])
        outs[impl], grads[impl] = out, (gx, gw)
    assert rel_err(outs["grouped_mm"], outs["loop"]) < 1e-2
    for a, b in zip(grads["grouped_mm"], grads["loop"]):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize("_", [pytest.param(None, id="cuda", marks=NEEDS_CUDA)])
def test_fused_adamw_on_cuda(_):
    model = MoELM(preset_config("debug")).to(CUDA)
    assert build_optimizer(model, OptimConfig()).defaults.get("fused") is True


@pytest.mark.parametrize("accum,batch", [pytest.param(1, 8, id="one-micro-batch", marks=NEEDS_CUDA),
                                         pytest.param(2, 8, id="two-micro-batches", marks=NEEDS_CUDA),
                                         pytest.param(1, 32, id="4096-tokens", marks=NEEDS_CUDA)])
def test_a_training_step_never_syncs(accum, batch):
    """Between log steps: zero host-device synchronizations (torch raises on the first one).

    4096 tokens: above 3072 indices torch's embedding backward takes another (sort-based) CUDA path.
    """
    if not hopper_or_later():
        pytest.skip("the sync-free dispatch (bf16 grouped_mm) needs compute capability >= 9.0")
    torch.manual_seed(0)
    cfg = preset_config("tiny")
    model = MoELM(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router=RouterConfig(kind="mpi")))).to(CUDA)
    opt = build_optimizer(model, OptimConfig())
    V = cfg.vocab_size
    batches = [(torch.randint(V, (batch, 128), device=CUDA), torch.randint(V, (batch, 128), device=CUDA)) for _ in range(accum)]
    watch, timer = NonFiniteWatch(CUDA), StepTimer(CUDA)
    train_step(model, model, opt, batches, torch.bfloat16, 1.0)  # first step: lazy state allocation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3):
            timer.start()
            out = train_step(model, model, opt, batches, torch.bfloat16, 1.0)
            watch.update(step, out)
            timer.stop()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert watch.check() is None and len(timer.read()) == 3 and out.read()["loss"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_short_run_learns(tmp_path, device):
    cfg = TrainConfig(model=preset_config("debug"), steps=40, batch_size=8, eval_every=0, log_every=5, device=device, precision="bf16",
                      out_dir=str(tmp_path / "run"), progress=False, schedule=ScheduleConfig(warmup_steps=4), optim=OptimConfig(lr=1e-2))
    said = []
    result = train(cfg, say=said.append)
    losses = [r["lm_loss"] for r in result.history if r.get("event") == "train"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert result.final_eval["val_loss"] < losses[0]
    # the run says when its bf16 matmuls are emulated (a CPU without bf16 kernels), and only then
    assert any("matmuls run in float32 on the bf16 operands" in line for line in said) is not native_bf16_matmul(device)


@pytest.mark.parametrize("strategy,ep", [pytest.param("fsdp", 1, id="fsdp", marks=NEEDS_CUDA),
                                         pytest.param("ddp", 1, id="ddp", marks=NEEDS_CUDA)])
def test_one_gpu_under_torchrun_matches_the_single_process_trainer(tmp_path, torchrun, strategy, ep):
    """NCCL with one rank: the distributed path (bf16 FSDP2 mixed precision or DDP) against the plain trainer."""
    common = ["--preset", "debug", "--steps", "20", "--batch-size", "8", "--device", "cuda", "--set", "progress=false",
              "--set", "eval_every=0", "--set", "log_every=1"]
    torchrun("-m", 1, "mpirouter", "train", *common, "--out", str(tmp_path / "dist"), "--set", f"dist.strategy={strategy}",
             "--set", f"dist.ep={ep}", timeout=300)
    single = train(_cfg_from(common, tmp_path / "single"), say=lambda *_: None)
    dist_losses = [r["lm_loss"] for r in _records(tmp_path / "dist")]
    single_losses = [r["lm_loss"] for r in single.history if r["event"] == "train"]
    assert len(dist_losses) == len(single_losses) == 20
    assert max(abs(a - b) for a, b in zip(dist_losses, single_losses)) < 0.05  # bf16: both drift from fp32 alike


def _records(run) -> list[dict]:
    import json

    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == "train"]


def _cfg_from(argv: list[str], out) -> TrainConfig:
    from mpirouter.cli import build_parser, explicit_flags, train_config

    parser = build_parser()
    argv = [*argv, "--out", str(out)]
    args = parser.parse_args(["train", *argv])
    return train_config(args, explicit_flags(parser.subcommands["train"], argv))
