"""The scale ladder's report: each router against linear on every model size, and how the difference moves with size.

    mpirouter ladder --out results/ladder --rungs debug,cpu-440k,tiny,cpu-1.7m --routers linear,mpi --cells bias,aux

Reads every rung's compare folder, `<out>/<rung>/confirm` (one model preset each, every router at its
own lr), and per rung and `model.moe.balance` cell pairs each router with linear over seeds: Δ final
whole-split validation loss (95% paired t-interval, two-sided paired t-test), tokens to linear's final
loss, MaxVio and alignment. Per router and cell tested on every rung (three or more), the trend of Δ over
x = log10 N (N: active non-embedding parameters) is a fixed-effect meta-regression (`stats.weighted_slope`,
weights n/sd², t with the smallest rung's n − 1 degrees of freedom). Every Δ and every trend is one
comparison of one Holm family (results/ladder/PLAN.md). Writes ladder.md, ladder.json and ladder.png
into --out; those three are replaced only when this command wrote them.

The report is the plan's only when the ladder is complete: every run each rung's compare calls asked for
(their `sessions/*.json`) finished or diverged, paired with linear, every rung named by --rungs present,
and on each every --routers router in every --cells cell (a call that never started leaves no session).
Otherwise it refuses, naming what is missing, unless --partial asks for an interim report, marked as one.
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
from .compare import CompareConfig, grid_runs
from .plots import pyplot, save_figure
from .report import RunRecord, discover_runs, paired_speedup, read_sessions, variant_label, variant_order
from .sections import signature
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
            data = json.loads(path.read_text())
        except ValueError:
            return False
        return isinstance(data, dict) and {"ladder", "rows", "trends", "comparisons"} <= set(data)
    head = path.read_bytes()[:512]
    return head.startswith(b"\x89PNG") and b"Matplotlib" in head


def active_non_embedding(config: dict) -> int:
    """N of a run's model, rebuilt from its config.json (cheap at CPU sizes)."""
    return MoELM(from_dict(ModelConfig, config["model"])).num_params()["active_non_embedding"]


class IncompleteLadder(ValueError):
    """The ladder lacks planned runs or rungs (and --partial was not given)."""


def _value(run: RunRecord, *keys: str):
    """config[keys[0]][keys[1]]...; a missing key is one line naming the run's config.json."""
    node = run.config
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{run.run_dir / 'config.json'} lacks {'.'.join(keys)}; not a run folder mpirouter compare wrote")
        node = node[key]
    return node


def _final(run: RunRecord, key: str) -> float:
    if key not in run.final:
        raise ValueError(f"{run.run_dir / 'metrics.jsonl'}: the final eval lacks {key!r}")
    return run.final[key]


def _is_diverged(run: RunRecord) -> bool:
    """compare's marker, or a final loss that is not finite (a run that ended non-finite without the marker)."""
    return run.diverged or (run.final is not None and not math.isfinite(_final(run, "val_loss")))


REQUIRED = (("preset",), ("seed",), ("steps",), ("batch_size",), ("grad_accum",), ("seq_len",), ("optim", "lr"),
            ("model", "max_seq_len"), ("model", "moe", "balance"), ("model", "moe", "router", "kind"))
"""The config keys the ladder reads of every run folder, checked before anything reads them."""


def planned_dirs(folder: Path, sessions: list[dict]) -> set[Path]:
    """The run folders the folder's compare calls asked for, rebuilt from their recorded configs (a folder
    names its lr, cell, router and seed as compare wrote it)."""
    dirs = set()
    for session in sessions:
        if not isinstance(session, dict) or not isinstance(session.get("config"), dict):
            raise ValueError(f"{folder}/sessions: a compare call records no config, so what it planned cannot be told")
        try:
            grid = grid_runs(from_dict(CompareConfig, {**session["config"], "out_dir": str(folder)}))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{folder}/sessions: a compare call's recorded config cannot be read back ({e})") from None
        dirs |= {Path(g.config.out_dir).resolve() for g in grid}
    return dirs


