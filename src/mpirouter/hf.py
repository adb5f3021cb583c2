"""MPI routers for Hugging Face `transformers` MoE models: retrofit, train, export.

    model = AutoModelForCausalLM.from_pretrained(...)     # or .from_config(...)
    apply_mpi(model)                                       # routers now use φ = C·normalize(R Gᵀ G)
    ... train (Trainer + RouterMetricsCallback, or any loop) ...
    export(model).save_pretrained(out_dir)                 # ordinary checkpoint, loads without mpirouter

How it works. Each MoE block keeps its own router module and forward code, so the model's
routing semantics (score function, top-k, weight normalisation, routed scaling factor,
correction bias, router bias, shared experts) are untouched. Only the router's `weight` becomes
computed: `torch.nn.utils.parametrize` swaps the stored weight for a float32 parameter R
(initialised from the existing weight, so pretrained models can be retrofitted) and returns the
rows φ(R, G) cast to the router's dtype whenever the router reads `weight`. The expert gate
matrices G come from an explicit per-architecture adapter table (`ADAPTERS`), never from
guessing by name. The math is `mpirouter.routers` (`mpi_rows`, `power_step`, `retract`).

Shape legend (suffixes on tensor names):
    T  tokens (batch * sequence, flattened)     D  model width (router input size)
    E  number of experts                        F  expert hidden size
    K  experts per token (top-k)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .moe import max_violation
from .routers import RouterConfig, alignment, mpi_rows, mpi_scale, power_step, retract, select_target

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("mpirouter.hf needs Hugging Face transformers >= 5: pip install 'transformers>=5'") from e

__all__ = [
    "ADAPTERS",
    "SUPPORTED_MODEL_TYPES",
    "MoEAdapter",
    "RouterMetricsCallback",
    "add_router_callback",
    "apply_mpi",
    "expert_matrices",
    "export",
    "inplace_update",
    "last_aux_loss",
    "load_balancing_loss",
    "router_metrics",
    "summary",
]

# ----------------------------------------------------------------------------- adapter table


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

Variant = Literal["linear", "mpi", "power", "retract", "mpi-inplace"]


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


# ----------------------------------------------------------------------------- per-layer state


def _in_backward() -> bool:
    """True while autograd runs a backward pass (gradient-checkpoint recomputation re-runs the router)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _probs(logits_TE: torch.Tensor, score: str) -> torch.Tensor:
    """Per-token expert probabilities P (T, E) in float32 for the load-balancing loss."""
    if score == "sigmoid":  # DeepSeek-V3's balance loss: sigmoid scores normalised over all experts
        s_TE = logits_TE.float().sigmoid()
        return s_TE / s_TE.sum(-1, keepdim=True)
    return logits_TE.float().softmax(-1)


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
            load_E = torch.bincount(idx_TK.reshape(-1), minlength=self.num_experts)[: self.num_experts].float()
            p_E = _probs(logits_TE.detach(), self.adapter.score).mean(0)
            split = "train" if module.training else "eval"
            s = self.stats.setdefault(split, {"load_E": torch.zeros_like(load_E), "maxvio": 0.0, "aux": 0.0, "batches": 0})
            s["load_E"] += load_E
            s["maxvio"] = s["maxvio"] + max_violation(load_E)
            s["aux"] = s["aux"] + self.num_experts * (load_E / idx_TK.shape[0] * p_E).sum()
            s["batches"] += 1


