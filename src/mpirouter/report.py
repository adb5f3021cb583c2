"""Reports of compare grids, rebuilt from run folders alone: tables, an lr-sweep table, plots.

    mpirouter compare --out runs/compare --report-only      # calls write_report(out)

A run folder is any folder holding config.json and metrics.jsonl (checkpoints/ is skipped). Runs are
grouped into sections by (preset, optimizer, lr); within a section runs with the same seed are paired
against `linear`. With several lrs for one (preset, optimizer), a sweep table compares every router at
its own best lr. The statistics themselves are in `stats.py`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write_text
from .metrics import read_metrics
from .stats import mean_curve, mean_std, paired_ci, tokens_to_target

SCALE_FREE = ("linear", "power")
"""Router kinds that do not use C' (trained once per seed, whatever `scales` says)."""
REPORT, REPORT_JSON, GRID_FILE, SESSIONS = "report.md", "report.json", "grid.json", "sessions"


def variant_label(router: str, scale: float | None) -> str:
    return router if scale is None else f"{router} C'={scale:g}"


def variant_order(router: str, scale: float | None) -> tuple:
    """Sort key of report rows: router kinds in ROUTER_KINDS order (unknown ones last), then C'."""
    from .routers import ROUTER_KINDS

    return (ROUTER_KINDS.index(router) if router in ROUTER_KINDS else len(ROUTER_KINDS), router, scale or 0.0)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def environment() -> dict:
    """demo.machine_info() plus the platform and core count."""
    from .demo import machine_info

    return {**machine_info(), "platform": platform.platform(), "cores": os.cpu_count()}


def read_sessions(out: Path) -> list[dict]:
    """The calls that trained into `out`: `sessions/*.json` (oldest first), after a legacy grid.json's list."""
    legacy = json.loads((out / GRID_FILE).read_text())["sessions"] if (out / GRID_FILE).is_file() else []
    return legacy + [json.loads(p.read_text()) for p in sorted((out / SESSIONS).glob("*.json"))]


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
    rows = []
    for key in sorted(variants, key=lambda key: variant_order(*key)):
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
    plt = pyplot()
    if plt is None:
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


def summarize_sweep(by_lr: dict[float, list[RunRecord]]) -> list[dict]:
    """One row per (router, C') across learning rates: final loss per lr, its best lr, and the paired
    difference to linear with every variant at its own best lr (the fair tuned comparison)."""
    finals: dict[str, dict[float, dict[int, float]]] = {}
    keys = {}
    for lr, runs in by_lr.items():
        for r in runs:
            if r.final is not None:
                label = variant_label(r.router, r.scale)
                keys[label] = variant_order(r.router, r.scale)
                finals.setdefault(label, {}).setdefault(lr, {})[r.config["seed"]] = r.final["val_loss"]
    best = {label: min(per_lr, key=lambda lr: mean_std(list(per_lr[lr].values()))[0]) for label, per_lr in finals.items()}
    rows = []
    for label in sorted(finals, key=keys.get):
        per_lr = finals[label]
        row = {"label": label, "by_lr": {lr: [*mean_std(list(v.values())), len(v)] for lr, v in sorted(per_lr.items())},
               "best_lr": best[label], "diff": None, "diff_n": 0}
        if label != "linear" and "linear" in finals:
            mine, base = per_lr[best[label]], finals["linear"][best["linear"]]
            common = sorted(set(mine) & set(base))
            row["diff"], row["diff_n"] = (paired_ci([mine[s] - base[s] for s in common]) if common else None), len(common)
        rows.append(row)
    return rows


def format_sweep(rows: list[dict]) -> str:
    """The sweep's markdown table (best lr of each row in bold)."""
    lrs = sorted({lr for r in rows for lr in r["by_lr"]})
    lines = ["| router | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | Δ vs linear, each at its best lr [95% CI] |",
             "|" + "---|" * (len(lrs) + 3)]
    for r in rows:
        cells = []
        for lr in lrs:
            m, sd, n = r["by_lr"].get(lr, (None, None, 0))
            text = "–" if m is None else f"{m:.4f} ± {sd:.4f} (n={n})"
            cells.append(f"**{text}**" if lr == r["best_lr"] else text)
        d = r["diff"]
        diff = ("baseline" if r["label"] == "linear" else "no linear run") if d is None else \
            f"{d[0]:+.4f} (n=1, no CI)" if math.isnan(d[1]) else f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] (n={r['diff_n']})"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['best_lr']:g} | {diff} |")
    return "\n".join(lines)


SWEEP_NOTES = """\
Cells: final validation loss, mean ± std over seeds, at each peak lr (same steps and tokens for every
cell). Each router's best lr (bold) is the one with the lowest mean; Δ pairs each seed of that router at
its best lr with the same seed of linear at linear's best lr (95% paired t-interval). Picking the best of
several settings on the same seeds is optimistic, and a router swept over more settings (several C') gets
more picks; read a lone C' row as the fair one-for-one comparison."""


