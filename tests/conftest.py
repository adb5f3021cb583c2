"""Test-session settings."""

import torch

# The suite's tensors are small: one thread is as fast, and it avoids OpenMP spin-waits that make a
# 2-core machine shared with other jobs up to 100x slower (seen here while benchmarks ran).
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- multi-process tests

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 180, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc script args` with gloo on CPU; never hangs.

    The launch gets its own process group, killed whole when `timeout` passes (the test then fails
    with the output so far). check=True fails the test on a non-zero exit, showing the output's tail.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--monitor-interval=0.2", str(script), *map(str, args)]
    # GLIBC_TUNABLES set: the mpirouter CLI does not re-exec itself (one interpreter start per rank, not two)
    full_env = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736", **os.environ,
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: kill them by ancestry, not by process group
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out = "(no output: a process still holds the pipe)"
        pytest.fail(f"torchrun {Path(script).name} did not finish in {timeout:.0f} s (killed):\n{out[-4000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {Path(script).name} exited {proc.returncode}:\n{out[-6000:]}")
    return result


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (read from /proc), children first."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(fields[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, parent in parent_of.items() if parent in frontier]
        out += kids
        frontier = kids
    return out


@pytest.fixture(scope="session")
def torchrun():
    """`torchrun(script, nproc, *args, timeout=180, env=None, check=True)`: see `run_torchrun`."""
    return run_torchrun


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(size)`: a folder on a tmpfs of `size` (e.g. "5m"), unmounted afterwards: a real full disk.

    Mounting needs root (or CAP_SYS_ADMIN); without it the test is skipped.
    """
    mounted = []

    def make(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """`text_corpus(chars)`: the first `chars` characters of the embedded corpus as a .txt file (made once per size).

    Small corpora keep multi-process tests fast: a run's final evaluation reads its whole validation split."""
    made: dict[int, Path] = {}

    def make(chars: int) -> Path:
        if chars not in made:
            from mpirouter.trainer.data import embedded_corpus

            made[chars] = tmp_path_factory.mktemp("corpus") / "text.txt"
            made[chars].write_text(embedded_corpus().text[:chars])
        return made[chars]

    return make


class StoppedAtSetDevice(Exception):
    """Raised by `cuda_set_device_stops`'s fake: a test needs only to see the call."""


@pytest.fixture
def cuda_set_device_stops(monkeypatch):
    """Pretend CUDA is available; `torch.cuda.set_device` records its device in the returned list and raises
    StoppedAtSetDevice (the returned list's `.stop` attribute), so a command is seen to set it first, then stops."""
    import torch

    class Calls(list):
        stop = StoppedAtSetDevice

    calls = Calls()

    def set_device(device):
        calls.append(torch.device(device))
        raise StoppedAtSetDevice

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return calls


# ----------------------------------------------------------------------------- test order

SLOW_FIRST = ("tests/trainer/test_distributed.py", "tests/integrations/megatron/test_megatron_ep.py",
              "tests/integrations/titan/test_titan_trainer.py", "tests/integrations/titan/test_titan_ep.py",
              "tests/trainer/test_dist_errors.py", "tests/parallel/test_wrap.py", "tests/parallel/test_gpu_paths.py")
"""The files that take longest (`make test` prints the slowest tests), started first: `make test` hands whole
files to its workers in collection order, and a long file collected last would run alone at the end."""


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    root = Path(str(config.rootpath))
    items.sort(key=lambda item: rank.get(Path(str(item.path)).relative_to(root).as_posix(), len(rank)))  # stable: the rest keep their order
