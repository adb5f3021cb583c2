"""`MPIMoE`: torchtitan's MoE layer with an `MPIGate` router and a per-step count of routed tokens.

Shape legend: B batch, L sequence, D model width, E experts, K experts per token.

Everything else is torchtitan's `MoE`: the token dispatcher, the grouped experts, shared experts,
and aux-loss-free balancing through `expert_bias_E` (which the stock `tokens_per_expert_E` buffer
feeds; it is zeroed by torchtitan's optimizer pre-hook before the step is logged, so the router
metrics keep their own count, `routed_tokens_E`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchtitan.models.common.moe import MoE

from .gate import MPIGate, plain


class MPIMoE(MoE):
    """torchtitan `MoE` whose router gate computes φ from its own experts (`MPIGate`)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        def __post_init__(self) -> None:
            if not isinstance(self.router.gate, MPIGate.Config):
                raise ValueError(f"MPIMoE needs an MPIGate router gate, got {type(self.router.gate).__qualname__}")

    def __init__(self, config: Config):
        super().__init__(config)
        if not isinstance(self.router.gate, MPIGate):
            # e.g. a quantization converter that rewrote every Linear config, the router gate included
            raise ValueError(f"MPIMoE: the router gate was built as {type(self.router.gate).__qualname__}, not MPIGate; "
                             "keep converters off 'router.gate' (e.g. add it to their filter_fqns)")
        self.router.gate.bind_experts(self.routed_experts.inner_experts)
        self.count_routed_tokens = True
        """Whether the forward counts routed tokens; `RouterMetricsProcessor` turns it on for logged steps only."""
        # counts of the current logging window, summed over micro-batches, read by RouterMetricsProcessor
        self.register_buffer("routed_tokens_E", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False)
        self.router.register_forward_hook(self._count_routed_tokens)

    def _count_routed_tokens(self, _router, _inputs, outputs) -> None:
        if not (self.training and self.count_routed_tokens):
            return
        expert_ids_M, counts = plain(outputs[1]).reshape(-1), plain(self.routed_tokens_E)
        with torch.no_grad():
            # a scatter-add into the fixed (E,) buffer, not bincount: on CUDA bincount reads its input's min and
            # max to the host (two syncs per MoE layer); sums of 1.0 are exact in float32 below 2**24 per expert
            counts.scatter_add_(0, expert_ids_M, torch.ones_like(expert_ids_M, dtype=counts.dtype))

    def parallelize(self, parallel_dims) -> None:
        if parallel_dims.tp > 1:
            raise ValueError("MPI router: tensor parallelism is not supported (φ_i needs whole expert matrices); "
                             "use FSDP and expert parallelism (--parallelism.expert_parallel_degree)")
        sharding = self._sharding_config
        if sharding is not None and "tokens_per_expert_E" in sharding.state_shardings:
            # torchtitan places every buffer; the metrics' counts are per-rank partial sums like its own
            self._sharding_config = dataclasses.replace(sharding, state_shardings={
                **sharding.state_shardings, "routed_tokens_E": sharding.state_shardings["tokens_per_expert_E"]})
        super().parallelize(parallel_dims)

    def _init_self_buffers(self, *, buffer_device: torch.device | None = None) -> None:
        super()._init_self_buffers(buffer_device=buffer_device)
        device = self.tokens_per_expert_E.device if buffer_device is None else buffer_device
        self.routed_tokens_E = torch.zeros(self.routed_tokens_E.shape[0], dtype=torch.float32, device=device)
