"""mpirouter: Mixture-of-Experts routers that follow their experts (Manifold Power Iteration, arXiv 2606.12397).

    from mpirouter import MPIRouter, route, MoE, MoEConfig, MoELM, preset_config

The public API is the model layer, `mpirouter.core`, re-exported here; the trainer, optimizers,
integrations and experiments are imported by their package (`mpirouter.trainer`, `mpirouter.optim`,
`mpirouter.hf`, `mpirouter.experiments.*`). The layout: README, "What it contains".
"""

from .common.version import __version__
from .core import *  # noqa: F403  (the list is core.__all__)
from .core import __all__
