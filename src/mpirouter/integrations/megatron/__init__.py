"""MPI routers in Megatron-Core's MoE layer (optional extra: pip install 'mpirouter[megatron]'); docs/megatron.md.

- `rows`: `MPIConfig` (kind, power target, C'), where the experts keep their fc1 gate/up rows, φ from them.
- `router`: `MPITopKRouter`, Megatron's `TopKRouter` with logits x·φᵀ (everything after the logits is Megatron's).
- `layer`: `MPIMoELayer` (hands the experts to the router) and `mpi_layer_spec` (a GPT layer spec made MPI).
- `fold`: φ written into the routers' weights for a stock Megatron model (state dict, distributed checkpoint).
- `tracking`, `metrics`: MaxVio per layer every step, alignment every N, logged like Megatron's MoE metrics.
"""

from .fold import folded_state_dict, folded_weights
from .layer import MPIMoELayer, mpi_layer_spec
from .metrics import record_alignment, report_router_metrics
from .router import MPITopKRouter
from .rows import MPIConfig

__all__ = ["MPIConfig", "MPIMoELayer", "MPITopKRouter", "folded_state_dict", "folded_weights", "mpi_layer_spec",
           "record_alignment", "report_router_metrics"]
