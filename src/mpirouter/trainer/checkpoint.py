"""Atomic checkpoints: safetensors weights + optimizer/RNG state + config, and loading them back.

Layout of a run folder:
    run/config.json                    the run's full config
    run/metrics.jsonl                  one JSON record per log/eval event
    run/checkpoints/step_0000100/      model.safetensors, train_state.pt, config.json
    run/checkpoints/latest             name of the newest complete checkpoint

A job of several processes (torchrun) writes a sharded checkpoint instead: `dcp/` (every rank's
shards, `torch.distributed.checkpoint`) in place of model.safetensors (`sharded_checkpoint`).
Both kinds load in one process (`load_model`, `export`, `sample`) and resume at any world size.

A checkpoint is written into a hidden temporary folder, flushed to disk and then renamed into
place; `latest` is replaced atomically afterwards. A crash at any point leaves the previous
checkpoint and `latest` untouched. `sha256.json` records each file's SHA-256, so bytes changed in
place (same size) are found on load: such a checkpoint counts as unreadable, like one whose weights
are not finite, and loading falls back to the previous one.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from ..common.config import from_dict
from ..common.files import atomic_write_text, fsync_dir, fsync_files
from ..core.model import MoELM
from .config import TrainConfig
from .shards import file_sha256
from .tokenizers import ByteTokenizer, HFTokenizer, Tokenizer

LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
DCP_DIR = "dcp"
"""The sharded weights and optimizer state of a multi-process run (torch.distributed.checkpoint)."""
CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TMP_PREFIX = ".tmp-"
STEP_NAME = re.compile(r"step_\d{7,}")
"""Names of checkpoint folders; rotation touches nothing else (moved-aside or foreign folders stay)."""
CHECKSUMS = "sha256.json"
"""{file path relative to the checkpoint folder: hex SHA-256} of the weights and state files (not config.json)."""


class NonFiniteWeightsError(ValueError):
    """A checkpoint would have held NaN/inf weights."""


class CorruptCheckpointError(ValueError):
    """A checkpoint folder exists but cannot be read."""


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for safetensors: contiguous CPU tensors, tied (shared) weights stored once."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue  # tied weight: reloading re-ties it
        if key is not None:
            seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_weights(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors file with the permissions the user's umask gives other outputs (safetensors itself writes 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def all_finite(tensors) -> bool:
    """Whether every tensor holds only finite values (one host read for all of them)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    if not flags:
        return True
    # gathered on one device: optimizer state mixes them (Adam keeps `step` on the CPU beside CUDA moments)
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def nested_tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside `obj` (dicts, lists and tuples, e.g. an optimizer's state_dict)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in nested_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in nested_tensors(v)]
    return []


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is one checkpoint folder (one-process safetensors, or sharded)."""
    return (path / WEIGHTS).is_file() or is_sharded(path)


def is_sharded(path: Path) -> bool:
    """Whether `path` is a checkpoint written by several processes together (`dcp/`)."""
    return (path / DCP_DIR / ".metadata").is_file()


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    config: dict,
    train_state: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoints/step_XXXXXXX atomically and point `latest` at it; keep the newest `keep`.

    Refuses (NonFiniteWeightsError, nothing written) when a weight is NaN/inf, so every checkpoint
    on disk can be resumed from. A failure mid-write (disk full, ...) removes the temporary folder.
    """
    tensors = model_tensors(model)
    if not all_finite(tensors.values()):
        raise NonFiniteWeightsError(f"weights are not finite at step {step}; no checkpoint written")
    try:
        tmp = temporary_folder(run_dir, step)
        try:
            save_weights(tensors, tmp / WEIGHTS, {"format": "pt", "step": str(step)})
            if train_state is not None:
                torch.save(train_state, tmp / STATE)
            (tmp / CONFIG).write_text(json.dumps(config, indent=2))
            write_checksums(tmp, {name: file_sha256(tmp / name) for name in (WEIGHTS, STATE) if (tmp / name).is_file()})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish(tmp, keep)
    except (Exception, CheckpointException) as e:
        raise write_error(e, Path(run_dir) / "checkpoints", f"the checkpoint of step {step}") from None


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _causes(e: BaseException) -> list[tuple[int | None, BaseException]]:
    """(rank or None, exception) behind `e`: DCP's per-rank failures, and the chain of causes."""
    out: list[tuple[int | None, BaseException]] = []
    seen = set()
    todo: list[tuple[int | None, BaseException]] = [(None, e)]
    while todo:
        rank, x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append((rank, x))
        if isinstance(x, CheckpointException):
            todo += [(r, f[0] if isinstance(f, tuple) else f) for r, f in sorted(getattr(x, "failures", {}).items())]
        todo += [(rank, x.__cause__), (rank, x.__context__)]
    return out


def write_error(e: BaseException, folder: Path, what: str, kept: str = "the previous checkpoints are intact") -> BaseException:
    """The exception to report for a failed write of `what` under `folder`: a full disk or a refused write as an
    OSError with a one-line message naming the rank, the folder and what was kept; anything else as it was.

    A full disk is recognised by its errno anywhere in the chain of causes (DCP wraps each rank's), or by the
    file system having under 1 MiB free: torch.save reports a short write as a RuntimeError with no errno.
    """
    causes = _causes(e)
    where = lambda rank: "" if rank is None else f"rank {rank}: "  # noqa: E731
    for rank, x in causes:
        if isinstance(x, OSError) and x.errno in DENIED:
            target = x.filename or folder
            return OSError(x.errno, f"{where(rank)}cannot write {what} ({x.strerror}: {target}); {kept}")
    full = next(((rank, x) for rank, x in causes if isinstance(x, OSError) and x.errno in NO_SPACE), None)
    if full is None and not isinstance(e, OSError):
        try:
            if shutil.disk_usage(folder).free < 1 << 20:
                full = (None, e)
        except OSError:
            pass
    if full is not None:
        again = " (free some space, then continue with --resume)" if "checkpoint" in kept else ""
        return OSError(errno.ENOSPC, f"no space left on device: {where(full[0])}writing {what} to {folder} failed; {kept}{again}")
    if isinstance(e, CheckpointException):  # some other failure of a rank: its own exception, on one line
        return OSError(errno.EIO, f"writing {what} to {folder} failed ({load_error_text(e)})")
    return e


def temporary_folder(run_dir: str | Path, step: int) -> Path:
    """A fresh hidden folder `checkpoints/.tmp-step_X` to write a checkpoint into (a leftover one is replaced)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f"{TMP_PREFIX}step_{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, keep: int) -> Path:
    """Flush a written checkpoint folder, rename it into place, point `latest` at it, keep the newest `keep`.

    A failure before the rename removes `tmp` and leaves the previous checkpoints as they were.
    """
    ckpt_root, name = tmp.parent, tmp.name.removeprefix(TMP_PREFIX)
    final = ckpt_root / name
    try:
        fsync_files(tmp)
        previous = None
        if final.exists():  # re-saving a step: keep the old copy complete until the new one is in place
            previous = final.with_name(f"{TMP_PREFIX}old-{name}")
            shutil.rmtree(previous, ignore_errors=True)
            os.rename(final, previous)
        os.rename(tmp, final)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / LATEST, name)
    if keep > 0:
        old = step_folders(ckpt_root)[:-keep]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return final


def step_folders(ckpt_root: Path) -> list[Path]:
    """The checkpoint folders `step_XXXXXXX` under `ckpt_root`, oldest first (by step number)."""
    if not Path(ckpt_root).is_dir():
        return []
    found = [p for p in Path(ckpt_root).iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def write_checksums(ckpt: Path, sums: dict[str, str]) -> None:
    """Record the SHA-256 of a checkpoint's files (relative paths) in its `sha256.json`."""
    (ckpt / CHECKSUMS).write_text(json.dumps(dict(sorted(sums.items())), indent=2) + "\n")


def verify_checksums(ckpt: Path, part: tuple[int, int] = (0, 1)) -> None:
    """ValueError naming the first file of `ckpt` whose SHA-256 differs from `sha256.json` (none recorded: nothing
    to check, a checkpoint from before they were). `part=(i, n)` checks every n-th file from the i-th, so the ranks
    of a job share the reading."""
    path = ckpt / CHECKSUMS
    if not path.is_file():
        return
    sums = json.loads(path.read_text())
    for name in sorted(sums)[part[0]::part[1]]:
        if not (ckpt / name).is_file():
            raise FileNotFoundError(f"{name} is missing")
        if file_sha256(ckpt / name) != sums[name]:
            raise ValueError(f"{name} does not match its sha256 in {CHECKSUMS} (changed or damaged on disk)")


def set_aside(checkpoints: list[Path]) -> list[Path]:
    """Rename unreadable checkpoints to `step_X.corrupt-<time>`, so they neither hold a `keep` slot nor
    push readable checkpoints out of it; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = []
    for p in checkpoints:
        if not (STEP_NAME.fullmatch(p.name) and p.parent.name == "checkpoints"):
            raise CorruptCheckpointError(f"checkpoint {p} is unreadable, and it is not a step folder of a run's checkpoints/: "
                                         f"nothing was moved")
        target, n = p.with_name(f"{p.name}.corrupt-{stamp}"), 1
        while target.exists():
            target, n = p.with_name(f"{p.name}.corrupt-{stamp}-{n}"), n + 1
        os.rename(p, target)
        moved.append(target)
    return moved


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary checkpoint folders a crashed save left behind (only ours: `.tmp-*`)."""
    removed = []
    for p in (Path(run_dir) / "checkpoints").glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a run folder, or a checkpoints/ folder.

    The one `latest` names, else (`latest` missing, or naming a folder that is gone) the newest step folder.
    """
    path = Path(path)
    if is_checkpoint(path):
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            ckpt = root / latest.read_text(errors="replace").strip()
            if is_checkpoint(ckpt):
                return ckpt
    newest = next((c for c in checkpoints_newest_first(path) if is_checkpoint(c)), None)
    if newest is not None:
        return newest
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    raise FileNotFoundError(f"no checkpoint found at {str(path)!r} (expected {WEIGHTS}, {DCP_DIR}/ or checkpoints/{LATEST})")


def checkpoints_newest_first(path: str | Path) -> list[Path]:
    """Every checkpoint folder of a run, newest step first (or the folder itself when it is one)."""
    path = Path(path)
    if is_checkpoint(path):
        return [path]
    # by step, not by `latest`: a crash between renaming a checkpoint into place and updating `latest`
    # leaves the newer checkpoint complete
    return step_folders(path / "checkpoints" if (path / "checkpoints").is_dir() else path)[::-1]


def load_sharded_weights(ckpt: Path, model: MoELM) -> None:
    """Fill a whole (unsharded) model with a sharded checkpoint's weights, in this process alone."""
    tensors = get_model_state_dict(model)
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": tensors}, checkpoint_id=str(ckpt / DCP_DIR), no_dist=True)
    set_model_state_dict(model, tensors)


def full_weights(ckpt: Path, config: dict) -> dict[str, torch.Tensor]:
    """The whole model's tensors of a sharded checkpoint, read in this process alone (no process group needed)."""
    model = MoELM(from_dict(TrainConfig, config).model)
    load_sharded_weights(ckpt, model)
    return model.state_dict()


def check_shards(ckpt: Path) -> None:
    """Every file a sharded checkpoint's metadata names exists and is long enough (cheap: reads only the metadata)."""
    metadata = FileSystemReader(str(ckpt / DCP_DIR)).read_metadata()
    need: dict[str, int] = {}
    for info in metadata.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = ckpt / DCP_DIR / name
        if not path.is_file():
            raise FileNotFoundError(f"shard {name} is missing")
        if path.stat().st_size < size:
            raise ValueError(f"shard {name} is truncated ({path.stat().st_size} of {size} bytes)")


def _read(ckpt: Path, with_state: bool, weights: bool = True) -> tuple[dict, dict[str, torch.Tensor] | None, dict | None]:
    try:
        config = json.loads((ckpt / CONFIG).read_text())
        if is_sharded(ckpt):
            check_shards(ckpt)
            if weights:  # without: each rank of the resuming job checks its share of the files (loop._restore)
                verify_checksums(ckpt)
            tensors = full_weights(ckpt, config) if weights else None
        else:
            verify_checksums(ckpt)
            tensors = load_file(str(ckpt / WEIGHTS))  # also the check that the file is whole
        if tensors is not None and not all_finite(tensors.values()):  # bytes overwritten in place keep the size
            raise ValueError("its weights are not all finite")
        state = None
        if with_state:
            if not (ckpt / STATE).is_file():
                raise FileNotFoundError(f"{STATE} is missing")
            state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
            if not all_finite(nested_tensors(state.get("optimizer"))):
                raise ValueError("its optimizer state is not all finite")
    except (Exception, CheckpointException) as e:
        if not is_damage(e):  # this machine failing (memory, a refused read) says nothing about the checkpoint
            raise
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CorruptCheckpointError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {reason[:200]})") from None
    return config, tensors, state


