"""The main job: train routers side by side on the embedded corpus and compare them.

    mpirouter demo                      # linear vs mpi, tiny preset, ~5 minutes on 2 CPU cores
    mpirouter demo --routers linear,mpi,retract --steps 300 --out runs/demo

Every router gets the same seed, so the same initial weights for all shared parameters and the
same batches in the same order. Prints a table and writes runs/demo/{summary.md,summary.json,curves.png}.
"""

from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from .data import DataConfig, prepare_data
from .model import preset_config
from .routers import RouterConfig
from .train import ScheduleConfig, TrainConfig, TrainResult, train

COLUMNS = ("router", "val loss", "val ppl", "MaxVio", "align φ", "align R", "tok/s", "step ms", "router ms", "router share")


def demo_config(router: str, steps: int, seed: int, out_dir: Path, preset: str = "tiny") -> TrainConfig:
    """The demo's run config: tiny preset, byte tokenizer, AdamW 3e-3, cosine, periodic capped evals."""
    return TrainConfig(
        model=preset_config(preset, moe=dict(router=RouterConfig(kind=router))),
        preset=preset,
        data=DataConfig(),
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


def machine_info() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    commit += "+dirty" if commit and dirty else ""  # numbers from uncommitted code must say so
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit or "unknown",
            "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
            "python": platform.python_version(), "torch": torch.__version__}


def plot_curves(run_dirs: dict[str, Path], path: Path) -> Path | None:
    """Validation loss, training loss, MaxVio and alignment curves, one line per router."""
    from .report import pyplot

    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed; skipping the plot (pip install 'mpirouter[plot]')")
        return None
    from .metrics import read_metrics

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("eval", "val_loss", "validation loss"), ("train", "lm_loss", "training loss (LM)"),
              ("eval", "maxvio", "MaxVio (validation, mean over layers)"), ("eval", "align", "alignment |cos| of φ (mean over layers)")]
    for ax, (event, key, title) in zip(axes.flat, panels):
        for name, run in run_dirs.items():
            recs = [r for r in read_metrics(run) if r.get("event") == event and key in r]
            ax.plot([r["tokens"] / 1e6 for r in recs], [r[key] for r in recs], label=name, marker="o" if event == "eval" else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(out_dir: str = "runs/demo", steps: int = 600, routers: list[str] | None = None, seed: int = 0, preset: str = "tiny") -> list[dict]:
    routers = routers or ["linear", "mpi"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg0 = demo_config(routers[0], steps, seed, out, preset)
    data = prepare_data(cfg0.data, cfg0.context)  # tokenized once, shared by every run
    print(f"corpus: {data.corpus.name}, sha256 {data.corpus.sha256[:16]}…, {data.train_ids.numel():,} train / "
          f"{data.val_ids.numel():,} val tokens; preset {preset}, {steps} steps, seed {seed}")
    rows, run_dirs = [], {}
    for router in routers:
        result = train(demo_config(router, steps, seed, out, preset), data=data)
        rows.append(summarize(router, result))
        run_dirs[router] = result.run_dir
    info = machine_info()
    table = format_table(rows)
    plot = plot_curves(run_dirs, out / "curves.png")
    header = (f"`mpirouter demo --steps {steps} --routers {','.join(routers)} --seed {seed}` · commit {info['commit']} · "
              f"{info['machine']} · torch {info['torch']} · {info['date']}")
    (out / "summary.md").write_text(f"{header}\n\n{table}\n" + (f"\n![curves]({plot.name})\n" if plot else ""))
    (out / "summary.json").write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print("\n" + table + f"\n\n{header}\nwritten: {out / 'summary.md'}" + (f", {plot}" if plot else ""))
    return rows
