"""Matched grids of trainings (routers × seeds × optimizers × C' × power targets × lr × any config axes) and a report.

    mpirouter compare --preset tiny --routers linear,mpi --seeds 0,1,2 --steps 600 --out runs/compare
    mpirouter compare --out runs/compare --report-only          # rebuild report.md from the run folders
    mpirouter compare --routers linear,mpi --lr 1.5e-3,3e-3,6e-3 --scales 0.5,1,2 --out runs/sweep   # a fair sweep
    mpirouter compare --data corpus/ --tokenizer bpe --out runs/compare-corpus   # another corpus, as in `train`
    mpirouter compare --vary model.moe.score_func=softmax,sigmoid --vary model.moe.balance=aux,bias --out runs/cells
    mpirouter compare --routers linear,mpi --targets gate,up,gate_up --out runs/targets   # the power step's matrix

Runs with the same seed are matched: the same batches in the same order (batches are a pure
function of (seed, step)) and the same initial weights for every parameter the routers share
(weights depend only on the seed). The grid runs sequentially and is resumable: a finished run
is skipped, a half-finished one resumes from its latest checkpoint. Run folders are
`{out}/{preset}/{optimizer}[-lr{lr}]/[{cell}/]{router}-C{C'}[-{target}]/seed{n}` (`{router}` alone for routers
that ignore C'; `-lr{lr}` when the lr is given rather than the optimizer's default; `-{target}` for a power
target other than the gate; `{cell}` names the `--vary` values, e.g. `score_func=sigmoid,balance=bias`).
Each `--vary` cell is a section of the report with its own linear baseline. Several compare processes may
share one output folder when their grids are disjoint (e.g. split by seeds, one process per core):
each call records itself in its own `sessions/*.json`, and a run another process is training is skipped.
`--out` must be absent, empty, or a compare folder (one holding those session records, or a legacy
grid.json): any other folder is the user's and is refused. The report (`report.md`, `report.json`, PNG
plots) is rebuilt from the run folders alone; with several lrs it adds a sweep table that compares
every router at its own best lr. Runs that differ in more than the grid's axes (steps, batch, corpus, model,
...) get report sections of their own.
"""

from __future__ import annotations

import argparse
import builtins
import itertools
import json
import re
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..common.config import apply_overrides, check_number, flatten, to_dict
from ..common.files import atomic_write_text
from ..common.provenance import environment
from ..core.model import preset_config
from ..core.routers import POWER_TARGETS, RouterConfig, parse_router_name, router_name_overrides
from ..optim import OptimConfig
from ..parallel.env import agree, init_distributed, rank_device
from ..trainer.checkpoint import resolve_checkpoint
from ..trainer.config import TrainConfig, with_defaults
from ..trainer.data import DataConfig, prepare_data
from ..trainer.device import resolve_device
from ..trainer.loop import NonFiniteLossError, train
from ..trainer.metrics import read_metrics
from ..trainer.rundir import RunLockedError, check_not_locked, is_run_folder
from ..trainer.schedule import ScheduleConfig
from .folders import SESSIONS, check_free_for_compare
from .report import SCALE_FREE, TARGET_FREE, router_kind, variant_label, write_report

GRID_KEYS = ("model.moe.router.kind", "model.moe.router.scale_prime", "model.moe.router.target", "model.moe.router.erc.enabled",
             "model.moe.router.simbal.enabled", "optim.name", "optim.lr", "seed", "out_dir")
"""Config fields the grid sets itself; `overrides` may not touch them."""
_UNCHECKED = {"out_dir", "progress", "device", "compile", "tensorboard", "model.vocab_size"}


