"""Per-layer and per-expert view of a checkpoint: alignment, load, norms, gate spectrum.

    mpirouter inspect runs/tiny-mpi
    mpirouter inspect runs/tiny-mpi --layers-only
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.routing import max_violation
from ..core.routers import ROW_KINDS, concat_rows, relative_gain, select_target
from ..trainer.checkpoint import load_model
from ..trainer.data import iter_eval_batches, prepare_data


@torch.no_grad()
def expert_loads(model, cfg, batches: int) -> list[torch.Tensor]:
    """Routed slots per expert, per MoE layer, over the first `batches` validation batches."""
    data = prepare_data(cfg.data, cfg.context)
    loads = None
    for x, _ in iter_eval_batches(data.val_ids, cfg.eval_batch_size, cfg.context, batches):
        counts = [s.tokens_per_expert_E for s in model(x).moe_stats]
        loads = counts if loads is None else [a + b for a, b in zip(loads, counts)]
    return loads or []


@torch.no_grad()
def inspect_checkpoint(path: str | Path, batches: int = 8, per_expert: bool = True) -> str:
    """A plain-text table; loads measured on `batches` validation batches (0 skips the data pass)."""
    model, cfg = load_model(path)
    rc = cfg.model.moe.router
    if rc.kind not in ROW_KINDS:
        raise ValueError(f"inspect reads router rows φ against the experts; a {rc.kind!r} router has none")
    loads = expert_loads(model, cfg, batches) if batches > 0 else []
    lines = [f"checkpoint {path}: router {rc.kind} (target {rc.target}, C'={rc.scale_prime}), "
             f"{cfg.model.n_layers} layers, E={cfg.model.moe.num_experts}, k={cfg.model.moe.top_k}",
             f"alignment = |cos| with the top right-singular vector of the expert's {rc.target} matrix; "
             f"random ≈ {(2 / (3.14159265 * cfg.model.dim)) ** 0.5:.3f}; gain φ = ‖G φ̂‖ / σ1(G) (1: top direction, "
             f"σ2/σ1: second)", ""]
    head = f"{'layer':>5} {'expert':>6} {'load%':>7} {'align φ':>8} {'align R':>8} {'|R|':>7} {'|φ|':>7} {'σ1(G)':>7} {'σ2/σ1':>6} {'gain φ':>7}"
    lines.append(head + (f" {'MaxVio':>7}" if loads else ""))
    lines.append("-" * len(lines[-1]))
    for li, moe in enumerate(model.moe_layers()):
        mats = select_target(rc.target, moe.w_gate, moe.w_up)
        sv = torch.linalg.svdvals(concat_rows(*mats))
        phi = moe.router.rows(moe.w_gate, moe.w_up)
        al = moe.alignment()
        gain = relative_gain(phi, *mats)
        r_norm, phi_norm = moe.router.weight.norm(dim=-1), phi.norm(dim=-1)
        load = loads[li].float() / loads[li].sum() * 100 if loads else None
        vio = f" {max_violation(loads[li]).item():>7.3f}" if loads else ""
        lines.append(f"{li:>5} {'all':>6} {'':>7} {al['phi'].mean():>8.3f} {al['raw'].mean():>8.3f} {r_norm.mean():>7.3f} "
                     f"{phi_norm.mean():>7.3f} {sv[:, 0].mean():>7.3f} {(sv[:, 1] / sv[:, 0]).mean():>6.3f} {gain.mean():>7.3f}{vio}")
        if per_expert:
            for e in range(moe.config.num_experts):
                ld = f"{load[e]:>7.2f}" if load is not None else f"{'':>7}"
                lines.append(f"{'':>5} {e:>6} {ld} {al['phi'][e]:>8.3f} {al['raw'][e]:>8.3f} {r_norm[e]:>7.3f} "
                             f"{phi_norm[e]:>7.3f} {sv[e, 0]:>7.3f} {sv[e, 1] / sv[e, 0]:>6.3f} {gain[e]:>7.3f}")
    return "\n".join(lines)