def _sweep_plot(rows: list[dict], out: Path, stem: str) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        lrs = list(r["by_lr"])
        ax.errorbar([lr * (1 + 0.02 * (i - len(rows) / 2)) for lr in lrs], [r["by_lr"][lr][0] for lr in lrs],
                    yerr=[r["by_lr"][lr][1] for lr in lrs], marker="o", ms=4, capsize=3, label=r["label"])
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss")
    ax.set_title(f"learning-rate sweep\n{stem}, mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{stem}-lr_sweep.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return [name]


def _section_header(c: dict, start: dict, lr: str | None = None) -> str:  # lr: e.g. "lrs 0.003 / 0.006"
    """The line under a section title: budget, lr, experts, corpus, device (from a run's config and start record)."""
    return (f"{c['steps']} steps × {c['batch_size'] * c['grad_accum']} sequences × {c.get('seq_len') or c['model']['max_seq_len']} "
            f"tokens, {lr or 'lr ' + str(c['optim'].get('lr'))}, {c['model']['moe']['num_experts']} experts top-{c['model']['moe']['top_k']}, "
            f"corpus {start.get('corpus', '?')}, device {start.get('device', '?')}")


def write_report(out_dir: str | Path) -> Path:
    """Rebuild report.md, report.json and the plots from the run folders under `out_dir`; returns report.md."""
    out = Path(out_dir)
    runs = discover_runs(out)
    if not runs:
        raise FileNotFoundError(f"no run folders (config.json + metrics.jsonl) under {out}")
    sessions = read_sessions(out)
    now = environment()
    lines = [f"# Router comparison: `{out}`", ""]
    for s in sessions:
        if not s.get("runs_trained", True):
            continue  # a call that found everything done
        lines.append(f"- trained {len(s.get('runs_trained', []))} run(s): `{s['command']}` · commit {s['commit']} · {s['platform']}, {s['cores']} cores "
                     f"({s['machine']}) · python {s['python']} · torch {s['torch']} · {s['date']}")
    lines.append(f"- report: `mpirouter compare --out {shlex.quote(str(out))} --report-only` · commit {now['commit']} · "
                 f"{now['platform']}, {now['cores']} cores · torch {now['torch']} · {now['date']}")
    unfinished = [r for r in runs if r.final is None]
    if unfinished:
        lines.append(f"- **incomplete runs (left out of the table):** " + ", ".join(f"`{r.run_dir.relative_to(out)}`" for r in unfinished))
    summary = {"sessions": sessions, "report_env": now, "sweeps": [], "sections": []}
    sections: dict[tuple, dict[float, list[RunRecord]]] = {}
    for r in runs:
        key = (r.config.get("preset", "?"), r.config["optim"]["name"])
        sections.setdefault(key, {}).setdefault(r.config["optim"].get("lr"), []).append(r)
    for (preset, optim), by_lr in sorted(sections.items()):
        rows = summarize_sweep(by_lr) if len(by_lr) > 1 else []
        if rows:
            first = next(iter(by_lr.values()))[0]
            lrs = "lrs " + " / ".join(f"{lr:g}" for lr in sorted(by_lr))
            lines += ["", f"## lr sweep: preset `{preset}`, optimizer `{optim}`", "",
                      _section_header(first.config, next(iter(first.events("start")), {}), lrs), "",
                      format_sweep(rows), "", SWEEP_NOTES, ""]
            lines += [f"![{f}]({f})" for f in _sweep_plot(rows, out, f"{preset}-{optim}")]
            summary["sweeps"].append({"preset": preset, "optimizer": optim, "rows": rows})
    for (preset, optim), by_lr in sorted(sections.items()):
        for lr, section in sorted(by_lr.items(), key=lambda kv: kv[0] or 0.0):
            rows = summarize_section(section)
            start = next(iter(section[0].events("start")), {})
            lr_title = f", lr {lr:g}" if len(by_lr) > 1 else ""
            lines += ["", f"## preset `{preset}`, optimizer `{optim}`{lr_title}", "", _section_header(section[0].config, start), ""]
            if not rows:
                lines.append("No finished runs yet.")
                continue
            lines += [format_rows(rows), ""]
            stem = f"{preset}-{optim}" + (f"-lr{lr:g}" if len(by_lr) > 1 else "")
            lines += [f"![{f}]({f})" for f in _plots(section, rows, out, stem)]
            summary["sections"].append({"preset": preset, "optimizer": optim, "lr": lr, "rows": rows})
    lines += ["", "Columns:", "", NOTES, ""]
    atomic_write_text(out / REPORT, "\n".join(lines))
    atomic_write_text(out / REPORT_JSON, json.dumps(summary, indent=2, default=str))
    return out / REPORT
