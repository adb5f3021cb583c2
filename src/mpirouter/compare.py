"""Matched grids of trainings (routers × seeds × optimizers × C') and a report comparing them.

    mpirouter compare --preset tiny --routers linear,mpi --seeds 0,1,2 --steps 600 --out runs/compare
    mpirouter compare --out runs/compare --report-only          # rebuild report.md from the run folders

Runs with the same seed are matched: the same batches in the same order (batches are a pure
function of (seed, step)) and the same initial weights for every parameter the routers share
(weights depend only on the seed). The grid runs sequentially and is resumable: a finished run
is skipped, a half-finished one resumes from its latest checkpoint. Run folders are
`{out}/{preset}/{optimizer}/{router}-C{C'}/seed{n}` (`{router}` alone for routers that ignore C').
The report (`report.md`, `report.json`, PNG plots) is rebuilt from the run folders alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import apply_overrides, to_dict
from .metrics import read_metrics
from .stats import mean_curve, mean_std, paired_ci, tokens_to_target

SCALE_FREE = ("linear", "power")
"""Router kinds that do not use C' (trained once per seed, whatever `scales` says)."""
GRID_KEYS = ("model.moe.router.kind", "model.moe.router.scale_prime", "optim.name", "seed", "out_dir")
"""Config fields the grid sets itself; `overrides` may not touch them."""
REPORT, REPORT_JSON, GRID_FILE = "report.md", "report.json", "grid.json"
_UNCHECKED = {"out_dir", "progress", "device", "compile", "tensorboard", "model.vocab_size"}


