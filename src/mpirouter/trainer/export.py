"""Fold trained routers into plain linear routers and write an ordinary checkpoint.

    mpirouter export runs/tiny-mpi --out runs/tiny-mpi-export

After folding, each router is `linear` with weight φ = C·normalize(R Gᵀ G) computed once, so
inference costs exactly what the vanilla router costs; logits are unchanged to float tolerance.

An export never deletes what it did not create: it is written into a hidden sibling folder and
renamed into place, and it replaces an existing `out` only when that is an earlier export and
`force=True`. Every export carries a marker file, `export.json`, which is how a later export
recognizes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from ..common.config import to_dict
from ..common.files import fit_name
from ..common.version import __version__
from . import checkpoint as ckpt
from .checkpoint import TOKENIZER_FILE, open_checkpoint, saved_tokenizer

MARKER = "export.json"
EXPORT_FORMAT = "mpirouter-export"
EXPORT_VERSION = 1
# what an export holds; a folder with anything else in it is not ours to replace
EXPORT_FILES = frozenset({ckpt.WEIGHTS, ckpt.CONFIG, TOKENIZER_FILE, MARKER})


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder written by `export_checkpoint` and holding nothing else.

    Either it has the `export.json` marker, or (exports from before the marker) its
    model.safetensors says folded_routers=true and it holds only model.safetensors,
    config.json and tokenizer.json.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if names - EXPORT_FILES or ckpt.WEIGHTS not in names:
        return False
    if MARKER in names:
        try:
            marker = json.loads((path / MARKER).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT
    return _weights_metadata(path / ckpt.WEIGHTS).get("folded_routers") == "true"


def _weights_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error types for a corrupt or foreign file
        return {}


def _run_folder(checkpoint_dir: Path) -> Path:
    """The run folder a checkpoint belongs to (run/checkpoints/step_X -> run), else the checkpoint folder itself."""
    return checkpoint_dir.parent.parent if checkpoint_dir.parent.name == "checkpoints" else checkpoint_dir


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_destination(src: str | Path, out: str | Path, force: bool = False) -> bool:
    """Refuse an `out` that an export must not touch; return whether it is an earlier export to replace.

    Raises FileExistsError for: an existing file or symlink; a folder that is (or contains) the
    source; a folder inside the source run; an existing folder that is not an export; an earlier
    export without `force`. An empty existing folder is fine (nothing in it can be lost).
    """
    out = Path(out)
    src_dir = ckpt.resolve_checkpoint(src).resolve()
    run_dir = _run_folder(src_dir)
    out_r = out.resolve()
    if out.is_symlink():
        raise FileExistsError(f"export destination {out} is a symbolic link; choose another --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export destination {out} is an existing file; choose another --out")
    for source in dict.fromkeys([Path(src).resolve(), src_dir, run_dir]):
        if _is_within(source, out_r):
            raise FileExistsError(f"export destination {out} is or contains the source {source}; choose another --out")
    # the run folder belongs to the run: training resumes, rotates checkpoints and writes metrics there,
    # and tools read everything under it as that run; an export is a separate artifact next to it
    if _is_within(out_r, run_dir):
        raise FileExistsError(
            f"export destination {out} is inside the source run {run_dir}; export next to it, e.g. --out {run_dir.parent / (run_dir.name + '-export')}"
        )
    if not out.exists() or not any(out.iterdir()):
        return False
    if not is_export(out):
        raise FileExistsError(f"export destination {out} exists and is not an mpirouter export; refusing to replace it")
    if not force:
        raise FileExistsError(f"export destination {out} is an earlier export; pass --force to replace it")
    return True


@torch.no_grad()
def export_checkpoint(src: str | Path, out: str | Path, verify: bool = True, atol: float = 1e-4, force: bool = False,
                      say=ckpt._warn) -> Path:
    """Write `out/` with model.safetensors + config.json (+ tokenizer.json) holding folded routers, and export.json.

    With verify=True the folded model's logits on a fixed probe batch must be finite and match
    the original's within `atol`, else a RuntimeError is raised and nothing is written. See
    `check_destination` for which `out` is refused (FileExistsError); `force=True` replaces an
    earlier export, and only that. Given a run, its newest checkpoint that loads with finite weights is
    exported (`checkpoint.open_checkpoint`; `say` reports any skipped).
    """
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    out = Path(out)
    replace = check_destination(src, out, force)
    model, cfg, src_dir = open_checkpoint(src, say=say)
    probe = torch.randint(0, cfg.model.vocab_size, (2, min(32, cfg.model.max_seq_len)), generator=torch.Generator().manual_seed(0))
    before = model(probe).logits
    model.fold_routers()
    cfg = dataclasses.replace(cfg, model=model.config)  # the folded config, as a new object
    if verify:
        after = model(probe).logits
        if not torch.isfinite(before).all():
            raise RuntimeError(f"the checkpoint at {src_dir} gives non-finite logits on the probe batch; not exporting")
        diff = (after - before).abs().max().item()
        if not diff <= atol:  # a NaN difference must fail too
            raise RuntimeError(f"folded model's logits differ by {diff:.3g} > {atol}; not exporting")

    step = (_weights_metadata(src_dir / ckpt.WEIGHTS).get("step") if not ckpt.is_sharded(src_dir)
            else src_dir.name.removeprefix("step_").lstrip("0") or "0")  # a sharded checkpoint: its folder names the step
    marker = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "source": str(src_dir.resolve()),
        "step": int(step) if step is not None and step.isdigit() else None,
        "mpirouter_version": __version__,
    }
    metadata = {"format": "pt", "folded_routers": "true"}
    if marker["step"] is not None:
        metadata["step"] = str(marker["step"])

    out.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    # a legal long --out name must not make its hidden siblings' names too long
    tmp = out.parent / fit_name(out.name, f".export-tmp-{pid}", prefix=".")
    old = out.parent / fit_name(out.name, f".export-old-{pid}", prefix=".")
    for path in (tmp, old):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"temporary export folder {path} already exists (left by a crashed export?); remove it and retry")
    tmp.mkdir()  # from here on, tmp is ours to remove
    try:
        _write_export(model, cfg, marker, metadata, src, tmp, out, old if replace else None)
    except (Exception, ckpt.CheckpointException) as e:
        raise ckpt.write_error(e, out.parent, f"the export {out}", kept="nothing was written there") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_export(model, cfg, marker: dict, metadata: dict, src, tmp: Path, out: Path, old: Path | None) -> None:
    """Write the export into `tmp`, flush it and rename it into place as `out` (`_place`)."""
    ckpt.save_weights(ckpt.model_tensors(model), tmp / ckpt.WEIGHTS, metadata)
    (tmp / ckpt.CONFIG).write_text(json.dumps(to_dict(cfg), indent=2))
    tokenizer = saved_tokenizer(src)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, tmp / TOKENIZER_FILE)
    # the marker last: a folder with it is a complete export
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    ckpt.fsync_files(tmp)
    _place(tmp, out, old)


def _place(tmp: Path, out: Path, old: Path | None) -> None:
    """Rename the finished export `tmp` to `out`; with `old`, park the earlier export there first and delete it after."""
    if old is None:
        was_empty_dir = out.is_dir()
        if was_empty_dir:
            out.rmdir()  # checked empty before; fails (and we stop) if something appeared in it since
        try:
            os.rename(tmp, out)
        except BaseException:
            if was_empty_dir:
                out.mkdir(exist_ok=True)
            raise
        return
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    try:
        shutil.rmtree(old)
    except OSError as e:
        warnings.warn(f"exported to {out}, but could not remove the replaced export parked at {old}: {e}", stacklevel=3)
