"""Router configuration: the router kinds (MPI, its ablations and the coupling designs beside it) and
one config dataclass per design, nested in `RouterConfig`.

A router kind says how the logits are made. The ERC and SimBal losses are regularizers any rows-based
kind can add (`RouterConfig.erc`, `RouterConfig.simbal`); `compare --routers` names them as
`kind+erc`, `kind+simbal` (`parse_router_name`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ...common.config import check_number, from_dict, show_value
from .mpi import MPI_FAMILY

RouterKind = Literal["linear", "mpi", "power", "retract", "mpi-inplace", "svd", "cosine", "kmeans", "aoe", "remoe"]
PowerTarget = Literal["gate", "up", "gate_up"]

ROUTER_KINDS: tuple[str, ...] = get_args(RouterKind)
POWER_TARGETS: tuple[str, ...] = get_args(PowerTarget)

ROW_KINDS: tuple[str, ...] = (*MPI_FAMILY, "svd", "remoe")
"""Kinds whose logits are x·φᵀ with rows φ (E, D) made from R (and the experts): `Router` serves them,
`export` folds them (remoe keeps its ReLU gate, which the folded rows feed unchanged)."""
UNFOLDABLE_WHY: dict[str, str] = {
    "cosine": "its logits cos(Wx, e_i)/τ normalize each token, which no linear router reproduces",
    "kmeans": "its logits are cosines of normalized tokens with the centroids, which no linear router reproduces",
    "aoe": "it has no router: experts are ranked by the norms ‖x·A_i‖ of their own factorized projections",
}
"""Why `export` refuses a kind that does not reduce to a linear router."""

ADDONS: tuple[str, ...] = ("erc", "simbal")
"""Router losses `compare --routers` can add to a rows-based kind as `kind+addon`."""


@dataclass
class CosineConfig:
    """X-MoE's cosine router (arXiv 2204.09179, eq. 6): s_i = cos(W x, e_i) / τ."""

    dim: int = 16
    """Dimension d_e of the projection W (d_e × D) and of the expert embeddings e_i (X-MoE: 16)."""
    init_temperature: float = 0.07
    """Initial value of the learnable temperature τ (X-MoE's code: 0.07)."""
    min_temperature: float = 1e-4
    """τ is clamped from below at this value in the forward pass (X-MoE's code: 1e-4)."""

    def __post_init__(self) -> None:
        check_number("cosine.dim", self.dim, integer=True, ge=1)
        check_number("cosine.init_temperature", self.init_temperature, gt=0)
        check_number("cosine.min_temperature", self.min_temperature, gt=0)
        if self.min_temperature > self.init_temperature:
            raise ValueError(f"cosine.min_temperature {self.min_temperature} exceeds cosine.init_temperature {self.init_temperature}")


@dataclass
class KMeansConfig:
    """Online k-means router (arXiv 2605.12476): centroids are running means of the routed hidden states."""

    momentum: float = 0.01
    """EMA step m of the centroid update c_i ← (1 − m) c_i + m · mean of the normalized states routed to i."""
    temperature: float = 0.1
    """Logits are cos(x, c_i) / temperature (the softmax's sharpness over cosines in [−1, 1])."""

    def __post_init__(self) -> None:
        check_number("kmeans.momentum", self.momentum, gt=0, le=1)
        check_number("kmeans.temperature", self.temperature, gt=0)


@dataclass
class AoEConfig:
    """Autonomy-of-Experts (arXiv 2501.13074): the experts' gate projections are factorized, W_g,i = B_i A_i."""

    low_rank: int = 0
    """Rank d_low of the factorization (A_i: d_low × D, B_i: F' × d_low); 0: D // 3 (AoE: 256 at d_model 768)."""
    match_params: bool = True
    """Widen the experts' hidden size to F' = (3DF − d_low·D) / (d_low + 2D) so each expert keeps the
    unfactorized SwiGLU's 3DF parameters (AoE's matching; the linear router's E·D is not replaced)."""

    def __post_init__(self) -> None:
        check_number("aoe.low_rank", self.low_rank, integer=True, ge=0)


@dataclass
class ReMoEConfig:
    """ReMoE (arXiv 2412.14711): ReLU gates and an adaptively weighted L1 penalty toward a target sparsity."""

    init_l1_coef: float = 1e-8
    """λ₀, the L1 coefficient at step 0 (ReMoE: 1e-8)."""
    l1_update: float = 1.2
    """α of the controller λ ← λ · α^sign(S_target − S) after each optimizer step (ReMoE: 1.2)."""
    balance_refined: bool = True
    """Weight each expert's L1 term by its load fraction (ReMoE eq. 9, the load-balancing refinement)."""

    def __post_init__(self) -> None:
        check_number("remoe.init_l1_coef", self.init_l1_coef, gt=0)
        check_number("remoe.l1_update", self.l1_update, gt=1)