@dataclass
class CompareConfig:
    """A grid of matched trainings: every router × seed × optimizer × C'."""

    routers: list[str] = field(default_factory=lambda: ["linear", "mpi"])
    """Router kinds (linear, mpi, power, retract, mpi-inplace); linear is the paired baseline."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds; runs with the same seed share initial weights and data order."""
    optimizers: list[str] = field(default_factory=lambda: ["adamw"])
    """Optimizer names, passed through as `optim.name=...`."""
    scales: list[float] = field(default_factory=lambda: [1.0])
    """MPI scales C' (model.moe.router.scale_prime); linear and power ignore them."""
    preset: str = "tiny"
    """Model preset."""
    steps: int = 600
    """Optimizer steps per run."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float | None = None
    """Peak learning rate for every optimizer (None: each optimizer's own default in OptimConfig)."""
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
        from .routers import ROUTER_KINDS

        for name in ("routers", "seeds", "optimizers", "scales"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"compare: {name} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"compare: {name} has duplicates: {values}")
        bad = [r for r in self.routers if r not in ROUTER_KINDS]
        if bad:
            raise ValueError(f"compare: unknown router(s) {bad}; choose from {', '.join(ROUTER_KINDS)}")
        for item in self.overrides:
            if item.split("=", 1)[0].strip() in GRID_KEYS:
                raise ValueError(f"compare: override {item!r} sets a grid key; use --routers/--seeds/--optimizers/--scales")
        if self.steps < 1:
            raise ValueError(f"compare: steps must be >= 1, got {self.steps}")


@dataclass
class GridRun:
    """One training of the grid."""

    router: str
    seed: int
    optimizer: str
    scale: float | None
    config: "TrainConfig"  # noqa: F821

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def label(self) -> str:
        return f"{variant_label(self.router, self.scale)} seed {self.seed} [{self.optimizer}]"


def variant_label(router: str, scale: float | None) -> str:
    return router if scale is None else f"{router} C'={scale:g}"


def run_config(cfg: CompareConfig, router: str, seed: int, optimizer: str, scale: float | None) -> "TrainConfig":  # noqa: F821
    """The TrainConfig of one grid cell (overrides first, then the grid's own keys)."""
    from .model import preset_config
    from .routers import RouterConfig
    from .train import OptimConfig, ScheduleConfig, TrainConfig

    folder = router if scale is None else f"{router}-C{scale:g}"
    warmup = min(50, cfg.steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps
    base = TrainConfig(model=preset_config(cfg.preset, moe=dict(router=RouterConfig(kind=router))), preset=cfg.preset,
                       optim=OptimConfig(**({} if cfg.lr is None else {"lr": cfg.lr})), schedule=ScheduleConfig(warmup_steps=warmup), steps=cfg.steps,
                       batch_size=cfg.batch_size, eval_every=cfg.eval_every, eval_batches=cfg.eval_batches,
                       ckpt_every=cfg.ckpt_every or cfg.eval_every or max(1, cfg.steps // 10), ckpt_keep=1, progress=cfg.progress)
    grid = [f"model.moe.router.kind={router}", f"optim.name={optimizer}", f"seed={seed}",
            f"out_dir={Path(cfg.out_dir) / cfg.preset / optimizer / folder / f'seed{seed}'}"]
    if scale is not None:
        grid.append(f"model.moe.router.scale_prime={scale!r}")
    return apply_overrides(base, [*cfg.overrides, *grid])


def grid_runs(cfg: CompareConfig) -> list[GridRun]:
    """Every run of the grid, seed-major so that each finished seed completes a paired comparison."""
    runs = []
    for optimizer in cfg.optimizers:
        for seed in cfg.seeds:
            for router in cfg.routers:
                for scale in [None] if router in SCALE_FREE else cfg.scales:
                    runs.append(GridRun(router, seed, optimizer, scale, run_config(cfg, router, seed, optimizer, scale)))
    return runs


def run_status(run_dir: Path, steps: int) -> tuple[str, int]:
    """("done" | "partial" | "new", step reached): done = final step logged, partial = resumable checkpoint."""
    from .checkpoint import resolve_checkpoint

    records = read_metrics(run_dir)
    if any(r.get("event") == "timing" and r.get("step") == steps for r in records):
        return "done", steps
    try:
        step = int(resolve_checkpoint(run_dir).name.split("_")[-1])
    except (FileNotFoundError, ValueError):
        return "new", 0
    return ("done" if step >= steps else "partial"), step


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_config(run: GridRun) -> None:
    """Refuse to reuse a run folder that was trained with a different config (None = a default resolved at run time)."""
    path = run.run_dir / "config.json"
    if not path.is_file():
        return
    saved, wanted = _flatten(json.loads(path.read_text())), _flatten(json.loads(json.dumps(to_dict(run.config))))
    diff = [f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in sorted(set(saved) | set(wanted))
            if k not in _UNCHECKED and saved.get(k) != wanted.get(k) and not (wanted.get(k) is None and k in saved)]
    if diff:
        raise ValueError(f"run folder {run.run_dir} was trained with a different config ({'; '.join(diff)}); "
                         f"use another --out or delete that folder")


def command_line(cfg: CompareConfig) -> str:
    """The `mpirouter compare` command that reproduces `cfg`."""
    args = ["mpirouter", "compare", "--routers", _join(cfg.routers), "--seeds", _join(cfg.seeds), "--optimizers",
            _join(cfg.optimizers), "--scales", _join(cfg.scales), "--preset", cfg.preset, "--steps", str(cfg.steps),
            "--batch-size", str(cfg.batch_size), "--eval-every", str(cfg.eval_every),
            "--eval-batches", str(cfg.eval_batches), "--out", cfg.out_dir]
    args += ["--lr", f"{cfg.lr:g}"] if cfg.lr is not None else []
    args += ["--warmup-steps", str(cfg.warmup_steps)] if cfg.warmup_steps is not None else []
    args += ["--ckpt-every", str(cfg.ckpt_every)] if cfg.ckpt_every else []
    args += [a for item in cfg.overrides for a in ("--set", item)] + ([] if cfg.progress else ["--no-progress"])
    return shlex.join(args)


def _join(xs: list) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)


def environment() -> dict:
    """demo.machine_info() plus the platform and core count."""
    from .demo import machine_info

    return {**machine_info(), "platform": platform.platform(), "cores": os.cpu_count()}


def run_grid(cfg: CompareConfig, data=None, limit: int | None = None, command: str | None = None) -> Path:
    """Train every unfinished run of the grid (at most `limit` this call), then write the report; returns report.md."""
    from .data import prepare_data
    from .train import train

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = grid_runs(cfg)
    for run in runs:
        check_config(run)
    grid_path = out / GRID_FILE
    grid = json.loads(grid_path.read_text()) if grid_path.is_file() else {"sessions": []}
    grid["config"] = to_dict(cfg)
    session = {"command": command or command_line(cfg), **environment(), "runs_trained": []}
    grid["sessions"].append(session)
    grid_path.write_text(json.dumps(grid, indent=2))
    trained, times = 0, []
    for i, run in enumerate(runs, 1):
        status, step = run_status(run.run_dir, run.config.steps)
        head = f"run {i}/{len(runs)}: {run.label}"
        if status == "done":
            print(f"{head}: done, skipped", flush=True)
            continue
        if limit is not None and trained >= limit:
            print(f"{head}: not started (limit of {limit} trainings this call); rerun to continue", flush=True)
            break
        if data is None:
            data = prepare_data(run.config.data, run.config.context)  # tokenized once, shared by every run
        left = sum(1 for r in runs[i - 1:] if run_status(r.run_dir, r.config.steps)[0] != "done")
        eta = f", ~{_duration(left * sum(times) / len(times))} left" if times else ""
        print(f"{head}: {'resuming from step ' + str(step) if status == 'partial' else 'training'}{eta}", flush=True)
        t0 = time.perf_counter()
        result = train(run.config, data=data, resume=status == "partial")
        times.append(time.perf_counter() - t0)
        trained += 1
        session["runs_trained"].append(str(run.run_dir.relative_to(out)))
        grid_path.write_text(json.dumps(grid, indent=2))
        ev = result.final_eval or {}
        print(f"{head}: finished in {_duration(times[-1])}, val loss {ev.get('val_loss', math.nan):.4f}, "
              f"MaxVio {ev.get('maxvio', math.nan):.3f}, align φ {ev.get('align', math.nan):.3f}", flush=True)
    report = write_report(out)
    print(f"report: {report}", flush=True)
    return report


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- report


@dataclass
class RunRecord:
    """A run folder found on disk: its config and metrics (finished when the final eval is logged)."""

    run_dir: Path
    config: dict
    records: list[dict]

    @property
    def router(self) -> str:
        return self.config["model"]["moe"]["router"]["kind"]

    @property
    def scale(self) -> float | None:
        return None if self.router in SCALE_FREE else float(self.config["model"]["moe"]["router"]["scale_prime"])

    def events(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == name]

    @property
    def final(self) -> dict | None:
        return next((r for r in self.events("eval") if r.get("step") == self.config["steps"]), None)

    @property
    def timing(self) -> dict:
        return next((r for r in reversed(self.records) if r.get("event") == "timing"), {})


def discover_runs(out_dir: Path) -> list[RunRecord]:
    """Every run folder under `out_dir` (a folder holding config.json and metrics.jsonl)."""
    runs = []
    for cfg_path in sorted(Path(out_dir).rglob("config.json")):
        if "checkpoints" in cfg_path.relative_to(out_dir).parts or not (cfg_path.parent / "metrics.jsonl").is_file():
            continue
        runs.append(RunRecord(cfg_path.parent, json.loads(cfg_path.read_text()), read_metrics(cfg_path.parent)))
    return runs


def summarize_section(runs: list[RunRecord]) -> list[dict]:
    """One row per (router, C') of a section (same preset and optimizer): final numbers over seeds."""
    variants: dict[tuple, dict[int, RunRecord]] = {}
    for r in runs:
        if r.final is not None:
            variants.setdefault((r.router, r.scale), {})[r.config["seed"]] = r
    base = variants.get(("linear", None), {})
    base_final = {s: r.final["val_loss"] for s, r in base.items()}
    target = mean_std(list(base_final.values()))[0] if base_final else None
    curve = lambda seeds: mean_curve([([e["tokens"] for e in r.events("eval")], [e["val_loss"] for e in r.events("eval")])
                                      for r in seeds.values()])
    base_tokens = tokens_to_target(*curve(base)[:2], target) if base else None
    base_step_ms = [r.timing["step_ms"] for r in base.values() if "step_ms" in r.timing]
    from .routers import ROUTER_KINDS

    order = lambda key: (ROUTER_KINDS.index(key[0]) if key[0] in ROUTER_KINDS else 99, key[0], key[1] or 0.0)
    rows = []
    for key in sorted(variants, key=order):
        seeds = variants[key]
        finals = [r.final for r in seeds.values()]
        common = sorted(set(seeds) & set(base_final))
        tok = tokens_to_target(*curve(seeds)[:2], target) if target is not None else None
        timings = [r.timing for r in seeds.values() if "step_ms" in r.timing]
        row = {
            "router": key[0], "scale": key[1], "label": variant_label(*key), "seeds": sorted(seeds),
            "val_loss": mean_std([f["val_loss"] for f in finals]),
            "diff": paired_ci([seeds[s].final["val_loss"] - base_final[s] for s in common]) if common and key != ("linear", None) else None,
            "diff_n": len(common),
            "tokens_to_target": tok,
            "speedup": base_tokens / tok if tok and base_tokens else None,
            "total_tokens": max(f["tokens"] for f in finals),
            "maxvio": mean_std([f["maxvio"] for f in finals]),
            "align": mean_std([f["align"] for f in finals]),
            "align_raw": mean_std([f["align_raw"] for f in finals]),
            "align_layers": [mean_std(v)[0] for v in zip(*(f["align_layers"] for f in finals))],
            "align_raw_layers": [mean_std(v)[0] for v in zip(*(f["align_raw_layers"] for f in finals))],
            "step_ms": mean_std([t["step_ms"] for t in timings])[0] if timings else None,
            "router_ms": mean_std([t["router_ms"] for t in timings])[0] if timings else None,
            "overhead": mean_std([t["router_ms"] / t["step_ms"] for t in timings])[0] if timings else None,
        }
        row["step_vs_linear"] = row["step_ms"] / mean_std(base_step_ms)[0] if row["step_ms"] and base_step_ms else None
        rows.append(row)
    return rows


def _tokens(n: float | None) -> str:
    if n is None:
        return "not reached"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_rows(rows: list[dict]) -> str:
    """The report's markdown table."""
    cols = ["router", "seeds", "val loss", "Δ vs linear [95% CI]", "tokens to linear's final", "speed-up", "MaxVio",
            "align φ", "align R", "step ms", "step / linear", "router ms", "router overhead"]
    f = lambda x, spec: "–" if x is None else format(x, spec)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if r["diff"] is None:
            diff = "baseline" if r["router"] == "linear" else "no linear run"
        elif math.isnan(r["diff"][1]):
            diff = f"{r['diff'][0]:+.4f} (n=1, no CI)"
        else:
            diff = f"{r['diff'][0]:+.4f} [{r['diff'][1]:+.4f}, {r['diff'][2]:+.4f}] (n={r['diff_n']})"
        cells = [r["label"], str(len(r["seeds"])), f"{r['val_loss'][0]:.4f} ± {r['val_loss'][1]:.4f}", diff,
                 _tokens(r["tokens_to_target"]) + f" / {_tokens(r['total_tokens'])}", f(r["speedup"], ".3f") + ("×" if r["speedup"] else ""),
                 f"{r['maxvio'][0]:.3f} ± {r['maxvio'][1]:.3f}", f"{r['align'][0]:.3f}", f"{r['align_raw'][0]:.3f}",
                 f(r["step_ms"], ".1f"), f(r["step_vs_linear"], ".3f"), f(r["router_ms"], ".3f"), f(r["overhead"], ".2%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """\
- val loss: final validation loss on the whole validation set, mean ± sample std over seeds.
- Δ vs linear: per-seed paired difference (router − linear, same seed = same init and data), mean with a
  95% paired t-interval (mean ± t₀.₉₇₅,ₙ₋₁·sd/√n); negative = better than linear.
- tokens to linear's final: training tokens at which the seed-mean validation curve first reaches linear's
  final mean loss (linear interpolation between evals; periodic evals use at most `eval_batches` batches),
  out of the tokens trained; speed-up = linear's tokens / this router's tokens to reach it.
- MaxVio: (max load − mean load) / mean load over the validation set, mean over layers. align φ / align R:
  mean |cos| between each expert's effective router row φ (or raw R) and its gate matrix's top right-singular
  vector (a random direction gives ≈ √(2/(πd))).
- step ms: median training-step time; router ms: forward + backward of every layer's router rows, measured
  in the same run; router overhead = router ms / step ms. Runs are sequential, so step-time ratios also
  carry machine-load noise."""


def _plots(section: list[RunRecord], rows: list[dict], out: Path, stem: str) -> list[str]:
    """Seed-band curves (val loss, MaxVio, alignment) and final per-layer alignment; returns file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    colors = {r["label"]: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(rows)}
    groups = {r["label"]: [x for x in section if x.final is not None and variant_label(x.router, x.scale) == r["label"]] for r in rows}
    dim = section[0].config["model"]["dim"]
    files = []
    for key, title, extra in (("val_loss", "validation loss", None), ("maxvio", "MaxVio (validation, mean over layers)", None),
                              ("align", "alignment |cos|, mean over layers (φ solid, raw R dashed)", "align_raw")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, runs in groups.items():
            for k, style in ((key, "-"), (extra, "--")):
                if k is None:
                    continue
                x, m, s = mean_curve([([e["tokens"] / 1e6 for e in r.events("eval")], [e[k] for e in r.events("eval")]) for r in runs])
                ax.plot(x, m, style, color=colors[label], label=label if style == "-" else None, marker="o", ms=3)
                ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=colors[label], alpha=0.2)
        if key == "align":
            ax.axhline(math.sqrt(2 / (math.pi * dim)), color="gray", lw=0.8, ls=":", label="random direction")
        ax.set_title(f"{title}\n{stem}, mean ± std over seeds", fontsize=10)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(f"{stem}-{key}.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [layer + (i - (len(rows) - 1) / 2) * width for layer in range(len(r["align_layers"]))]
        ax.bar(xs, r["align_layers"], width, color=colors[r["label"]], label=f"{r['label']} φ")
        ax.plot(xs, r["align_raw_layers"], "k.", ms=6, label="raw R" if i == 0 else None)
    ax.set_title(f"final alignment |cos| per layer\n{stem}, mean over seeds", fontsize=10)
    ax.set(xlabel="layer", ylabel="|cos|", xticks=range(len(rows[0]["align_layers"])))
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(f"{stem}-align_layers.png")
    fig.savefig(out / files[-1], dpi=110)
    plt.close(fig)
    return files


def write_report(out_dir: str | Path) -> Path:
    """Rebuild report.md, report.json and the plots from the run folders under `out_dir`; returns report.md."""
    out = Path(out_dir)
    runs = discover_runs(out)
    if not runs:
        raise FileNotFoundError(f"no run folders (config.json + metrics.jsonl) under {out}")
    grid = json.loads((out / GRID_FILE).read_text()) if (out / GRID_FILE).is_file() else {"sessions": []}
    now = environment()
    lines = [f"# Router comparison: `{out}`", ""]
    for s in grid["sessions"]:
        if not s.get("runs_trained", True):
            continue  # a call that found everything done
        lines.append(f"- trained {len(s.get('runs_trained', []))} run(s): `{s['command']}` · commit {s['commit']} · {s['platform']}, {s['cores']} cores "
                     f"({s['machine']}) · python {s['python']} · torch {s['torch']} · {s['date']}")
    lines.append(f"- report: `mpirouter compare --out {shlex.quote(str(out))} --report-only` · commit {now['commit']} · "
                 f"{now['platform']}, {now['cores']} cores · torch {now['torch']} · {now['date']}")
    unfinished = [r for r in runs if r.final is None]
    if unfinished:
        lines.append(f"- **incomplete runs (left out of the table):** " + ", ".join(f"`{r.run_dir.relative_to(out)}`" for r in unfinished))
    summary = {"sessions": grid["sessions"], "report_env": now, "sections": []}
    sections: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        sections.setdefault((r.config.get("preset", "?"), r.config["optim"]["name"]), []).append(r)
    for (preset, optim), section in sorted(sections.items()):
        rows = summarize_section(section)
        c = section[0].config
        start = next(iter(section[0].events("start")), {})
        lines += ["", f"## preset `{preset}`, optimizer `{optim}`", "",
                  f"{c['steps']} steps × {c['batch_size'] * c['grad_accum']} sequences × {c.get('seq_len') or c['model']['max_seq_len']} "
                  f"tokens, lr {c['optim'].get('lr')}, {c['model']['moe']['num_experts']} experts top-{c['model']['moe']['top_k']}, "
                  f"corpus {start.get('corpus', '?')}, device {start.get('device', '?')}", ""]
        if not rows:
            lines.append("No finished runs yet.")
            continue
        lines += [format_rows(rows), ""]
        stem = f"{preset}-{optim}"
        lines += [f"![{f}]({f})" for f in _plots(section, rows, out, stem)]
        summary["sections"].append({"preset": preset, "optimizer": optim, "rows": rows})
    lines += ["", "Columns:", "", NOTES, ""]
    (out / REPORT).write_text("\n".join(lines))
    (out / REPORT_JSON).write_text(json.dumps(summary, indent=2, default=str))
    return out / REPORT


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `mpirouter compare` flags (cli.py adds the subparser and calls `cli_main`)."""
    d = CompareConfig()
    p.add_argument("--routers", default=_join(d.routers), help="comma-separated router kinds (linear is the baseline)")
    p.add_argument("--seeds", default=_join(d.seeds), help="comma-separated seeds")
    p.add_argument("--optimizers", default=_join(d.optimizers), help="comma-separated optimizer names (optim.name)")
    p.add_argument("--scales", default=_join(d.scales), help="comma-separated MPI scales C'")
    p.add_argument("--preset", default=d.preset)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=None, help="peak lr for every optimizer (default: each optimizer's own)")
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
    split = lambda s, t: [t(v.strip()) for v in s.split(",") if v.strip()]
    return CompareConfig(routers=split(args.routers, str), seeds=split(args.seeds, int), optimizers=split(args.optimizers, str),
                         scales=split(args.scales, float), preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_batches=args.eval_batches,
                         ckpt_every=args.ckpt_every, out_dir=args.out, overrides=args.set or [], progress=not args.no_progress)


def cli_main(args: argparse.Namespace) -> int:
    """Run (or resume) the grid and write the report; with --report-only just rebuild the report."""
    if args.report_only:
        print(f"report: {write_report(args.out)}")
        return 0
    run_grid(config_from_args(args), limit=args.limit)
    return 0
