"""Optimizers for the MoE LM: AdamW, Muon, AdamH and MuonH, built from one grouping rule.

    from mpirouter.optim import build_optimizer
    opt = build_optimizer(model, OptimConfig(name="muonh"))      # lr None: DEFAULT_LR["muonh"]

- `groups.param_groups`: the one grouping rule (which parameter gets which update, the router's
  treatment) for every optimizer; asserts that each trainable parameter is in exactly one group.
- `muon`: Newton-Schulz orthogonalization (pure, batched over experts), Muon's shape-aware lr
  scaling, `StackedMuon` for 3-D expert stacks (torch.optim.Muon is used for 2-D matrices).
- `hyperball`: the Hyperball rule (fixed weight norm, fixed update norm) and the `Hyperball`
  wrapper turning a base optimizer into AdamH / MuonH.
- `combined.CombinedOptimizer`: AdamW for embeddings/head/gains + the matrix optimizer, as one.

The object `build_optimizer` returns behaves like a torch optimizer: ``param_groups`` (each with
"lr", which the training loop overwrites every step; groups with another peak lr carry
"lr_scale", applied inside ``step``), ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``.
For "adamw" it is a plain ``torch.optim.AdamW``.

Default peak learning rates (`DEFAULT_LR`), chosen by a sweep with the MPI router, seed 0,
batch 16, cosine schedule with 10% warmup, final eval on the whole validation set, 1 CPU thread:
(1) ``debug`` preset, 300 steps, ×2-spaced grids, to find each optimizer's range; (2) ``tiny``,
200 steps, around those ranges; (3) ``tiny``, 600 steps, the best two or three of (2). Chosen:
the best at 600 steps on tiny (val loss):

    adamw  3e-3: 1.889   (6e-3: 1.854, 1.2e-2: 1.975; kept at the previous default, see below)
    muon   1e-2: 1.637   (2e-2: 1.723)
    adamh  5e-3: 1.727   (1e-2: 1.737)
    muonh  2e-2: 1.598   (4e-2: 1.639)

AdamW stays at the project's earlier default 3e-3 (its 6e-3 edge is a single-seed 0.035 and would
silently change earlier baselines). A later 4-seed sweep of both routers on tiny at 600 steps
(results/sweep-tiny) confirms it: 3e-3 is best for linear (1.882) and mpi (1.875), with 6e-3 level
for linear (1.888) and 1.2e-2 clearly worse. Every
value trained without spikes; the next larger ×2 value is worse at 600 steps but still stable.
For muon the lr is on AdamW's scale (``muon_lr_scaling="match_rms_adamw"``); for adamh/muonh it
is the relative step ‖ΔW‖/‖W‖ per step. The AdamW-side groups of muon/adamh/muonh use
``DEFAULT_LR["adamw"]`` unless ``OptimConfig.adam_lr`` is set.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

from .combined import CombinedOptimizer, scaled_lr
from .groups import MATRIX_RULE, ROUTER_MODES, classify, param_groups
from .hyperball import RADIUS_RULES, Hyperball, frobenius_normalize, hyperball_radius, hyperball_step
from .muon import LR_SCALINGS, NS_COEFFICIENTS, NS_STEPS, StackedMuon, muon_lr_scale, muon_update, newton_schulz

if TYPE_CHECKING:
    from ..train import OptimConfig, TrainConfig

OPTIMIZERS: tuple[str, ...] = tuple(MATRIX_RULE)

DEFAULT_LR: dict[str, float] = {
    "adamw": 3e-3,
    "muon": 1e-2,
    "adamh": 5e-3,
    "muonh": 2e-2,
}
"""Peak learning rate per optimizer when ``OptimConfig.lr`` is None (the matrices' lr; for adamw, everything's)."""


def resolve_lrs(optim: "OptimConfig") -> tuple[float, float]:
    """(lr, adam_lr): the matrices' peak lr and the AdamW-side groups' peak lr, defaults filled in."""
    if optim.name not in DEFAULT_LR:
        raise ValueError(f"unknown optimizer {optim.name!r}; available: {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[optim.name] if optim.lr is None else optim.lr
    adam_lr = DEFAULT_LR["adamw"] if optim.adam_lr is None else optim.adam_lr
    if optim.name == "adamw":
        adam_lr = lr
    if not (lr > 0 and adam_lr > 0):
        raise ValueError(f"learning rates must be > 0, got lr={lr}, adam_lr={adam_lr}")
    return lr, adam_lr


def build_optimizer(model: torch.nn.Module, optim: "OptimConfig"):
    """The optimizer ``optim.name`` over ``model``'s parameters (grouping: `groups.param_groups`).

    Learning rates left None take the optimizer's defaults (`resolve_lrs`); ``optim`` itself is not
    changed (`mpirouter.train.resolve_config` returns a config with them filled in). For adamh/muonh
    the wrapped weights are moved onto their Hyperball spheres here.
    """
    lr, adam_lr = resolve_lrs(optim)
    groups = param_groups(model, optim, lr, adam_lr)
    betas = tuple(optim.betas)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=optim.eps)
    children: list[Any] = []
    side = [g for g in groups if g["algo"] == "adamw"]
    if side:
        children.append(torch.optim.AdamW(side, lr=lr, betas=betas, eps=optim.eps))
    mats = [g for g in groups if g["algo"] != "adamw"]
    hyper = lambda base: Hyperball(base, optim.hyperball_radius, optim.hyperball_radius_mult, optim.hyperball_update_scale)  # noqa: E731
    if optim.name == "adamh":
        children.append(hyper(torch.optim.Adam(mats, lr=lr, betas=betas, eps=optim.eps, weight_decay=0.0)))
    else:
        children.extend(hyper(o) if optim.name == "muonh" else o for o in _muon_optimizers(mats, lr, optim))
    return CombinedOptimizer(children)


def _muon_optimizers(groups: list[dict], lr: float, optim: "OptimConfig") -> list:
    """torch.optim.Muon for plain 2-D matrices, StackedMuon for expert stacks and per-row routers."""
    kw = dict(lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, ns_steps=optim.ns_steps,
              ns_coefficients=NS_COEFFICIENTS, adjust_lr_fn=optim.muon_lr_scaling)
    torch_muon = getattr(torch.optim, "Muon", None)
    flat, stacked = [], []
    for g in groups:
        two_d = [p for p in g["params"] if p.dim() == 2 and not g["rows"]] if torch_muon is not None else []
        rest = [p for p in g["params"] if not any(p is q for q in two_d)]
        if two_d:
            flat.append({**g, "params": two_d})
        if rest:
            stacked.append({**g, "params": rest})
    out = []
    if flat:
        out.append(torch_muon(flat, **kw))
    if stacked:
        out.append(StackedMuon(stacked, **kw))
    return out


def with_optimizer(cfg: "TrainConfig", name: str, lr: float | None = None, out_dir: str | None = None, **optim_fields) -> "TrainConfig":
    """A copy of a TrainConfig that trains with optimizer ``name`` (for comparison grids).

    The learning rates are reset to the new optimizer's defaults unless given (a copied lr
    tuned for another optimizer would be wrong); other OptimConfig fields can be overridden.

        grid = [with_optimizer(base, n, out_dir=f"runs/cmp/{n}") for n in OPTIMIZERS]
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")
    optim_fields.setdefault("adam_lr", None)
    new_optim = dataclasses.replace(cfg.optim, name=name, lr=lr, **optim_fields)
    return dataclasses.replace(cfg, optim=new_optim, **({"out_dir": out_dir} if out_dir else {}))


__all__ = [
    "CombinedOptimizer",
    "DEFAULT_LR",
    "Hyperball",
    "LR_SCALINGS",
    "NS_COEFFICIENTS",
    "NS_STEPS",
    "OPTIMIZERS",
    "RADIUS_RULES",
    "ROUTER_MODES",
    "StackedMuon",
    "build_optimizer",
    "classify",
    "frobenius_normalize",
    "hyperball_radius",
    "hyperball_step",
    "muon_lr_scale",
    "muon_update",
    "newton_schulz",
    "param_groups",
    "resolve_lrs",
    "scaled_lr",
    "with_optimizer",
]
