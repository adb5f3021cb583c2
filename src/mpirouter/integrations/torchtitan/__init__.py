"""MPI routers in TorchTitan's MoE models (qwen3, deepseek_v3), under its FSDP and expert parallelism.

    pip install 'mpirouter[titan]'
    torchrun --nproc_per_node=8 -m torchtitan.train --module mpirouter.integrations.torchtitan --config qwen3_moe_1b_mpi
    torchrun ... -m torchtitan.train --module qwen3 --config qwen3_moe_debug \\
        --override.imports mpirouter.integrations.torchtitan.convert.mpi_moe,mpirouter.integrations.torchtitan.metrics.router_metrics

No fork and no patch of torchtitan: its router gate becomes `MPIGate` (logits x·φᵀ with
φ = C·normalize(R W1ᵀ W1), R the stored gate weight), its MoE layer `MPIMoE` (binds the experts to
the gate, counts routed tokens for the metrics), its metrics processor `RouterMetricsProcessor`.
All three are config classes swapped in by torchtitan's own extension points. docs/torchtitan.md
has the launch commands and what each option does.

Modules (each imports only modules above it in this list):
    gate             `MPIGate`, `gathered_rows` (φ for local experts, all-gathered under EP)
    moe              `MPIMoE`
    convert          `to_mpi`, `to_stock`, the `mpi_moe` override
    fold             `folded_state_dict`: φ written into the stock gate weight, for release
    metrics          `RouterMetricsProcessor`, the `router_metrics` override
    config_registry  ready configs for `--module mpirouter.integrations.torchtitan --config ...`
"""

from .convert import mpi_moe, to_mpi, to_stock
from .fold import folded_state_dict
from .gate import MPIGate, gathered_rows
from .metrics import RouterMetricsProcessor, router_metrics
from .moe import MPIMoE

__all__ = [
    "MPIGate",
    "MPIMoE",
    "RouterMetricsProcessor",
    "folded_state_dict",
    "gathered_rows",
    "mpi_moe",
    "router_metrics",
    "to_mpi",
    "to_stock",
]
