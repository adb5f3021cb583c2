"""One optimizer step with no host-device synchronization, and the on-device record of what it did.

    out = train_step(model, forward, optimizer, batches, amp=None, grad_clip=1.0)   # tensors stay on the device
    watch.update(step, out)                                                          # still no host read
    values = out.read()                                                              # at log time: one read

On a GPU the host queues a step's kernels and runs ahead; every `.item()`, `bool(tensor)` or
data-dependent shape makes it wait for the device, and a small model's step is shorter than
those waits. So a step returns its scalars as device tensors, the non-finite check is a device
flag (`NonFiniteWatch`) read where the loop reads anyway (log, eval and checkpoint steps: a
checkpoint also verifies every weight is finite before it is written), and timing uses CUDA
events (`device.StepTimer`). On CPU the same code runs; there a "sync" costs nothing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from ..core.model import MoELM, ModelOutput
from ..core.routing import max_violation
from ..core.precision import autocast, bf16_matmuls
from ..core.routers import RowsPerStep
from ..parallel.env import DistContext, all_reduce_sum
from ..parallel.wrap import Parallelized


class StepOutput(NamedTuple):
    """One optimizer step's scalars: 0-dim float64 tensors on the model's device (means over micro-batches)."""

    loss: torch.Tensor
    """Training loss (lm + aux + z)."""
    lm_loss: torch.Tensor
    """Next-token cross-entropy."""
    aux_loss: torch.Tensor
    """Load-balancing loss, scaled by its coefficient, summed over layers."""
    max_vio: torch.Tensor
    """Batch MaxVio, mean over MoE layers."""
    grad_norm: torch.Tensor
    """Global gradient norm before clipping."""
    tokens_per_expert_NLE: torch.Tensor | None = None
    """Routed slots per micro-batch, MoE layer and expert on this rank (multi-process runs: MaxVio over the global batch)."""

    def read(self, ctx: DistContext | None = None) -> dict[str, float]:
        """The values on the host: one synchronization for all of them.

        In a multi-process job (`ctx`) the losses are means over ranks, i.e. over the global batch
        (ranks hold equal token counts), and MaxVio is computed from the expert counts summed over
        ranks: the global batch's MaxVio per micro-batch and layer, averaged as in one process.
        Every rank must call it at the same step (one all-reduce).
        """
        scalars = torch.stack([t.to(torch.float64) for t in self[:5]])
        if ctx is None or self.tokens_per_expert_NLE is None:
            return dict(zip(self._fields[:5], scalars.tolist()))  # sync point: log steps only
        counts_NLE = self.tokens_per_expert_NLE
        summed = all_reduce_sum(ctx, torch.cat([scalars, counts_NLE.flatten().to(torch.float64)]))
        means = summed[:5] / ctx.world_size
        global_NLE = summed[5:].view(counts_NLE.shape)
        # as in one process: MaxVio per layer in float32, mean over layers, then over micro-batches
        vio = torch.stack([torch.stack([max_violation(c_E) for c_E in c_LE]).double().mean() for c_LE in global_NLE]).mean()
        values = dict(zip(self._fields[:5], means.tolist()))  # sync point: log steps only
        values["max_vio"] = float(vio)
        return values


def micro_batch_scalars(out: ModelOutput) -> torch.Tensor:
    """(loss, lm_loss, aux_loss, max_vio) of one forward pass as a float64 (4,) tensor, without leaving the device."""
    vio = torch.stack([s.max_vio for s in out.moe_stats]).double().mean() if out.moe_stats else out.loss.new_zeros((), dtype=torch.float64)
    return torch.stack([out.loss.detach().double(), out.lm_loss.detach().double(), out.aux_loss.detach().double(), vio])


def train_step(
    model: MoELM,
    forward: Callable[..., ModelOutput],
    optimizer,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    amp: torch.dtype | None,
    grad_clip: float,
    par: Parallelized | None = None,
) -> StepOutput:
    """Forward and backward over `batches` (the micro-batches), clip, optimizer step, post-step hook.

    `forward` is the model or its compiled wrapper; `model` the module itself (for the routers'
    rows, the parameters and the post-step hook). With several micro-batches φ is computed once
    for the step (`RowsPerStep`). Nothing here reads a tensor on the host.

    `par`: this rank's share of a multi-process job (`forward` is then `par.forward` or its compiled
    wrapper); gradients are reduced across ranks in the last micro-batch, and φ is computed in each
    micro-batch's forward, where DDP and FSDP2 expect every use of the weights.
    """
    if par is not None:
        return _parallel_train_step(par, forward, optimizer, batches, amp, grad_clip)
    n = len(batches)
    device = batches[0][0].device
    rows = model.router_rows() if n > 1 else None
    shared = RowsPerStep(rows, n) if rows is not None else None
    sums = None
    with bf16_matmuls(device, amp):  # bf16 matmuls emulated on a CPU without bf16 kernels (core.precision)
        for i, (x, y) in enumerate(batches):
            with autocast(device, amp):
                out = forward(x, y, router_rows=shared.for_micro_batch(i)) if shared is not None else forward(x, y)
            (out.loss / n).backward()
            scalars = micro_batch_scalars(out)
            sums = scalars if sums is None else sums + scalars
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.post_step()
    means = sums / n
    return StepOutput(means[0], means[1], means[2], means[3], grad_norm.detach().double())


def _parallel_train_step(par: Parallelized, forward, optimizer, batches, amp, grad_clip: float) -> StepOutput:
    n = len(batches)
    device = batches[0][0].device
    sums, counts = None, []
    for i, (x, y) in enumerate(batches):
        with par.micro_batch(last=i == n - 1), bf16_matmuls(device, amp):
            with autocast(device, amp):
                out = forward(x, y)
            (out.loss / n).backward()
        scalars = micro_batch_scalars(out)
        sums = scalars if sums is None else sums + scalars
        if out.moe_stats:
            counts.append(torch.stack([s.tokens_per_expert_E for s in out.moe_stats]))
    par.finish_gradients()
    grad_norm = par.clip_grad_norm(grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    par.model.post_step()
    means = sums / n
    counts_NLE = torch.stack(counts) if counts else None
    return StepOutput(means[0], means[1], means[2], means[3], grad_norm.detach().double(), counts_NLE)


class NonFiniteWatch:
    """The first step whose loss or gradient norm was NaN/inf, kept on the device until `check` reads it."""

    def __init__(self, device: torch.device):
        self.first = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64, device=device)
        """(step, loss, grad_norm) of the first non-finite step; step -1: none yet."""

    def update(self, step: int, out: StepOutput) -> None:
        bad = ~(torch.isfinite(out.loss) & torch.isfinite(out.grad_norm))
        take = bad & (self.first[0] < 0)
        candidate = torch.stack([torch.full_like(out.loss, float(step)), out.loss, out.grad_norm])
        self.first = torch.where(take, candidate, self.first)

    def check(self) -> str | None:
        """None if every step so far was finite, else a sentence naming the first bad step (one host read)."""
        step, loss, grad_norm = self.first.tolist()  # sync point: log, eval and checkpoint steps only
        if step < 0:
            return None
        if not torch.isfinite(torch.tensor(loss)):
            return f"loss became {loss} at step {int(step)}"
        return f"gradient norm became {grad_norm} at step {int(step)}"
