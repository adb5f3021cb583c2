"""The per-architecture adapter table: where each supported model keeps its router and its expert
gate matrices G (`ADAPTERS`, `get_adapter`), and `expert_matrices`, which reads G (and U) from a block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class MoEAdapter:
    """Where one architecture keeps its router and expert gate weights."""

    block_classes: tuple[str, ...]
    """Class names of the MoE block (same names in transformers 4.x and 5.x)."""
    router_attr: str
    """Attribute of the block holding the router; the router has `weight` (E, D) used as `x · weightᵀ`."""
    fused_layout: Literal["EFD_halves", "EDF_interleaved", "EFD_w1w3_halves"]
    """Layout of the fused `experts.gate_up_proj` (transformers 5):
    EFD_halves       (E, 2F, D), gate = rows [0, F), up = rows [F, 2F)  (`x·Wᵀ` then `.chunk(2, -1)`)
    EDF_interleaved  (E, D, 2F), gate = even columns, up = odd columns  (`x @ W` then `[..., ::2]`)"""
    legacy_gate: str | None
    """Per-expert `nn.Linear` holding G in the older `nn.ModuleList` expert layout (transformers 4.x)."""
    legacy_up: str | None
    score: Literal["softmax", "sigmoid"]
    """The router's score function, used for the probabilities P_i of the load-balancing loss."""
    semantics: str
    """What the untouched router/block forward does (documentation)."""
    experts_attr: str = "experts"


ADAPTERS: dict[str, MoEAdapter] = {
    "mixtral": MoEAdapter(
        ("MixtralSparseMoeBlock",), "gate", "EFD_halves", "w1", "w3", "softmax",
        "softmax over E, top-k, renormalise the k weights; router jitter noise",
    ),
    "olmoe": MoEAdapter(
        ("OlmoeSparseMoeBlock",), "gate", "EFD_halves", "gate_proj", "up_proj", "softmax",
        "softmax over E, top-k, renormalise iff norm_topk_prob",
    ),
    "qwen2_moe": MoEAdapter(
        ("Qwen2MoeSparseMoeBlock",), "gate", "EFD_halves", "gate_proj", "up_proj", "softmax",
        "softmax over E, top-k, renormalise iff norm_topk_prob; sigmoid-gated shared expert; dense mlp_only layers",
    ),
    "qwen3_moe": MoEAdapter(
        ("Qwen3MoeSparseMoeBlock",), "gate", "EFD_halves", "gate_proj", "up_proj", "softmax",
        "softmax over E, top-k, renormalise iff norm_topk_prob; dense mlp_only layers",
    ),
    "deepseek_v3": MoEAdapter(
        ("DeepseekV3MoE",), "gate", "EFD_halves", "gate_proj", "up_proj", "sigmoid",
        "float32 sigmoid scores, e_score_correction_bias for the choice only, group-limited top-k "
        "(n_group/topk_group), renormalise iff norm_topk_prob, times routed_scaling_factor; shared "
        "experts; first_k_dense_replace dense layers",
    ),
    "gpt_oss": MoEAdapter(
        ("GptOssMLP",), "router", "EDF_interleaved", None, None, "softmax",
        "router bias, top-k on logits, softmax over the k; expert biases, clamped alpha-SwiGLU",
    ),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(ADAPTERS)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def get_adapter(model: nn.Module) -> MoEAdapter:
    """The adapter for `model.config.model_type`; ValueError listing the supported ones otherwise."""
    model_type = _model_type(model)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"mpirouter.hf does not support model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (transformers MoE causal LMs)"
        )
    return ADAPTERS[model_type]


def _check_flag(experts: nn.Module, name: str, expected: bool) -> None:
    """transformers 5 marks fused experts with `is_transposed`/`is_concatenated`; refuse a layout we would misread."""
    value = getattr(experts, name, expected)
    if value != expected:
        raise ValueError(f"{type(experts).__name__}.{name} is {value}, the adapter expects {expected}: unknown layout")


def expert_matrices(
    adapter: MoEAdapter, experts: nn.Module, need_up: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(w_gate_EFD, w_up_EFD) of one MoE block in `nn.Linear` layout, as differentiable views of its parameters."""
    w = getattr(experts, "gate_up_proj", None)
    if isinstance(w, torch.Tensor):
        if adapter.fused_layout == "EFD_halves":
            _check_flag(experts, "is_transposed", False)
            _check_flag(experts, "is_concatenated", True)
            f = w.shape[1] // 2
            return w[:, :f], (w[:, f:] if need_up else None)
        _check_flag(experts, "is_transposed", True)
        _check_flag(experts, "is_concatenated", False)
        return w[..., 0::2].transpose(1, 2), (w[..., 1::2].transpose(1, 2) if need_up else None)
    if isinstance(experts, nn.ModuleList) and adapter.legacy_gate is not None:
        w_gate_EFD = torch.stack([getattr(e, adapter.legacy_gate).weight for e in experts])
        w_up_EFD = torch.stack([getattr(e, adapter.legacy_up).weight for e in experts]) if need_up else None
        return w_gate_EFD, w_up_EFD
    raise TypeError(
        f"cannot locate expert gate weights in {type(experts).__name__}: expected a fused `gate_up_proj` "
        f"({adapter.fused_layout}) or a ModuleList of experts with `.{adapter.legacy_gate}`"
    )
