"""CPU shims for Megatron-Core 0.19.2 (test-only; the product code has none of them).

Megatron-Core assumes CUDA. Each function below works around one such assumption, names the line of
megatron-core 0.19.2 it targets, and changes nothing else. `stub_triton_kernels()` must run before
megatron.core is imported; `cpu_megatron()` applies the rest for the duration of a block (a test module,
through the `megatron_on_cpu` fixture), with Megatron's parallel state on a 1-process (or torchrun) gloo group,
and undoes all of it after, so the other tests of the session see torch.cuda as it is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types

import pytest
import torch


def stub_triton_kernels() -> None:
    """transformer/moe/paged_stash.py:12 imports the Triton kernels of ops/paged_stash.py (`import triton`, line 4)
    for a feature these tests never use; without triton installed, stand in a module with the names it imports."""
    if importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = None
    sys.modules[stub.__name__] = stub


def current_device_is_cpu(patch) -> None:
    """`torch.cuda.current_device()` places buffers and the router weight (transformer/moe/router.py:98,100,184,193,
    207,213,233,241,247; tensor_parallel/mappings.py:95,145,152,185,447): on a CPU build it raises. Return the CPU."""
    patch(torch.cuda, "current_device", lambda: torch.device("cpu"))


class _NoStream(contextlib.nullcontext):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def wait_stream(self, *args):
        pass

    def record_event(self, *args):
        return _NoEvent()

    def synchronize(self):
        pass


class _NoEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args):
        pass

    def wait(self, *args):
        pass

    def synchronize(self):
        pass


def no_cuda_streams(patch) -> None:
    """The alltoall dispatcher creates a `torch.cuda.Stream()` (transformer/moe/token_dispatcher.py:469) and uses
    streams and events (:922-949; shared_experts.py:192 with overlap): on CPU they are no-ops."""
    patch(torch.cuda, "Stream", _NoStream)
    patch(torch.cuda, "Event", _NoEvent)
    patch(torch.cuda, "current_stream", lambda *a, **k: _NoStream())
    patch(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())


def no_cuda_synchronize(patch) -> None:
    """Distributed checkpointing waits for the GPU before writing (dist_checkpointing/strategies/filesystem_async.py:248,
    `torch.cuda.synchronize()`): on CPU there is nothing to wait for."""
    patch(torch.cuda, "synchronize", lambda *a, **k: None)


def split_sizes_as_numpy_on_cpu(patch) -> None:
    """transformer/moe/moe_utils.py:1184 turns the all-to-all split sizes into numpy only for CUDA tensors, so under
    expert parallelism on CPU `all_to_all_single` gets tensors and raises a TypeError: convert CPU tensors too."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    real = moe_utils.maybe_move_tensor_to_cpu

    def to_numpy(tensor, as_numpy=False, record_stream=False):
        if tensor is not None and as_numpy and tensor.device.type == "cpu":
            return tensor.numpy()
        return real(tensor, as_numpy=as_numpy, record_stream=record_stream)

    patch(moe_utils, "maybe_move_tensor_to_cpu", to_numpy)
    patch(token_dispatcher, "maybe_move_tensor_to_cpu", to_numpy)


def cuda_rng_on_the_cpu_generator(patch) -> None:
    """GPTModel's attention forks the CUDA RNG tracker (transformer/dot_product_attention.py:217); the tracker reads
    and sets CUDA RNG states (tensor_parallel/random.py:104,135, and torch.cuda's own at :303-306 and :490):
    point them at the CPU generator."""
    from megatron.core.tensor_parallel import random

    patch(random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    patch(random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    patch(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    patch(torch.cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    patch(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cpu_megatron(expert_parallel: int = 1):
    """Within: the shims above, and Megatron's parallel state (tensor/pipeline parallel 1, expert parallel
    `expert_parallel`) on the default gloo group: torchrun's, or a 1-process group made here and destroyed after."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    saved: list[tuple[object, str, object]] = []

    def patch(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    for shim in (current_device_is_cpu, no_cuda_streams, no_cuda_synchronize, split_sizes_as_numpy_on_cpu,
                 cuda_rng_on_the_cpu_generator):
        shim(patch)
    made_group = not dist.is_initialized()
    if made_group:
        address = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
        for k, v in address.items():  # the rendezvous is done: leave the environment as it was
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if made_group:
            dist.destroy_process_group()
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@pytest.fixture(scope="module", autouse=True)
def megatron_on_cpu():
    """For a test module that imports it: `cpu_megatron()` around all its tests."""
    with cpu_megatron():
        yield


@pytest.fixture(autouse=True)
def fresh_router_metrics():
    """The routers' metric trackers are module globals sized by the first model that records: empty them per test."""
    from mpirouter.integrations.megatron.tracking import ALIGN_TRACKER, MAXVIO_TRACKER

    MAXVIO_TRACKER.metrics.clear(), ALIGN_TRACKER.metrics.clear()