def _check_one_budget(folder: Path, runs: list[RunRecord]) -> None:
    """A rung is one training setting: every field compare's report keeps within a section agrees (steps, batch,
    warmup, eval, optimizer, data, model), all but the router, lr, seed and balance cell."""
    seen: dict[tuple, RunRecord] = {}
    for r in runs:
        start = next((e for e in r.records if e.get("event") == "start"), {})
        try:
            seen.setdefault(signature(r.config, start, ["model.moe.balance"]), r)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{r.run_dir / 'config.json'} cannot be read as a run's config ({e})") from None
    if len(seen) > 1:
        (a, ra), (b, rb) = list(seen.items())[:2]
        field = next(k for k, v in sorted(set(a) ^ set(b)))
        va, vb = dict(a).get(field, "(unset)"), dict(b).get(field, "(unset)")
        raise ValueError(f"{folder} mixes training settings: {field} is {va} in {ra.run_dir} but {vb} in {rb.run_dir}; a rung is one setting")


def read_rung(folder: Path) -> dict:
    """One rung: its finished runs grouped by (balance, variant), and `missing`: the planned runs not finished,
    unfinished run folders, and seeds a router has that linear lacks in its cell (or the reverse)."""
    try:
        found, sessions = discover_runs(folder), read_sessions(folder)
    except ValueError as e:  # json's errors do not name the file
        raise ValueError(f"{folder}: a config.json, metrics.jsonl or sessions/*.json is not valid JSON ({e})") from None
    for r in found:
        for keys in REQUIRED:
            _value(r, *keys)
    runs = [r for r in found if r.final is not None or r.diverged]
    done = {r.run_dir.resolve() for r in runs}
    missing = [f"{d.relative_to(folder.resolve())}" for d in sorted(planned_dirs(folder, sessions) - done)]
    missing += [f"{r.run_dir.relative_to(folder)} (stopped before its last step)" for r in found
                if r.final is None and not r.diverged and f"{r.run_dir.relative_to(folder)}" not in missing]
    rung = {"rung": folder.parent.name, "folder": folder, "groups": {}, "sessions": sessions, "missing": missing}
    if not runs:
        return rung
    presets = {_value(r, "preset") for r in runs}
    if len(presets) != 1:
        raise ValueError(f"{folder} mixes model presets {sorted(presets)}; a rung is one preset")
    _check_one_budget(folder, runs)
    groups: dict[tuple, dict] = {}
    for r in runs:
        key = (_value(r, "model", "moe", "balance"), r.variant)
        g = groups.setdefault(key, {"lrs": set(), "runs": {}, "diverged": set()})
        g["lrs"].add(_value(r, "optim", "lr"))
        seed = _value(r, "seed")
        if seed in g["runs"] or seed in g["diverged"]:
            raise ValueError(f"{folder}: two runs of {variant_label(*r.variant)} seed {seed} under balance={key[0]}; a rung holds one")
        (g["diverged"].add(seed) if _is_diverged(r) else g["runs"].__setitem__(seed, r))
    for (cell, variant), g in groups.items():
        if len(g["lrs"]) != 1:
            raise ValueError(f"{folder}: {variant_label(*variant)} under balance={cell} ran at several lrs {sorted(g['lrs'])}; a rung holds one lr per router")
        base = groups.get((cell, BASE))
        if variant == BASE:
            continue
        if base is None:
            missing.append(f"balance={cell}: {variant_label(*variant)} has runs but linear has none to pair them with")
            continue
        ours, theirs = set(g["runs"]) | g["diverged"], set(base["runs"]) | base["diverged"]
        missing += [f"balance={cell}: {variant_label(*variant)} seed {s} has no linear run" for s in sorted(ours - theirs)]
        missing += [f"balance={cell}: linear seed {s} has no {variant_label(*variant)} run" for s in sorted(theirs - ours)]
    first = runs[0].config
    return {**rung, "preset": presets.pop(), "groups": groups, "n": active_non_embedding(first),
            "tokens": first["steps"] * first["batch_size"] * first["grad_accum"] * (first["seq_len"] or first["model"]["max_seq_len"])}


