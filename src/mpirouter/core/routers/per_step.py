"""φ computed once per optimizer step and shared by its micro-batches (docs/performance.md)."""

from __future__ import annotations

import torch

class _AddAccumulatedGrad(torch.autograd.Function):
    """Identity on φ whose backward adds the gradient the earlier micro-batches left on a detached copy."""

    @staticmethod
    def forward(ctx, phi_ED: torch.Tensor, leaf_ED: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf_ED
        return phi_ED.view_as(phi_ED)

    @staticmethod
    def backward(ctx, g_ED: torch.Tensor):
        earlier = ctx.leaf.grad
        return (g_ED if earlier is None else g_ED + earlier), None


class RowsPerStep:
    """φ computed once per optimizer step and shared by its `micro_batches` micro-batches.

        shared = RowsPerStep([m.router_rows() for m in moe_layers], micro_batches=4)
        for i in range(4):
            model(x[i], y[i], router_rows=shared.for_micro_batch(i)).loss.backward()

    Micro-batches 0..n-2 read a detached copy of φ, on which their backward passes accumulate
    ∂L/∂φ. The last one reads φ itself through an identity whose backward adds that accumulated
    gradient, so the backward through φ's graph (into R, G, U) runs once, inside the last
    micro-batch's backward: where DDP/FSDP hooks expect every parameter's gradient. The
    gradients equal recomputing φ per micro-batch, up to the order of summation.

    Each micro-batch must call `.backward()` (not `torch.autograd.grad`, which leaves the copy's
    gradient empty), and the last one's loss must depend on the rows it was given; the rows of the
    last micro-batch can be taken once.
    """

    def __init__(self, rows: list[torch.Tensor], micro_batches: int):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.rows, self.micro_batches = rows, micro_batches
        self.detached = [r.detach().requires_grad_(r.requires_grad) for r in rows]
        self._last_taken = False

    def for_micro_batch(self, i: int) -> list[torch.Tensor]:
        """The rows micro-batch `i` (0-based) routes with."""
        if not 0 <= i < self.micro_batches:
            raise ValueError(f"micro-batch {i} is outside 0..{self.micro_batches - 1}")
        if i < self.micro_batches - 1:
            return self.detached
        if self._last_taken:  # a second graph through the identity would add the earlier gradients twice
            raise RuntimeError("the last micro-batch's rows were already taken; make a new RowsPerStep for the next step")
        self._last_taken = True
        return [_AddAccumulatedGrad.apply(r, d) if r.requires_grad else r for r, d in zip(self.rows, self.detached)]
