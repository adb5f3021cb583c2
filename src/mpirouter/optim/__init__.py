"""Optimizers for the MoE LM: AdamW, Muon, AdamH and MuonH, built from one grouping rule.

    from mpirouter.optim import build_optimizer
    opt = build_optimizer(model, OptimConfig(name="muonh"))      # lr None: DEFAULT_LR["muonh"]

- `config`: `OptimConfig`, the default learning rates (`DEFAULT_LR`, how they were chosen) and `resolve_lrs`.
- `build.build_optimizer`: the optimizer of a config (fused AdamW kernel on CUDA).
- `groups.param_groups`: the one grouping rule (which parameter gets which update, the router's
  treatment) for every optimizer; asserts that each trainable parameter is in exactly one group.
- `muon`: Newton-Schulz orthogonalization (pure, batched over experts), Muon's shape-aware lr
  scaling, `StackedMuon` for 3-D expert stacks (torch.optim.Muon is used for 2-D matrices).
- `hyperball`: the Hyperball rule (fixed weight norm, fixed update norm) and the `Hyperball`
  wrapper turning a base optimizer into AdamH / MuonH.
- `combined.CombinedOptimizer`: AdamW for embeddings/head/gains + the matrix optimizer, as one.
- `sharding`: per-matrix operations on DTensor parameters (FSDP2, expert parallelism): Newton-Schulz
  and Hyperball norms on whole matrices, so a sharded run takes the unsharded run's steps; `layout_parts`
  for the fused/foreach Adam kernels.
- `build.torch_optimizers` / `build.hyperball_radii`: the state to put in a sharded checkpoint
  (torch.distributed.checkpoint's ``get_optimizer_state_dict`` over the former, plus the latter).

The object `build_optimizer` returns behaves like a torch optimizer: ``param_groups`` (each with
"lr", which the training loop overwrites every step; groups with another peak lr carry
"lr_scale", applied inside ``step``), ``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``.
For "adamw" it is a ``torch.optim.AdamW`` (`build.AdamW`: each param group stepped in parts of one
tensor layout, so that its fused and foreach kernels also take groups mixing plain tensors and DTensors).
"""

from .build import build_optimizer, fused_adamw_supported, hyperball_radii, load_hyperball_radii, torch_optimizers
from .combined import CombinedOptimizer, scaled_lr
from .config import DEFAULT_LR, MATRIX_RULE, MAX_LR, OPTIMIZERS, ROUTER_MODES, OptimConfig, resolve_lrs, with_optimizer
from .groups import classify, param_groups
from .hyperball import RADIUS_RULES, Hyperball, frobenius_normalize, hyperball_radius, hyperball_step
from .muon import LR_SCALINGS, NS_COEFFICIENTS, NS_STEPS, StackedMuon, muon_lr_scale, muon_update, newton_schulz
from .sharding import layout_parts, on_whole_matrices, per_matrix_like, whole_matrix_placements

__all__ = [
    "CombinedOptimizer",
    "DEFAULT_LR",
    "Hyperball",
    "LR_SCALINGS",
    "MATRIX_RULE",
    "MAX_LR",
    "NS_COEFFICIENTS",
    "NS_STEPS",
    "OPTIMIZERS",
    "OptimConfig",
    "RADIUS_RULES",
    "ROUTER_MODES",
    "StackedMuon",
    "build_optimizer",
    "classify",
    "frobenius_normalize",
    "fused_adamw_supported",
    "hyperball_radii",
    "hyperball_radius",
    "hyperball_step",
    "layout_parts",
    "load_hyperball_radii",
    "muon_lr_scale",
    "muon_update",
    "newton_schulz",
    "on_whole_matrices",
    "param_groups",
    "per_matrix_like",
    "resolve_lrs",
    "scaled_lr",
    "torch_optimizers",
    "whole_matrix_placements",
    "with_optimizer",
]
