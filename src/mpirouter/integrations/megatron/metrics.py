"""Router metrics for Megatron-Core runs, logged the way Megatron logs its MoE metrics (console, TensorBoard, W&B).

    # in the training loop, beside Megatron's MoE metrics (megatron/training/training.py, `track_moe_metrics`):
    if iteration % 100 == 0:
        record_alignment(model)                     # off the hot path: an SVD per expert
    line = report_router_metrics(1 / num_microbatches, iteration, writer, wandb_writer, num_layers=num_layers,
                                 alignment=iteration % 100 == 0, moe_layer_freq=moe_layer_freq)

Metrics per MoE layer (layer numbers as Megatron's):
    mpi_maxvio          MaxVio = max_i load_i / mean load − 1 of each micro-batch's routed tokens on this rank,
                        recorded by every `MPITopKRouter` forward on the device (no host read), averaged over the
                        micro-batches and the data-parallel ranks
    mpi_alignment       |cos| of each router's rows φ with its experts' top singular directions (target matrices),
    mpi_alignment_raw   and of R; mean over experts; recorded when `record_alignment` is called

They live in trackers of this package's own (`tracking`), reported by `report_router_metrics`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...core.routers import alignment
from .fold import mpi_routers
from .tracking import ALIGN, ALIGN_RAW, ALIGN_TRACKER, MAXVIO, MAXVIO_TRACKER, metric_layer


@torch.no_grad()
def record_alignment(model: torch.nn.Module) -> None:
    """Alignment of φ and of R with the experts' top singular directions, per MoE layer (collectives under expert
    parallelism: each rank scores its own experts, the mean is taken over the EP group). Every rank calls it."""
    for router in mpi_routers(model):
        if router.layer_number is None or not router.mpi.uses_experts:
            continue
        mine, mats = router.local_experts()
        values = torch.stack([alignment(router.rows()[mine], *mats).mean(), alignment(router.weight[mine], *mats).mean()])
        group = router._ep_group
        if group is not None:
            dist.all_reduce(values, group=group)
            values /= group.size()
        slot, size = metric_layer(router)
        for name, value in zip((ALIGN, ALIGN_RAW), values):
            ALIGN_TRACKER.record(name, value, slot, size, needs_dp_avg=False)


def report_router_metrics(loss_scale: float, iteration: int, writer=None, wandb_writer=None, *, num_layers: int,
                          alignment: bool = False, per_layer_logging: bool = False, moe_layer_freq=1,
                          mtp_num_layers: int | None = None, pg_collection=None) -> str:
    """Log this interval's router metrics through `MoEMetricsTracker.report` (its averaging over MoE layers, TensorBoard
    and W&B scalars, per-layer logging) and clear them; returns the console string. Every rank calls it with the same
    arguments. `loss_scale`: 1 / micro-batches per step, as for Megatron's own MoE metrics (applied to MaxVio);
    `alignment`: whether `record_alignment` ran this interval (the same on every rank: the report is collective);
    `moe_layer_freq`, `mtp_num_layers`: as in the run's config, so the mean is over the MoE layers."""
    common = dict(per_layer_logging=per_layer_logging, force_initialize=True, num_layers=num_layers,
                  moe_layer_freq=moe_layer_freq, mtp_num_layers=mtp_num_layers, pg_collection=pg_collection)
    lines = [MAXVIO_TRACKER.report(loss_scale, iteration, writer, wandb_writer, track_names=[MAXVIO], **common)]
    if alignment:
        lines.append(ALIGN_TRACKER.report(1.0, iteration, writer, wandb_writer, track_names=[ALIGN, ALIGN_RAW], **common))
    return "".join(lines)  # Megatron's own console format: " name: value |" per metric
