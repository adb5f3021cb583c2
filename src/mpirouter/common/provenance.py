"""Where a number came from: the mpirouter source commit, version, CPU, threads, device, torch.

    from mpirouter.common.provenance import environment, describe
    describe(environment("cpu"))   # 'commit abc1234 · mpirouter 0.1.0 · Intel(R) Xeon(R) Processor (2 cores), 2 threads · ...'

The commit is that of the package source itself (git run in the package folder), not of the folder
the command runs in, so a report written from another checkout or from /tmp still names the code that
produced it; "+dirty" marks uncommitted changes to tracked files under the package folder. Nothing here
raises: provenance that cannot be found is recorded as unknown.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from .version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent.parent
"""The mpirouter package folder, whose git state `source_commit` reports."""
UNKNOWN_COMMIT = "unknown (not a git checkout)"
ENV_KEYS = ("mpirouter_version", "commit", "cpu", "threads", "cores", "device", "torch", "cuda", "gpu", "python",
            "platform", "date")
"""The keys of `environment()`."""


def _git(directory: Path, *args: str) -> str | None:
    """stdout of `git -C directory args` (stripped), or None when git is missing or fails."""
    try:
        done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_commit(directory: str | Path | None = None) -> str:
    """Short commit of the git checkout holding `directory` (default: the mpirouter package), "+dirty"
    when tracked files under `directory` have uncommitted changes; UNKNOWN_COMMIT when not in a checkout.

    A package installed into a virtualenv inside some checkout is not that checkout's source: its files
    are untracked there, so a folder with no tracked files also counts as "not a git checkout".
    """
    where = Path(directory) if directory is not None else PACKAGE_DIR
    commit = _git(where, "rev-parse", "--short", "HEAD")
    if not commit or not _git(where, "ls-files", "--", "."):
        return UNKNOWN_COMMIT
    dirty = _git(where, "status", "--porcelain", "--untracked-files=no", "--", ".")
    return commit + ("+dirty" if dirty else "")  # dirty is None (git failed) only in races; say clean then


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor(), else "unknown"."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version() -> str:
    """The installed mpirouter version (package metadata), else the source's `__version__`."""
    try:
        return importlib.metadata.version("mpirouter")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def environment(device: str | None = None) -> dict:
    """Provenance of a run or report: the ENV_KEYS, `device` defaulting to "cpu"."""
    import torch

    device = device or "cpu"
    on_gpu = device.startswith("cuda") and torch.cuda.is_available()
    return {
        "mpirouter_version": package_version(),
        "commit": source_commit(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(torch.device(device)) if on_gpu else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe(env: dict) -> str:
    """One line: commit · version · CPU (cores), threads · torch · device · date.

    Also renders records written before this module existed (keys commit, machine, platform, cores,
    python, torch, date: the CPU model and version were not recorded then, `machine` stands in).
    """
    parts = [f"commit {env.get('commit') or 'unknown'}"]
    if env.get("mpirouter_version"):
        parts.append(f"mpirouter {env['mpirouter_version']}")
    cores = f" ({env['cores']} cores)" if env.get("cores") else ""
    if "cpu" in env:
        parts.append(f"{env['cpu']}{cores}, {env.get('threads', '?')} threads")
    else:
        parts.append(f"{' '.join(str(env.get('machine', 'unknown machine')).split())}{cores}")
    parts.append(f"torch {env.get('torch', '?')}")
    if env.get("device"):
        parts.append(env["device"] + (f" ({env['gpu']}, CUDA {env.get('cuda')})" if env.get("gpu") else ""))
    parts.append(str(env.get("date", "date unknown")))
    return " · ".join(parts)