@dataclass
class ERCConfig:
    """The expert–router coupling loss (arXiv 2512.23447): proxies of the router rows through every expert."""

    enabled: bool = False
    """Add the ERC loss (with any rows-based router)."""
    coef: float = 1.0
    """Loss coefficient (ERC §4.1: 1), per MoE layer; the layers' losses add up, as the balance losses do."""
    noise: float = 1.0
    """The noise bound as a fraction of ERC eq. 4's largest one: δ_i ~ U(1 − ε_i, 1 + ε_i) per component with
    ε_i = noise · ‖φ_i − φ_j‖ / (2‖φ_i‖), j the nearest other row (1: the paper's choice; 0: no noise)."""
    margin: float = 1.0
    """α in the constraints M[i, j] < α M[i, i] and M[j, i] < α M[i, i] (ERC: 1 recommended, 0.5 at 256 experts)."""

    def __post_init__(self) -> None:
        check_number("erc.coef", self.coef, ge=0)
        check_number("erc.noise", self.noise, ge=0, le=1)
        check_number("erc.margin", self.margin, gt=0, le=1)


@dataclass
class SimBalConfig:
    """SimBal (arXiv 2506.14038): an orthogonality loss on the router rows."""

    enabled: bool = False
    """Add the SimBal loss (with any rows-based router)."""
    coef: float = 0.1
    """Coefficient λ of ‖R Rᵀ − I‖₁ per MoE layer (SimBal reports 0.01–1 within noise; 0.1 typical)."""
    orthogonal_init: bool = True
    """Start R from orthonormal rows (SimBal's initialization) instead of the N(0, 0.02) of the other kinds."""

    def __post_init__(self) -> None:
        check_number("simbal.coef", self.coef, ge=0)


_SECTIONS = {"cosine": CosineConfig, "kmeans": KMeansConfig, "aoe": AoEConfig, "remoe": ReMoEConfig, "erc": ERCConfig,
             "simbal": SimBalConfig}


@dataclass
class RouterConfig:
    """How the router turns tokens into logits: the kind, and the settings of each design."""

    kind: RouterKind = "mpi"
    """linear | mpi (power+retract every forward, differentiable) | power | retract | mpi-inplace | svd (exact top
    singular direction) | cosine (X-MoE) | kmeans (online k-means) | aoe (Autonomy-of-Experts) | remoe (ReLU gates)."""
    scale_prime: float = 1.0
    """C' in C = C'/sqrt(E): the retraction radius, scale-free in the number of experts."""
    target: PowerTarget = "gate"
    """Which expert matrix drives the power step: gate (G), up (U) or gate_up ([G; U])."""
    cosine: CosineConfig = field(default_factory=CosineConfig)
    """kind="cosine" settings."""
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)
    """kind="kmeans" settings."""
    aoe: AoEConfig = field(default_factory=AoEConfig)
    """kind="aoe" settings."""
    remoe: ReMoEConfig = field(default_factory=ReMoEConfig)
    """kind="remoe" settings."""
    erc: ERCConfig = field(default_factory=ERCConfig)
    """The ERC loss (any rows-based kind)."""
    simbal: SimBalConfig = field(default_factory=SimBalConfig)
    """The SimBal loss (any rows-based kind)."""

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {self.kind!r}; choose one of {', '.join(ROUTER_KINDS)}")
        if self.target not in POWER_TARGETS:
            raise ValueError(f"unknown power target {self.target!r}; choose one of {', '.join(POWER_TARGETS)}")
        check_number("scale_prime (C')", self.scale_prime, gt=0)
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value, f"router.{name}"))
            elif not isinstance(value, cls):
                raise ValueError(f"router.{name} must be a {cls.__name__} or a dict of its fields, got {show_value(value)}")
        for addon in ADDONS:
            if getattr(self, addon).enabled and self.kind not in ROW_KINDS:
                raise ValueError(f"the {addon} loss needs router rows; router kind {self.kind!r} has none "
                                 f"(use one of {', '.join(ROW_KINDS)})")

    @property
    def addons(self) -> tuple[str, ...]:
        """The router losses switched on (erc, simbal)."""
        return tuple(a for a in ADDONS if getattr(self, a).enabled)

    @property
    def name(self) -> str:
        """The router's name as `compare --routers` writes it: the kind, with the losses added ("mpi+erc")."""
        return self.kind + "".join(f"+{a}" for a in self.addons)


def parse_router_name(name: str) -> tuple[str, tuple[str, ...]]:
    """"mpi+erc" -> ("mpi", ("erc",)): a router kind and the losses added to it (`compare --routers`)."""
    kind, *addons = name.split("+")
    if kind not in ROUTER_KINDS:
        raise ValueError(f"unknown router kind {kind!r} in {name!r}; choose one of {', '.join(ROUTER_KINDS)}")
    for addon in addons:
        if addon not in ADDONS:
            raise ValueError(f"unknown router loss {addon!r} in {name!r}; choose one of {', '.join(ADDONS)}")
        if kind not in ROW_KINDS:
            raise ValueError(f"{name!r}: the {addon} loss needs router rows; {kind!r} has none")
    if len(set(addons)) != len(addons):
        raise ValueError(f"{name!r} names a router loss twice")
    return kind, tuple(addons)


def router_name_overrides(name: str) -> list[str]:
    """The `--set` overrides that make a run's router `name` (e.g. "mpi+erc")."""
    kind, addons = parse_router_name(name)
    return [f"model.moe.router.kind={kind}", *(f"model.moe.router.{a}.enabled=true" for a in addons)]