def read_rungs(out: Path, expect: list[str] | None = None) -> tuple[list[dict], list[str], list[str]]:
    """(rungs holding finished runs sorted by N, gaps, folders left out): every `<out>/<rung>/confirm`, or only
    those named in `expect`. A rung without a finished run is a gap, not a rung."""
    folders = sorted(p for p in Path(out).glob("*/confirm") if p.is_dir())
    ignored = [p.parent.name for p in folders if expect is not None and p.parent.name not in expect]
    read = [read_rung(p) for p in folders if p.parent.name not in ignored]
    rungs = sorted((r for r in read if r["groups"]), key=lambda r: r["n"])
    gaps = [f"rung {name} has no finished runs" for name in (expect or []) if name not in {r["rung"] for r in rungs}]
    gaps += [f"rung {r['rung']} has no finished runs" for r in read if not r["groups"] and r["rung"] not in (expect or [])]
    if not rungs:
        raise ValueError(f"{out} holds no rung folder with finished runs (expected <out>/<rung>/confirm, as results/ladder/run.sh writes)")
    return rungs, gaps, ignored


def _mean(runs: dict[int, RunRecord], seeds: list[int], key: str) -> float:
    return mean_std([_final(runs[s], key) for s in seeds])[0]


def compare_rung(rung: dict) -> list[dict]:
    """Δ rows of one rung: every router other than linear against linear, per balance cell, paired over seeds.
    A router (or linear) diverged on every seed still gets its row, with no Δ and no test."""
    rows = []
    for (cell, variant), g in sorted(rung["groups"].items(), key=lambda kv: (kv[0][0], variant_order(*kv[0][1]))):
        base = rung["groups"].get((cell, BASE))
        if variant == BASE or base is None:
            continue
        seeds = sorted(set(g["runs"]) & set(base["runs"]))
        mine, theirs = g["runs"], base["runs"]
        row = {"rung": rung["rung"], "n": rung["n"], "tokens": rung["tokens"], "cell": cell, "router": variant_label(*variant),
               "seeds": seeds, "diverged": sorted(g["diverged"] | base["diverged"]),
               "lr": next(iter(g["lrs"])), "lr_linear": next(iter(base["lrs"])), "diff": None, "sd": None, "p": None, "p_holm": None}
        rows.append(row)
        if not seeds:
            continue
        diffs = [_final(mine[s], "val_loss") - _final(theirs[s], "val_loss") for s in seeds]
        p = paired_t_pvalue(diffs)
        speed = paired_speedup({s: theirs[s].curve() for s in seeds}, {s: mine[s].curve() for s in seeds})
        row.update({"val": mean_std([mine[s].final["val_loss"] for s in seeds]), "val_linear": mean_std([theirs[s].final["val_loss"] for s in seeds]),
                    "diff": paired_ci(diffs), "sd": mean_std(diffs)[1], "p": None if math.isnan(p) else p,
                    "speedup": speed["ratio"], "reached": speed["reached"],
                    "maxvio": (_mean(theirs, seeds, "maxvio"), _mean(mine, seeds, "maxvio")),
                    "align": (_mean(theirs, seeds, "align"), _mean(mine, seeds, "align"))})
    return rows


def trends(rows: list[dict], rungs: list[str]) -> list[dict]:
    """Per (router, cell) with a tested Δ on every rung of the ladder (three or more): the weighted slope of
    mean Δ over log10 N. A router on only some rungs (as linear+erc) has no trend."""
    out = []
    for key in sorted({(r["router"], r["cell"]) for r in rows}):
        pts = [r for r in rows if (r["router"], r["cell"]) == key and r["diff"] is not None and len(r["seeds"]) > 1 and r["sd"] > 0]
        if len(rungs) < 3 or sorted(r["rung"] for r in pts) != sorted(rungs):
            continue
        fit = weighted_slope([math.log10(r["n"]) for r in pts], [r["diff"][0] for r in pts],
                             [r["sd"] / math.sqrt(len(r["seeds"])) for r in pts], df=min(len(r["seeds"]) for r in pts) - 1)
        out.append({"router": key[0], "cell": key[1], "rungs": [r["rung"] for r in pts], **fit, "p_holm": None})
    return out


