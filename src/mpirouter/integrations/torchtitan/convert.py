"""Switch a torchtitan model config to MPI routers and back, as config transforms (no module surgery).

    --override.imports mpirouter.integrations.torchtitan.convert.mpi_moe             # the CLI way
    --override.imports 'mpirouter.integrations.torchtitan.convert.mpi_moe={"kind": "power"}'
    model_config = to_mpi(model_config, kind="mpi", target="gate")                   # in Python
    stock_config = to_stock(model_config)                                            # for folded weights

Only torchtitan's own `MoE.Config` is claimed (exact type): qwen3 and deepseek_v3 use it. A MoE
subclass of another model may hold its experts differently, so it is left alone rather than
guessed at.
"""

from __future__ import annotations

import copy

from torchtitan.config import derive, override
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import MoE

from .gate import MPIGate
from .moe import MPIMoE


def mpi_moe_config(cfg: MoE.Config, *, kind: str = "mpi", target: str = "gate", scale_prime: float = 1.0) -> MPIMoE.Config:
    """The MPI version of one `MoE.Config`: same fields, `MPIGate` router gate. `cfg` is not modified."""
    if cfg.router.gate.bias:
        raise ValueError("MPI router: torchtitan's router gate has a bias here; MPI rows replace the whole weight")
    gate = derive(cfg.router.gate, MPIGate.Config, kind=kind, target=target, scale_prime=scale_prime)
    router = copy.copy(cfg.router)
    router.gate = gate
    return derive(cfg, MPIMoE.Config, router=router)


@override(target=MoE.Config, exact=True, description="MPI router rows φ = C·normalize(R W1ᵀ W1) (mpirouter)")
def mpi_moe(cfg: MoE.Config, *, kind: str = "mpi", target: str = "gate", scale_prime: float = 1.0) -> MPIMoE.Config:
    """`--override.imports` entry: every MoE layer gets an MPI router (kwargs: kind, target, scale_prime)."""
    return mpi_moe_config(cfg, kind=kind, target=target, scale_prime=scale_prime)


def to_mpi(model_config, *, kind: str = "mpi", target: str = "gate", scale_prime: float = 1.0):
    """A copy of a torchtitan model config whose MoE layers use MPI routers; the argument is not modified."""
    out = copy.deepcopy(model_config)
    claims = [(parent, attr, cfg) for _, cfg, parent, attr in out.traverse(MoE.Config) if type(cfg) is MoE.Config]
    if not claims:
        raise ValueError(f"{type(model_config).__qualname__} has no torchtitan MoE layer to give an MPI router")
    for parent, attr, cfg in claims:
        _replace(parent, attr, mpi_moe_config(cfg, kind=kind, target=target, scale_prime=scale_prime))
    return out


def to_stock(model_config):
    """A copy of a model config with every `MPIMoE` back to torchtitan's `MoE` and `MPIGate` to `Linear`.

    The stock model built from it loads a `fold.folded_state_dict` and gives the same logits.
    """
    out = copy.deepcopy(model_config)
    for _, cfg, parent, attr in list(out.traverse(MPIMoE.Config)):
        router = copy.copy(cfg.router)
        router.gate = derive(cfg.router.gate, Linear.Config)
        _replace(parent, attr, derive(cfg, MoE.Config, router=router))
    return out


def _replace(parent, attr, value) -> None:
    if isinstance(attr, int):
        parent[attr] = value
    else:
        setattr(parent, attr, value)
