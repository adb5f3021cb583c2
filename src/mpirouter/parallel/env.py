"""The process group of a torchrun job: who am I, how many are we, and the mesh of data x expert parallelism.

    torchrun --nproc_per_node=2 -m mpirouter train ...     # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK

`init_distributed` is a no-op (returns None) in a process that torchrun did not start, so the same
job runs in one process unchanged. Every rank calls the same functions in the same order; a
collective that waits longer than `DistConfig.timeout_s` fails instead of hanging (a dead rank).
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import MIN_TIMEOUT_S, DistConfig

T = TypeVar("T")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """This rank's place in the job."""

    rank: int
    """Global rank in [0, world_size)."""
    world_size: int
    """Number of processes; every rank reads its own share of each global batch."""
    local_rank: int
    """Rank on this node (picks the GPU)."""
    backend: str
    """gloo or nccl."""
    mesh: DeviceMesh
    """("dp", "ep") mesh of shape (world_size / ep, ep)."""
    config: DistConfig
    """The job's DistConfig."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, writes metrics and holds the run folder's lock."""
        return self.rank == 0

    @property
    def dp_mesh(self) -> DeviceMesh:
        """Ranks holding the same experts (all ranks when ep = 1)."""
        return self.mesh["dp"]

    @property
    def ep_mesh(self) -> DeviceMesh:
        """Ranks among which the experts are split."""
        return self.mesh["ep"]


_MESHES: dict[tuple[str, int, int], DeviceMesh] = {}


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment variables) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARS)


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto: nccl for CUDA training, gloo otherwise; nccl without CUDA is refused."""
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"dist.backend=nccl needs a CUDA device, the run uses {device}; use gloo or auto")
    return backend


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK for "cuda" under torchrun (one GPU per process).

    Refuses a fixed GPU index when several processes share the node (they would all use that GPU)
    and more processes per node than GPUs.
    """
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    local, per_node = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.index is not None:
        if per_node > 1:
            raise ValueError(f"--device {device} would put all {per_node} processes of this node on one GPU; "
                             f"use --device cuda (each process takes cuda:LOCAL_RANK)")
        return device
    if torch.cuda.is_available() and local >= torch.cuda.device_count():
        raise ValueError(f"{per_node} processes per node but {torch.cuda.device_count()} GPU(s): "
                         f"use --nproc_per_node={torch.cuda.device_count()} or fewer")
    return torch.device("cuda", local)