class _RouterRows(nn.Module):
    """Parametrization of `router.weight`: φ(R, G) in float32, cast to the router's dtype.

    `dtype_probe` is a non-persistent empty buffer: `model.to(dtype)` casts it, so the rows follow
    the model's dtype. The layer (and so the experts) is held as a plain reference, not a submodule,
    so the expert weights stay where they are in the module tree and in the state dict.
    """

    def __init__(self, layer: _Layer, kind: str, scale: float, target: str, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.kind, self.scale, self.target = kind, scale, target
        self.register_buffer("dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)
        object.__setattr__(self, "_layer", layer)

    def forward(self, r_ED: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=r_ED.device.type, enabled=False):
            if self.kind == "mpi-inplace":
                phi_ED = r_ED.float()
            elif self.kind == "retract":
                phi_ED = retract(r_ED.float(), self.scale)
            elif self.kind == "power":
                phi_ED = power_step(r_ED.float(), *(m.float() for m in self._layer.mats(self.target)))
            else:
                phi_ED = mpi_rows(r_ED, *self._layer.mats(self.target), scale=self.scale)
        return phi_ED.to(self.dtype_probe.dtype)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, target={self.target}, C={self.scale:.4g}, dtype={self.dtype_probe.dtype}"


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


# ----------------------------------------------------------------------------- public API


def apply_mpi(
    model: nn.Module,
    variant: Variant = "mpi",
    scale: float | Literal["auto"] = 1.0,
    target: Literal["gate", "up", "gate_up"] = "gate",
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
    """
    kind_cfg = RouterConfig(kind=variant, scale_prime=1.0 if scale == "auto" else float(scale), target=target)
    adapter = get_adapter(model)
    if _find_state(model) is not None:
        raise RuntimeError("apply_mpi was already applied to this model; call export(model) first")
    layers = _find_layers(model, adapter)
    if not layers:
        raise ValueError(f"no MoE blocks ({', '.join(adapter.block_classes)}) found in {type(model).__name__}")
    for layer in layers:
        router, w_ED = layer.router, layer.router.weight
        w_gate_EFD = layer.mats("gate")[0]
        if w_gate_EFD.shape[0] != w_ED.shape[0] or w_gate_EFD.shape[2] != w_ED.shape[1]:
            raise ValueError(f"{layer.name}: router {tuple(w_ED.shape)} does not match gate {tuple(w_gate_EFD.shape)}")
        if scale == "auto":
            layer.scale = w_ED.detach().float().norm(dim=-1).mean().item()
        else:
            layer.scale = mpi_scale(layer.num_experts, kind_cfg.scale_prime)
        if variant != "linear":
            r_ED = nn.Parameter(w_ED.detach().float().clone(), requires_grad=w_ED.requires_grad)
            rows = _RouterRows(layer, variant, layer.scale, target, w_ED.dtype, w_ED.device)
            router.weight = r_ED
            parametrize.register_parametrization(router, "weight", rows, unsafe=True)
        layer.handle = router.register_forward_hook(layer.record)
    coef = aux_loss_coef if aux_loss_coef is not None else getattr(model.config, "router_aux_loss_coef", 0.0)
    state = _State(variant, target, float(coef or 0.0), layers)
    state.handle = model.register_forward_hook(state.after_forward, with_kwargs=True)
    model.__dict__[_STATE_ATTR] = state
    return model


def load_balancing_loss(
    logits: list[torch.Tensor],
    indices: list[torch.Tensor],
    num_experts: int,
    score: str = "softmax",
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' load-balancing loss E · Σ_i f_i P_i, pooled over layers (as its `load_balancing_loss_func`).

    f_i: routed slots to expert i per token (sums to K), from the choices the router actually made
    (so DeepSeek-V3's group-limited, bias-corrected choice counts as made); P_i: mean probability
    (softmax, or sigmoid scores normalised over experts for sigmoid routers). Padding (mask 0) is excluded.
    Equals transformers' value for the softmax models when their top-k is plain top-k.
    """
    count_E = probs_E = rows = 0.0
    for logits_TE, idx_TK in zip(logits, indices):
        p_TE = _probs(logits_TE, score)
        hits_TE = torch.zeros_like(p_TE).scatter_add_(1, idx_TK, torch.ones_like(idx_TK, dtype=p_TE.dtype))
        w_T1 = None
        if attention_mask is not None and attention_mask.numel() == p_TE.shape[0]:
            w_T1 = attention_mask.reshape(-1, 1).to(p_TE)
        if w_T1 is None:
            count_E, probs_E, rows = count_E + hits_TE.sum(0), probs_E + p_TE.sum(0), rows + p_TE.shape[0]
        else:
            count_E, probs_E, rows = count_E + (hits_TE * w_T1).sum(0), probs_E + (p_TE * w_T1).sum(0), rows + w_T1.sum()
    return num_experts * ((count_E / rows) * (probs_E / rows)).sum()


def last_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The (detached) load-balancing loss of the model's last forward, with or without output_router_logits."""
    return _state(model).last_aux_loss


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


# ----------------------------------------------------------------------------- metrics


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


class RouterMetricsCallback(TrainerCallback):
    """`transformers.Trainer` callback: router metrics in every log, and the `mpi-inplace` update.

    Adds `router_metrics` to the training logs (and `eval_router/...` to evaluation logs), and runs
    `inplace_update` after every optimizer step. `add_router_callback(trainer)` installs it first in
    the callback list so that reporting integrations (TensorBoard, W&B, ...) also see the metrics.
    """

    def __init__(self, alignment: bool = True, prefix: str = "router"):
        self.alignment, self.prefix = alignment, prefix

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            inplace_update(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or _find_state(model) is None:
            return
        if any(k.startswith("eval_") for k in logs):
            metrics = router_metrics(model, "eval", self.alignment, prefix="eval_" + self.prefix)
        elif "loss" in logs:
            metrics = router_metrics(model, "train", self.alignment, prefix=self.prefix)
        else:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def add_router_callback(trainer: Any, alignment: bool = True) -> RouterMetricsCallback:
    """Install a `RouterMetricsCallback` at the front of `trainer`'s callbacks; returns it."""
    callback = RouterMetricsCallback(alignment=alignment)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


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
