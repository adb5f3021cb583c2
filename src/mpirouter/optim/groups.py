"""The parameter grouping rule shared by every optimizer (AdamW, Muon, AdamH, MuonH).

Four logical groups, the same for every optimizer; what changes is the update each one gets:

============  ==============================================  ===========  ===========  =============  =============
group         parameters                                      adamw        muon         adamh          muonh
============  ==============================================  ===========  ===========  =============  =============
matrices      attention wqkv/wo, dense FFN, expert stacks     AdamW, wd    Muon, wd     Adam+Hyperball Muon+Hyperball
              (E,F,D)/(E,D,F) (Muon and Hyperball per expert)
embeddings    token embedding, output head (tied: once)       AdamW, wd    AdamW, wd    AdamW, wd      AdamW, wd
norms         RMSNorm gains (and any bias / 1-D parameter)    AdamW, 0     AdamW, 0     AdamW, 0       AdamW, 0
router        router rows R (E, D), float32                   see below
============  ==============================================  ===========  ===========  =============  =============

The AdamW-side groups of muon/adamh/muonh run at ``adam_lr`` (stored as ``lr_scale`` = adam_lr/lr,
applied inside the optimizer's step); the matrices run at ``lr``. Under Hyperball the wrapped
groups have weight decay 0: the fixed norm replaces it.

The router R (``OptimConfig.router``):

- ``"matrix"`` (default): R is one more hidden (E × D) matrix and follows the matrices' column:
  AdamW (weight decay ``router_weight_decay``) under adamw, Muon on the E×D matrix under muon,
  the base update wrapped by Hyperball (one Frobenius sphere, radius sqrt(E) by default) under
  adamh/muonh. This is the paper's grouping ("embeddings, output head and norm gains stay on
  AdamW") and treats every router kind alike, so linear-vs-MPI comparisons stay paired.
  With MPI (and ``retract``) only the row directions of R matter: φ_i = C·N(R_i G_iᵀG_i) does
  not change when R_i is scaled, so the gradient is orthogonal to each R_i and fixing ‖R‖_F
  removes no function, it only fixes the angular step size.
- ``"rows"``: as "matrix", but R is treated as E separate 1×D matrices, one per expert, as the
  expert stacks are: Muon normalizes each row's momentum on its own, and Hyperball keeps each
  row at a fixed norm (radius 1 by default) and normalizes each row's update. For MPI this is
  exactly the manifold R lives on (a product of spheres: only directions matter); for a linear
  router it would fix every row norm, i.e. impose the ``retract`` ablation's constraint.
- ``"adamw"``: R stays on AdamW (``router_weight_decay``, ``adam_lr``) under every optimizer, like
  the embeddings: identical router dynamics across optimizers, only the other matrices differ.
"""

from __future__ import annotations

from torch import nn

from ..core.routers import Router
from .config import MATRIX_RULE, ROUTER_MODES, OptimConfig, resolve_lrs

HEAD_NAMES = ("head", "lm_head")


def classify(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable parameters by logical group: matrices, embeddings, router, norms (first name wins for tied weights)."""
    out: dict[str, list] = {"matrices": [], "embeddings": [], "router": [], "norms": []}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(mod, Router) or name.endswith("router.weight"):
                out["router"].append((name, p))
            elif p.dim() < 2:
                out["norms"].append((name, p))
            elif isinstance(mod, nn.Embedding) or mod_name.split(".")[-1] in HEAD_NAMES:
                out["embeddings"].append((name, p))
            else:
                out["matrices"].append((name, p))
    return out


def param_groups(model: nn.Module, optim: OptimConfig, lr: float | None = None, adam_lr: float | None = None) -> list[dict]:
    """The parameter groups of optimizer ``optim.name`` (module docstring); asserts each trainable parameter is in exactly one.

    ``lr``/``adam_lr`` are the peak learning rates of the matrices / AdamW-side groups (None: `resolve_lrs`).
    Each group dict has: name, params, weight_decay, algo ("adamw" | "adam" | "muon"),
    hyperball (bool), rows (bool), and lr_scale for AdamW-side groups of non-AdamW optimizers.
    """
    if optim.name not in MATRIX_RULE:
        raise ValueError(f"unknown optimizer {optim.name!r}; available: {', '.join(MATRIX_RULE)}")
    if optim.router not in ROUTER_MODES:
        raise ValueError(f"unknown router treatment {optim.router!r}; choose one of {', '.join(ROUTER_MODES)}")
    if lr is None or adam_lr is None:
        lr, adam_lr = resolve_lrs(optim)
    algo, hyper = MATRIX_RULE[optim.name]
    wd = optim.weight_decay
    router_wd = wd if optim.router_weight_decay is None else optim.router_weight_decay
    side = {} if optim.name == "adamw" else {"lr_scale": adam_lr / lr}
    adamw_side = lambda decay: dict(weight_decay=decay, algo="adamw", hyperball=False, rows=False, **side)  # noqa: E731
    matrix_like = lambda decay, rows: dict(weight_decay=0.0 if hyper else decay, algo=algo, hyperball=hyper, rows=rows)  # noqa: E731
    spec = {
        "matrices": matrix_like(wd, False),
        "embeddings": adamw_side(wd),
        "router": adamw_side(router_wd) if optim.router == "adamw" else matrix_like(router_wd, optim.router == "rows"),
        "norms": adamw_side(0.0),
    }
    if algo == "adamw":  # plain AdamW: every group is AdamW; "rows" changes nothing there
        spec["router"]["rows"] = False
    found = classify(model)
    groups = [{"name": k, "params": [p for _, p in found[k]], **spec[k]} for k in spec if found[k]]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, "a parameter is in no group or in two"
    return groups
