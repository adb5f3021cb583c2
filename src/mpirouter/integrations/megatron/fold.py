"""Folding for release: φ written into each router's `weight`, so a stock Megatron model has identical logits.

    with folded_weights(model):                                   # every rank, same point (collectives under EP)
        dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)     # or torch.save(model.state_dict(), ...)

A stock `TopKRouter` computes x·weightᵀ, so a checkpoint whose router weights are φ gives a model built from the
stock layer spec the same logits, with no MPI code at inference. Inside the block the routers' parameter holds φ;
after it, R again (a training job can fold, save and go on).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .router import MPITopKRouter


def mpi_routers(model: torch.nn.Module) -> list[MPITopKRouter]:
    return [m for m in model.modules() if isinstance(m, MPITopKRouter)]


@contextlib.contextmanager
def folded_weights(model: torch.nn.Module) -> Iterator[list[MPITopKRouter]]:
    """Inside the block every `MPITopKRouter` of `model` holds φ in `weight` (in the weight's dtype); R is put back
    after, whatever happens inside. Yields the routers. ValueError when the model has none."""
    routers = mpi_routers(model)
    if not routers:
        raise ValueError("folded_weights: the model has no MPITopKRouter (built with mpi_layer_spec?)")
    with torch.no_grad():
        phis = [r.rows().to(r.weight.dtype) for r in routers]  # every φ from the unfolded weights first
        saved = [r.weight.detach().clone() for r in routers]
        for r, phi in zip(routers, phis):
            r.weight.copy_(phi)
    try:
        yield routers
    finally:
        with torch.no_grad():
            for r, w in zip(routers, saved):
                r.weight.copy_(w)


def folded_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with φ as every MPI router's weight: loads into the same model built from the stock spec."""
    with folded_weights(model):
        return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