def load_checkpoint(path: str | Path, with_state: bool = True, fallback: bool = False, say=print,
                    skipped: list[Path] | None = None, weights: bool = True) -> tuple[dict, dict[str, torch.Tensor] | None, dict | None]:
    """Return (config dict, model tensors, train state or None) of a checkpoint.

    weights=False skips reading a sharded checkpoint's weights (tensors None; its shards are still
    checked against its metadata): a resume loads them into the sharded model itself
    (`sharded_checkpoint.load_sharded`). The folder in use is `state["path"]`.
    with_state=True requires the training state. A corrupt or incomplete checkpoint raises
    CorruptCheckpointError; with fallback=True the previous readable
    checkpoint of the run is used instead, `say` reports which one was skipped and why, and the
    skipped folders are appended to `skipped`.
    """
    candidates = checkpoints_newest_first(path)
    if not candidates:
        resolve_checkpoint(path)  # raises the clear "not found" error
    errors = []
    for ckpt in candidates if fallback else candidates[:1]:
        try:
            loaded = _read(ckpt, with_state, weights)
        except CorruptCheckpointError as e:
            errors.append(str(e))
            if skipped is not None:
                skipped.append(ckpt)
            if fallback:
                say(f"warning: {e}; trying the previous checkpoint")
            continue
        if errors:
            say(f"falling back to {ckpt}")
        if loaded[2] is not None:
            loaded[2]["path"] = ckpt
        return loaded
    raise CorruptCheckpointError(errors[-1] if len(errors) == 1 else f"no readable checkpoint under {path}: {'; '.join(errors)}")


