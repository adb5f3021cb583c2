"""`build_optimizer`: the optimizer of an `OptimConfig` over a model's parameters.

    from mpirouter.optim import build_optimizer
    opt = build_optimizer(model, OptimConfig(name="muonh"))      # lr None: DEFAULT_LR["muonh"]

The object it returns behaves like a torch optimizer: ``param_groups`` (each with "lr", which the
training loop overwrites every step; groups with another peak lr carry "lr_scale", applied inside
``step``), ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``. For "adamw" it is a
``torch.optim.AdamW`` (on CUDA with its fused kernel: one launch for all parameters) whose step
takes each param group in parts of one tensor layout (`StepsByLayout`), as the Adam inside AdamH does.
"""

from __future__ import annotations

from typing import Any

import torch

from .combined import CombinedOptimizer
from .config import OptimConfig, resolve_lrs
from .groups import param_groups
from .hyperball import Hyperball
from .muon import NS_COEFFICIENTS, StackedMuon
from .sharding import layout_parts


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel can take these parameters: all on one CUDA device, floating point.

    The fused kernel updates every parameter in one launch instead of a foreach chain; on CPU the
    default (foreach) implementation is kept so CPU results stay what they were.
    """
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params) and len({p.device for p in params}) == 1


class StepsByLayout:
    """Mixin for torch's Adam and AdamW: each param group is stepped in parts of one tensor layout
    (`sharding.layout_parts`: plain tensors; DTensors of one mesh), each with the group's hyperparameters.

    Their fused and foreach kernels (CUDA's choices: `fused_adamw_supported`; torch's default foreach
    for Adam) take a group's tensors as one list, which DTensor refuses when it mixes plain tensors and
    DTensors: expert parallelism under DDP puts DTensor expert stacks beside plain attention matrices in
    the "matrices" group. Only the step sees the parts: ``param_groups`` stays as built, so the state
    dict, and the param groups of a sharded checkpoint (matched by position by
    torch.distributed.checkpoint), are the same in every layout, and checkpoints written before load.
    A group of one layout (one process; DDP or FSDP2 without expert parallelism) is stepped as it is.
    """

    def step(self, closure=None):
        groups = self.param_groups
        parts = [dict(g, params=part) for g in groups for part in layout_parts(g["params"])]
        base = _without_step_hooks(super().step.__func__)  # type: ignore[misc]
        if len(parts) == len(groups):
            return base(self, closure)
        self.param_groups = parts  # what torch's step iterates over; the state is keyed by parameter, shared
        try:
            return base(self, closure)
        finally:
            self.param_groups = groups


def _without_step_hooks(step):
    """torch's ``step`` without the wrapper that runs the step hooks (``Optimizer.profile_hook_step``,
    marked ``hooked``): `StepsByLayout.step` is wrapped itself, and hooks must run once per step."""
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


class AdamW(StepsByLayout, torch.optim.AdamW):
    """torch.optim.AdamW stepping each param group by layout (`StepsByLayout`); bitwise torch's on one layout."""


class Adam(StepsByLayout, torch.optim.Adam):
    """torch.optim.Adam stepping each param group by layout (`StepsByLayout`); bitwise torch's on one layout."""


def _adamw(groups: list[dict], **kw) -> AdamW:
    params = [p for g in groups for p in g["params"]]
    return AdamW(groups, fused=True if fused_adamw_supported(params) else None, **kw)


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
        children.append(hyper(Adam(mats, lr=lr, betas=betas, eps=optim.eps, weight_decay=0.0)))
    else:
        children.extend(hyper(o) if optim.name == "muonh" else o for o in _muon_optimizers(mats, lr, optim))
    return CombinedOptimizer(children)


def _muon_optimizers(groups: list[dict], lr: float, optim: OptimConfig) -> list:
    """StackedMuon for every Muon-updated matrix: 2-D weights, expert stacks, per-row routers, plain or
    sharded (DTensor, Newton-Schulz on whole matrices, `sharding.on_whole_matrices`).

    One optimizer whatever the sharding, so a checkpoint's optimizer state has the same groups in one
    process, under DDP and under FSDP2 (torch.distributed.checkpoint matches groups by position).
    On a plain 2-D matrix it is bitwise torch.optim.Muon (tests/optim/test_optim.py).
    """
    kw = dict(lr=lr, momentum=optim.momentum, nesterov=optim.nesterov, ns_steps=optim.ns_steps,
              ns_coefficients=NS_COEFFICIENTS, adjust_lr_fn=optim.muon_lr_scaling)
    return [StackedMuon(groups, **kw)] if groups else []


def torch_optimizers(opt) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside an optimizer of `build_optimizer`, in stepping order.

    Their states together are the whole optimizer state except the Hyperball radii
    (`hyperball_radii`), so a sharded checkpoint is
    ``get_optimizer_state_dict(model, torch_optimizers(opt))`` (torch.distributed.checkpoint
    keys it by parameter name and reshards it) plus ``hyperball_radii(model, opt)``.
    """
    if isinstance(opt, torch.optim.Optimizer):
        return [opt]
    if isinstance(opt, CombinedOptimizer):
        return [o for child in opt.optimizers for o in torch_optimizers(child)]
    if isinstance(opt, Hyperball):
        return torch_optimizers(opt.base)
    raise ValueError(f"not an optimizer of build_optimizer: {type(opt).__name__}")


def _hyperballs(opt) -> list[Hyperball]:
    if isinstance(opt, Hyperball):
        return [opt]
    return [h for child in opt.optimizers for h in _hyperballs(child)] if isinstance(opt, CombinedOptimizer) else []


def hyperball_radii(model: torch.nn.Module, opt) -> dict[str, torch.Tensor]:
    """The Hyperball radius of every wrapped parameter of ``opt``, by parameter name (empty for adamw, muon).

    The one optimizer state outside `torch_optimizers`. The radii are a function of the config
    ("sqrt_fan_out": of the shapes) or of the weights when the optimizer was built ("init"), so a
    run rebuilt from the same seed recomputes them; saving them makes a resume exact also when it
    is not. The tensors returned are the optimizer's own (DTensors under FSDP2, laid out like
    their weights' matrices), so ``torch.distributed.checkpoint.load`` fills them in place;
    `load_hyperball_radii` copies in radii loaded otherwise.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for hyper in _hyperballs(opt):
        for p, r in hyper.radius.items():
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            out[names[id(p)]] = r
    return out


def load_hyperball_radii(model: torch.nn.Module, opt, radii: dict[str, torch.Tensor]) -> None:
    """Copy saved radii (`hyperball_radii`'s dict) into ``opt``'s; a missing or extra name is a ValueError."""
    mine = hyperball_radii(model, opt)
    if set(radii) != set(mine):
        missing, extra = sorted(set(mine) - set(radii)), sorted(set(radii) - set(mine))
        raise ValueError(f"Hyperball radii do not match the optimizer: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, r in mine.items():
            if radii[name] is not r:
                r.copy_(radii[name])