def init_distributed(cfg: DistConfig, device: torch.device) -> DistContext | None:
    """Join the job's process group and build its ("dp", "ep") mesh; None outside torchrun.

    `device` is this rank's device (`rank_device`). Refuses an ep that does not divide the world size.
    """
    if not launched_by_torchrun():
        return None
    world = int(os.environ["WORLD_SIZE"])
    if cfg.timeout_s < MIN_TIMEOUT_S:
        raise ValueError(f"dist.timeout_s={cfg.timeout_s:g} is too short for a job to start (rendezvous, first collective); "
                         f"use at least {MIN_TIMEOUT_S:g} s")
    if world % cfg.ep:
        raise ValueError(f"dist.ep={cfg.ep} must divide the number of processes ({world})")
    backend = resolve_backend(cfg.backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    key = (device.type, world, cfg.ep)
    if key not in _MESHES:  # a `compare` grid trains many runs in one job: one set of process groups for all
        _MESHES[key] = init_device_mesh(device.type, (world // cfg.ep, cfg.ep), mesh_dim_names=("dp", "ep"))
    mesh = _MESHES[key]
    return DistContext(dist.get_rank(), world, int(os.environ["LOCAL_RANK"]), backend, mesh, cfg)


def world_mesh(ctx: DistContext) -> DeviceMesh:
    """A 1-D mesh over every rank: the dense weights' data parallelism (also under expert parallelism)."""
    if ctx.config.ep == 1:
        return ctx.dp_mesh
    key = (ctx.mesh.device_type, ctx.world_size, 0)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(ctx.mesh.device_type, (ctx.world_size,), mesh_dim_names=("world",))
    return _MESHES[key]


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group (safe to call twice, or with None)."""
    if ctx is not None and dist.is_initialized():
        _MESHES.clear()
        dist.destroy_process_group()


def agree(ctx: DistContext | None, value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object: a verdict, an error, a loaded config).

    A check that only one rank makes (the run folder, the checkpoints on disk) runs on rank 0 and
    its verdict is shared, so that on failure every rank raises the same error instead of the
    others waiting in the next collective until the timeout.
    """
    if ctx is None:
        return value
    found = [value]
    dist.broadcast_object_list(found, src=0)
    return found[0]


def any_rank(ctx: DistContext | None, flag: bool) -> bool:
    """Whether `flag` is true on any rank (one small all-reduce; a host read: call it at sync points only)."""
    if ctx is None:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _comm_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(ctx: DistContext | None, t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all ranks (a new tensor; `t` itself unchanged); `t` without a job."""
    if ctx is None:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


LOST_PEER_SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Read error", "Write error",
                   "remote process exited", "Socket closed")
"""Words in gloo's and NCCL's errors when another process of the job went away in the middle of a collective."""


def is_lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the job died or was killed."""
    text = str(e)
    return isinstance(e, (RuntimeError, dist.DistError)) and any(sign in text for sign in LOST_PEER_SIGNS)


def missing_ranks(wait_s: float = 3.0) -> tuple[list[int], bool] | None:
    """After a lost peer: (the ranks that did not answer within `wait_s`, whether this rank is the lowest that did).

    Every surviving rank writes a key into the job's store (torchrun's agent holds it, so it outlives the
    dead process) and reads the others'; None when that is not possible (no process group, store gone).
    Best effort: a survivor that notices the failure more than `wait_s` after the others is counted as
    stopped (and may print a line of its own).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store  # the job's store; no public accessor

        store, rank, world = _get_default_store(), dist.get_rank(), dist.get_world_size()
        store.set_timeout(datetime.timedelta(seconds=max(wait_s, 1.0)))
        prefix = f"mpirouter/alive/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store.set(f"{prefix}{rank}", "1")
        keys = [f"{prefix}{r}" for r in range(world)]
        deadline = time.monotonic() + wait_s
        while True:
            alive = [r for r, key in enumerate(keys) if store.check([key])]
            if len(alive) == world or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    except Exception:  # the store went with the node that held it: nothing to learn
        return None
    return [r for r in range(world) if r not in alive], rank == min(alive)


def _job_store(timeout_s: float):
    """The torchrun job's key-value store (its agent holds it): the process group's once there is one, else a
    client of the agent's store at MASTER_ADDR:MASTER_PORT; None outside torchrun."""
    from torch.distributed.distributed_c10d import _get_default_store  # no public accessor

    if dist.is_available() and dist.is_initialized():
        return _get_default_store()
    if not launched_by_torchrun() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def rank0_said_it(line: str, wait_s: float = 3.0) -> bool:
    """Whether rank 0 of this torchrun job reports the same error `line` (then the others need not repeat it).

    Rank 0 posts its line in the job's store and returns False (it always speaks); another rank waits up to
    `wait_s` for rank 0's line. Errors raised before the ranks communicate (a bad setting, a missing file) are
    alike on every rank, and the job's log shows them once. False when the store cannot be reached.
    """
    key = f"mpirouter/error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/0"
    try:
        store = _job_store(wait_s)
        if store is None:
            return False
        if int(os.environ.get("RANK", "0")) == 0:
            store.set(key, line)
            return False
        store.set_timeout(datetime.timedelta(seconds=wait_s))
        store.wait([key])
        return store.get(key).decode() == line
    except Exception:  # rank 0 did not fail (timeout) or the store is gone: this rank speaks for itself
        return False