def last_finite_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run whose weights are readable and all finite (None if there is none)."""
    for ckpt in checkpoints_newest_first(run_dir) if (Path(run_dir) / "checkpoints").is_dir() else []:
        try:
            _, tensors, _ = _read(ckpt, with_state=False)
        except CorruptCheckpointError:
            continue
        if all_finite(tensors.values()):
            return ckpt
    return None


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load safetensors weights; tied weights absent from the file are fine, anything else missing is an error."""
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shapes differ: the weights belong to another config
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise ValueError(f"checkpoint weights do not match its config.json ({detail})") from None
    shared = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [m for m in missing if m not in shared]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


# ----------------------------------------------------------------------------- a trained model and its tokenizer


def is_damage(e: BaseException) -> bool:
    """Whether a failed load means the checkpoint itself is damaged (skip it for the previous one), rather than this
    machine failing to read it (out of memory, a refused or failed read, a lost peer: report that, skip nothing).

    Damage: a missing file, content that does not decode (pickle, safetensors, torch.load, DCP's reading of a
    shard), a sha256 mismatch, weights that do not fit the config (ValueError, KeyError, EOFError).
    """
    if isinstance(e, CheckpointException):  # the ranks' own exceptions decide
        inner = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
        return bool(inner) and all(isinstance(x, BaseException) and is_damage(x) for x in inner)
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))) or "out of memory" in str(e):
        return False
    if isinstance(e, torch.distributed.DistError):
        return False
    if isinstance(e, OSError):
        return isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError))
    return isinstance(e, (CorruptCheckpointError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError,
                          RuntimeError))


