"""DistConfig validation and the process-group helpers that run without a job."""

import pytest
import torch

from mpirouter.parallel.config import DistConfig
from mpirouter.parallel.env import agree, any_rank, init_distributed, launched_by_torchrun, rank_device, resolve_backend


@pytest.mark.parametrize("field,value,match", [
    ("strategy", "zero3", "dist.strategy must be ddp or fsdp"),
    ("backend", "mpi", "dist.backend must be auto, gloo or nccl"),
    ("ep", 0, "dist.ep"),
    ("ep", 1.5, "dist.ep"),
    ("timeout_s", 0, "dist.timeout_s"),
], ids=lambda v: str(v))
def test_bad_settings_are_refused_with_their_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        DistConfig(**{field: value})


def test_backend_follows_the_device():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda", 0)) == "gloo"
    with pytest.raises(ValueError, match="nccl needs a CUDA device"):
        resolve_backend("nccl", torch.device("cpu"))


def test_outside_torchrun_nothing_is_initialized(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not launched_by_torchrun()
    assert init_distributed(DistConfig(ep=2), torch.device("cpu")) is None
    assert rank_device(torch.device("cuda")) == torch.device("cuda")  # no LOCAL_RANK to pick a GPU by
    assert agree(None, "verdict") == "verdict" and any_rank(None, True) and not any_rank(None, False)


def test_under_torchrun_cuda_means_this_ranks_gpu(monkeypatch):
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an explicit index is kept
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


def test_a_job_refuses_a_timeout_too_short_to_start(monkeypatch):
    """Issue #22 row 15: dist.timeout_s=0.001 was accepted, then failed with a DistStoreError traceback. A saved config
    with a short timeout still loads (one process ignores it); a job refuses it before joining a process group."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=r"dist.timeout_s=0.001 is too short .* use at least 10 s"):
        init_distributed(DistConfig(timeout_s=0.001), torch.device("cpu"))
    assert not torch.distributed.is_initialized()
