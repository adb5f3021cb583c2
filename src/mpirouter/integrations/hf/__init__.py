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
guessing by name. The math is `mpirouter.core.routers` (`mpi_rows`, `power_step`, `retract`).

Shape legend (suffixes on tensor names):
    T  tokens (batch * sequence, flattened)     D  model width (router input size)
    E  number of experts                        F  expert hidden size
    K  experts per token (top-k)

Modules (each imports only modules above it in this list):
    adapters         the per-architecture table (`ADAPTERS`) and `expert_matrices` (G, U of a block)
    loss             `load_balancing_loss` and the per-token expert probabilities it uses
    state            per-layer hook state: what the router and model hooks record during forward
    parametrization  `_RouterRows`, the parametrization that computes the router weight as φ
    patching         `apply_mpi`, `inplace_update`, `export`, `summary`
    metrics          `router_metrics`, `last_aux_loss`
    callback         `RouterMetricsCallback`, `add_router_callback` (the only one importing transformers)
"""

from .adapters import ADAPTERS, SUPPORTED_MODEL_TYPES, MoEAdapter, expert_matrices
from .callback import RouterMetricsCallback, add_router_callback
from .loss import load_balancing_loss
from .metrics import last_aux_loss, router_metrics
from .patching import apply_mpi, export, inplace_update, summary

# Private names, re-exported for the tests (`hf._state(model)`); not part of the API.
from .state import _state  # noqa: F401

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
