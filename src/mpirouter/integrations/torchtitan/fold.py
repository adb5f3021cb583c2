"""Fold MPI router rows for release: a state dict that stock torchtitan (and transformers) load as is.

    sd = folded_state_dict(model)                       # gate weights hold φ, not R
    stock = to_stock(model_config).build(); stock.load_state_dict(sd)      # same logits, no mpirouter
    hf_sd = Qwen3StateDictAdapter(to_stock(model_config), None).to_hf(sd)  # transformers' keys

The keys are torchtitan's own (`layers.<i>.moe.router.gate.weight` holds φ instead of R), so the
folded weights also go through torchtitan's HF state-dict adapters and its checkpoint export unchanged.
"""

from __future__ import annotations

import torch

from ...core.routers import EXPERT_KINDS
from .gate import gathered_rows, whole, whole_experts
from .moe import MPIMoE


@torch.no_grad()
def folded_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` as whole tensors, with each MPI router gate's R replaced by its rows φ.

    φ is computed as in the forward (float32 math) from the stored weights and kept in the gate's
    dtype; a model trained with bf16 FSDP parameters computed φ from bf16-rounded copies, so its folded
    rows match its training forward up to that rounding. DTensor parameters and expert-parallel shards
    are gathered (collectives: under torchrun every rank calls this); the result holds whole tensors on
    every rank. Refuses non-finite rows rather than writing them.
    """
    out = {k: whole(v).detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if not isinstance(module, MPIMoE):
            continue
        prefix = name.replace("._checkpoint_wrapped_module", "")
        num_experts = module.router.gate.out_features
        for pname, param in module.routed_experts.inner_experts.named_parameters():
            # under spmd_types an expert-parallel shard is a plain local tensor that `whole` leaves as it is
            out[f"{prefix}.routed_experts.inner_experts.{pname}"] = whole_experts(param, num_experts).detach().clone()
        key = f"{prefix}.router.gate.weight"
        gate = module.router.gate
        phi_ED = _whole_rows(gate)
        if not torch.isfinite(phi_ED).all():
            raise ValueError(f"{key}: the router rows are not finite; refusing to fold")
        out[key] = phi_ED.to(out[key].dtype)
    return out


def _whole_rows(gate) -> torch.Tensor:
    # gathered outside a forward: FSDP keeps the weights sharded between steps
    r_ED = whole(gate.weight)
    mats = tuple(whole_experts(m, r_ED.shape[0]) for m in gate.matrices()) if gate.kind in EXPERT_KINDS else ()
    return gathered_rows(gate.kind, r_ED, mats, gate.scale)

