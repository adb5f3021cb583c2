"""Per-layer hook state: what the forward hooks record. `_Layer` is one patched MoE block (its
router's last logits and choices, running load statistics), `_State` all of them plus the model-level
hook that adds the aux loss; `_state(model)` finds it on a model."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ...core.routing import max_violation, tokens_per_expert
from ...core.routers import select_target
from .adapters import MoEAdapter, expert_matrices
from .loss import _probs, load_balancing_loss


def _in_backward() -> bool:
    """True while autograd runs a backward pass (gradient-checkpoint recomputation re-runs the router)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


class _Layer:
    """One patched MoE block: references into the model plus what its router did in the last forward."""

    def __init__(self, name: str, index: int, block: nn.Module, adapter: MoEAdapter, top_k: int):
        self.name, self.index, self.block, self.adapter, self.top_k = name, index, block, adapter, top_k
        self.router: nn.Module = getattr(block, adapter.router_attr)
        self.experts: nn.Module = getattr(block, adapter.experts_attr)
        self.num_experts = self.router.weight.shape[0]
        self.scale = 1.0
        self.logits_TE: torch.Tensor | None = None  # with autograd graph, until the model's forward returns
        self.idx_TK: torch.Tensor | None = None
        self.stats: dict[str, dict[str, Any]] = {}  # "train"/"eval" -> running sums (detached)
        self.handle = None

    def mats(self, target: str) -> tuple[torch.Tensor, ...]:
        w_gate_EFD, w_up_EFD = expert_matrices(self.adapter, self.experts, need_up=target != "gate")
        return select_target(target, w_gate_EFD, w_up_EFD)

    def raw_rows(self) -> torch.Tensor:
        """R: the trained parameter (the original router weight when unpatched)."""
        if parametrize.is_parametrized(self.router, "weight"):
            return self.router.parametrizations.weight.original
        return self.router.weight

    def record(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook on the router: keep its logits and choices, accumulate load statistics."""
        if _in_backward():
            return
        logits_TE, idx_TK = None, None
        outs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        for o in outs:
            if not isinstance(o, torch.Tensor) or o.dim() != 2:
                continue
            if o.is_floating_point() and logits_TE is None and o.shape[-1] == self.num_experts:
                logits_TE = o
            elif not o.is_floating_point() and idx_TK is None:
                idx_TK = o
        if logits_TE is None:  # a router that does not return its logits (older releases): recompute them
            x_TD = args[0].reshape(-1, module.weight.shape[1])
            logits_TE = F.linear(x_TD, module.weight, getattr(module, "bias", None))
        if idx_TK is None:
            idx_TK = logits_TE.topk(self.top_k, dim=-1).indices
        self.logits_TE, self.idx_TK = logits_TE, idx_TK
        with torch.no_grad():
            # a scatter-add into (E,), not bincount: on CUDA bincount reads its input's min and max to the host
            load_E = tokens_per_expert(idx_TK, self.num_experts).float()
            p_E = _probs(logits_TE.detach(), self.adapter.score).mean(0)
            split = "train" if module.training else "eval"
            s = self.stats.setdefault(split, {"load_E": torch.zeros_like(load_E), "maxvio": 0.0, "aux": 0.0, "batches": 0})
            s["load_E"] += load_E
            s["maxvio"] = s["maxvio"] + max_violation(load_E)
            s["aux"] = s["aux"] + self.num_experts * (load_E / idx_TK.shape[0] * p_E).sum()
            s["batches"] += 1


@dataclass
class _State:
    variant: str
    target: str
    aux_loss_coef: float
    layers: list[_Layer]
    handle: Any = None
    last_aux_loss: torch.Tensor | None = None

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook on the whole model: the aux loss into `outputs` (and `loss`) unless transformers did it.

        A bound method rather than a closure, so that `copy.deepcopy(model)` gives the copy its own state.
        """
        layers = [lay for lay in self.layers if lay.logits_TE is not None]
        try:
            if not layers:
                return None
            aux = load_balancing_loss(
                [lay.logits_TE for lay in layers], [lay.idx_TK for lay in layers],
                layers[0].num_experts, layers[0].adapter.score, kwargs.get("attention_mask"),
            )
            self.last_aux_loss = aux.detach()
            if not is_dataclass(output) or getattr(output, "aux_loss", None) is not None:
                return None  # a plain tuple, or transformers already computed (and added) its own aux loss
            if "aux_loss" in {f.name for f in fields(output)}:
                output.aux_loss = aux
            loss = getattr(output, "loss", None)
            if loss is not None and self.aux_loss_coef > 0:
                output.loss = loss + self.aux_loss_coef * aux.to(loss.device)
            return output
        finally:
            for lay in self.layers:  # never keep the graph alive past the forward
                lay.logits_TE = lay.idx_TK = None


_STATE_ATTR = "_mpirouter_state"


def _find_state(model: nn.Module) -> _State | None:
    for m in (model, *model.modules()):
        state = m.__dict__.get(_STATE_ATTR)
        if state is not None:
            return state
    return None


def _state(model: nn.Module) -> _State:
    state = _find_state(model)
    if state is None:
        raise ValueError("this model has no MPI routers: call mpirouter.hf.apply_mpi(model) first")
    return state


def _find_layers(model: nn.Module, adapter: MoEAdapter) -> list[_Layer]:
    top_k = int(getattr(model.config, "num_experts_per_tok", 0) or 0)
    layers = []
    for name, module in model.named_modules():
        if type(module).__name__ in adapter.block_classes:
            m = re.search(r"layers\.(\d+)\.", name + ".")
            layer = _Layer(name, int(m.group(1)) if m else len(layers), module, adapter, top_k)
            if layer.top_k <= 0:
                layer.top_k = int(getattr(layer.router, "top_k", 1))
            layers.append(layer)
    return layers