def build_ladder(out: Path, expect: list[str] | None = None, partial: bool = False,
                 routers: list[str] | None = None, cells: list[str] | None = None) -> dict:
    """The report's content. `expect`: the rung (folder) names of the ladder (others are left out);
    `routers` x `cells`: what every rung must hold (router names as compare takes them, balance values). A
    missing rung, router or cell, or a planned run not finished, makes the ladder incomplete: refused unless
    `partial` (then marked interim)."""
    rungs, gaps, ignored = read_rungs(out, expect)
    for rung in rungs:
        have = {(cell, variant[0]) for cell, variant in rung["groups"]}
        gaps += [f"{rung['rung']}: no finished run of {router} under balance={cell}"
                 for cell in (cells or []) for router in (routers or []) if (cell, router) not in have]
        if rung["missing"]:
            gaps.append(f"{rung['rung']}: {len(rung['missing'])} planned run(s) not finished or unpaired, e.g. {rung['missing'][0]}")
    if gaps and not partial:
        raise IncompleteLadder(f"the ladder in {out} is incomplete ({'; '.join(gaps)}); the plan's report waits for it, --partial writes an interim one")
    rows = [row for rung in rungs for row in compare_rung(rung)]
    fits = trends(rows, sorted({rung["rung"] for rung in rungs} | set(expect or [])))
    tested = [r for r in rows + fits if r["p"] is not None]
    for r, adj in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = adj
    # The processes of one grid run the same compare command and each records its session: list it once.
    runs = {rung["rung"]: list(dict.fromkeys(describe(s) + f" · `{s['command']}`" for s in rung["sessions"])) for rung in rungs}
    return {"ladder": [{k: rung[k] for k in ("rung", "preset", "n", "tokens", "missing")} for rung in rungs], "rows": rows, "trends": fits,
            "comparisons": len(tested), "incomplete": gaps, "left_out": ignored, "runs": runs}


def _p(r: dict) -> str:
    if r["p_holm"] is None:
        return "no test"
    return f"p_Holm={r['p_holm']:.2g}" + (f" {MARK}" if r["p_holm"] < ALPHA else "")


def _speed(r: dict) -> str:
    if r["speedup"] is None:
        return f"– (0/{len(r['seeds'])} reached)"
    return f"{r['speedup'][0]:.3f}× [{r['speedup'][1]:.3f}, {r['speedup'][2]:.3f}] ({r['reached']}/{len(r['seeds'])} reached)"


