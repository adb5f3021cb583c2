"""Hyperball: fixed weight norm and fixed update norm, wrapped around a base optimizer (AdamH, MuonH).

Wen, Dang, Lyu, Ma, Liang, "Fantastic Pretraining Optimizers and Where to Find Them II:
Hyperball Optimization", arXiv 2606.16899 (blog version Dec. 2025). For every wrapped weight
matrix W with radius r and the base optimizer's update direction u_t (Adam's m̂/(√v̂+ε) or Muon's
orthogonalized momentum):

    W_{t+1} = r · N(W_t − η_t · c · r · N(u_t)),      N(x) = x / ‖x‖_F

so ‖W‖_F = r always, every update has Frobenius norm c·r·η_t before the retraction, and η_t is
the relative (angular) step ‖ΔW‖/‖W‖ (c = 1 by default, as in the paper). This replaces weight
decay, whose only lasting effect is to set the equilibrium norm and hence this angular step.

Radius r per matrix (``radius``):
- ``"sqrt_fan_out"`` (default): r = sqrt(fan_out) for a (fan_out × fan_in) matrix: the expected
  Frobenius norm of a matrix with N(0, 1/fan_in) entries (LeCun/μP-style init), i.e. each output
  unit has O(1) RMS for O(1)-RMS inputs. Independent of the initializer.
- ``"init"``: r = ‖W_0‖_F, the norm the weight had when the optimizer was built (the blog's
  choice; with this project's N(0, 0.02) init it keeps the init scale).
times ``radius_mult``. Stacked expert weights (E, F, D) get one radius and one normalization per
expert matrix; with the group key ``rows=True`` each row is its own 1×n matrix. Sharded (DTensor)
weights: the norms are of whole matrices (DTensor reductions) and the radii are DTensors laid out
like the weights' matrices (`sharding.per_matrix_like`), so the rule is the unsharded one.

`Hyperball` wraps any base optimizer (torch.optim.Adam, torch.optim.Muon, `StackedMuon`): it
runs the base step with lr = 1 and no weight decay, reads the base update as u = W_before −
W_after and then applies the rule above. This costs one copy of the wrapped weights per step and
needs nothing from the base but its ordinary ``step``. The wrapped weights are moved onto their
spheres when the wrapper is built.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .muon import as_matrices
from .sharding import full, per_matrix_like

RadiusRule = Literal["sqrt_fan_out", "init"]
RADIUS_RULES: tuple[str, ...] = ("sqrt_fan_out", "init")


def frobenius_normalize(x: Tensor, eps: float = 1e-30) -> Tensor:
    """N(x) = x / ‖x‖_F for each matrix of ``x`` (..., m, n); a (near-)zero matrix maps to zero."""
    norm = torch.linalg.matrix_norm(x, keepdim=True)
    ok = norm > eps
    return torch.where(ok, x / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(x))


def hyperball_radius(w: Tensor, rule: RadiusRule = "sqrt_fan_out", mult: float = 1.0) -> Tensor:
    """Radius r of each matrix of ``w`` (..., fan_out, fan_in), shape (..., 1, 1), float32.

    For a DTensor ``w`` (FSDP2), r is a DTensor laid out like w's matrices (`per_matrix_like`):
    sharded with w's stack dims, replicated where w splits matrices; "init" norms are then of
    whole matrices.
    """
    if rule == "sqrt_fan_out":
        r = torch.full((*w.shape[:-2], 1, 1), math.sqrt(w.shape[-2]), dtype=torch.float32, device=w.device)
    elif rule == "init":
        r = torch.linalg.matrix_norm(w.detach().float(), keepdim=True)
    else:
        raise ValueError(f"unknown hyperball radius {rule!r}; choose one of {', '.join(RADIUS_RULES)}")
    r = per_matrix_like(r, w)
    if rule == "init" and not bool((full(r) > 0).all()):
        raise ValueError("hyperball radius 'init' needs nonzero initial weights")
    if not mult > 0:
        raise ValueError(f"hyperball radius multiplier must be > 0, got {mult}")
    return r * mult


def hyperball_step(w: Tensor, u: Tensor, lr: float, radius: Tensor, update_scale: float = 1.0) -> Tensor:
    """W' = r · N(W − η · c · r · N(u)) per matrix (Wen et al., arXiv 2606.16899; module docstring).

    ``w``, ``u``: (..., m, n); ``radius``: broadcastable (..., 1, 1); ``lr`` = η, ``update_scale``
    = c. A zero update leaves W's direction unchanged (W is still retracted onto its sphere).
    DTensors (all three, ``radius`` from `hyperball_radius`) work as they are: the norms are
    DTensor reductions, i.e. of whole matrices, and only those scalars are communicated.
    """
    step = frobenius_normalize(u.float()) * (radius * (lr * update_scale))
    return (frobenius_normalize(w.float() - step) * radius).to(w.dtype)


class Hyperball:
    """AdamH / MuonH: the Hyperball rule around a base optimizer whose groups it all wraps.

    Looks like a torch optimizer (``param_groups``, ``state``, ``step``, ``zero_grad``,
    ``state_dict``, ``load_state_dict``); ``group["lr"]`` is η (the relative step). Every group
    of ``base`` must have weight decay 0 (the fixed norm replaces it). Holds one radius tensor
    per parameter, saved in the state dict so that a resumed run uses the same radii.
    """

    def __init__(self, base, radius: RadiusRule = "sqrt_fan_out", radius_mult: float = 1.0, update_scale: float = 1.0):
        for group in base.param_groups:
            if group.get("weight_decay", 0.0) != 0.0:
                raise ValueError(f"Hyperball replaces weight decay; group {group.get('name', '?')!r} has weight_decay={group['weight_decay']}")
        if not update_scale > 0:
            raise ValueError(f"hyperball update scale must be > 0, got {update_scale}")
        self.base = base
        self.update_scale = update_scale
        self.radius: dict[Tensor, Tensor] = {}
        with torch.no_grad():
            for group in base.param_groups:
                for p in group["params"]:
                    m = as_matrices(p, group.get("rows", False))
                    r = hyperball_radius(m, radius, radius_mult)
                    self.radius[p] = r
                    m.copy_((frobenius_normalize(m.float()) * r).to(p.dtype))

    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @property
    def state(self):
        return self.base.state

    @property
    def defaults(self) -> dict:
        return self.base.defaults

    def _params(self) -> list[Tensor]:
        return [p for g in self.base.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.base.param_groups
        before = [[(p, p.detach().clone()) for p in g["params"] if p.grad is not None] for g in groups]
        lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 1.0  # the base step then *is* its update direction u: W_after = W_before − u
        try:
            self.base.step()
        finally:
            for g, lr in zip(groups, lrs):
                g["lr"] = lr
        for g, pairs in zip(groups, before):
            rows = g.get("rows", False)
            for p, w0 in pairs:
                m0, m = as_matrices(w0, rows), as_matrices(p, rows)
                m.copy_(hyperball_step(m0, m0 - m, g["lr"], self.radius[p], self.update_scale))
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "radius": [self.radius[p].clone() for p in self._params()],
                "update_scale": self.update_scale}

    def load_state_dict(self, state_dict: dict) -> None:
        radii = state_dict["radius"]
        params = self._params()
        if len(radii) != len(params):
            raise ValueError(f"Hyperball state has {len(radii)} radii for {len(params)} parameters")
        self.base.load_state_dict(state_dict["base"])
        for p, r in zip(params, radii):
            if r.shape != self.radius[p].shape:
                raise ValueError(f"Hyperball radius shape {tuple(r.shape)} does not match {tuple(self.radius[p].shape)}")
            self.radius[p] = r.to(self.radius[p].device, self.radius[p].dtype)
        self.update_scale = state_dict.get("update_scale", self.update_scale)

    def __repr__(self) -> str:
        return f"Hyperball(update_scale={self.update_scale}, base={self.base!r})"