def load_error_text(e: BaseException) -> str:
    """A failed load's cause on one line: for DCP's CheckpointException (which wraps each rank's exception with
    its traceback) the first rank's own exception."""
    if isinstance(e, CheckpointException) and getattr(e, "failures", None):
        rank, failure = next(iter(sorted(e.failures.items())))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(inner).__name__}: {' '.join(str(inner).split())[:200]} (reading rank {rank})"
    return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _open_one(ckpt: Path) -> tuple[MoELM, TrainConfig]:
    """The model of one checkpoint folder; CorruptCheckpointError when it cannot be read or is not finite."""
    try:
        cfg = from_dict(TrainConfig, json.loads((ckpt / CONFIG).read_text()))
        model = MoELM(cfg.model)
        verify_checksums(ckpt)
        if is_sharded(ckpt):  # read straight into the model: one copy of the weights in memory, not two
            check_shards(ckpt)
            load_sharded_weights(ckpt, model)
        else:
            load_model_tensors(model, load_file(str(ckpt / WEIGHTS)))
        if not all_finite(model.state_dict().values()):  # bytes overwritten in place keep the file's size
            raise ValueError("its weights are not all finite")
    # DCP (its CheckpointException is a BaseException) and pickle raise many types for a damaged shard
    except (Exception, CheckpointException) as e:
        if not is_damage(e):
            raise
        raise CorruptCheckpointError(f"checkpoint {ckpt} is unreadable ({load_error_text(e)})") from None
    return model, cfg


