"""The scale ladder's report: each router against linear on every model size, and how the difference moves with size.

    mpirouter ladder --out results/ladder

Reads every rung's compare folder, `<out>/<rung>/confirm` (one model preset each, every router at its
own lr), and per rung and `model.moe.balance` cell pairs each router with linear over seeds: Δ final
whole-split validation loss (95% paired t-interval, two-sided paired t-test), tokens to linear's final
loss, MaxVio and alignment. Per router and cell with three rungs or more, the trend of Δ over
x = log10 N (N: active non-embedding parameters) is a fixed-effect meta-regression (`stats.weighted_slope`,
weights n/sd², t with the smallest rung's n − 1 degrees of freedom). Every Δ and every trend is one
comparison of one Holm family (results/ladder/PLAN.md). Writes ladder.md, ladder.json and ladder.png
into --out; those three are replaced only when this command wrote them.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..common.config import from_dict
from ..common.files import atomic_write_text
from ..common.provenance import describe
from ..core.model import ModelConfig, MoELM
from .plots import pyplot, save_figure
from .report import RunRecord, discover_runs, paired_speedup, read_sessions, variant_label, variant_order
from .stats import ALPHA, MARK, holm, mean_std, paired_ci, paired_t_pvalue, weighted_slope

TITLE = "# The scale ladder: each router against linear, by model size"
MD, JSON, PNG = "ladder.md", "ladder.json", "ladder.png"
BASE = ("linear", None, None)


def _ours(path: Path) -> bool:
    """Whether `path` was written by this command (its title, its JSON keys, or a matplotlib PNG)."""
    if path.suffix == ".md":
        return path.read_text(errors="replace").startswith(TITLE)
    if path.suffix == ".json":
        try:
            return "ladder" in json.loads(path.read_text())
        except ValueError:
            return False
    head = path.read_bytes()[:512]
    return head.startswith(b"\x89PNG") and b"Matplotlib" in head


def active_non_embedding(config: dict) -> int:
    """N of a run's model, rebuilt from its config.json (cheap at CPU sizes)."""
    return MoELM(from_dict(ModelConfig, config["model"])).num_params()["active_non_embedding"]


def read_rungs(out: Path) -> list[dict]:
    """One entry per `<out>/<rung>/confirm` holding finished runs, sorted by N."""
    rungs = []
    for folder in sorted(p for p in Path(out).glob("*/confirm") if p.is_dir()):
        runs = [r for r in discover_runs(folder) if r.final is not None or r.diverged]
        if not runs:
            continue
        presets = {r.config["preset"] for r in runs}
        if len(presets) != 1:
            raise ValueError(f"{folder} mixes model presets {sorted(presets)}; a rung is one preset")
        groups: dict[tuple, dict] = {}
        for r in runs:
            key = (r.config["model"]["moe"]["balance"], r.variant)
            g = groups.setdefault(key, {"lrs": set(), "runs": {}, "diverged": []})
            g["lrs"].add(r.config["optim"]["lr"])
            (g["diverged"].append(r.config["seed"]) if r.diverged else g["runs"].__setitem__(r.config["seed"], r))
        for (cell, variant), g in groups.items():
            if len(g["lrs"]) != 1:
                raise ValueError(f"{folder}: {variant_label(*variant)} under balance={cell} ran at several lrs {sorted(g['lrs'])}; a rung holds one lr per router")
        first = runs[0].config
        rungs.append({"rung": folder.parent.name, "preset": presets.pop(), "folder": folder, "groups": groups,
                      "n": active_non_embedding(first),
                      "tokens": first["steps"] * first["batch_size"] * first["grad_accum"] * (first["seq_len"] or first["model"]["max_seq_len"]),
                      "sessions": read_sessions(folder)})
    if not rungs:
        raise ValueError(f"{out} holds no rung folder with finished runs (expected <out>/<rung>/confirm, as results/ladder/run.sh writes)")
    return sorted(rungs, key=lambda r: r["n"])


def _mean(runs: dict[int, RunRecord], seeds: list[int], key: str) -> float:
    return mean_std([runs[s].final[key] for s in seeds])[0]


