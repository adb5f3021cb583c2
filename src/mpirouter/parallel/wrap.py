"""Spread the built-in model over a job: DDP or FSDP2 for the dense weights, expert parallelism for the experts.

    par = parallelize(model, ctx, param_dtype=torch.bfloat16)   # model is changed in place (FSDP2) or wrapped (DDP)
    with par.micro_batch(last=i == n - 1):                     # gradients are reduced in the last micro-batch only
        par.forward(x, y).loss.backward()
    par.finish_gradients()                                      # expert gradients (EP) before clipping
    norm = par.clip_grad_norm(1.0)

- ddp: `DistributedDataParallel` over all ranks; every rank holds every dense weight.
- fsdp: FSDP2 `fully_shard` on each transformer block, then on the root (torchtitan's recipe): a
  block's weights are gathered for its forward and backward only. The MPI rows need nothing special:
  a block is one FSDP unit, so its experts are whole while its router runs.
- ep > 1 (`parallel.expert`): the experts and their router rows are split over the "ep" mesh
  dimension and left out of DDP/FSDP; their gradients are reduced by `finish_gradients`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..core.model import MoELM
from .env import DistContext, world_mesh
from .expert import expert_parameters, reduce_expert_grads, shard_experts


@dataclass
class Parallelized:
    """The model of one rank and how to step it."""

    model: MoELM
    """The module itself (FSDP2 changes it in place; DDP wraps it): parameters, post_step, evaluation."""
    forward: nn.Module
    """What the training step calls: the DDP wrapper or the (FSDP2) model."""
    ctx: DistContext
    """The job."""
    expert_params: list[nn.Parameter] = field(default_factory=list)
    """Parameters split by expert parallelism (reduced by `finish_gradients`, not by DDP/FSDP)."""

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Run one micro-batch's forward and backward; gradients are reduced across ranks only in the last one."""
        if isinstance(self.forward, DistributedDataParallel) and not last:
            with self.forward.no_sync():
                yield
            return
        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(last)
        yield

    def finish_gradients(self) -> None:
        """After the last backward: reduce the expert-parallel gradients (no-op without EP)."""
        if self.expert_params:
            reduce_expert_grads(self.model, self.ctx.world_size)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm over every rank's gradients; returns the norm before clipping
        as a plain 0-dim tensor on the device (no host read)."""
        if not self.expert_params:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            return norm.full_tensor() if isinstance(norm, DTensor) else norm
        experts = {id(p) for p in self.expert_params}
        dense = [p.grad for p in self.model.parameters() if p.grad is not None and id(p) not in experts]
        sharded = [p.grad for p in self.expert_params if p.grad is not None]
        return clip_mixed_(dense, sharded, max_norm, self.expert_group)

    @property
    def expert_group(self) -> dist.ProcessGroup:
        return self.ctx.ep_mesh.get_group()

    @contextlib.contextmanager
    def whole(self, module: nn.Module) -> Iterator[nn.Module]:
        """`module` with its weights whole on this rank (under FSDP2 the transformer block holding it is
        gathered, one block at a time, never the whole model), e.g. for the alignment of one MoE layer."""
        unit = next((b for b in self.model.blocks if isinstance(b, FSDPModule) and any(m is module for m in b.modules())), None)
        if unit is None:
            yield module
            return
        unit.unshard()
        try:
            yield module
        finally:
            unit.reshard()


def clip_mixed_(dense: list[torch.Tensor], sharded: list[torch.Tensor], max_norm: float,
                expert_group: dist.ProcessGroup) -> torch.Tensor:
    """Clip gradients of two kinds to one global norm: `dense` (whole, or FSDP2 shards of the data-parallel
    mesh) and `sharded` (expert-parallel shards, equal across data-parallel replicas after
    `reduce_expert_grads`). ‖g‖² = ‖dense‖² + Σ over the EP group of each rank's ‖expert shard‖².
    Returns the norm before clipping; no host read (torch's clip_grad_norm_ mixes neither meshes nor kinds)."""
    device = (dense or sharded)[0].device
    dense_sq = torch.zeros((), device=device, dtype=torch.float32)
    if dense:
        norm = torch.nn.utils.get_total_norm(dense)
        dense_sq = (norm.full_tensor() if isinstance(norm, DTensor) else norm).float().square()
    local = [g.to_local() if isinstance(g, DTensor) else g for g in sharded]
    expert_sq = torch.nn.utils.get_total_norm(local).float().square() if local else dense_sq.new_zeros(())
    dist.all_reduce(expert_sq, group=expert_group)
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in dense + local:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total


def parallelize(model: MoELM, ctx: DistContext, param_dtype: torch.dtype | None = None) -> Parallelized:
    """Spread `model` (already on this rank's device, identically initialized on every rank) over the job.

    `param_dtype`: FSDP2's compute dtype for the weights (bf16 on GPU; gradients are still reduced
    in float32); None keeps them as they are. DDP broadcasts rank 0's weights at wrap time.
    Every rank reads its own data, so the dense weights are data-parallel over all ranks, also
    under expert parallelism (whose experts DDP/FSDP2 leave alone).
    """
    device = next(model.parameters()).device
    experts: dict[str, nn.Parameter] = {}
    if ctx.config.ep > 1:
        shard_experts(model, ctx.mesh)
        experts = expert_parameters(model)
    mesh = world_mesh(ctx)
    if ctx.config.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        if experts:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(experts))
        ddp = DistributedDataParallel(model, device_ids=ids, process_group=mesh.get_group())
        return Parallelized(model, ddp, ctx, list(experts.values()))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype is not None else None)
    ignored = set(experts.values()) or None
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    return Parallelized(model, model, ctx, list(experts.values()))
