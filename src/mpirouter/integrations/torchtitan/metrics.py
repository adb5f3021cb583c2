"""Router metrics in torchtitan's logs: MaxVio per layer at every log step, alignment every N steps.

    --override.imports mpirouter.integrations.torchtitan.metrics.router_metrics
    --override.imports 'mpirouter.integrations.torchtitan.metrics.router_metrics={"alignment_every": 50}'

Shape legend: n MoE layers, E experts, F expert hidden size, D model width.

MaxVio (docs/method.md, eq. 8) of a layer is computed from the routed-token counts of the logged
step, summed over the data-parallel ranks: the counts accumulate on device in the forward
(`MPIMoE.routed_tokens_E`), and are read once, at the log step, where torchtitan reads its loss.
Alignment |cos(row_i, v_i)| with v_i the top right-singular vector of expert i's power-step matrix is
logged for φ (the rows that route) and for the stored R; it gathers each layer's weights and runs
an SVD, so it runs only every `alignment_every` steps, each rank taking a share of the experts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import derive, override
from torchtitan.tools.logging import logger

from ...core.routing import max_violation
from ...core.routers import alignment, router_rows
from .gate import plain, whole, whole_experts
from .moe import MPIMoE


def mpi_layers(model_parts) -> list[tuple[str, MPIMoE]]:
    """(name, layer) of every MPI MoE layer, named by the transformer block's key in `model.layers`."""
    found = []
    for part in model_parts or []:
        for name, module in part.named_modules():
            if isinstance(module, MPIMoE):
                found.append((name.removesuffix(".moe").replace("layers.", "").replace("._checkpoint_wrapped_module", ""), module))
    return found


def layer_alignment(layer: MPIMoE, share: tuple[int, int]) -> torch.Tensor:
    """(2, E) float32: alignment of φ and of R for the experts i with i % world == rank, zeros elsewhere."""
    gate = layer.router.gate
    r_ED = whole(gate.weight).detach().float()
    mats = tuple(whole_experts(m, r_ED.shape[0]).detach().float() for m in gate.matrices())
    rank, world = share
    mine_E = torch.arange(r_ED.shape[0], device=r_ED.device) % world == rank
    out_2E = torch.zeros(2, r_ED.shape[0], device=r_ED.device)
    if mine_E.any():
        mats_mine = tuple(m[mine_E] for m in mats)
        phi_ED = router_rows(gate.kind, r_ED[mine_E], *mats_mine, scale=gate.scale)
        out_2E[0, mine_E] = alignment(phi_ED, *mats_mine)
        out_2E[1, mine_E] = alignment(r_ED[mine_E], *mats_mine)
    return out_2E


class RouterMetricsProcessor(MetricsProcessor):
    """torchtitan's `MetricsProcessor` plus `router/...` metrics of the MPI MoE layers."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        alignment_every: int = 100
        """Steps between alignment metrics (gathers each layer's experts and runs an SVD); 0 = never."""

        def __post_init__(self) -> None:
            if not (isinstance(self.alignment_every, int) and self.alignment_every >= 0):
                raise ValueError(f"alignment_every must be an integer >= 0, got {self.alignment_every!r}")

    def should_log(self, step: int) -> bool:
        logs = super().should_log(step)
        # torchtitan's trainer asks once, before the step's forward: the layers count routed tokens
        # during the steps that will be logged, from zero, and not at all in the others
        for _, layer in mpi_layers(self.model_parts):
            layer.count_routed_tokens = logs
            if logs:
                plain(layer.routed_tokens_E).zero_()
        return logs

    def router_metrics(self, step: int) -> dict[str, float]:
        """`router/maxvio/<layer>` (and the mean), plus alignment at multiples of `alignment_every`."""
        layers = mpi_layers(self.model_parts)
        if not layers:
            return {}
        loss_mesh = self.parallel_dims.get_optional_mesh("loss")
        group = None if loss_mesh is None else loss_mesh.get_group()
        counts_nE = torch.stack([plain(layer.routed_tokens_E) for _, layer in layers])
        if group is not None:
            dist.all_reduce(counts_nE, group=group)
        values = [torch.stack([max_violation(c_E) for c_E in counts_nE])]
        names = [name for name, _ in layers]
        with_alignment = self.config.alignment_every > 0 and step % self.config.alignment_every == 0
        if with_alignment:
            # the loss mesh holds the ranks with this model part (the same layers, under pipeline parallelism too)
            share = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
            with torch.no_grad():
                align_n2E = torch.stack([layer_alignment(layer, share) for _, layer in layers])
            if group is not None:
                dist.all_reduce(align_n2E, group=group)  # each expert was computed by exactly one rank
            values.append(align_n2E.mean(-1).reshape(-1))  # (φ, R) per layer
        host = torch.cat(values).tolist()  # the one host read of the router metrics, at a log step
        out = {f"router/maxvio/{n}": v for n, v in zip(names, host[:len(names)])}
        out["router/maxvio_mean"] = sum(host[:len(names)]) / len(names)
        if with_alignment:
            pairs = host[len(names):]
            for i, n in enumerate(names):
                out[f"router/alignment_phi/{n}"] = pairs[2 * i]
                out[f"router/alignment_R/{n}"] = pairs[2 * i + 1]
            out["router/alignment_phi_mean"] = sum(pairs[0::2]) / len(names)
            out["router/alignment_R_mean"] = sum(pairs[1::2]) / len(names)
        return out

    def log(self, step: int, global_avg_loss: float, global_max_loss: float, grad_norm: float,
            extra_metrics: dict | None = None):
        started = time.perf_counter()
        router = self.router_metrics(step)
        # torchtitan's throughput is measured from its last log: leave the metrics' own time out of it
        self.time_last_log += time.perf_counter() - started
        if router:
            line = f"router: maxvio mean {router['router/maxvio_mean']:.3f} max {max(v for k, v in router.items() if k.startswith('router/maxvio/')):.3f}"
            if "router/alignment_phi_mean" in router:
                line += f"  alignment phi {router['router/alignment_phi_mean']:.3f} R {router['router/alignment_R_mean']:.3f}"
            logger.info(f"step: {step:2}  {line}")
        super().log(step, global_avg_loss, global_max_loss, grad_norm, extra_metrics={**(extra_metrics or {}), **router})


@override(target=MetricsProcessor.Config, exact=True, description="router MaxVio and alignment metrics (mpirouter)")
def router_metrics(cfg: MetricsProcessor.Config, *, alignment_every: int = 100) -> RouterMetricsProcessor.Config:
    """`--override.imports` entry: log router metrics of MPI MoE layers (kwarg: alignment_every)."""
    return derive(cfg, RouterMetricsProcessor.Config, alignment_every=alignment_every)