def open_checkpoint(path: str | Path, device: str | torch.device = "cpu", say=_warn) -> tuple[MoELM, TrainConfig, Path]:
    """(model, its TrainConfig, the checkpoint folder used) from a run, checkpoints/ or checkpoint folder.

    Given a run, the newest checkpoint that loads with finite weights is used: unreadable or non-finite
    ones are skipped (each reported through `say`) and left where they are (`train --resume` sets them aside).
    """
    candidates = checkpoints_newest_first(path) or [resolve_checkpoint(path)]  # the latter raises "not found"
    errors = []
    for ckpt in candidates:
        try:
            model, cfg = _open_one(ckpt)
        except CorruptCheckpointError as e:
            errors.append(str(e))
            if ckpt != candidates[-1]:
                say(f"{e}; trying the previous checkpoint")
            continue
        if errors:
            say(f"using {ckpt}")
        return model.to(device).eval(), cfg, ckpt
    raise CorruptCheckpointError(errors[-1] if len(errors) == 1 else f"no readable checkpoint under {path}: {'; '.join(errors)}")


def load_model(path: str | Path, device: str | torch.device = "cpu", say=_warn) -> tuple[MoELM, TrainConfig]:
    """A model and its TrainConfig from a checkpoint (a run folder or a checkpoint folder); see `open_checkpoint`."""
    model, cfg, _ = open_checkpoint(path, device, say)
    return model, cfg


def saved_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer.json kept with a run, checkpoint or export (None: the run used bytes)."""
    ckpt_dir = resolve_checkpoint(path)
    for folder in (Path(path), ckpt_dir, ckpt_dir.parent.parent):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    return None


def run_tokenizer(path: str | Path, cfg: TrainConfig) -> Tokenizer:
    """The tokenizer a run was trained with: its saved tokenizer.json, else bytes."""
    saved = saved_tokenizer(path)
    if saved is not None:
        return HFTokenizer(saved)
    if cfg.data.tokenizer != "byte":
        raise FileNotFoundError(f"run at {path} used tokenizer {cfg.data.tokenizer!r} but has no {TOKENIZER_FILE}")
    return ByteTokenizer()