@dataclass
class CompareConfig:
    """A grid of matched trainings: every router × seed × optimizer × C'."""

    routers: list[str] = field(default_factory=lambda: ["linear", "mpi"])
    """Router names: a kind (linear, mpi, power, retract, mpi-inplace, svd, cosine, kmeans, aoe, remoe), optionally
    with router losses added, e.g. "linear+erc", "mpi+erc", "linear+simbal"; linear is the paired baseline."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds; runs with the same seed share initial weights and data order."""
    optimizers: list[str] = field(default_factory=lambda: ["adamw"])
    """Optimizer names, passed through as `optim.name=...`."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """MPI scales C' (model.moe.router.scale_prime); linear and power ignore them."""
    targets: list[str] = field(default_factory=lambda: ["gate"])
    """Power-step targets (model.moe.router.target: gate, up, gate_up) of the routers that use one (mpi, power,
    mpi-inplace); linear and retract are trained once per seed."""
    vary: dict[str, list[str]] = field(default_factory=dict)
    """Further grid axes: config field -> values (as `--set` would parse them); every combination is a cell,
    a section of the report with its own paired linear baseline."""
    preset: str = "tiny"
    """Model preset."""
    steps: int = 600
    """Optimizer steps per run."""
    batch_size: int = 16
    """Sequences per step."""
    data: str | None = None
    """Corpus of every run: a text file, directory or .jsonl (None: the embedded Shakespeare)."""
    tokenizer: str = "byte"
    """Tokenizer of every run: byte | bpe | path/to/tokenizer.json."""
    lrs: list[float] = field(default_factory=list)
    """Peak learning rates, each a grid axis value for every optimizer (empty: each optimizer's own default)."""
    warmup_steps: int | None = None
    """Warmup steps (None: min(50, steps // 10))."""
    eval_every: int = 100
    """Validate every this many steps (and at the end, on the whole validation set)."""
    eval_batches: int | None = 16
    """Cap on validation batches of the periodic evals (None: whole set)."""
    ckpt_every: int = 0
    """Checkpoint every this many steps so an interrupted run can resume (0: eval_every, else steps // 10)."""
    out_dir: str = "runs/compare"
    """Output folder: run folders, grid.json, report.md, plots."""
    overrides: list[str] = field(default_factory=list)
    """Extra `section.field=value` overrides applied to every run (not the grid's own keys)."""
    progress: bool = True
    """Show each training's progress bar."""

    def __post_init__(self) -> None:
        for name in ("routers", "seeds", "optimizers", "scales", "targets", "lrs"):
            values = getattr(self, name)
            if not values and name != "lrs":
                raise ValueError(f"compare: {name} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"compare: {name} has duplicates: {values}")
        for name in self.routers:
            try:
                parse_router_name(name)
            except ValueError as e:
                raise ValueError(f"compare: --routers: {e}") from None
        bad = [t for t in self.targets if t not in POWER_TARGETS]
        if bad:
            raise ValueError(f"compare: unknown power target(s) {bad}; choose from {', '.join(POWER_TARGETS)}")
        for item in self.overrides:
            if item.split("=", 1)[0].strip() in GRID_KEYS:
                raise ValueError(f"compare: override {item!r} sets a grid key; use --routers/--seeds/--optimizers/--scales/--targets/--lr")
        for key, values in self.vary.items():
            if key in GRID_KEYS:
                raise ValueError(f"compare: --vary {key} is a grid key; use --routers/--seeds/--optimizers/--scales/--targets/--lr")
            if key in ("preset", "seq_len") or key.startswith("data."):
                raise ValueError(f"compare: --vary {key} is not supported (the grid shares one model preset and one corpus); "
                                 f"run one compare per value into separate --out folders")
            if any(item.split("=", 1)[0].strip() == key for item in self.overrides):
                raise ValueError(f"compare: {key} is both varied (--vary) and set (--set); keep one")
            if not values or len(set(values)) != len(values) or any(not v or "/" in v or "," in v for v in values):
                raise ValueError(f"compare: --vary {key} needs distinct non-empty values without '/' or ',', got {values}")
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"compare: learning rates must be > 0, got {self.lrs}")
        # named as the flags are, and refused before the output folder is made
        for flag, value, low in (("--steps", self.steps, 1), ("--batch-size", self.batch_size, 1), ("--eval-every", self.eval_every, 0),
                                 ("--eval-batches", self.eval_batches, 1), ("--ckpt-every", self.ckpt_every, 0),
                                 ("--warmup-steps", self.warmup_steps, 0)):
            if value is not None:  # None: eval_batches "none" (whole set), warmup_steps left to its default
                check_number(f"compare: {flag}", value, integer=True, ge=low)
        if not self.tokenizer:
            raise ValueError("compare: tokenizer must not be empty (byte | bpe | path/to/tokenizer.json)")


