"""Atomic checkpoints: safetensors weights + optimizer/RNG state + config, and loading them back.

Layout of a run folder:
    run/config.json                    the run's full config
    run/metrics.jsonl                  one JSON record per log/eval event
    run/checkpoints/step_0000100/      model.safetensors, train_state.pt, config.json
    run/checkpoints/latest             name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed to disk and then renamed into
place; `latest` is replaced atomically afterwards. A crash at any point leaves the previous
checkpoint and `latest` untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import time
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..common.config import from_dict
from ..common.files import atomic_write_text, fsync_dir, fsync_files
from ..core.model import MoELM
from .config import TrainConfig
from .data import ByteTokenizer, HFTokenizer, Tokenizer

LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
CONFIG = "config.json"
TOKENIZER_FILE = "tokenizer.json"
TMP_PREFIX = ".tmp-"
STEP_NAME = re.compile(r"step_\d{7,}")
"""Names of checkpoint folders; rotation touches nothing else (moved-aside or foreign folders stay)."""


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
    return bool(torch.stack(flags).all()) if flags else True


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
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final, tmp = ckpt_root / name, ckpt_root / f"{TMP_PREFIX}{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_weights(tensors, tmp / WEIGHTS, {"format": "pt", "step": str(step)})
        if train_state is not None:
            torch.save(train_state, tmp / STATE)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
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


def set_aside(checkpoints: list[Path]) -> list[Path]:
    """Rename unreadable checkpoints to `step_X.corrupt-<time>`, so they neither hold a `keep` slot nor
    push readable checkpoints out of it; nothing is deleted."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    moved = []
    for p in checkpoints:
        target = p.with_name(f"{p.name}.corrupt-{stamp}")
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
    """A checkpoint folder from a checkpoint folder, a run folder, or a checkpoints/ folder."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            ckpt = root / latest.read_text().strip()
            if (ckpt / WEIGHTS).is_file():
                return ckpt
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    raise FileNotFoundError(f"no checkpoint found at {str(path)!r} (expected {WEIGHTS} or checkpoints/{LATEST})")


def checkpoints_newest_first(path: str | Path) -> list[Path]:
    """Every checkpoint folder of a run, newest step first (or the folder itself when it is one)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return [path]
    # by step, not by `latest`: a crash between renaming a checkpoint into place and updating `latest`
    # leaves the newer checkpoint complete
    return step_folders(path / "checkpoints" if (path / "checkpoints").is_dir() else path)[::-1]


def _read(ckpt: Path, with_state: bool) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    try:
        config = json.loads((ckpt / CONFIG).read_text())
        tensors = load_file(str(ckpt / WEIGHTS))
        state = None
        if with_state:
            if not (ckpt / STATE).is_file():
                raise FileNotFoundError(f"{STATE} is missing")
            state = torch.load(ckpt / STATE, map_location="cpu", weights_only=False)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CorruptCheckpointError(f"checkpoint {ckpt} is unreadable ({type(e).__name__}: {reason[:200]})") from None
    return config, tensors, state


def load_checkpoint(path: str | Path, with_state: bool = True, fallback: bool = False, say=print,
                    skipped: list[Path] | None = None) -> tuple[dict, dict[str, torch.Tensor], dict | None]:
    """Return (config dict, model tensors, train state or None) of a checkpoint.

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
            loaded = _read(ckpt, with_state)
        except CorruptCheckpointError as e:
            errors.append(str(e))
            if skipped is not None:
                skipped.append(ckpt)
            if fallback:
                say(f"warning: {e}; trying the previous checkpoint")
            continue
        if errors:
            say(f"falling back to {ckpt}")
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


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MoELM, TrainConfig]:
    """A model and its TrainConfig from a checkpoint (a run folder or a checkpoint folder)."""
    saved, tensors, _ = load_checkpoint(path, with_state=False)
    cfg = from_dict(TrainConfig, saved)
    model = MoELM(cfg.model)
    load_model_tensors(model, tensors)
    return model.to(device).eval(), cfg


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
