"""`MPITopKRouter`: Megatron-Core's `TopKRouter` whose logits are x·φᵀ, φ computed from its weight R and the experts.

Shape legend: D hidden size, E experts, e experts held by this rank (E / EP), F expert hidden size.

The router keeps Megatron's parameter `weight` [E, D], now read as R, so state-dict keys, the optimizer and
distributed checkpoints are unchanged. Only `gating` changes: it hands φ instead of R to Megatron's own
`router_gating_linear` (router dtype fp32/fp64 and the bias as Megatron does them), and everything after the
logits is `TopKRouter`'s: score functions, expert bias and its update, aux losses, z-loss, group-limited
top-k, the top-k scaling factor, capacity and token dropping.

Under expert parallelism each rank holds its e local experts, numbered ep_rank·e + i. It computes φ for those
from its rows of R and all-gathers the rows over the expert-parallel group with Megatron's
`gather_from_sequence_parallel_region` (all-gather forward, reduce-scatter of the sum backward), so every
expert's fc1 rows and R rows get the router-path gradient of every rank's tokens.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter

from .rows import MPIConfig, fc1_weights, local_rows, target_rows
from .tracking import record_maxvio


class MPITopKRouter(TopKRouter):
    """`TopKRouter` with rows φ(R, fc1) (`MPIConfig`); `MPIMoELayer` attaches the experts after building them."""

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *, mpi: MPIConfig = MPIConfig()):
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        if not isinstance(mpi, MPIConfig):
            raise TypeError(f"MPITopKRouter: mpi must be an MPIConfig, got {type(mpi).__name__}")
        self.mpi = mpi
        # a plain reference, not a submodule: the experts stay where Megatron put them (state dict, DDP buckets)
        object.__setattr__(self, "_experts", None)
        self._ep_group = None

    def attach_experts(self, experts: torch.nn.Module, ep_group=None) -> None:
        """Read the power step's matrices from `experts` (this rank's local experts); `ep_group`: the expert-parallel
        group to all-gather φ over (None or size 1: this rank holds every expert)."""
        if self.mpi.uses_experts:
            if getattr(self.config, "expert_tensor_parallel_size", 1) not in (None, 1):
                raise ValueError("MPI router: expert tensor parallelism splits each expert's fc1 over ranks, and φ_i "
                                 "needs its whole gate rows; use expert_tensor_parallel_size=1")
            if getattr(self.config, "moe_mlp_glu_interleave_size", None) is not None:
                raise ValueError("MPI router: moe_mlp_glu_interleave_size interleaves the gate and up rows of fc1 in "
                                 "blocks; the router reads them as [gate; up]; leave it unset")
            if getattr(self.config, "moe_latent_size", None):
                raise ValueError("MPI router: with moe_latent_size the experts' fc1 acts on the latent projection, not "
                                 "on the router's input; φ would live in another space")
            for w in fc1_weights(experts):  # fails here, at build time, for a layout it cannot read
                # with gradient_accumulation_fusion the expert GEMM writes its weight gradient into main_grad and hands
                # autograd a placeholder that DDP then drops (distributed_data_parallel.py, the grad hook) unless it is
                # zeros: the router's gradient into fc1 arrives in param.grad and must be kept, as Megatron does for
                # a shared embedding (language_module.py, `zero_out_wgrad`)
                w.zero_out_wgrad = True
        object.__setattr__(self, "_experts", experts)
        self._ep_group = ep_group if ep_group is not None and ep_group.size() > 1 else None

    def local_experts(self) -> tuple[slice, tuple[torch.Tensor, ...]]:
        """This rank's experts: their rows of R (a slice of E) and the (e, F, D) target matrices, in that order."""
        if self._experts is None:
            raise RuntimeError("MPITopKRouter has no experts attached: build it inside MPIMoELayer")
        fc1 = fc1_weights(self._experts)
        e = len(fc1)
        first = 0 if self._ep_group is None else self._ep_group.rank() * e
        if first + e > self.num_experts or (self._ep_group is None and e != self.num_experts):
            raise ValueError(f"MPI router: {e} local experts do not match {self.num_experts} experts "
                             f"over an expert-parallel group of {1 if self._ep_group is None else self._ep_group.size()}")
        return slice(first, first + e), target_rows(fc1, self.mpi.target, self.config.gated_linear_unit)

    def rows(self) -> torch.Tensor:
        """φ (E, D) in float32 in global expert order, differentiable into R and the targeted fc1 rows."""
        if not self.mpi.uses_experts:
            return local_rows(self.mpi, self.weight, (), self.num_experts)
        mine, mats = self.local_experts()
        phi_eD = local_rows(self.mpi, self.weight[mine], mats, self.num_experts)
        if self._ep_group is None:
            return phi_eD
        return gather_from_sequence_parallel_region(phi_eD.contiguous(), group=self._ep_group)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Logits x·φᵀ (+ bias), through Megatron's `router_gating_linear` in the configured router dtype."""
        if torch.cuda.is_available():  # as TopKRouter.gating: a weight left on the CPU moves to the GPU
            for p in (self.weight, self.bias):
                if p is not None and p.device.type == "cpu":
                    p.data = p.data.to(device=torch.cuda.current_device())
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        with torch.autocast(device_type=input.device.type, enabled=False):
            phi_ED = self.rows()
        if moe_utils.te_general_gemm is not None and router_dtype != torch.float64:
            # TransformerEngine's GEMM takes both operands in one dtype, like the stock weight and the input
            phi_ED = phi_ED.to(input.dtype)
        return router_gating_linear(input, phi_ED, self.bias, router_dtype)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """`TopKRouter.routing`, then this micro-batch's MaxVio recorded on the device (`tracking.record_maxvio`)."""
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        record_maxvio(self, routing_map, padding_mask)
        return probs, routing_map

    def extra_repr(self) -> str:
        return f"kind={self.mpi.kind}, target={self.mpi.target}, scale_prime={self.mpi.scale_prime:g}"
