"""Layer 2, PyTorch distributed for the built-in model (depends on `core`, `common`).

- `config`: `DistConfig` (strategy ddp|fsdp, expert-parallel degree, backend, timeout).
"""

from .config import DistConfig
from .expert import ExpertParallel, expert_parameters, reduce_expert_grads, shard_experts

__all__ = ["DistConfig", "ExpertParallel", "expert_parameters", "reduce_expert_grads", "shard_experts"]
