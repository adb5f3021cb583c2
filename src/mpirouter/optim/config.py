"""The optimizer's configuration and the learning-rate defaults: which optimizer, its peak
learning rates, and the router's treatment (the rule itself: `mpirouter.optim.groups`).

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
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from ..common.config import check_number
from .hyperball import RADIUS_RULES
from .muon import LR_SCALINGS

MAX_LR = 1e3
"""Largest accepted peak learning rate: far beyond any useful value, and well before Adam's step size
(lr / (1 - β1), times the bias correction) overflows float32, which torch reports with a traceback."""

# How each optimizer updates the hidden matrices: (algorithm, Hyperball-wrapped)
MATRIX_RULE: dict[str, tuple[str, bool]] = {
    "adamw": ("adamw", False),
    "muon": ("muon", False),
    "adamh": ("adam", True),
    "muonh": ("muon", True),
}
OPTIMIZERS: tuple[str, ...] = tuple(MATRIX_RULE)
ROUTER_MODES: tuple[str, ...] = ("matrix", "rows", "adamw")

DEFAULT_LR: dict[str, float] = {
    "adamw": 3e-3,
    "muon": 1e-2,
    "adamh": 5e-3,
    "muonh": 2e-2,
}
"""Peak learning rate per optimizer when ``OptimConfig.lr`` is None (the matrices' lr; for adamw, everything's)."""


@dataclass
class OptimConfig:
    """The optimizer: AdamW, Muon, AdamH or MuonH (issue 4; details in `mpirouter.optim`).

    Which parameter gets which update (and the router's treatment) is one rule for all four:
    `mpirouter.optim.groups`. Embeddings, output head and norm gains are always on AdamW.
    """

    name: Literal["adamw", "muon", "adamh", "muonh"] = "adamw"
    """adamw | muon (Muon on hidden matrices, per expert on stacks) | adamh / muonh (Hyperball around Adam / Muon)."""
    lr: float | None = None
    """Peak learning rate of the hidden matrices (adamw: of everything); None: mpirouter.optim.DEFAULT_LR[name].
    For adamh/muonh it is the relative step ‖ΔW‖/‖W‖. A run's config.json records the resolved value."""
    adam_lr: float | None = None
    """muon/adamh/muonh: peak lr of the AdamW-side groups (embeddings, head, norm gains; the router if router=adamw).
    None: DEFAULT_LR["adamw"]. Ignored by adamw."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (AdamW, and Adam inside AdamH)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices and embeddings (norm gains never decay; Hyperball-wrapped matrices
    have none, the fixed norm replaces it). Muon applies it as W ← (1 − lr·wd) W, like AdamW."""
    router_weight_decay: float | None = None
    """Weight decay of the router rows R when not Hyperball-wrapped (None: same as weight_decay)."""
    router: Literal["matrix", "rows", "adamw"] = "matrix"
    """Treatment of the router rows R (mpirouter.optim.groups): matrix = like the other hidden matrices
    (the paper's grouping), rows = each row its own 1×D matrix (per expert), adamw = always AdamW."""
    momentum: float = 0.95
    """Muon momentum μ."""
    nesterov: bool = True
    """Muon: Nesterov momentum."""
    ns_steps: int = 5
    """Muon: Newton-Schulz iterations (coefficients: Keller Jordan's 3.4445, -4.7750, 2.0315)."""
    muon_lr_scaling: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    """Muon's shape-aware lr factor: 0.2·sqrt(max(m, n)) (update RMS of AdamW; reuse AdamW's lr) or
    sqrt(max(1, m/n)) (Keller Jordan; lr ~0.02). Irrelevant under Hyperball (the update norm is fixed)."""
    hyperball_radius: Literal["sqrt_fan_out", "init"] = "sqrt_fan_out"
    """AdamH/MuonH: fixed Frobenius norm of each matrix: sqrt(fan_out) or its norm at initialization."""
    hyperball_radius_mult: float = 1.0
    """AdamH/MuonH: multiplier on that radius."""
    hyperball_update_scale: float = 1.0
    """AdamH/MuonH: update norm before the lr, as a multiple of the radius (1: lr = relative step)."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; available: {', '.join(OPTIMIZERS)}")
        for field_name, value, choices in (("router", self.router, ROUTER_MODES), ("muon_lr_scaling", self.muon_lr_scaling, LR_SCALINGS),
                                           ("hyperball_radius", self.hyperball_radius, RADIUS_RULES)):
            if value not in choices:
                raise ValueError(f"optim.{field_name}={value!r} is not one of {', '.join(choices)}")
        for field_name in ("lr", "adam_lr"):
            value = getattr(self, field_name)
            if value is not None:
                check_number(f"optim.{field_name}", value, gt=0, le=MAX_LR)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {list(self.betas)}")
        for i, beta in enumerate(self.betas):
            check_number(f"optim.betas[{i}]", beta, ge=0, lt=1)
        check_number("optim.eps", self.eps, ge=0)
        check_number("optim.weight_decay", self.weight_decay, ge=0)
        if self.router_weight_decay is not None:
            check_number("optim.router_weight_decay", self.router_weight_decay, ge=0)
        check_number("optim.momentum", self.momentum, ge=0, lt=1)
        check_number("optim.ns_steps", self.ns_steps, integer=True, ge=1)
        check_number("optim.hyperball_radius_mult", self.hyperball_radius_mult, gt=0)
        check_number("optim.hyperball_update_scale", self.hyperball_update_scale, gt=0)

    @property
    def peak_lr(self) -> float:
        """The matrices' peak learning rate: lr, or the optimizer's default when lr is None."""
        return resolve_lrs(self)[0]


def resolve_lrs(optim: OptimConfig) -> tuple[float, float]:
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


class _HasOptim(Protocol):
    optim: OptimConfig


C = TypeVar("C", bound=_HasOptim)


def with_optimizer(cfg: C, name: str, lr: float | None = None, out_dir: str | None = None, **optim_fields) -> C:
    """A copy of a config with an `optim` field (a TrainConfig) that trains with optimizer ``name`` (for comparison grids).

    The learning rates are reset to the new optimizer's defaults unless given (a copied lr
    tuned for another optimizer would be wrong); other OptimConfig fields can be overridden.

        grid = [with_optimizer(base, n, out_dir=f"runs/cmp/{n}") for n in OPTIMIZERS]
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(OPTIMIZERS)}")
    optim_fields.setdefault("adam_lr", None)
    new_optim = dataclasses.replace(cfg.optim, name=name, lr=lr, **optim_fields)
    return dataclasses.replace(cfg, optim=new_optim, **({"out_dir": out_dir} if out_dir else {}))
