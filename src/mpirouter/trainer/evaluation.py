"""Evaluation of a model during and after training: validation loss, load balance, alignment, router cost.

    result = evaluate(model, data.val_ids, cfg, device)      # one host read per batch: evals are sync points
"""

from __future__ import annotations

import contextlib
import math
import statistics
from typing import Callable, ContextManager

import torch

from ..core.model import MoELM
from ..core.moe import MoE
from ..core.routing import max_violation
from ..core.precision import autocast, bf16_matmuls
from .config import TrainConfig
from .data import iter_eval_batches
from .device import StepTimer, autocast_dtype


@torch.no_grad()
def evaluate(model: MoELM, val_ids: torch.Tensor, cfg: TrainConfig, device: torch.device, max_batches: int | None = None,
             prefix_batches: int | None = None, whole: Callable[[MoE], ContextManager] | None = None) -> dict:
    """Validation loss/perplexity, MaxVio per layer over the batches seen, alignment per layer.

    max_batches caps the pass at the first batches of the split (`val_scope` "prefix"), else the
    whole split is read ("whole"). prefix_batches additionally reports `val_loss_prefix` and
    `maxvio_prefix` over the first that many batches of the same pass: the capped periodic evals'
    estimator, so a curve can use one estimator at every point (the two differ systematically).
    `whole(moe)`: a context in which that MoE layer's weights are whole, for its alignment (FSDP2
    gathers its block: `parallel.wrap.Parallelized.whole`); None: they are.
    """
    was_training = model.training
    model.eval()
    amp = autocast_dtype(cfg.precision, device)
    total_loss, total_tokens, batches = 0.0, 0, 0
    loads = prefix = None
    for x, y in iter_eval_batches(val_ids, cfg.eval_batch_size, cfg.context, max_batches):
        x, y = x.to(device), y.to(device)
        with bf16_matmuls(device, amp), autocast(device, amp):
            out = model(x, y)
        total_loss += out.lm_loss.item() * y.numel()
        total_tokens += y.numel()
        batches += 1
        counts = torch.stack([s.tokens_per_expert_E for s in out.moe_stats])
        loads = counts if loads is None else loads + counts
        if batches == prefix_batches:
            prefix = (total_loss / total_tokens, loads.clone())
    model.train(was_training)
    whole_batches = -(-((val_ids.numel() - 1) // cfg.context) // cfg.eval_batch_size)
    val_loss = total_loss / max(1, total_tokens)
    maxvio_L = [max_violation(l).item() for l in loads] if loads is not None else []
    result = {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_tokens": total_tokens,
        "val_batches": batches,
        "val_scope": "whole" if batches == whole_batches else "prefix",
        "maxvio_layers": maxvio_L,
        "maxvio": statistics.fmean(maxvio_L) if maxvio_L else 0.0,
        "maxvio_max": max(maxvio_L) if maxvio_L else 0.0,
    }
    if prefix_batches is not None:
        loss_p, loads_p = prefix if prefix is not None else (val_loss, loads)  # the split has no more batches
        result["val_loss_prefix"] = loss_p
        result["maxvio_prefix"] = statistics.fmean(max_violation(l).item() for l in loads_p) if loads_p is not None else 0.0
    result.update(alignment_summary(model, whole))
    return result


@torch.no_grad()
def alignment_summary(model: MoELM, whole: Callable[[MoE], ContextManager] | None = None) -> dict:
    """Mean |cos| of φ and of raw R with the experts' top singular directions, per layer and overall."""
    phi, raw = [], []
    for moe in model.moe_layers():
        with (whole or contextlib.nullcontext)(moe):
            a = moe.alignment()
        phi.append(a["phi"].mean().item())
        raw.append(a["raw"].mean().item())
    return {
        "align_layers": phi,
        "align": statistics.fmean(phi) if phi else 0.0,
        "align_raw_layers": raw,
        "align_raw": statistics.fmean(raw) if raw else 0.0,
    }


def router_cost_ms(model: MoELM, tokens: int = 0, reps: int = 10, amp: torch.dtype | None = None) -> float:
    """Median ms of every layer's router work forward + backward for `tokens` tokens (`MoE.router_work`):
    the rows φ, the logits and the router's own losses (ERC, SimBal), under the training's autocast `amp`.

    With tokens=0 it is the token-independent part alone: computing φ, which streams the expert gate
    weights and writes their gradient (the MPI overhead).
    """
    moes = model.moe_layers()
    params = [p for m in moes for p in (*m.router.parameters(), m.w_gate, m.w_up) if p.requires_grad]
    device = model.tok_emb.weight.device
    x_TD = torch.randn(tokens, model.config.dim, generator=torch.Generator().manual_seed(0)).to(device)
    timer = StepTimer(device)  # the same clock as the training step's (CUDA events on a GPU)
    for i in range(reps + 2):
        timer.start()
        with autocast(device, amp), bf16_matmuls(device, amp):
            loss = sum(m.router_work(x_TD) for m in moes)
        if loss.requires_grad:
            torch.autograd.grad(loss, params, allow_unused=True)
        timer.stop()
        if i < 2:
            timer.read()  # warm-up
    return 1000 * statistics.median(timer.read())
