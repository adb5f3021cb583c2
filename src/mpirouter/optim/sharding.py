"""Per-matrix operations on sharded (DTensor) parameters: whole matrices, wherever the shards are.

Under FSDP2 (``fully_shard``) every parameter is a DTensor sharded Shard(0) over the
data-parallel mesh; with expert parallelism the expert stacks (E, F, D) may also be sharded over
an expert-parallel mesh. Muon's Newton-Schulz and Hyperball's norms act on each matrix as a
whole, so for them a DTensor splits into two kinds of mesh dims:

- shards of a leading (stack, i.e. expert) dim: every matrix is whole on its rank (FSDP2 shards
  dim 0 in ``torch.chunk`` pieces, e.g. E = 3 over 2 ranks as 2 + 1 experts, never a partial
  expert), so the operation runs where the data is, with no communication;
- shards of a matrix dim (Shard(0) of a 2-D weight): the matrices are split and must be gathered
  (`on_whole_matrices`) or reduced (per-matrix norms: DTensor's own reductions do that).

`whole_matrix_placements` keeps the first kind and replicates the second. `layout_parts` splits a
list of parameters into lists that a foreach or fused kernel may take as one.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.placement_types import Placement


def whole_matrix_placements(placements: tuple[Placement, ...], ndim: int, matrix_dims: int = 2) -> tuple[Placement, ...]:
    """``placements`` of an ``ndim``-dim DTensor with every shard of its last ``matrix_dims`` dims
    (and any Partial) made Replicate; shards of the leading (stack) dims are kept, so that each rank
    holds whole matrices. ``matrix_dims`` = 1: each row is a matrix (the "rows" view)."""
    def keeps(pl: Placement) -> bool:
        dim = getattr(pl, "dim", None)  # Shard and _StridedShard each split one dim
        return pl.is_replicate() or (dim is not None and dim % ndim < ndim - matrix_dims)
    return tuple(pl if keeps(pl) else Replicate() for pl in placements)


def on_whole_matrices(fn: Callable[[Tensor], Tensor], x: Tensor, matrix_dims: int = 2) -> Tensor:
    """``fn(x)`` for a per-matrix function ``fn`` (each output matrix depends only on its input
    matrix; output of ``x``'s shape), computed on whole matrices also when ``x`` is a DTensor.

    A plain tensor goes to ``fn`` as is. For a DTensor, ``fn`` gets this rank's local tensor after
    redistributing to `whole_matrix_placements` (nothing moves when only stack dims are sharded;
    an all-gather over the mesh dims that split matrices otherwise, after which every rank of
    that mesh dim computes the same whole matrices), and the result is laid out like ``x`` again
    by keeping this rank's slice (no communication).
    """
    if not isinstance(x, DTensor):
        return fn(x)
    mesh, placements = x.device_mesh, tuple(x.placements)
    whole = whole_matrix_placements(placements, x.dim(), matrix_dims)
    local = (x if whole == placements else x.redistribute(mesh, whole)).to_local()
    out = DTensor.from_local(fn(local), mesh, whole, shape=x.shape, stride=x.stride())
    return out if whole == placements else out.redistribute(mesh, placements)


def per_matrix_like(values: Tensor, x: Tensor) -> Tensor:
    """Per-matrix values (..., 1, 1) of the matrices of ``x`` (..., m, n), laid out like ``x``'s matrices.

    For a plain ``x``: ``values`` as is. For a DTensor ``x``: a DTensor on ``x``'s mesh, sharded as
    ``x``'s stack dims and replicated over the rest (`whole_matrix_placements`), so that it
    broadcasts against ``x`` shard by shard. ``values`` may be a plain tensor holding every
    matrix's value (the same on every rank; each rank keeps its slice) or a DTensor (e.g. a
    per-matrix norm of ``x`` with pending reductions, which are carried out).
    """
    if not isinstance(x, DTensor):
        return values
    placements = whole_matrix_placements(tuple(x.placements), x.dim())
    if isinstance(values, DTensor):
        return values.redistribute(x.device_mesh, placements)
    return distribute_tensor(values, x.device_mesh, placements, src_data_rank=None)


def full(t: Tensor) -> Tensor:
    """The whole tensor on every rank (``full_tensor()`` of a DTensor); a plain tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def layout_parts(tensors: list[Tensor]) -> list[list[Tensor]]:
    """``tensors`` split by layout, each part in the given order, parts in order of first appearance:
    the plain tensors, and the DTensors of each device mesh.

    One foreach or fused kernel call (torch's Adam/AdamW on CUDA) takes one list, and DTensor refuses
    a list that mixes plain tensors and DTensors ("got mixed torch.Tensor and DTensor"), as a param
    group does under expert parallelism with DDP. Lists of DTensors of two meshes (FSDP2 with expert
    parallelism: the dense weights' mesh and the "ep" one) are split too, which torch does not promise to take.
    A list of one layout gives one part, its tensors as they were.
    """
    parts: dict[object, list[Tensor]] = {}
    for t in tensors:
        parts.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return list(parts.values())
