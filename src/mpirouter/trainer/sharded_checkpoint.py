"""Checkpoints of a multi-process job: every rank writes its shards (torch.distributed.checkpoint) into one folder.

    save_sharded(run_dir, step, par, optimizer, config, train_state, keep)    # all ranks call it
    load_sharded(ckpt, model, optimizer)                                      # all ranks, any world size

Layout: `step_X/dcp/` (DCP's `.metadata` and one file per rank: model and optimizer state, keyed
by parameter name), `train_state.pt` (step, RNG, world size; rank 0) and `config.json`. The
folder is written under its temporary name and published by rank 0 only after every rank has
finished (`checkpoint.publish`), so a crash or a dead rank leaves the previous checkpoint as it
was. Because the state is keyed by name and DCP reshards on load, a run can resume at another
world size or strategy, and `checkpoint.full_weights` reads the whole model in one process.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.tensor import DTensor

from ..optim import hyperball_radii, load_hyperball_radii, torch_optimizers
from ..parallel.env import DistContext, agree, any_rank
from .checkpoint import (CONFIG, DCP_DIR, STATE, NonFiniteWeightsError, all_finite, load_error_text, publish,
                         temporary_folder, write_checksums, write_error)
from .shards import file_sha256


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) parameter or state; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def save_sharded(run_dir: str | Path, step: int, ctx: DistContext, model: torch.nn.Module, optimizer, config: dict,
                 train_state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoints/step_X with every rank's shards; every rank calls it and gets the published path.

    Refuses on every rank (NonFiniteWeightsError, nothing written) when any rank holds a NaN/inf weight.
    """
    if any_rank(ctx, not all_finite([local_tensor(p.detach()) for p in model.parameters()])):
        raise NonFiniteWeightsError(f"weights are not finite at step {step}; no checkpoint written")
    folder, what = Path(run_dir) / "checkpoints", f"the checkpoint of step {step}"
    tmp = folder / f".tmp-step_{step:07d}"

    def stage(work, everyone: bool):
        """`work()` on every rank (or rank 0 alone); if it failed anywhere, every rank raises the same one-line OSError
        (the first failing rank's), so that none waits in the next collective for a rank that gave up."""
        result, error = None, None
        if everyone or ctx.is_main:
            try:
                result = work()
            except (Exception, CheckpointException) as e:  # a MemoryError too: the others must hear of it
                reported = write_error(e, folder, what)
                if not isinstance(reported, OSError):
                    reported = OSError(errno.EIO, f"writing {what} to {folder} failed ({load_error_text(e)})")
                error = reported.args
        if everyone:
            errors = [None] * ctx.world_size
            dist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        else:
            error = agree(ctx, error)
        if error is not None:
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(*error)  # the same text on every rank: printed once (cli._report)
        return result

    tmp = agree(ctx, stage(lambda: temporary_folder(run_dir, step), everyone=False))
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, torch_optimizers(optimizer)),
             "hyperball": hyperball_radii(model, optimizer)}  # AdamH/MuonH radii: the only state outside the torch optimizers
    # collective: returns once every rank's shard and the metadata are written (or raises on every rank)
    stage(lambda: dcp.save(state, checkpoint_id=str(tmp / DCP_DIR)), everyone=True)
    # each rank hashes the files it wrote (DCP names them __<rank>_<n>.distcp); rank 0 the rest
    mine = stage(lambda: {f"{DCP_DIR}/{f.name}": file_sha256(f) for f in sorted((tmp / DCP_DIR).glob(f"__{ctx.rank}_*"))},
                 everyone=True)
    sums: list[dict] = [{}] * ctx.world_size
    dist.all_gather_object(sums, mine)

    def finish() -> None:
        torch.save({**train_state, "world_size": ctx.world_size}, tmp / STATE)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
        known = {k: v for part in sums for k, v in part.items()}
        rest = [f for f in sorted((tmp / DCP_DIR).iterdir()) if f.is_file() and f"{DCP_DIR}/{f.name}" not in known]
        known.update({f"{DCP_DIR}/{f.name}": file_sha256(f) for f in rest})
        write_checksums(tmp, {**known, STATE: file_sha256(tmp / STATE)})
        publish(tmp, keep)

    stage(finish, everyone=False)
    return tmp.with_name(tmp.name.removeprefix(".tmp-"))  # every rank waited in `stage` until it was published


def load_sharded(ckpt: Path, model: torch.nn.Module, optimizer=None) -> None:
    """Load a sharded checkpoint's model (and optimizer) state into this rank's model, resharding as needed.

    Works for any world size and strategy, also in one process without a process group.
    """
    opts = torch_optimizers(optimizer) if optimizer is not None else []
    state = {"model": get_model_state_dict(model)}
    if opts:
        state["optim"] = get_optimizer_state_dict(model, opts)
        radii = hyperball_radii(model, optimizer)
        if radii:
            state["hyperball"] = radii
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(Path(ckpt) / DCP_DIR), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if opts:
        set_optimizer_state_dict(model, opts, state["optim"])
        if "hyperball" in state:
            load_hyperball_radii(model, optimizer, state["hyperball"])
