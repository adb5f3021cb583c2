"""EP router rows under each of torchtitan's SPMD backends vs one process, in float64 (a test worker).

    torchrun --standalone --nproc_per_node=2 tests/integrations/titan/dist_rows.py OUT.json

torchtitan's own EP token dispatch needs NCCL under its default spmd_types backend (gloo has no
uneven all-to-all on tensor lists), so the trainer-level tests run partial_dtensor; this worker checks
the MPI rows' EP path of both backends directly. Experts as a DTensor sharded Shard(0) over "ep"
(partial_dtensor, full_dtensor) and as a plain local shard with the "ep" axis on torchtitan's
registered sparse mesh (spmd_types): φ, the gradients of R and W, and `whole_experts`, each
against the same computation in one process over both ranks' tokens. Rank 0 writes max errors.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torchtitan.distributed import utils as dist_utils
from torchtitan.distributed.spmd_types import set_spmd_meshes

from mpirouter.core.routers import mpi_rows
from mpirouter.integrations.torchtitan.gate import gathered_rows, whole_experts

E, F, D, T = 8, 6, 5, 7


def main() -> None:
    out_path = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    g = torch.Generator().manual_seed(0)
    r_ED, w_EFD = torch.randn(E, D, generator=g, dtype=torch.float64), torch.randn(E, F, D, generator=g, dtype=torch.float64)
    x_RTD = torch.randn(world, T, D, generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(E)

    def loss(phi_ED, x_TD):
        return torch.softmax(x_TD @ phi_ED.T, -1).pow(2).sum()

    ref_r, ref_w = r_ED.clone().requires_grad_(), w_EFD.clone().requires_grad_()
    ref_phi = mpi_rows(ref_r, ref_w, scale=scale).double()
    sum(loss(ref_phi, x) for x in x_RTD).backward()

    errors = {}
    e = E // world
    for backend in ("partial_dtensor", "spmd_types"):
        dist_utils.set_spmd_backend(backend)
        r = r_ED.clone().requires_grad_()
        if backend == "spmd_types":
            set_spmd_meshes(dense_mesh=mesh, sparse_mesh=mesh)
            w = w_EFD[rank * e:(rank + 1) * e].clone().requires_grad_()
            local_grad = lambda: w.grad  # noqa: E731
        else:
            w = distribute_tensor(w_EFD.clone(), mesh, [Shard(0)]).requires_grad_()
            local_grad = lambda: w.grad.to_local()  # noqa: E731
        phi = gathered_rows("mpi", r, (w,), scale)
        loss(phi.double(), x_RTD[rank]).backward()
        r_grad = r.grad.clone()
        dist.all_reduce(r_grad)  # R's gradient is summed over ranks by FSDP (torchtitan: division off)
        errors[backend] = {
            "phi": (phi.double() - ref_phi).abs().max().item(),
            "grad_R": (r_grad - ref_r.grad).abs().max().item() / ref_r.grad.abs().max().item(),
            "grad_W": (local_grad() - ref_w.grad[rank * e:(rank + 1) * e]).abs().max().item() / ref_w.grad.abs().max().item(),
            "whole_experts": (whole_experts(w.detach(), E) - w_EFD).abs().max().item(),
        }
    if rank == 0:
        out_path.write_text(json.dumps(errors, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
