"""mpirouter: Mixture-of-Experts routers that follow their experts (Manifold Power Iteration, arXiv 2606.12397)."""

from .model import ModelConfig, MoELM, ModelOutput, preset_config
from .moe import MoE, MoEConfig, MoEOutput, MoEStats, load_balance_loss, max_violation, route
from .routers import (
    MPIRouter,
    Router,
    RouterConfig,
    alignment,
    mpi_rows,
    mpi_scale,
    power_step,
    retract,
    top_singular_directions,
)

__version__ = "0.1.0"

__all__ = [
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
    "alignment",
    "load_balance_loss",
    "max_violation",
    "mpi_rows",
    "mpi_scale",
    "power_step",
    "preset_config",
    "retract",
    "route",
    "top_singular_directions",
]
