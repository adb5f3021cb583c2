"""One place that turns what a `train` command gives into its TrainConfig, with one documented precedence.

    cfg, notes = resolve_train_config(ConfigSources(flags={"steps": 300}, overrides=("model.moe.top_k=4",)))

A value can come from five places. Lowest precedence first:

    1. the defaults: TrainConfig's, with the command line's flag defaults and the preset (`--preset`, default tiny)
    2. the base: a config file (`--config FILE`) or the run being resumed (`--resume`, its newest
       readable checkpoint's config), instead of 1; an explicit `--preset` replaces the base's model
       section (keeping its router)
    3. `--set key=value` overrides, in order
    4. flags given explicitly on the command line (`--steps`, `--router`, `--out`, ...)

A `--set` and an explicit flag that name the same field (or one a section of the other) are refused,
whatever their values: one command line, one value per field. Where the run goes (`out_dir`) is
never taken from a config file, which says what to train, not where: it is `--out` (or
`--set out_dir=`), the run folder itself when resuming, else the default
`runs/{preset}-{router}-s{seed}`; a file's other out_dir is reported in a note.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.config import apply_overrides, from_dict, to_dict
from ..core.model import preset_config
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .rundir import check_not_locked

OUT_DIR = "out_dir"


@dataclass(frozen=True)
class ConfigSources:
    """What a `train` command line gives, before any of it is combined (`resolve_train_config` combines it)."""

    flags: dict[str, Any] = field(default_factory=dict)
    """Flags given explicitly, by the TrainConfig field each sets (dotted path, e.g. "model.moe.router.kind")."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """The other flags' default values, by field: they build the defaults (1) when there is no base (2)."""
    preset: str | None = None
    """`--preset` given explicitly (None: not given; the defaults then use "tiny" or the base keeps its model)."""
    config_file: str | None = None
    """`--config FILE`: a saved TrainConfig as the base."""
    resume: str | None = None
    """`--resume`: the run folder whose newest readable checkpoint's config is the base."""
    overrides: tuple[str, ...] = ()
    """`--set key=value` items, applied in order."""

    def __post_init__(self) -> None:
        if self.config_file is not None and self.resume is not None:
            raise ValueError("--config cannot be combined with --resume (the checkpoint holds the run's config)")
        for name in ("config_file", "resume"):
            if getattr(self, name) == "":
                raise ValueError(f"--{'config' if name == 'config_file' else 'out'} must not be empty")


def default_out_dir(cfg: TrainConfig) -> str:
    """Where a run goes when no --out names a folder: runs/{preset}-{router}-s{seed}."""
    return f"runs/{cfg.preset}-{cfg.model.moe.router.kind}-s{cfg.seed}"


def resolve_train_config(src: ConfigSources, check_lock: bool = True) -> tuple[TrainConfig, list[str]]:
    """The TrainConfig `src` asks for and notes on what was not used (module docstring: the precedence).

    ValueError names any conflict or bad value. Nothing is written; resuming reads the run's checkpoint
    config, and first (check_lock) refuses a run another job holds. In a torchrun job only rank 0 checks:
    it takes the lock for the whole job, so the others would find it taken.
    """
    _refuse_conflicts(src)
    notes: list[str] = []
    if src.resume is not None:
        if check_lock:
            check_not_locked(src.resume)  # another job running there: say so before reading its checkpoints
        base = _checkpoint_config(src.resume)
    elif src.config_file is not None:
        base = _file_config(src.config_file)
    else:
        base = _defaults(src)
    if src.preset is not None and (src.resume is not None or src.config_file is not None):
        model = to_dict(preset_config(src.preset))
        model["moe"]["router"] = base["model"]["moe"]["router"]
        base["model"], base["preset"] = model, src.preset
    names = [src.flags.get("optim.name")] + [o.split("=", 1)[1].strip() for o in src.overrides if _path(o) == "optim.name"]
    if any(name is not None and name != base["optim"]["name"] for name in names):
        # tuned lrs belong to the old optimizer (a muon lr is no adamw lr); --set and flags set either again below
        base["optim"]["lr"] = base["optim"]["adam_lr"] = None
    from_file = base.get(OUT_DIR) if src.config_file is not None else None
    for path, value in src.flags.items():
        _set(base, path, value)
    if src.resume is not None:
        base[OUT_DIR] = src.resume  # a moved or copied run continues where it is now
    try:
        cfg = apply_overrides(from_dict(TrainConfig, base), list(src.overrides))
    except TypeError as e:  # a section given as a list, ...: from_dict names the path
        raise ValueError(str(e)) from None
    chosen = OUT_DIR in src.flags or any(_path(o) == OUT_DIR for o in src.overrides) or src.resume is not None
    if not chosen:
        cfg = apply_overrides(cfg, [f"{OUT_DIR}={default_out_dir(cfg)}"])
        if from_file and from_file != cfg.out_dir:
            notes.append(f"the out_dir in --config {src.config_file} ({from_file}) is not used: the run goes to "
                         f"{cfg.out_dir} (pass --out to choose)")
    return cfg, notes


def _path(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _refuse_conflicts(src: ConfigSources) -> None:
    for item in src.overrides:
        for path in src.flags:
            if _overlap(_path(item), path):
                flag = FIELD_FLAGS.get(path, path)
                raise ValueError(f"--set {item} and --{flag} both set {path}; keep one")
        if src.resume is not None and _overlap(_path(item), OUT_DIR):
            raise ValueError(f"--set {item}: a resumed run stays in its folder (--out {src.resume})")
    if src.resume is not None and OUT_DIR in src.flags and src.flags[OUT_DIR] != src.resume:
        raise ValueError(f"--resume continues the run in --out {src.resume}; it cannot also write to {src.flags[OUT_DIR]}")


FIELD_FLAGS = {"model.moe.router.kind": "router", "model.moe.router.scale_prime": "scale", "model.moe.router.target": "target",
               "data.path": "data", "data.tokenizer": "tokenizer", "steps": "steps", "batch_size": "batch-size",
               "optim.name": "optimizer", "optim.lr": "lr", "seed": "seed", "device": "device", "compile": "compile",
               OUT_DIR: "out"}
"""The command line flag that sets each field (for messages)."""


def _set(data: dict, path: str, value) -> None:
    *sections, leaf = path.split(".")
    for key in sections:
        data = data[key]
    data[leaf] = value


def _defaults(src: ConfigSources) -> dict:
    preset = src.preset or "tiny"
    cfg = TrainConfig(model=preset_config(preset), preset=preset)
    data = to_dict(cfg)
    for path, value in src.defaults.items():
        if path not in src.flags:
            _set(data, path, value)
    return data


def _file_config(path: str) -> dict:
    try:
        text = Path(path).read_text()
    except IsADirectoryError:
        raise ValueError(f"--config {path} is a folder; pass its config.json") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path} is not UTF-8 text") from None
    try:
        return to_dict(from_dict(TrainConfig, json.loads(text)))
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"--config {path} is nested too deeply to be a config") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"--config {path}: {e}") from None


def _checkpoint_config(run_dir: str) -> dict:
    saved, _, _ = load_checkpoint(run_dir, with_state=False, fallback=True, say=lambda _: None, weights=False)
    return to_dict(from_dict(TrainConfig, saved))
