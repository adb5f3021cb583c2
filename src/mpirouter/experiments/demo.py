"""The main job: train routers side by side (on the embedded corpus unless given another) and compare them.

    mpirouter demo                      # linear vs mpi, tiny preset, ~5 minutes on 2 CPU cores
    mpirouter demo --routers linear,mpi,retract --steps 300 --out runs/demo

Every router gets the same seed, so the same initial weights for all shared parameters and the
same batches in the same order. Prints a table and writes runs/demo/{summary.md,summary.json,curves.png}.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from ..common.provenance import describe, environment
from ..core.model import preset_config
from ..core.routers import RouterConfig
from ..trainer import rundir
from ..trainer.config import TrainConfig
from ..trainer.data import DataConfig, prepare_data
from ..trainer.device import resolve_device
from ..trainer.loop import TrainResult, train
from ..trainer.metrics import read_metrics
from ..trainer.schedule import ScheduleConfig
from .plots import pyplot
from .report import eval_curve, estimator_title

COLUMNS = ("router", "val loss", "val ppl", "MaxVio", "align φ", "align R", "tok/s", "step ms", "router ms", "router share")


def demo_config(router: str, steps: int, seed: int, out_dir: Path, preset: str = "tiny", data_path: str | None = None,
                tokenizer: str = "byte") -> TrainConfig:
    """The demo's run config: tiny preset, embedded corpus and byte tokenizer unless given (`data_path`: a text file,
    directory or .jsonl; `tokenizer`: byte | bpe | path/to/tokenizer.json), AdamW 3e-3, cosine, periodic capped evals."""
    return TrainConfig(
        model=preset_config(preset, moe=dict(router=RouterConfig(kind=router))),
        preset=preset,
        data=DataConfig(path=data_path, tokenizer=tokenizer),
        steps=steps,
        batch_size=16,
        seed=seed,
        schedule=ScheduleConfig(warmup_steps=min(50, steps // 10)),
        eval_every=max(1, steps // 6),
        eval_batches=16,
        log_every=10,
        out_dir=str(out_dir / router),
    )


def summarize(name: str, result: TrainResult) -> dict:
    ev = result.final_eval or {}
    timing = next((r for r in reversed(result.history) if r.get("event") == "timing"), {})
    return {
        "router": name,
        "val loss": ev.get("val_loss"),
        "val ppl": ev.get("val_ppl"),
        "MaxVio": ev.get("maxvio"),
        "align φ": ev.get("align"),
        "align R": ev.get("align_raw"),
        "tok/s": result.tokens_per_s,
        "step ms": 1000 * result.step_time_median_s,
        "router ms": timing.get("router_ms"),
        "router share": (timing.get("router_ms", 0.0) / timing["step_ms"]) if timing.get("step_ms") else None,
    }


def format_table(rows: list[dict]) -> str:
    """A markdown table of the summary rows."""
    fmt = {"val loss": "{:.4f}", "val ppl": "{:.3f}", "MaxVio": "{:.3f}", "align φ": "{:.3f}", "align R": "{:.3f}",
           "tok/s": "{:,.0f}", "step ms": "{:.0f}", "router ms": "{:.2f}", "router share": "{:.2%}"}
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r["router"]] + [fmt[c].format(r[c]) if r.get(c) is not None else "–" for c in COLUMNS[1:]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot_curves(run_dirs: dict[str, Path], path: Path) -> Path | None:
    """Validation loss, training loss, MaxVio and alignment curves, one line per router.

    Validation loss and MaxVio are `report.eval_curve`s: one estimator at every point, named in the title.
    """
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed; skipping the plot (pip install 'mpirouter[plot]')")
        return None
    runs = {name: (json.loads((Path(run) / "config.json").read_text()), read_metrics(run)) for name, run in run_dirs.items()}
    estimator = estimator_title([eval_curve(cfg, recs) for cfg, recs in runs.values()]).replace("; ", ";\n")  # fits the title
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("eval", "val_loss", f"validation loss ({estimator})"), ("train", "lm_loss", "training loss (LM)"),
              ("eval", "maxvio", f"MaxVio, mean over layers ({estimator})"), ("eval", "align", "alignment |cos| of φ (mean over layers)")]
    for ax, (event, key, title) in zip(axes.flat, panels):
        for name, (cfg, recs) in runs.items():
            if key in ("val_loss", "maxvio"):
                curve = eval_curve(cfg, recs, key)
                xs, ys = curve.tokens, curve.values
            else:  # training records, and alignment (a function of the weights, the same at every eval)
                picked = [r for r in recs if r.get("event") == event and key in r]
                xs, ys = [r["tokens"] for r in picked], [r[key] for r in picked]
            ax.plot([x / 1e6 for x in xs], ys, label=name, marker="o" if event == "eval" else None, ms=3)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


DEMO_FILES = frozenset({"summary.md", "summary.json", "curves.png"})
"""The files a demo writes beside its run folders (one per router)."""


def _is_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("rows"), list) and isinstance(data.get("info"), dict)


def foreign_entries(out: Path) -> list[str]:
    """What in `out` a demo did not write: anything but its summary files and run folders (our markers, `rundir.is_run_folder`)."""
    foreign = []
    for p in sorted(out.iterdir()):
        if p.name == rundir.LOCK_FILE:
            continue
        if p.is_symlink() or not (p.is_dir() and rundir.is_run_folder(p) or p.is_file() and p.name in DEMO_FILES):
            foreign.append(p.name)
        elif p.name == "summary.json" and not _is_summary(p):
            foreign.append(p.name)
    ours = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and rundir.is_run_folder(p)]
    if not foreign and not ours and not _is_summary(out / "summary.json"):
        foreign = sorted(p.name for p in out.iterdir() if p.name != rundir.LOCK_FILE)  # loose summary files alone are no demo
    return foreign


def claim_demo_folder(out: Path, say=print) -> None:
    """Make `out` an empty folder for a new demo: an earlier demo there is moved aside (never deleted), anything else refused.

    An earlier demo is a folder holding only demo output (summary files and run folders recognised by the
    trainer's own markers); a folder with anything else in it is the user's and is never moved.
    """
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file; choose another --out")
    if out.is_symlink():
        raise FileExistsError(f"--out {out} is a symbolic link; pass the folder itself or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
            raise FileExistsError(f"{out} is not empty and is not an earlier demo (it holds {shown}); choose another --out")
        # a job still training in the earlier demo writes by path: never move its folder from under it
        locks: list[rundir.RunLock] = []
        try:
            for run in (p for p in out.iterdir() if p.is_dir() and rundir.is_run_folder(p)):
                locks.append(rundir.RunLock(run).acquire())
            say(f"moved the earlier demo in {out} aside to {rundir.move_aside(out)}")
        finally:
            for lock in locks:
                lock.release()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(out_dir: str = "runs/demo", steps: int = 600, routers: list[str] | None = None, seed: int = 0, preset: str = "tiny",
             data_path: str | None = None, tokenizer: str = "byte") -> list[dict]:
    """Train each router on the same seed and data, then write summary.md, summary.json and curves.png to `out_dir`."""
    routers = routers or ["linear", "mpi"]
    if len(set(routers)) != len(routers) or not all(routers):
        raise ValueError(f"--routers must name distinct routers, got {','.join(routers)}")
    out = Path(os.path.abspath(out_dir))  # "." still names the same folder once an earlier demo there is moved aside
    claim_demo_folder(out)
    cfg0 = demo_config(routers[0], steps, seed, out, preset, data_path, tokenizer)
    data = prepare_data(cfg0.data, cfg0.context)  # tokenized once, shared by every run
    print(f"corpus: {data.corpus.name}, sha256 {data.corpus.sha256[:16]}…, {data.train_ids.numel():,} train / "
          f"{data.val_ids.numel():,} val tokens; preset {preset}, {steps} steps, seed {seed}")
    rows, run_dirs = [], {}
    for router in routers:
        result = train(demo_config(router, steps, seed, out, preset, data_path, tokenizer), data=data)
        rows.append(summarize(router, result))
        run_dirs[router] = result.run_dir
    info = environment(str(resolve_device(cfg0.device)))
    table = format_table(rows)
    plot = plot_curves(run_dirs, out / "curves.png")
    command = ["mpirouter", "demo", "--steps", str(steps), "--routers", ",".join(routers), "--seed", str(seed), "--preset", preset]
    command += (["--data", data_path] if data_path is not None else []) + (["--tokenizer", tokenizer] if tokenizer != "byte" else [])
    header = f"`{shlex.join(command)}` · {describe(info)}"
    (out / "summary.md").write_text(f"{header}\n\n{table}\n" + (f"\n![curves]({plot.name})\n" if plot else ""))
    (out / "summary.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    shown = Path(out_dir)  # as the user gave it
    print("\n" + table + f"\n\n{header}\nwritten: {shown / 'summary.md'}" + (f", {shown / plot.name}" if plot else ""))
    return rows