def compare_rung(rung: dict) -> list[dict]:
    """Δ rows of one rung: every router other than linear against linear, per balance cell, paired over seeds."""
    rows = []
    for (cell, variant), g in sorted(rung["groups"].items(), key=lambda kv: (kv[0][0], variant_order(*kv[0][1]))):
        base = rung["groups"].get((cell, BASE))
        if variant == BASE or base is None:
            continue
        seeds = sorted(set(g["runs"]) & set(base["runs"]))
        if not seeds:
            continue
        mine, theirs = g["runs"], base["runs"]
        diffs = [mine[s].final["val_loss"] - theirs[s].final["val_loss"] for s in seeds]
        p = paired_t_pvalue(diffs)
        speed = paired_speedup({s: theirs[s].curve() for s in seeds}, {s: mine[s].curve() for s in seeds})
        rows.append({"rung": rung["rung"], "n": rung["n"], "tokens": rung["tokens"], "cell": cell, "router": variant_label(*variant),
                     "seeds": seeds, "diverged": sorted(g["diverged"] + base["diverged"]),
                     "lr": next(iter(g["lrs"])), "lr_linear": next(iter(base["lrs"])),
                     "val": mean_std([mine[s].final["val_loss"] for s in seeds]), "val_linear": mean_std([theirs[s].final["val_loss"] for s in seeds]),
                     "diff": paired_ci(diffs), "sd": mean_std(diffs)[1], "p": None if math.isnan(p) else p, "p_holm": None,
                     "speedup": speed["ratio"], "reached": speed["reached"],
                     "maxvio": (_mean(theirs, seeds, "maxvio"), _mean(mine, seeds, "maxvio")),
                     "align": (_mean(theirs, seeds, "align"), _mean(mine, seeds, "align"))})
    return rows


def trends(rows: list[dict]) -> list[dict]:
    """Per (router, cell) on three rungs or more: the weighted slope of mean Δ over log10 N."""
    out = []
    for key in sorted({(r["router"], r["cell"]) for r in rows}):
        pts = [r for r in rows if (r["router"], r["cell"]) == key and len(r["seeds"]) > 1 and r["sd"] > 0]
        if len(pts) < 3:
            continue
        fit = weighted_slope([math.log10(r["n"]) for r in pts], [r["diff"][0] for r in pts],
                             [r["sd"] / math.sqrt(len(r["seeds"])) for r in pts], df=min(len(r["seeds"]) for r in pts) - 1)
        out.append({"router": key[0], "cell": key[1], "rungs": [r["rung"] for r in pts], **fit, "p_holm": None})
    return out


def build_ladder(out: Path) -> dict:
    rungs = read_rungs(out)
    rows = [row for rung in rungs for row in compare_rung(rung)]
    fits = trends(rows)
    tested = [r for r in rows + fits if r["p"] is not None]
    for r, adj in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = adj
    runs = {rung["rung"]: [describe(s) + f" · `{s['command']}`" for s in rung["sessions"]] for rung in rungs}
    return {"ladder": [{k: rung[k] for k in ("rung", "preset", "n", "tokens")} for rung in rungs], "rows": rows, "trends": fits,
            "comparisons": len(tested), "runs": runs}


def _p(r: dict) -> str:
    if r["p_holm"] is None:
        return "no test"
    return f"p_Holm={r['p_holm']:.2g}" + (f" {MARK}" if r["p_holm"] < ALPHA else "")


def _speed(r: dict) -> str:
    if r["speedup"] is None:
        return f"– (0/{len(r['seeds'])} reached)"
    return f"{r['speedup'][0]:.3f}× [{r['speedup'][1]:.3f}, {r['speedup'][2]:.3f}] ({r['reached']}/{len(r['seeds'])} reached)"


