"""Patching a model and undoing it: `apply_mpi` (parametrize every router, install the hooks),
`inplace_update` (the `mpi-inplace` step), `export` (fold φ into plain weights, remove the hooks),
`summary`."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...common.config import check_number, show_value
from ...core.routers import MPI_FAMILY, POWER_TARGETS, PowerTarget, RouterKind, mpi_rows, mpi_scale
from .adapters import get_adapter
from .parametrization import _RouterRows
from .state import _STATE_ATTR, _find_layers, _find_state, _State, _state

Variant = RouterKind


def apply_mpi(
    model: nn.Module,
    variant: Variant = "mpi",
    scale: float | Literal["auto"] = 1.0,
    target: PowerTarget = "gate",
    aux_loss_coef: float | None = None,
) -> nn.Module:
    """Make every MoE router of a supported transformers model use MPI rows. In place; returns `model`.

    variant:  "mpi"          φ = C·normalize(R Gᵀ G), recomputed differentiably in every forward (the paper)
              "power"        φ = R Gᵀ G (ablation: no retraction)
              "retract"      φ = C·R/‖R‖ (ablation: no power step)
              "mpi-inplace"  φ = R; `inplace_update` (run by `RouterMetricsCallback` after every
                             optimizer step) sets R ← C·normalize(R Gᵀ G) without gradient
              "linear"       routing unchanged; only the loss and metrics below are added (baseline)
    scale:    C' in C = C'/sqrt(E) (paper default 1.0), or "auto": C = mean row norm of the existing
              router weight of each layer (keeps a pretrained model's logit scale when retrofitting)
    target:   the expert matrix driving the power step: gate G (paper), up U or both [G; U]
    aux_loss_coef: weight of the load-balancing loss added to `outputs.loss` when the model computed a
              loss and transformers did not add one itself (it does only with output_router_logits=True).
              Default: `config.router_aux_loss_coef` (0 for DeepSeek-V3, which balances with its bias).

    R is a float32 parameter (`router.parametrizations.weight.original`) initialised from the router's
    weight, whatever the model dtype; apply after `model.to(device, dtype)`. The router's logits use φ
    rounded to the router weight's dtype, exactly like an ordinary router weight (and like `export`).

    Every argument and every block is checked before the model is touched: a ValueError leaves it as it was.
    """
    auto = isinstance(scale, str) and scale == "auto"
    _check_arguments(variant, scale, auto, target, aux_loss_coef)
    adapter = get_adapter(model)
    if _find_state(model) is not None:
        raise RuntimeError("apply_mpi was already applied to this model; call export(model) first")
    coef = aux_loss_coef if aux_loss_coef is not None else getattr(model.config, "router_aux_loss_coef", None)
    check_number("aux_loss_coef (default: model.config.router_aux_loss_coef)", coef, ge=0, optional=True)
    layers = _find_layers(model, adapter)
    if not layers:
        raise ValueError(f"no MoE blocks ({', '.join(adapter.block_classes)}) found in {type(model).__name__}")
    for layer in layers:  # all checks first, so that a bad block leaves every block unpatched
        w_ED = layer.router.weight
        w_gate_EFD = layer.mats("gate")[0]
        if w_gate_EFD.shape[0] != w_ED.shape[0] or w_gate_EFD.shape[2] != w_ED.shape[1]:
            raise ValueError(f"{layer.name}: router {tuple(w_ED.shape)} does not match gate {tuple(w_gate_EFD.shape)}")
        if auto:
            layer.scale = w_ED.detach().float().norm(dim=-1).mean().item()
            if variant not in ("linear", "power") and not (math.isfinite(layer.scale) and layer.scale > 0):
                raise ValueError(f'{layer.name}: scale="auto" needs router rows of finite nonzero norm, '
                                 f"got mean norm {layer.scale}; pass a number")
        else:
            layer.scale = mpi_scale(layer.num_experts, float(scale))
    for layer in layers:
        router, w_ED = layer.router, layer.router.weight
        if variant != "linear":
            r_ED = nn.Parameter(w_ED.detach().float().clone(), requires_grad=w_ED.requires_grad)
            rows = _RouterRows(layer, variant, layer.scale, target, w_ED.dtype, w_ED.device)
            router.weight = r_ED
            parametrize.register_parametrization(router, "weight", rows, unsafe=True)
        layer.handle = router.register_forward_hook(layer.record)
    state = _State(variant, target, float(coef or 0.0), layers)
    state.handle = model.register_forward_hook(state.after_forward, with_kwargs=True)
    model.__dict__[_STATE_ATTR] = state
    return model


def _check_arguments(variant: object, scale: object, auto: bool, target: object, aux_loss_coef: object) -> None:
    """`apply_mpi`'s arguments, each a one-line ValueError naming it and what it takes."""
    if variant not in MPI_FAMILY:
        raise ValueError(f"variant must be one of {', '.join(MPI_FAMILY)}, got {show_value(variant)}")
    if target not in POWER_TARGETS:
        raise ValueError(f"target must be one of {', '.join(POWER_TARGETS)}, got {show_value(target)}")
    if not auto:
        try:
            check_number("scale", scale, gt=0)
        except ValueError:
            raise ValueError(f'scale must be a finite number > 0 or "auto", got {show_value(scale)}') from None
    check_number("aux_loss_coef", aux_loss_coef, ge=0, optional=True)


@torch.no_grad()
def inplace_update(model: nn.Module) -> None:
    """`mpi-inplace`: R ← C·normalize(R Gᵀ G) for every layer, no gradient. Call after each optimizer step."""
    state = _find_state(model)
    if state is None or state.variant != "mpi-inplace":
        return
    for layer in state.layers:
        r_ED = layer.raw_rows()
        r_ED.copy_(mpi_rows(r_ED, *layer.mats(state.target), scale=layer.scale))


@torch.no_grad()
def export(model: nn.Module) -> nn.Module:
    """Fold φ into each router's own `weight` and remove every mpirouter hook. In place; returns `model`.

    The weight is written in the router weight's dtype (the model dtype, e.g. bfloat16): exactly the
    tensor the patched forward multiplied with, so the exported model computes the same logits and
    `save_pretrained` writes an ordinary checkpoint (same keys and shapes as the original) that plain
    `AutoModelForCausalLM.from_pretrained` loads. Serving stacks that read transformers checkpoints see
    an ordinary router weight; only transformers' own loading is tested here.
    """
    state = _state(model)
    for layer in state.layers:
        router = layer.router
        if parametrize.is_parametrized(router, "weight"):
            phi_ED = router.weight.detach().clone()
            requires_grad = router.parametrizations.weight.original.requires_grad
            if len(router.parametrizations) == 1:
                # Undo the class swap by hand: `remove_parametrizations` deletes the property from the
                # generated class, which a `copy.deepcopy` of the model shares with the original.
                del router._modules["parametrizations"]
                router.__class__ = router.__class__.__bases__[0]
            else:
                parametrize.remove_parametrizations(router, "weight", leave_parametrized=False)
            router.weight = nn.Parameter(phi_ED, requires_grad=requires_grad)
        if layer.handle is not None:
            layer.handle.remove()
    state.handle.remove()
    for m in (model, *model.modules()):
        m.__dict__.pop(_STATE_ATTR, None)
    return model


def summary(model: nn.Module) -> str:
    """One line per patched MoE block: name, router, E, F, D, C, variant."""
    state = _state(model)
    lines = []
    for layer in state.layers:
        w_gate_EFD = layer.mats("gate")[0]
        e, f, d = w_gate_EFD.shape
        lines.append(
            f"{layer.name}.{layer.adapter.router_attr}: E={e} F={f} D={d} C={layer.scale:.4g} "
            f"variant={state.variant} target={state.target} R dtype={layer.raw_rows().dtype}"
        )
    return "\n".join(lines)
