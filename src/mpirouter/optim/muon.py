"""Muon for stacked matrices: Newton-Schulz orthogonalization batched over experts.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) updates a weight matrix W
with the orthogonalized momentum of its gradient:

    B_t = μ B_{t-1} + (1 − μ) g_t                      momentum as an EMA (``buf.lerp_(g, 1 − μ)``)
    M_t = (1 − μ) g_t + μ B_t   (Nesterov)  or  B_t      (``g.lerp(B_t, μ)``)
    O_t = NS_5(M_t) ≈ U Vᵀ      where M_t = U Σ Vᵀ       (`newton_schulz`)
    W_t = (1 − η λ) W_{t-1} − η · s(shape) · O_t        (`muon_lr_scale` gives s)

What `torch.optim.Muon` (torch >= 2.9) already does, and we use as is: exactly this update for
2-D parameters (the model's attention and dense-FFN matrices go to it; see
`mpirouter.optim.build_optimizer`). What it lacks, and this module adds:

- 3-D stacked expert weights ``(E, F, D)``: torch's Muon rejects ``ndim != 2`` (and its
  ``_adjust_lr`` would read the shape of a stack as (E, F)). `StackedMuon` applies the same
  update to every matrix ``W[e]`` of a stack independently (per expert), with one batched
  Newton-Schulz iteration for the whole stack instead of a Python loop over experts.
- a "rows" view (a group key ``rows=True``): an (E, D) router is treated as E separate 1×D
  matrices, one per expert. NS of a 1×D matrix is its unit vector, so each row's momentum is
  normalized on its own (see `mpirouter.optim.groups` for when this is used).

The math is in the pure functions below; `StackedMuon` only holds the momentum buffers.

Sharded parameters (DTensors, e.g. under FSDP2 ``fully_shard``: Shard(0) over the data-parallel
mesh). Newton-Schulz is not elementwise: the polar factor of a row block is not the row block of
the polar factor. `on_whole_matrices` runs it on whole matrices: a shard of a stack's leading
(expert) dim leaves every expert matrix whole on its rank, so those are orthogonalized where they
are (no communication, also for experts sharded over an expert-parallel mesh); a shard that splits
a matrix (Shard(0) of a 2-D weight) is all-gathered, orthogonalized on every rank of that mesh
dim, and each rank keeps its own shard. The momentum update is elementwise and stays sharded.
`StackedMuon` therefore also takes the 2-D DTensor weights (`build_optimizer` sends them there):
torch.optim.Muon runs the iteration on DTensors op by op, which is the whole matrix's iteration
too, but with 11 all-reduces per matrix and step (5 steps) instead of one all-gather, and in
another bf16 summation order (so not bitwise the unsharded update, which this is).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..core.precision import bf16_matmuls
from .sharding import on_whole_matrices

# Quintic Newton-Schulz coefficients (a, b, c) and step count of Keller Jordan's Muon:
# https://github.com/KellerJordan/Muon/blob/f90a42b28e00b8d9d2d05865fe90d9f39abcbcbd/muon.py#L16
# (the same constants as torch.optim._muon.DEFAULT_A/B/C and DEFAULT_NS_STEPS). They maximize the
# slope at 0 (a = 3.4445) rather than converge to exactly 1: after 5 steps the singular values land
# in roughly [0.7, 1.2] instead of exactly 1, which does not hurt training (Jordan et al. 2024).
NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7  # torch.optim.Muon's default eps for the Frobenius normalization

LrScaling = Literal["match_rms_adamw", "original"]
LR_SCALINGS: tuple[str, ...] = ("match_rms_adamw", "original")


def newton_schulz(
    x: Tensor,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    dtype: torch.dtype | None = torch.bfloat16,
) -> Tensor:
    """Approximate orthogonal polar factor U Vᵀ of every matrix in ``x`` (shape (..., m, n)).

    The quintic Newton-Schulz iteration of Jordan et al. (2024), as in torch.optim.Muon's
    ``_zeropower_via_newtonschulz`` but batched over all leading dimensions:

        X_0 = M / max(‖M‖_F, eps)                       (so every singular value is ≤ 1)
        A_k = X_k X_kᵀ
        X_{k+1} = a X_k + (b A_k + c A_k²) X_k          (odd polynomial p(σ) = aσ + bσ³ + cσ⁵
                                                          applied to each singular value)

    computed on the wide orientation (m ≤ n; tall inputs are transposed and back) so the Gram
    matrix is the smaller one. ``dtype`` is the working precision (bfloat16 as in torch and the
    reference code; None keeps the input's). A zero matrix maps to zero. Returns ``x``'s shape,
    in the working dtype.
    """
    if x.dim() < 2:
        raise ValueError(f"newton_schulz needs matrices (..., m, n), got shape {tuple(x.shape)}")
    if not 0 < steps < 100:
        raise ValueError(f"steps must be in [1, 99], got {steps}")
    a, b, c = coefficients
    lead, (m, n) = x.shape[:-2], x.shape[-2:]
    X = x.reshape(math.prod(lead), m, n)  # not -1: a rank may hold no matrix of a sharded stack
    if dtype is not None:
        X = X.to(dtype)
    tall = m > n
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(eps)
    with bf16_matmuls(X.device, X.dtype):  # a CPU without bf16 kernels: emulated, 13x faster (core.precision)
        for _ in range(steps):
            A = torch.bmm(X, X.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A²
            X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    if tall:
        X = X.mT
    return X.reshape(*lead, m, n)


def muon_lr_scale(fan_out: int, fan_in: int, rule: LrScaling = "match_rms_adamw") -> float:
    """Shape-aware multiplier s of Muon's learning rate for one (fan_out × fan_in) matrix.

    - ``"match_rms_adamw"`` (default): s = 0.2 · sqrt(max(fan_out, fan_in)) (Liu et al. 2025,
      "Muon is Scalable for LLM Training", arXiv 2502.16982, Sec. 2.2). An orthogonal m×n
      matrix has RMS entry 1/sqrt(max(m, n)); this scales it to RMS 0.2, the typical RMS of an
      AdamW update, so Muon can reuse AdamW's learning rate and weight decay.
    - ``"original"``: s = sqrt(max(1, fan_out / fan_in)) (Keller Jordan's Muon): keeps the
      update's spectral norm per unit input RMS the same for tall matrices; needs a larger
      learning rate (~0.02) than AdamW.

    Both are the two ``adjust_lr_fn`` options of torch.optim.Muon, with the same formulas.
    """
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    if rule == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    raise ValueError(f"unknown Muon lr scaling {rule!r}; choose one of {', '.join(LR_SCALINGS)}")


def as_matrices(t: Tensor, rows: bool = False) -> Tensor:
    """A view of ``t`` as a stack of matrices (..., m, n): as is, or each row as a 1×n matrix."""
    if t.dim() < 2 and not rows:
        raise ValueError(f"expected a matrix or a stack of matrices, got shape {tuple(t.shape)}")
    return t.unsqueeze(-2) if rows else t


def muon_update(
    grad: Tensor,
    buf: Tensor,
    momentum: float,
    nesterov: bool = True,
    steps: int = NS_STEPS,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = NS_EPS,
    rows: bool = False,
) -> Tensor:
    """Orthogonalized (Nesterov) momentum O_t of one parameter, per matrix (see module docstring).

    Advances the momentum buffer in place (``buf ← μ buf + (1 − μ) grad``, torch.optim.Muon's
    EMA form) and returns O_t in the parameter's dtype and shape. Each matrix of a stack (and
    each row with ``rows=True``) is orthogonalized on its own; for DTensors on whole matrices
    (`on_whole_matrices`), so a sharded parameter gets the update of the unsharded one.
    """
    buf.lerp_(grad, 1 - momentum)
    m = grad.lerp(buf, momentum) if nesterov else buf

    def orthogonalize(t: Tensor) -> Tensor:
        return newton_schulz(as_matrices(t, rows), steps, coefficients, eps).reshape(t.shape).to(t.dtype)

    return on_whole_matrices(orthogonalize, m, 1 if rows else 2)


class StackedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update applied per matrix to stacked weights (..., m, n).

    Same hyperparameters, defaults and state layout (``momentum_buffer``) as torch.optim.Muon;
    ``adjust_lr_fn`` takes the same two rules (`muon_lr_scale`), computed from each matrix's own
    (fan_out, fan_in) = (m, n), not from the stack's leading dimensions. Also accepts 2-D
    parameters (then it equals torch.optim.Muon up to bf16 rounding; bitwise on CPU, under one GEMM path) and the
    group key ``rows=True`` (each row of a 2-D parameter is its own 1×n matrix). DTensor
    parameters (FSDP2, expert parallelism) get the update of the unsharded parameter
    (`on_whole_matrices`); the momentum buffers are sharded like the parameters.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: LrScaling | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn or "original", rows=False)
        super().__init__(params, defaults)
        for group in self.param_groups:
            muon_lr_scale(1, 1, group["adjust_lr_fn"])  # validates the rule name
            for p in group["params"]:
                if p.dim() < 2 and not group["rows"]:
                    raise ValueError(f"StackedMuon needs matrices or stacks of matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p):
                    raise RuntimeError("StackedMuon supports dense real parameters only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                o = muon_update(p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"],
                                group["ns_steps"], group["ns_coefficients"], group["eps"], group["rows"])
                fan_out, fan_in = as_matrices(p, group["rows"]).shape[-2:]
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=-lr * muon_lr_scale(fan_out, fan_in, group["adjust_lr_fn"]))
        return loss
