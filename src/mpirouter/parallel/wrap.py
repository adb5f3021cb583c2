"""Spread the built-in model over a job: DDP or FSDP2 for the dense weights, expert parallelism for the experts.

    par = parallelize(model, ctx, param_dtype=torch.bfloat16)   # model is changed in place (FSDP2) or wrapped (DDP)
    with par.micro_batch(last=i == n - 1):                     # gradients are reduced in the last micro-batch only
        par.forward(x, y).loss.backward()
    par.finish_gradients()                                      # expert gradients (EP) before clipping
    norm = par.clip_grad_norm(1.0)

- ddp: `DistributedDataParallel` over all ranks; every rank holds every dense weight.
- fsdp: FSDP2 `fully_shard` on each transformer block, then on the root (torchtitan's recipe): a
  block's weights are gathered for its forward and backward only, so a MoE layer's experts are whole
  while its router runs. With bf16 compute weights (`param_dtype`) each MoE layer is a float32 unit
  of its own (`FLOAT32`), so φ is computed from the float32 weights one process uses.
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
from ..core.moe import MoE
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
        gathered with the units inside it, one block at a time, never the whole model), e.g. for the
        alignment of one MoE layer."""
        block = next((b for b in self.model.blocks if any(m is module for m in b.modules())), None)
        units = [m for m in block.modules() if isinstance(m, FSDPModule)] if block is not None else []
        for unit in units:
            unit.unshard()
        try:
            yield module
        finally:
            for unit in units:
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


FLOAT32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
"""FSDP2's policy for the MoE layers when `parallelize` gets a `param_dtype`: float32 weights gathered,
gradients reduced in float32, inputs left as they come (the blocks' bf16 activations).

φ = C·normalize(R GᵀG) reads R and the expert matrices, parameters of the MoE layer, in the layer's
forward (not the router's: a unit of the router alone would still be sharded there), so each layer is
a unit of its own and φ comes from the float32 weights one process and DDP use; bf16-rounded R and G
shift φ, and every logit, by ~2e-3 relative (tests/parallel/test_gpu_paths.py). The same for every
router kind, so linear-vs-MPI runs stay paired. The experts' matmuls still run in bf16 (autocast casts
their float32 weights, as in one process); the cost is their gather, twice the bytes of bf16."""


def _require_autocast(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a `FLOAT32` MoE unit: its float32 experts meet bf16 activations, which only
    autocast reconciles; without it the expert matmul would fail with a dtype mismatch deep inside."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError("parallelize(param_dtype=...) keeps the MoE layers in float32: run the forward under "
                           "torch.autocast(device_type, dtype=param_dtype), as the trainer does")


def parallelize(model: MoELM, ctx: DistContext, param_dtype: torch.dtype | None = None) -> Parallelized:
    """Spread `model` (already on this rank's device, identically initialized on every rank) over the job.

    `param_dtype`: FSDP2's compute dtype for the weights (bf16 on GPU; gradients are still reduced
    in float32); None keeps them as they are. With it set (and ep = 1), each MoE layer is a float32
    unit of its own (`FLOAT32`: φ reads its weights), so a forward with a lower `param_dtype` must run
    under autocast, as the trainer's does (autocast casts the experts for their matmuls, as in one
    process); one without is refused. DDP broadcasts rank 0's weights at wrap time.
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
    # φ's inputs in float32 (`FLOAT32`); under expert parallelism R and the experts are float32 DTensors
    # that FSDP2 leaves alone, and φ comes from their shards already
    own_units = param_dtype is not None and not experts
    for block in model.blocks:
        for moe in [m for m in block.modules() if isinstance(m, MoE)] if own_units else []:
            fully_shard(moe, mesh=mesh, mp_policy=FLOAT32, ignored_params=ignored)
            if param_dtype != torch.float32:  # before FSDP2's all-gather
                moe.register_forward_pre_hook(_require_autocast, prepend=True)
        fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=ignored)
    return Parallelized(model, model, ctx, list(experts.values()))