@dataclass
class GridRun:
    """One training of the grid."""

    router: str
    seed: int
    optimizer: str
    scale: float | None
    lr: float | None
    config: "TrainConfig"  # noqa: F821
    target: str | None = None
    """The power target, None for routers without one."""
    cell: dict[str, str] = field(default_factory=dict)
    """This run's `--vary` values."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def label(self) -> str:
        lr = "" if self.lr is None else f" lr {self.lr:g}"
        cell = f" {cell_name(self.cell)}" if self.cell else ""
        return f"{variant_label(self.router, self.scale, self.target)} seed {self.seed} [{self.optimizer}{lr}{cell}]"


def cell_name(cell: dict[str, str]) -> str:
    """A `--vary` cell as a folder name, e.g. "score_func=sigmoid,balance=bias" (last part of each key)."""
    return ",".join(f"{key.split('.')[-1]}={value}" for key, value in cell.items())


def run_config(cfg: CompareConfig, router: str, seed: int, optimizer: str, scale: float | None,
               lr: float | None = None, target: str | None = None, cell: dict[str, str] | None = None) -> TrainConfig:
    """The TrainConfig of one run (overrides first, then the cell's `--vary` values, then the grid's own keys)."""
    folder = (router if scale is None else f"{router}-C{scale:g}") + (f"-{target}" if target not in (None, "gate") else "")
    opt_folder = optimizer if lr is None else f"{optimizer}-lr{lr:g}"
    if cell:
        opt_folder = f"{opt_folder}/{cell_name(cell)}"
    warmup = min(50, cfg.steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps
    base = TrainConfig(model=preset_config(cfg.preset, moe=dict(router=RouterConfig(kind=parse_router_name(router)[0]))), preset=cfg.preset,
                       data=DataConfig(path=cfg.data, tokenizer=cfg.tokenizer), optim=OptimConfig(),
                       schedule=ScheduleConfig(warmup_steps=warmup), steps=cfg.steps,
                       batch_size=cfg.batch_size, eval_every=cfg.eval_every, eval_batches=cfg.eval_batches,
                       ckpt_every=cfg.ckpt_every or cfg.eval_every or max(1, cfg.steps // 10), ckpt_keep=1, progress=cfg.progress)
    grid = [*router_name_overrides(router), f"optim.name={optimizer}", f"seed={seed}",
            f"out_dir={Path(cfg.out_dir) / cfg.preset / opt_folder / folder / f'seed{seed}'}"]
    if lr is not None:
        grid.append(f"optim.lr={lr!r}")
    if scale is not None:
        grid.append(f"model.moe.router.scale_prime={scale!r}")
    if target is not None:
        grid.append(f"model.moe.router.target={target}")
    return apply_overrides(base, [*cfg.overrides, *(f"{k}={v}" for k, v in (cell or {}).items()), *grid])


def grid_cells(cfg: CompareConfig) -> list[dict[str, str]]:
    """Every combination of the `--vary` values, in the order given ([{}] without --vary)."""
    return [dict(zip(cfg.vary, values)) for values in itertools.product(*cfg.vary.values())]


def grid_runs(cfg: CompareConfig) -> list[GridRun]:
    """Every run of the grid, seed-major so that each finished seed completes a paired comparison."""
    runs = []
    for optimizer in cfg.optimizers:
        for seed in cfg.seeds:
            for lr in cfg.lrs or [None]:
                for cell in grid_cells(cfg):
                    for router in cfg.routers:
                        for scale in [None] if router_kind(router) in SCALE_FREE else cfg.scales:
                            for target in [None] if router_kind(router) in TARGET_FREE else cfg.targets:
                                config = run_config(cfg, router, seed, optimizer, scale, lr, target, cell)
                                runs.append(GridRun(router, seed, optimizer, scale, lr, config, target, cell))
    return runs


DIVERGED = "diverged.json"
"""Marker a grid leaves in a run folder whose loss or weights became non-finite: a result, not a run to retry."""


def run_status(run_dir: Path, steps: int) -> tuple[str, int]:
    """("done" | "diverged" | "partial" | "new", step reached): done = final step logged, diverged = stopped on a
    non-finite loss (`DIVERGED`), partial = resumable checkpoint."""
    if (run_dir / DIVERGED).is_file():
        return "diverged", int(json.loads((run_dir / DIVERGED).read_text()).get("step", 0))
    records = read_metrics(run_dir)
    if any(r.get("event") == "timing" and r.get("step") == steps for r in records):
        return "done", steps
    try:
        step = int(resolve_checkpoint(run_dir).name.split("_")[-1])
    except (FileNotFoundError, ValueError):
        return "new", 0
    return ("done" if step >= steps else "partial"), step


def check_config(run: GridRun) -> None:
    """Refuse to reuse a run folder that was trained with a different config (None = a default resolved at run time)."""
    path = run.run_dir / "config.json"
    if not path.is_file():
        return
    saved, wanted = flatten(with_defaults(json.loads(path.read_text()))), flatten(to_dict(run.config))
    # how a run is spread over processes may change (as for `train --resume`), its global batch may not
    start = next((r for r in read_metrics(run.run_dir) if r.get("event") == "start"), {})
    saved_global = saved.get("batch_size", 0) * start.get("world_size", 1)
    wanted_global = run.config.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    diff = [f"global batch (processes x batch_size): {saved_global} -> {wanted_global}"] if saved_global != wanted_global else []
    diff += [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
             if k not in _UNCHECKED and not k.startswith("dist.") and k != "batch_size" and saved.get(k) != wanted.get(k)
             and not (wanted.get(k) is None and k in saved)]
    if diff:
        raise ValueError(f"run folder {run.run_dir} was trained with a different config ({'; '.join(diff)}); "
                         f"use another --out or delete that folder")


def command_line(cfg: CompareConfig) -> str:
    """The `mpirouter compare` command that reproduces `cfg`."""
    args = ["mpirouter", "compare", "--routers", _join(cfg.routers), "--seeds", _join(cfg.seeds), "--optimizers",
            _join(cfg.optimizers), "--scales", _join(cfg.scales), "--preset", cfg.preset, "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--eval-every", str(cfg.eval_every),
            "--eval-batches", str(cfg.eval_batches), "--out", cfg.out_dir]
    args += ["--targets", _join(cfg.targets)] if cfg.targets != ["gate"] else []
    args += [a for key, values in cfg.vary.items() for a in ("--vary", f"{key}={_join(values)}")]
    args += ["--lr", _join(cfg.lrs)] if cfg.lrs else []
    args += ["--data", cfg.data] if cfg.data is not None else []
    args += ["--tokenizer", cfg.tokenizer] if cfg.tokenizer != "byte" else []
    args += ["--warmup-steps", str(cfg.warmup_steps)] if cfg.warmup_steps is not None else []
    args += ["--ckpt-every", str(cfg.ckpt_every)] if cfg.ckpt_every else []
    args += [a for item in cfg.overrides for a in ("--set", item)] + ([] if cfg.progress else ["--no-progress"])
    return shlex.join(args)


def _join(xs: list) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)


def run_grid(cfg: CompareConfig, data=None, limit: int | None = None, command: str | None = None) -> Path:
    """Train every unfinished run of the grid (at most `limit` this call), then write the report; returns report.md."""
    if limit is not None:
        check_number("compare: --limit", limit, integer=True, ge=1)
    out = Path(cfg.out_dir)
    runs = grid_runs(cfg)
    device = rank_device(resolve_device(runs[0].config.device))
    # under torchrun every rank trains every run together: rank 0 reads the folders and writes the
    # session and report, and its view of each run's status is the one all ranks act on
    ctx = init_distributed(runs[0].config.dist, device)
    main = ctx is None or ctx.is_main
    print = builtins.print if main else _silent
    # rank 0 looks before it writes (the broadcast waits for its verdict), so no rank sees its half-made folder
    refusal = agree(ctx, _refusal(out) if main else None)
    if refusal:
        raise FileExistsError(refusal)
    for run in runs:
        check_config(run)
    env = environment(str(device))
    session = {"command": command or command_line(cfg), **env, "config": to_dict(cfg), "runs_trained": []}
    # sortable by start time, and unique even for two calls in one second from one process
    now_ns = time.time_ns()
    session_path = out / SESSIONS / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now_ns // 10**9))}-{now_ns % 10**9:09d}-{os.getpid()}.json"
    if main:
        _start_session(session_path, json.dumps(session, indent=2))
    trained, times = 0, []
    prepared: dict[tuple, object] = {}
    for i, run in enumerate(runs, 1):
        status, step, busy = agree(ctx, _status_and_lock(run) if main else None)
        head = f"run {i}/{len(runs)}: {run.label}"
        if status in ("done", "diverged"):
            print(f"{head}: {status}, skipped", flush=True)
            continue
        if busy:  # another compare call (sharing the folder) is training it: its checkpoints are not ours to resume
            print(f"{head}: being trained by another process, skipped", flush=True)
            continue
        if limit is not None and trained >= limit:
            print(f"{head}: not started (limit of {limit} trainings this call); rerun to continue", flush=True)
            break
        key = (json.dumps(to_dict(run.config.data), sort_keys=True), run.config.context)
        if key not in prepared:  # tokenized once per corpus and tokenizer, shared by the runs that use them
            prepared[key] = data if data is not None and not prepared else prepare_data(run.config.data, run.config.context)
        left = sum(1 for r in runs[i - 1:] if run_status(r.run_dir, r.config.steps)[0] != "done")
        eta = f", ~{_duration(left * sum(times) / len(times))} left" if times else ""
        print(f"{head}: {'resuming from step ' + str(step) if status == 'partial' else 'training'}{eta}", flush=True)
        t0 = time.perf_counter()
        try:
            # a "new" run whose folder exists was stopped before its first checkpoint: start it again, its start moved aside
            result = train(run.config, data=prepared[key], resume=status == "partial", force=status == "new")
        except RunLockedError:
            print(f"{head}: being trained by another process, skipped", flush=True)
            continue
        except NonFiniteLossError as e:  # a result of this setting (e.g. too high an lr): recorded, the grid goes on
            if main:
                at = re.search(r"at step (\d+)", str(e))
                step = int(at.group(1)) if at else max((r.get("step", 0) for r in read_metrics(run.run_dir)), default=0)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run.run_dir / DIVERGED, json.dumps({"step": step, "message": str(e)}, indent=2))
                session.setdefault("runs_diverged", []).append(str(run.run_dir.relative_to(out)))
                atomic_write_text(session_path, json.dumps(session, indent=2))
            print(f"{head}: diverged ({e}); recorded in {DIVERGED}, the grid goes on", flush=True)
            continue
        times.append(time.perf_counter() - t0)
        trained += 1
        session["runs_trained"].append(str(run.run_dir.relative_to(out)))
        if main:
            atomic_write_text(session_path, json.dumps(session, indent=2))
        ev = result.final_eval or {}
        print(f"{head}: finished in {_duration(times[-1])}, val loss {ev.get('val_loss', math.nan):.4f}, "
              f"MaxVio {ev.get('maxvio', math.nan):.3f}, align φ {ev.get('align', math.nan):.3f}", flush=True)
    report = write_report(out) if main else out / "report.md"
    print(f"report: {report}", flush=True)
    return report


def _refusal(out: Path) -> str | None:
    """Why `out` may not take a grid (None: it may)."""
    if is_run_folder(out):
        return f"--out {out} is a training run folder, not a compare folder; choose another --out"
    try:
        check_free_for_compare(out)
    except FileExistsError as e:
        return str(e)
    return None


def _start_session(path: Path, text: str) -> None:
    """Make the output folder and record this call in it; if that fails (a full disk), remove the folders made
    here, so that a retry does not find a non-empty folder without a session and refuse it."""
    made, folder = [], path.parent
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except BaseException:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
        raise


def _status_and_lock(run: GridRun) -> tuple[str, int, bool]:
    """`run_status`, and whether another process holds the run folder's lock (not asked of a finished run:
    the probe takes the lock for an instant, and a process starting a run then would find it taken)."""
    status, step = run_status(run.run_dir, run.config.steps)
    if status == "done":
        return status, step, False
    try:
        check_not_locked(run.run_dir)
    except RunLockedError:
        return status, step, True
    return status, step, False


def _silent(*args, **kwargs) -> None:
    """`print` on ranks other than 0."""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `mpirouter compare` flags (cli.py adds the subparser and calls `cli_main`)."""
    d = CompareConfig()
    p.add_argument("--routers", default=_join(d.routers), help="comma-separated router names: kinds, or kinds with router losses such as linear+erc (linear is the baseline)")
    p.add_argument("--seeds", default=_join(d.seeds), help="comma-separated seeds")
    p.add_argument("--optimizers", default=_join(d.optimizers), help="comma-separated optimizer names (optim.name)")
    p.add_argument("--scales", default=_join(d.scales), help="comma-separated MPI scales C'")
    p.add_argument("--targets", default=_join(d.targets), help="comma-separated power targets (gate, up, gate_up) of mpi/power/mpi-inplace")
    p.add_argument("--vary", action="append", metavar="KEY=V1,V2", help="another grid axis, e.g. model.moe.score_func=softmax,sigmoid; "
                   "each combination is a report section with its own linear baseline")
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--data", default=d.data, help="text file, directory or .jsonl, or a packaged corpus: shakespeare (default), kjv")
    p.add_argument("--tokenizer", default=d.tokenizer, help="byte | bpe | path/to/tokenizer.json")
    p.add_argument("--lr", "--lrs", dest="lr", default="", help="peak lr(s) for every optimizer, comma-separated to sweep "
                   "(default: each optimizer's own)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default min(50, steps // 10)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-batches", type=lambda s: None if s.lower() == "none" else int(s), default=d.eval_batches,
                   help="validation batches per periodic eval ('none': whole set)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint interval for resuming (0: eval-every)")
    p.add_argument("--out", default=d.out_dir)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every run, e.g. model.moe.top_k=4")
    p.add_argument("--limit", type=int, default=None, help="train at most this many runs now (rerun to continue)")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md from the run folders")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress bars")


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    def split(text: str, kind: type, flag: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--{flag} {text!r}: expected comma-separated {kind.__name__} values") from None


    vary = {}
    for item in args.vary or []:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--vary {item!r}: expected KEY=V1,V2,...")
        if key.strip() in vary:
            raise ValueError(f"--vary {key.strip()} is given twice")
        vary[key.strip()] = split(values, str, "vary")
    return CompareConfig(routers=split(args.routers, str, "routers"), seeds=split(args.seeds, int, "seeds"), optimizers=split(args.optimizers, str, "optimizers"),
                         scales=split(args.scales, float, "scales"), targets=split(args.targets, str, "targets"), vary=vary, preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                         data=args.data, tokenizer=args.tokenizer,
                         lrs=split(args.lr, float, "lr"), warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_batches=args.eval_batches,
                         ckpt_every=args.ckpt_every, out_dir=args.out, overrides=args.set or [], progress=not args.no_progress)


def cli_main(args: argparse.Namespace) -> int:
    """Run (or resume) the grid and write the report; with --report-only just rebuild the report."""
    if args.report_only:
        print(f"report: {write_report(args.out)}")
        return 0
    run_grid(config_from_args(args), limit=args.limit)
    return 0
