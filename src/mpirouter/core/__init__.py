"""Layer 1, the model code (depends only on torch and `common`): router math and the `Router`
module (`routers`), the dropless MoE layer (`moe`), the decoder-only MoE language model (`model`),
bf16 autocast with bf16 matmuls emulated where a CPU has no bf16 kernels (`precision`)."""

from .model import ModelConfig, ModelOutput, MoELM, preset_config
from .moe import MoE, MoEConfig, MoEOutput, MoEStats, load_balance_loss, max_violation, route
from .precision import EmulateBF16Matmuls, bf16_matmuls, native_bf16_matmul
from .routers import (
    MPIRouter,
    Router,
    RouterConfig,
    RowsPerStep,
    alignment,
    mpi_rows,
    mpi_scale,
    power_step,
    retract,
    top_singular_directions,
)

__all__ = [
    "EmulateBF16Matmuls",
    "MPIRouter",
    "ModelConfig",
    "ModelOutput",
    "MoE",
    "MoEConfig",
    "MoELM",
    "MoEOutput",
    "MoEStats",
    "Router",
    "RouterConfig",
    "RowsPerStep",
    "alignment",
    "bf16_matmuls",
    "load_balance_loss",
    "max_violation",
    "mpi_rows",
    "mpi_scale",
    "native_bf16_matmul",
    "power_step",
    "preset_config",
    "retract",
    "route",
    "top_singular_directions",
]
