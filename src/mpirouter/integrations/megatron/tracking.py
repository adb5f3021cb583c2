"""The trackers the MPI routers record their metrics into (`metrics` reports them); MaxVio's recording.

Two `MoEMetricsTracker`s of this package's own: Megatron's global tracker is reported only for its own names (aux
losses, z-loss) and cleared whole after, so metrics recorded there would be zeroed unseen; and one report clears its
whole tracker, so MaxVio (every step) and the alignments (every N steps) keep one each.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_logging import MoEMetricsTracker

from ...core.routing import max_violation

MAXVIO, ALIGN, ALIGN_RAW = "mpi_maxvio", "mpi_alignment", "mpi_alignment_raw"
MAXVIO_TRACKER, ALIGN_TRACKER = MoEMetricsTracker(), MoEMetricsTracker()


def metric_layer(router) -> tuple[int, int]:
    """(1-based slot, table size) of a router's layer in the trackers, as Megatron numbers its own MoE metrics:
    multi-token-prediction layers come after the decoder's (transformer/moe/router.py, `_apply_aux_loss` logging)."""
    size = router.config.num_layers + (router.config.mtp_num_layers or 0)
    return router.layer_number + (router.config.num_layers if router.is_mtp_layer else 0), size


def record_maxvio(router, routing_map_TE: torch.Tensor, padding_mask: torch.Tensor | None = None) -> None:
    """MaxVio = max load / mean load − 1 of one micro-batch's routing map (this rank's tokens × experts, after capacity
    dropping; padding tokens left out as Megatron's expert-bias count does), added to the router's layer on the
    device (no host read). Training forwards with gradients only: not evaluation, not an activation recompute."""
    if router.layer_number is None or not router.training or not torch.is_grad_enabled():
        return
    if padding_mask is not None:
        routing_map_TE = routing_map_TE & ~padding_mask.reshape(-1, 1)
    slot, size = metric_layer(router)
    MAXVIO_TRACKER.record(MAXVIO, max_violation(routing_map_TE.sum(dim=0).float()), slot, size,
                          avg_group=router.tp_cp_group)