def format_ladder(summary: dict, command: str, plotted: bool = True) -> str:
    rows, fits = summary["rows"], summary["trends"]
    hits = [f"{r['router']}, {r['rung']}, balance={r['cell']}" for r in rows if r["p_holm"] is not None and r["p_holm"] < ALPHA]
    hits += [f"trend of {t['router']}, balance={t['cell']}" for t in fits if t["p_holm"] is not None and t["p_holm"] < ALPHA]
    lines = [TITLE, "",
             f"Built by `{command}` from the rung folders below; the plan, written before any test run: [PLAN.md](PLAN.md).", "",
             f"This report makes {summary['comparisons']} comparisons ({sum(r['p'] is not None for r in rows)} Δs against linear, "
             f"{sum(t['p'] is not None for t in fits)} trends); 'significant' means Holm-adjusted p < {ALPHA:g} across all of them. "
             f"Significant ({MARK}): {'; '.join(hits) if hits else 'none'}."]
    if summary["left_out"]:
        lines[2:2] = [f"Rung folders not named by --rungs, left out: {', '.join(summary['left_out'])}.", ""]
    if summary["incomplete"]:
        lines[2:2] = ["**Interim report: the ladder is incomplete** (" + "; ".join(summary["incomplete"]) + "). Its comparisons, "
                      "Holm family and trends are those of the finished runs, not the plan's; no hypothesis is answered from it.", ""]
    lines += ["", "## Runs", ""]
    for rung in summary["ladder"]:
        lines.append(f"- `{rung['rung']}` ([report]({rung['rung']}/confirm/report.md)):")
        lines += [f"  - {line}" for line in summary["runs"][rung["rung"]]]
    for cell in sorted({r["cell"] for r in rows}):
        lines += ["", f"## balance={cell}", "",
                  "| rung | N | tokens / run | router | seeds | linear val loss | router val loss | Δ vs linear [95% CI], p_Holm | speed-up to linear's final [95% CI] | MaxVio linear → router | align φ linear → router |",
                  "|" + "---|" * 11]
        for r in (r for r in rows if r["cell"] == cell):
            div = f" ({len(r['diverged'])} diverged, left out)" if r["diverged"] else ""
            if r["diff"] is None:
                lines.append(f"| `{r['rung']}` | {r['n'] / 1e6:.3f} M | {r['tokens'] / 1e6:.3f} M | {r['router']} | 0{div} "
                             f"| – (lr {r['lr_linear']:g}) | – (lr {r['lr']:g}) | no seed with both runs finite: no test | – | – | – |")
                continue
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
    lines += ["", f"![Δ against N]({PNG})"] if plotted else []
    lines += ["", "Notes:",
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
    routers = sorted({r["router"] for r in summary["rows"]})  # one colour per router in every panel
    for ax, cell in zip(axes[0], cells):
        for i, router in enumerate(routers):
            pts = [r for r in summary["rows"] if r["cell"] == cell and r["router"] == router and r["diff"] is not None]
            if not pts:
                continue
            color = f"C{i}"
            xs = [r["n"] * (1.04 ** i) for r in pts]  # nudged apart so the intervals do not overlap
            ys = [r["diff"][0] for r in pts]
            err = [[r["diff"][0] - r["diff"][1] for r in pts], [r["diff"][2] - r["diff"][0] for r in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", capsize=3, color=color, label=router)
            for t in (t for t in summary["trends"] if t["cell"] == cell and t["router"] == router):
                lo, hi = min(r["n"] for r in pts), max(r["n"] for r in pts)
                ax.plot([lo, hi], [t["intercept"] + t["slope"] * math.log10(v) for v in (lo, hi)], "--", color=color)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set(title=f"balance={cell}", xlabel="active non-embedding parameters N", ylabel="Δ val loss vs linear (95% CI)")
        ax.legend(fontsize=8)
    fig.tight_layout()  # else the x labels fall off the bottom edge
    save_figure(fig, path)
    return True


def write_ladder(out: str | Path, command: str, expect: list[str] | None = None, partial: bool = False,
                 routers: list[str] | None = None, cells: list[str] | None = None) -> Path:
    out = Path(out)
    if not out.is_dir():
        raise ValueError(f"--out {out} is not a folder")
    theirs = [n for n in (MD, JSON, PNG) if (out / n).exists() and not _ours(out / n)]
    if theirs:
        raise FileExistsError(f"{out / theirs[0]} was not written by mpirouter ladder; move it away first (nothing was written)")
    summary = build_ladder(out, expect, partial, routers, cells)
    atomic_write_text(out / JSON, json.dumps({**summary, "command": command}, indent=1, default=str))
    plotted = plot_ladder(summary, out / PNG)
    atomic_write_text(out / MD, format_ladder(summary, command, plotted))
    return out / MD


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the ladder folder: reads <out>/<rung>/confirm, writes ladder.md, .json and .png there")
    p.add_argument("--rungs", default=None, help="comma-separated rung folder names the ladder must hold, e.g. debug,cpu-440k,tiny,cpu-1.7m")
    p.add_argument("--routers", default=None, help="comma-separated routers every rung must hold in every --cells cell, e.g. linear,mpi")
    p.add_argument("--cells", default=None, help="comma-separated model.moe.balance values every rung must hold, e.g. bias,aux")
    p.add_argument("--partial", action="store_true", help="write an interim report (marked so) while planned runs or rungs are missing")


def cli_main(args: argparse.Namespace) -> int:
    names = {key: [v.strip() for v in value.split(",") if v.strip()] if value else None
             for key, value in (("rungs", args.rungs), ("routers", args.routers), ("cells", args.cells))}
    command = f"mpirouter ladder --out {args.out}" + "".join(f" --{k} {','.join(v)}" for k, v in names.items() if v) + (" --partial" if args.partial else "")
    print(f"ladder: {write_ladder(args.out, command, names['rungs'], args.partial, names['routers'], names['cells'])}")
    return 0
