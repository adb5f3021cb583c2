"""Router metrics for logging: `router_metrics` (MaxVio, aux loss, alignment per layer, from the
statistics the hooks accumulate) and `last_aux_loss` (the load-balancing loss of the last forward)."""

from __future__ import annotations

import torch
from torch import nn

from ...core.routing import max_violation
from ...core.routers import alignment
from .state import _state


def last_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The (detached) load-balancing loss of the model's last forward, with or without output_router_logits."""
    return _state(model).last_aux_loss


@torch.no_grad()
def router_metrics(
    model: nn.Module, split: str = "train", alignment_metrics: bool = True, reset: bool = True, prefix: str = "router"
) -> dict[str, float]:
    """Per-layer router metrics since the last reset, for logging (a plain function for custom loops).

    Keys `{prefix}/{metric}/layer{i}` and the mean over layers `{prefix}/{metric}`:
      maxvio         MaxVio per batch ((max load − mean load)/mean load), averaged over the batches seen
      maxvio_window  MaxVio of the loads summed over all batches seen
      aux            per-layer load-balancing loss E·Σ f_i P_i, averaged over batches
      align          mean |cos| between the effective router rows and their experts' top singular
                     direction (of the power-step target); one SVD per layer, skip with alignment_metrics=False
      align_R        the same for the raw parameter R (variants whose rows differ from R)
    `split` is "train" or "eval" (statistics are kept apart by the router's training flag).
    """
    state = _state(model)
    per_layer: dict[str, dict[int, float]] = {}
    for layer in state.layers:
        s = layer.stats.pop(split, None) if reset else layer.stats.get(split)
        vals: dict[str, float] = {}
        if s and s["batches"]:
            vals["maxvio"] = float(s["maxvio"]) / s["batches"]
            vals["maxvio_window"] = max_violation(s["load_E"]).item()
            vals["aux"] = float(s["aux"]) / s["batches"]
        if alignment_metrics:
            mats = layer.mats(state.target)
            vals["align"] = alignment(layer.router.weight, *mats).mean().item()
            if state.variant in ("mpi", "power", "retract"):
                vals["align_R"] = alignment(layer.raw_rows(), *mats).mean().item()
        for k, v in vals.items():
            per_layer.setdefault(k, {})[layer.index] = v
    out: dict[str, float] = {}
    for k, by_layer in per_layer.items():
        out[f"{prefix}/{k}"] = sum(by_layer.values()) / len(by_layer)
        out.update({f"{prefix}/{k}/layer{i}": v for i, v in by_layer.items()})
    return out
