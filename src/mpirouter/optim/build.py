"""`build_optimizer`: the optimizer of an `OptimConfig` over a model's parameters.

    from mpirouter.optim import build_optimizer
    opt = build_optimizer(model, OptimConfig(name="muonh"))      # lr None: DEFAULT_LR["muonh"]

The object it returns behaves like a torch optimizer: ``param_groups`` (each with "lr", which the
training loop overwrites every step; groups with another peak lr carry "lr_scale", applied inside
``step``), ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``. For "adamw" it is a plain
``torch.optim.AdamW``; on CUDA its fused kernel (one launch for all parameters).
"""

from __future__ import annotations

from typing import Any

import torch

from .combined import CombinedOptimizer
from .config import OptimConfig, resolve_lrs
from .groups import param_groups
from .hyperball import Hyperball
from .muon import NS_COEFFICIENTS, StackedMuon


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can take these parameters: all on one CUDA device, floating point.

    The fused kernel updates every parameter in one launch instead of a foreach chain; on CPU the
    default (foreach) implementation is kept so CPU results stay what they were.
    """
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params) and len({p.device for p in params}) == 1


def _adamw(groups: list[dict], **kw) -> torch.optim.AdamW:
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(groups, fused=True if fused_adamw_supported(params) else None, **kw)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig):
    """The optimizer ``optim.name`` over ``model``'s parameters (grouping: `groups.param_groups`).

    Learning rates left None take the optimizer's defaults (`resolve_lrs`); ``optim`` itself is not
    changed (`mpirouter.trainer.config.resolve_config` returns a config with them filled in). For adamh/muonh
    the wrapped weights are moved onto their Hyperball spheres here.
    """
    lr, adam_lr = resolve_lrs(optim)
    groups = param_groups(model, optim, lr, adam_lr)
    betas = tuple(optim.betas)
    if optim.name == "adamw":
        return _adamw(groups, lr=lr, betas=betas, eps=optim.eps)
    children: list[Any] = []
    side = [g for g in groups if g["algo"] == "adamw"]
    if side:
        children.append(_adamw(side, lr=lr, betas=betas, eps=optim.eps))
    mats = [g for g in groups if g["algo"] != "adamw"]
    hyper = lambda base: Hyperball(base, optim.hyperball_radius, optim.hyperball_radius_mult, optim.hyperball_update_scale)  # noqa: E731
    if optim.name == "adamh":
        children.append(hyper(torch.optim.Adam(mats, lr=lr, betas=betas, eps=optim.eps, weight_decay=0.0)))
    else:
        children.extend(hyper(o) if optim.name == "muonh" else o for o in _muon_optimizers(mats, lr, optim))
    return CombinedOptimizer(children)


def _muon_optimizers(groups: list[dict], lr: float, optim: OptimConfig) -> list:
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