def format_ladder(summary: dict, command: str) -> str:
    rows, fits = summary["rows"], summary["trends"]
    hits = [f"{r['router']}, {r['rung']}, balance={r['cell']}" for r in rows if r["p_holm"] is not None and r["p_holm"] < ALPHA]
    hits += [f"trend of {t['router']}, balance={t['cell']}" for t in fits if t["p_holm"] is not None and t["p_holm"] < ALPHA]
    lines = [TITLE, "",
             f"Built by `{command}` from the rung folders below; the plan, written before any test run: [PLAN.md](PLAN.md).", "",
             f"This report makes {summary['comparisons']} comparisons ({sum(r['p'] is not None for r in rows)} Δs against linear, "
             f"{sum(t['p'] is not None for t in fits)} trends); 'significant' means Holm-adjusted p < {ALPHA:g} across all of them. "
             f"Significant ({MARK}): {'; '.join(hits) if hits else 'none'}.", "", "## Runs", ""]
    for rung in summary["ladder"]:
        lines.append(f"- `{rung['rung']}` ([report]({rung['rung']}/confirm/report.md)):")
        lines += [f"  - {line}" for line in summary["runs"][rung["rung"]]]
    for cell in sorted({r["cell"] for r in rows}):
        lines += ["", f"## balance={cell}", "",
                  "| rung | N | tokens / run | router | seeds | linear val loss | router val loss | Δ vs linear [95% CI], p_Holm | speed-up to linear's final [95% CI] | MaxVio linear → router | align φ linear → router |",
                  "|" + "---|" * 11]
        for r in (r for r in rows if r["cell"] == cell):
            div = f" ({len(r['diverged'])} diverged, left out)" if r["diverged"] else ""
            lines.append(f"| `{r['rung']}` | {r['n'] / 1e6:.3f} M | {r['tokens'] / 1e6:.3f} M | {r['router']} | {len(r['seeds'])}{div} "
                         f"| {r['val_linear'][0]:.4f} ± {r['val_linear'][1]:.4f} (lr {r['lr_linear']:g}) | {r['val'][0]:.4f} ± {r['val'][1]:.4f} (lr {r['lr']:g}) "
                         f"| {r['diff'][0]:+.4f} [{r['diff'][1]:+.4f}, {r['diff'][2]:+.4f}], {_p(r)} | {_speed(r)} "
                         f"| {r['maxvio'][0]:.3f} → {r['maxvio'][1]:.3f} | {r['align'][0]:.3f} → {r['align'][1]:.3f} |")
    if fits:
        lines += ["", "## Trend of Δ over model size", "",
                  "| router | balance | rungs | slope of Δ per decade of N [95% CI], p_Holm | residual Q (df) |", "|---|---|---|---|---|"]
        for t in fits:
            lines.append(f"| {t['router']} | {t['cell']} | {', '.join(t['rungs'])} | {t['slope']:+.4f} [{t['lo']:+.4f}, {t['hi']:+.4f}], {_p(t)} "
                         f"| {t['q']:.2f} ({len(t['rungs']) - 2}) |")
    lines += ["", f"![Δ against N]({PNG})", "", "Notes:",
              "- N: active non-embedding parameters (attention, the top-k experts' share, routers, norms). tokens / run: steps × sequences × tokens.",
              "- Δ: router − linear final whole-split validation loss, same seed = same initial weights and batches; negative = better than linear.",
              "- Trend: weighted least squares of the rungs' mean Δ on log10 N, weights n/sd² (fixed-effect meta-regression), "
              "two-sided t-test of the slope with the smallest rung's n − 1 degrees of freedom. Positive slope = Δ rises with N.",
              "- speed-up, MaxVio, alignment: as in each rung's report (descriptive, not tested)."]
    return "\n".join(lines) + "\n"


def plot_ladder(summary: dict, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    cells = sorted({r["cell"] for r in summary["rows"]})
    fig, axes = plt.subplots(1, len(cells), figsize=(5.5 * len(cells), 4), squeeze=False, sharey=True)
    for ax, cell in zip(axes[0], cells):
        for i, router in enumerate(sorted({r["router"] for r in summary["rows"] if r["cell"] == cell})):
            pts = [r for r in summary["rows"] if r["cell"] == cell and r["router"] == router]
            xs = [r["n"] * (1.04 ** i) for r in pts]  # nudged apart so the intervals do not overlap
            ys = [r["diff"][0] for r in pts]
            err = [[r["diff"][0] - r["diff"][1] for r in pts], [r["diff"][2] - r["diff"][0] for r in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, label=router)
            for t in (t for t in summary["trends"] if t["cell"] == cell and t["router"] == router):
                lo, hi = min(r["n"] for r in pts), max(r["n"] for r in pts)
                ax.plot([lo, hi], [t["intercept"] + t["slope"] * math.log10(v) for v in (lo, hi)], "--", color=ax.lines[-1].get_color() if ax.lines else None)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=f"balance={cell}", xlabel="active non-embedding parameters N", ylabel="Δ val loss vs linear (95% CI)")
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def write_ladder(out: str | Path, command: str) -> Path:
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"--out {out} is not a folder")
    theirs = [n for n in (MD, JSON, PNG) if (out / n).exists() and not _ours(out / n)]
    if theirs:
        raise FileExistsError(f"{out / theirs[0]} was not written by mpirouter ladder; move it away first (nothing was written)")
    summary = build_ladder(out)
    atomic_write_text(out / JSON, json.dumps({**summary, "command": command}, indent=1, default=str))
    plot_ladder(summary, out / PNG)
    atomic_write_text(out / MD, format_ladder(summary, command))
    return out / MD


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the ladder folder: reads <out>/<rung>/confirm, writes ladder.md, .json and .png there")


def cli_main(args: argparse.Namespace) -> int:
    print(f"ladder: {write_ladder(args.out, f'mpirouter ladder --out {args.out}')}")
    return 0
