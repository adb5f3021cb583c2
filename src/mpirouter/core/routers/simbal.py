"""SimBal (Omi, Sen, Farhadi, arXiv 2506.14038, §3): an orthogonality loss on the router rows, in place of
(or beside) a load-balancing loss: L = ‖R Rᵀ − I‖₁, the entrywise L1 norm of the E × E Gram matrix of the
raw (unnormalized) rows minus the identity. It depends on the weights only, not on the tokens.
"""

from __future__ import annotations

import torch


def simbal_loss(r_ED: torch.Tensor) -> torch.Tensor:
    """‖R Rᵀ − I‖₁ summed over all E² entries (SimBal's L_orth), float32."""
    r_ED = r_ED.float()
    gram_EE = r_ED @ r_ED.t()
    return (gram_EE - torch.eye(r_ED.shape[0], dtype=gram_EE.dtype, device=gram_EE.device)).abs().sum()
