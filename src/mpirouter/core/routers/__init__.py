"""MoE routers: MPI and its ablations, and the router–expert coupling designs beside it (one module each)."""

from .aoe import AoERouter, aoe_hidden, aoe_low_rank, aoe_scores
from .config import (
    ADDONS,
    POWER_TARGETS,
    ROUTER_KINDS,
    ROW_KINDS,
    UNFOLDABLE_WHY,
    AoEConfig,
    CosineConfig,
    ERCConfig,
    KMeansConfig,
    PowerTarget,
    ReMoEConfig,
    RouterConfig,
    RouterKind,
    SimBalConfig,
    parse_router_name,
    router_name_overrides,
)
from .cosine import CosineRouter, cosine_logits
from .erc import erc_activation_norms, erc_loss, erc_noise_bound, erc_proxies
from .kmeans import KMeansRouter, centroid_update, kmeans_logits, routed_sums
from .mpi import (
    DEGENERATE_NORM,
    EXPERT_KINDS,
    MPI_FAMILY,
    mpi_rows,
    mpi_scale,
    power_step,
    retract,
    riemannian_ascent_step,
    router_rows,
)
from .per_step import RowsPerStep
from .remoe import l1_coef_step, relu_gates, relu_slots, remoe_l1, target_sparsity
from .router import MPIRouter, Router, build_router, select_target
from .simbal import simbal_loss
from .spectral import (
    alignment,
    concat_rows,
    exact_rows,
    random_alignment_baseline,
    relative_gain,
    top_singular_directions,
)
