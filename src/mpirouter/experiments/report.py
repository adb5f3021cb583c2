"""Reports of compare grids, rebuilt from run folders alone: tables, an lr-sweep table, plots.

    mpirouter compare --out runs/compare --report-only      # calls write_report(out)

A run folder is any folder holding config.json and metrics.jsonl (checkpoints/ is skipped). Runs are
grouped into sections by (preset, optimizer, `--vary` cell, lr) and by the rest of their config (`sections.py`:
runs with other steps, batch, corpus or model get sections of their own); within a section runs with the same
seed are paired against `linear`, and two finished runs of one variant and seed are refused. A row is a
variant: router kind, C' and power target. With several lrs for one (preset, optimizer), a sweep table
compares every router at its own best lr; with `--vary`, each cell is also paired with its key's first value
(`cells.py`). Every Δ cell of a report (section, sweep and between-cell rows) is one paired t-test, and
all of them are Holm-adjusted together. Curves and the speed-up use one validation estimator at every
point (`eval_curve`). The statistics themselves are in `stats.py`, provenance in `provenance.py`.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..common.files import atomic_write_text
from ..common.provenance import describe, environment
from ..core.routers import ADDONS, POWER_TARGETS, ROUTER_KINDS
from ..trainer.metrics import read_metrics
from ..trainer.rundir import is_moved_aside
from .cells import NOTES as CELL_NOTES
from .cells import format_between_cells, summarize_between_cells
from .folders import GRID_FILE, REPORT, REPORT_JSON, REPORT_TITLE, SESSIONS, check_outputs_ours
from .plots import pyplot, save_figure
from .sections import check_no_duplicates, differs_order, differs_stem, differs_text, group_runs
from .sweeps import SWEEP_NOTES, format_sweep, sweep_plot
from .versus import NOTES as VERSUS_NOTES
from .versus import format_versus, summarize_versus
from .stats import ALPHA, MARK, holm, mean_curve, mean_std, paired_ci, paired_t_pvalue, ratio_ci, tokens_to_target

SCALE_FREE = ("linear", "power", "cosine", "kmeans", "aoe", "remoe")
"""Router kinds that do not use C' (trained once per seed, whatever `scales` says)."""
TARGET_FREE = ("linear", "retract", "cosine", "kmeans", "aoe", "remoe")
"""Router kinds that do not use a power target (trained once per seed, whatever `targets` says)."""


def router_kind(name: str) -> str:
    """The router kind of a run's router name ("mpi+erc" -> "mpi")."""
    return name.split("+", 1)[0]
PREFIX_EVAL_SINCE = "recorded from commit c3002f6 on"
"""Which runs carry the final eval's prefix estimate (`val_loss_prefix`); older capped runs cannot give a speed-up."""


def variant_label(router: str, scale: float | None, target: str | None = None) -> str:
    label = router if scale is None else f"{router} C'={scale:g}"
    return label if target in (None, "gate") else f"{label} target={target}"


def variant_order(router: str, scale: float | None, target: str | None = None) -> tuple:
    """Sort key of report rows: router kinds in ROUTER_KINDS order (unknown ones last), then C', then the target."""
    kind = router_kind(router)
    return (ROUTER_KINDS.index(kind) if kind in ROUTER_KINDS else len(ROUTER_KINDS), router, scale or 0.0,
            POWER_TARGETS.index(target) if target in POWER_TARGETS else -1)


@dataclass(frozen=True)
class EvalCurve:
    """A run's validation curve with the same estimator at every point (see `eval_curve`)."""

    tokens: list[float]
    values: list[float]
    scope: str
    """"prefix": the first `batches` validation batches at every point (capped periodic evals); "whole": the whole split."""
    batches: int | None
    """Validation batches of the prefix estimator (None when scope is "whole")."""
    has_final: bool
    """Whether the final step is on the curve. False for an unfinished run, and for a capped run recorded
    before the final eval also logged its prefix estimate: that curve ends at the last periodic eval."""

    @property
    def label(self) -> str:
        return f"first {self.batches} batches" if self.scope == "prefix" else "whole validation split"


def eval_curve(config: dict, records: list[dict], key: str = "val_loss") -> EvalCurve:
    """(tokens, `key`) over a run's evals, one estimator throughout: the prefix estimator when the run's periodic
    evals are capped (periodic values, then the final eval's `{key}_prefix`), else the whole split everywhere.

    The final eval always covers the whole split; plotting it after capped periodic evals would put a step
    at the end of every curve that is the estimator changing, not the model (`key`: val_loss or maxvio).
    The scope follows the config, not each record's `val_scope`: a cap that covers the whole split makes
    the two estimators equal, and old records have no `val_scope`.
    """
    capped = config.get("eval_batches") is not None
    steps = config["steps"]
    tokens, values, has_final = [], [], False
    for r in (r for r in records if r.get("event") == "eval" and key in r):
        # every whole-split eval of a capped run carries the prefix estimate too (also a final eval that a
        # resumed, extended run left mid-curve); one without it is a final eval from before it was recorded
        value = r.get(f"{key}_prefix", None if capped and r.get("step") == steps else r[key]) if capped else r[key]
        if value is None:
            continue
        tokens.append(r["tokens"])
        values.append(value)
        has_final = has_final or r.get("step") == steps
    return EvalCurve(tokens, values, "prefix" if capped else "whole", config.get("eval_batches") if capped else None, has_final)


def estimator_title(curves: list[EvalCurve]) -> str:
    """What a plot of `curves` shows, e.g. "first 16 batches, every point" (for panel titles)."""
    labels = sorted({c.label for c in curves})
    text = (labels[0] if len(labels) == 1 else "mixed estimators: " + " / ".join(labels)) + ", every point"
    if any(c.scope == "prefix" and not c.has_final for c in curves):
        text += "; no final prefix eval recorded, curves end at the last periodic eval"
    return text


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
    def diverged(self) -> bool:
        """The grid stopped this run on a non-finite loss (compare's marker): a result, left out of the tables."""
        return (self.run_dir / "diverged.json").is_file()

    @property
    def router(self) -> str:
        """The router's name: its kind, with the router losses it adds ("mpi+erc")."""
        r = self.config["model"]["moe"]["router"]
        return r["kind"] + "".join(f"+{a}" for a in ADDONS if (r.get(a) or {}).get("enabled"))

    @property
    def scale(self) -> float | None:
        return None if router_kind(self.router) in SCALE_FREE else float(self.config["model"]["moe"]["router"]["scale_prime"])

    @property
    def target(self) -> str | None:
        return None if router_kind(self.router) in TARGET_FREE else self.config["model"]["moe"]["router"].get("target", "gate")

    @property
    def variant(self) -> tuple:
        """(router, C', target): one row of a section."""
        return self.router, self.scale, self.target

    def cell(self, keys: list[str]) -> tuple[tuple[str, str], ...]:
        """This run's values of the `--vary` keys, e.g. (("score_func", "sigmoid"),)."""
        return tuple((key.split(".")[-1], _config_value(self.config, key)) for key in keys)

    def events(self, name: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == name]

    @property
    def final(self) -> dict | None:
        return next((r for r in self.events("eval") if r.get("step") == self.config["steps"]), None)

    @property
    def timing(self) -> dict:
        return next((r for r in reversed(self.records) if r.get("event") == "timing"), {})

    def curve(self, key: str = "val_loss") -> EvalCurve:
        return eval_curve(self.config, self.records, key)


def _config_value(config: dict, key: str) -> str:
    node = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return json.dumps(node) if not isinstance(node, str) else node


def vary_values(sessions: list[dict]) -> dict[str, list[str]]:
    """The config fields that the folder's compare calls varied (`--vary`) and their values, in the order first given."""
    given: dict[str, list[str]] = {}
    for s in sessions:
        for key, values in (s.get("config", {}).get("vary", {}) or {}).items():
            known = given.setdefault(key, [])
            known += [v for v in values if v not in known]
    return given


def vary_keys(sessions: list[dict]) -> list[str]:
    return list(vary_values(sessions))


def cell_order(given: dict[str, list[str]], cell: tuple[tuple[str, str], ...]) -> tuple:
    """Sort key of a cell: each value's position in the `vary_values` list of its key (unknown values last, by name)."""
    short = {key.split(".")[-1]: values for key, values in given.items()}
    return tuple((short.get(k, []).index(v), "") if v in short.get(k, []) else (len(short.get(k, [])), v) for k, v in cell)


def cell_text(cell: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in cell)


def discover_runs(out_dir: Path) -> list[RunRecord]:
    """Every run folder under `out_dir` (a folder holding config.json and metrics.jsonl; moved-aside ones skipped)."""
    runs = []
    for cfg_path in sorted(Path(out_dir).rglob("config.json")):
        parts = cfg_path.relative_to(out_dir).parts
        if "checkpoints" in parts or any(is_moved_aside(Path(part)) for part in parts) or not (cfg_path.parent / "metrics.jsonl").is_file():
            continue
        runs.append(RunRecord(cfg_path.parent, json.loads(cfg_path.read_text()), read_metrics(cfg_path.parent)))
    return runs


def paired_speedup(base: dict[int, EvalCurve], curves: dict[int, EvalCurve]) -> dict:
    """Per-seed speed-up to linear's final loss, on each run's one-estimator curve (`eval_curve`).

    For each seed s of both: target_s = linear seed s's final curve value; tokens = first crossing of
    target_s on linear's and on the router's seed-s curve (`tokens_to_target`); ratio_s = linear's tokens /
    the router's (> 1: faster). "ratio" is the geometric mean with a 95% t-interval on the log ratios
    (`ratio_ci`) over the seeds that reached the target; `not_reached` and `lacking` (a curve without its
    final point, so no same-estimator target) list the other seeds, which are never silently dropped.
    """
    per_seed, not_reached, lacking = {}, [], []
    common = sorted(set(base) & set(curves))
    for s in common:
        b, c = base[s], curves[s]
        if not (b.has_final and c.has_final):
            lacking.append(s)
            continue
        target = b.values[-1]
        tokens_linear, tokens = tokens_to_target(b.tokens, b.values, target), tokens_to_target(c.tokens, c.values, target)
        per_seed[s] = {"target": target, "tokens_linear": tokens_linear, "tokens": tokens,
                       "ratio": tokens_linear / tokens if tokens is not None else None}
        if tokens is None:
            not_reached.append(s)
    ratios = [v["ratio"] for v in per_seed.values() if v["ratio"] is not None]
    return {"per_seed": per_seed, "n": len(common), "reached": len(ratios), "not_reached": not_reached, "lacking": lacking,
            "ratio": ratio_ci(ratios) if ratios else None}


def _p_or_none(diffs: list[float]) -> float | None:
    p = paired_t_pvalue(diffs)
    return None if math.isnan(p) else p


def summarize_section(runs: list[RunRecord]) -> list[dict]:
    """One row per (router, C') of a section (same preset and optimizer): final numbers over seeds.

    "p" is the paired t-test of the row's Δ; "p_holm" stays None until `adjust_comparisons` sees every row
    of the report.
    """
    variants: dict[tuple, dict[int, RunRecord]] = {}
    for r in runs:
        if r.final is not None:
            variants.setdefault(r.variant, {})[r.config["seed"]] = r
    base = variants.get(("linear", None, None), {})
    base_final = {s: r.final["val_loss"] for s, r in base.items()}
    base_curves = {s: r.curve() for s, r in base.items()}
    base_step_ms = [r.timing["step_ms"] for r in base.values() if "step_ms" in r.timing]
    rows = []
    for key in sorted(variants, key=lambda key: variant_order(*key)):
        seeds = variants[key]
        finals = [r.final for r in seeds.values()]
        compared = key != ("linear", None, None) and bool(base)
        diffs = [seeds[s].final["val_loss"] - base_final[s] for s in sorted(set(seeds) & set(base_final))]
        timings = [r.timing for r in seeds.values() if "step_ms" in r.timing]
        row = {
            "router": key[0], "scale": key[1], "target": key[2], "label": variant_label(*key), "seeds": sorted(seeds),
            "val_loss": mean_std([f["val_loss"] for f in finals]),
            "diff": paired_ci(diffs) if compared and diffs else None,
            "diff_n": len(diffs),
            "p": _p_or_none(diffs) if compared and diffs else None,
            "p_holm": None,
            "speedup": paired_speedup(base_curves, {s: r.curve() for s, r in seeds.items()}) if compared else None,
            "curve": estimator_title([r.curve() for r in seeds.values()]),
            "total_tokens": max(f["tokens"] for f in finals),
            "maxvio": mean_std([f["maxvio"] for f in finals]),
            "align": mean_std([f["align"] for f in finals]),
            "align_raw": mean_std([f["align_raw"] for f in finals]),
            "align_layers": [mean_std(v)[0] for v in zip(*(f["align_layers"] for f in finals))],
            "align_raw_layers": [mean_std(v)[0] for v in zip(*(f["align_raw_layers"] for f in finals))],
            "step_ms": mean_std([t["step_ms"] for t in timings])[0] if timings else None,
            # router cost is measured by one-process runs only (None under torchrun)
            "router_ms": mean_std([t["router_ms"] for t in routed])[0] if (routed := [t for t in timings if t.get("router_ms") is not None]) else None,
            "overhead": mean_std([t["router_ms"] / t["step_ms"] for t in routed])[0] if routed else None,
        }
        row["step_vs_linear"] = row["step_ms"] / mean_std(base_step_ms)[0] if row["step_ms"] and base_step_ms else None
        rows.append(row)
    return rows


def tuned_lrs(by_lr: dict, one_lr_too: bool = False) -> dict[tuple, float] | None:
    """{variant: lr} when the runs of a group were trained at several lrs but each variant at one only (each
    router at its tuned lr, e.g. after a sweep); None otherwise (an lr sweep, or one lr unless `one_lr_too`)."""
    if len(by_lr) < (1 if one_lr_too else 2) or None in by_lr:
        return None
    lr_of: dict[tuple, float] = {}
    for lr, runs in by_lr.items():
        for r in runs:
            if lr_of.setdefault(r.variant, lr) != lr:
                return None
    return lr_of


def adjust_comparisons(rows: list[dict]) -> int:
    """Holm-adjust the "p" of all `rows` together, in place ("p_holm"); returns how many comparisons that is.

    Rows without a p (the baseline, one seed, zero variance) are not comparisons and keep p_holm None.
    """
    tested = [r for r in rows if r.get("p") is not None]
    for r, adjusted in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = adjusted
    return len(tested)


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else f"{p:.1e}"


def _diff_cell(row: dict) -> str:
    """Δ mean [95% CI] (n), then the Holm-adjusted p and the survivor mark once `adjust_comparisons` ran."""
    d = row["diff"]
    if d is None:
        return "baseline" if row["label"] == "linear" else "no linear run"
    if math.isnan(d[1]):
        return f"{d[0]:+.4f} (n=1, no CI)"
    text = f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] (n={row['diff_n']})"
    if row.get("p") is None:
        return text + ", no test (zero variance)"
    if row.get("p_holm") is None:
        return text
    return text + f", p_Holm={_p(row['p_holm'])}" + (f" {MARK}" if row["p_holm"] < ALPHA else "")


def _speedup_cell(row: dict) -> str:
    sp = row["speedup"]
    if sp is None:
        return "baseline" if row["router"] == "linear" else "no linear run"
    if not sp["per_seed"] and sp["lacking"]:
        return f"n/a: runs lack the final prefix eval ({PREFIX_EVAL_SINCE})"
    counts = f"{sp['reached']}/{sp['n']} reached" + (f"; {len(sp['not_reached'])} not reached" if sp["not_reached"] else "") + \
        (f"; {len(sp['lacking'])} lack the final prefix eval" if sp["lacking"] else "")
    g = sp["ratio"]
    if g is None:
        return f"– ({counts})"
    return f"{g[0]:.3f}× ({counts}, no CI)" if math.isnan(g[1]) else f"{g[0]:.3f}× [{g[1]:.3f}, {g[2]:.3f}] ({counts})"


def format_rows(rows: list[dict]) -> str:
    """The report's markdown table."""
    cols = ["router", "seeds", "val loss", "Δ vs linear [95% CI], p_Holm", "speed-up to linear's final [95% CI]", "MaxVio",
            "align φ", "align R", "step ms", "step / linear", "router ms", "router overhead"]
    f = lambda x, spec: "–" if x is None else format(x, spec)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["label"] + (f" @ lr {r['lr']:g}" if r.get("lr") else ""), str(len(r["seeds"])), f"{r['val_loss'][0]:.4f} ± {r['val_loss'][1]:.4f}", _diff_cell(r),
                 _speedup_cell(r), f"{r['maxvio'][0]:.3f} ± {r['maxvio'][1]:.3f}", f"{r['align'][0]:.3f}", f"{r['align_raw'][0]:.3f}",
                 f(r["step_ms"], ".1f"), f(r["step_vs_linear"], ".3f"), f(r["router_ms"], ".3f"), f(r["overhead"], ".2%")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = f"""\
- val loss: final validation loss on the whole validation split (the final eval always covers all of it),
  mean ± sample std over seeds.
- Δ vs linear: per-seed paired difference of that final whole-split loss (router − linear, same seed =
  same init and data), mean with a 95% paired t-interval (mean ± t₀.₉₇₅,ₙ₋₁·sd/√n, not adjusted for
  multiplicity); negative = better than linear. p_Holm: the two-sided paired t-test's p-value,
  Holm-adjusted over all N comparisons of this report (every section, sweep and between-cells row, so a
  comparison shown in both counts twice). {MARK} marks p_Holm < {ALPHA:g}: only those cells are significant; an
  interval that excludes 0 without {MARK} does not survive the adjustment. Single-seed and zero-variance
  cells have no test and are not counted.
- speed-up to linear's final: paired per seed on one validation estimator at every point: the first
  `eval_batches` batches when the periodic evals are capped (the periodic values, and at the final step the
  final eval's `val_loss_prefix`, computed in the same pass), the whole split when they are not. For seed s:
  target = linear seed s's final value of that curve; tokens = first crossing of the target on linear's
  and on the router's seed-s curve (linear interpolation between evals); ratio = linear's tokens / the
  router's (> 1 = faster). Shown: geometric mean of the ratios with a 95% t-interval on the log ratios
  (exponentiated), over the seeds that reached the target, and how many seeds reached it. Seeds that
  never did are counted, not dropped; the mean leaves them out, which flatters a router with unreached
  seeds, so read it with the count. Capped runs without the final prefix eval ({PREFIX_EVAL_SINCE})
  have no same-estimator target: n/a. Descriptive: not tested, not in N.
- MaxVio: (max load − mean load) / mean load over the final eval's whole split, mean over layers. The
  validation-loss and MaxVio plots use the speed-up's curve estimator (their titles say which). align φ /
  align R: mean |cos| between each expert's effective router row φ (or raw R) and its gate matrix's top
  right-singular vector (a random direction gives ≈ √(2/(πd))); they depend on the weights only.
- step ms: median training-step time; router ms: forward + backward of every layer's router work for one
  micro-batch's tokens (rows φ, logits, the router's own losses), measured
  in the same run; router overhead = router ms / step ms. Runs are sequential, so step-time ratios also
  carry machine-load noise."""


def _plots(section: list[RunRecord], rows: list[dict], out: Path, stem: str) -> list[str]:
    """Seed-band curves (val loss, MaxVio, alignment) and final per-layer alignment; returns file names."""
    plt = pyplot()
    if plt is None:
        return []
    colors = {r["label"]: plt.get_cmap("tab10")(i % 10) for i, r in enumerate(rows)}
    groups = {r["label"]: [x for x in section if x.final is not None and variant_label(*x.variant) == r["label"]] for r in rows}
    dim = section[0].config["model"]["dim"]
    estimator = estimator_title([x.curve() for runs in groups.values() for x in runs]).replace("; ", ";\n")  # fits the title
    files = section_plots(stem)
    for name, key, title, extra in zip(files, ("val_loss", "maxvio", "align"),
                                       (f"validation loss ({estimator})", f"MaxVio, mean over layers ({estimator})",
                                        "alignment |cos|, mean over layers (φ solid, raw R dashed)"), (None, None, "align_raw")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, runs in groups.items():
            for k, style in ((key, "-"), (extra, "--")):
                if k is None:
                    continue
                if key == "align":  # alignment is a function of the weights: every eval measures the same thing
                    curves = [([e["tokens"] for e in r.events("eval")], [e[k] for e in r.events("eval")]) for r in runs]
                else:
                    curves = [(c.tokens, c.values) for c in (r.curve(k) for r in runs)]
                x, m, s = mean_curve(curves)
                x = [t / 1e6 for t in x]
                ax.plot(x, m, style, color=colors[label], label=label if style == "-" else None, marker="o", ms=3)
                ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=colors[label], alpha=0.2)
        if key == "align":
            ax.axhline(math.sqrt(2 / (math.pi * dim)), color="gray", lw=0.8, ls=":", label="random direction")
        ax.set_title(f"{title}\n{stem}, mean ± std over seeds", fontsize=9)
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / name)
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
    save_figure(fig, out / files[-1])
    return files


def section_plots(stem: str) -> list[str]:
    """The file names `_plots` writes for a section (known before any is written)."""
    return [f"{stem}-{key}.png" for key in ("val_loss", "maxvio", "align", "align_layers")]


def summarize_sweep(by_lr: dict[float, list[RunRecord]]) -> list[dict]:
    """One row per (router, C') across learning rates: final loss per lr, its best lr, and the paired
    difference to linear with every variant at its own best lr (the fair tuned comparison), with its
    t-test "p" ("p_holm" is left to `adjust_comparisons`)."""
    finals: dict[str, dict[float, dict[int, float]]] = {}
    diverged: dict[str, dict[float, int]] = {}
    keys = {}
    for lr, runs in by_lr.items():
        for r in runs:
            if r.final is None and r.diverged:
                label = variant_label(*r.variant)
                keys[label] = variant_order(*r.variant)
                finals.setdefault(label, {})
                diverged.setdefault(label, {}).setdefault(lr, 0)
                diverged[label][lr] += 1
            if r.final is not None:
                label = variant_label(*r.variant)
                keys[label] = variant_order(*r.variant)
                finals.setdefault(label, {}).setdefault(lr, {})[r.config["seed"]] = r.final["val_loss"]
    # an lr at which a seed diverged is never the best (its mean would hide the divergence)
    best = {label: min(per_lr, key=lambda lr: math.inf if diverged.get(label, {}).get(lr) else mean_std(list(per_lr[lr].values()))[0])
            for label, per_lr in finals.items() if per_lr}
    rows = []
    for label in sorted(best, key=keys.get):  # (a router whose every run diverged has no best lr: listed, not a row)
        per_lr = finals[label]
        row = {"label": label, "by_lr": {lr: [*mean_std(list(v.values())), len(v)] for lr, v in sorted(per_lr.items())},
               "best_lr": best[label], "diff": None, "diff_n": 0, "p": None, "p_holm": None,
               "diverged": dict(sorted(diverged.get(label, {}).items()))}
        if label != "linear" and "linear" in finals:
            mine, base = per_lr[best[label]], finals["linear"][best["linear"]]
            diffs = [mine[s] - base[s] for s in sorted(set(mine) & set(base))]
            if diffs:
                row.update(diff=paired_ci(diffs), p=_p_or_none(diffs))
            row["diff_n"] = len(diffs)
        rows.append(row)
    return rows


def _section_header(c: dict, start: dict, lr: str | None = None) -> str:  # lr: e.g. "lrs 0.003 / 0.006"
    """The line under a section title: budget, lr, experts, corpus, device (from a run's config and start record)."""
    return (f"{c['steps']} steps × {c['batch_size'] * c['grad_accum']} sequences × {c.get('seq_len') or c['model']['max_seq_len']} "
            f"tokens, {lr or 'lr ' + str(c['optim'].get('lr'))}, {c['model']['moe']['num_experts']} experts top-{c['model']['moe']['top_k']}, "
            f"corpus {start.get('corpus', '?')}, device {start.get('device', '?')}")


def multiplicity_line(n: int, significant: list[str], untested: int, between: int = 0, versus: int = 0) -> str:
    """The report's opening statement of how many comparisons it makes and which survive Holm."""
    parts = [f"{n - between - versus} against linear"] + [f"{between} between cells"] * bool(between) + [f"{versus} against mpi"] * bool(versus)
    which = "against linear" if len(parts) == 1 else f"({', '.join(parts)})"
    text = (f"This report makes {n} paired comparisons {which}; 'significant' below means Holm-adjusted "
            f"p < {ALPHA:g} across all {n}. ")
    text += f"Significant ({MARK}): {'; '.join(significant)}." if significant else "No comparison is significant."
    if untested:
        text += f" {untested} more Δ cell(s) have no test (one seed, or zero variance) and are not counted."
    return text


def _stem(preset: str, optim: str, cell: tuple) -> str:
    """File-name stem of a section's plots, e.g. "debug-adamw-score_func_sigmoid-balance_bias"."""
    return "-".join([preset, optim, *(f"{k}_{v}" for k, v in cell)])


def write_report(out_dir: str | Path) -> Path:
    """Rebuild report.md, report.json and the plots from the run folders under `out_dir`; returns report.md."""
    out = Path(out_dir)
    runs = discover_runs(out)
    if not runs:
        raise FileNotFoundError(f"no run folders (config.json + metrics.jsonl) under {out}")
    sessions = read_sessions(out)
    now = environment()
    given = vary_values(sessions)
    # Every table is summarized before any is written: the Holm adjustment needs all of the report's p-values.
    # presets and optimizers sort by name, cells as their values were given to --vary, then other configs by value
    groups = sorted(group_runs(runs, list(given)), key=lambda g: (g.preset, g.optimizer, cell_order(given, g.cell), differs_order(g)))
    sweeps, sections, compared = [], [], []
    # a cell whose routers all took one lr belongs with its tuned neighbour cells (so "Between cells" pairs them)
    tuned_families = {(g.preset, g.optimizer, g.signature) for g in groups if tuned_lrs(g.by_lr)}
    for g in groups:
        preset, optim, cell, by_lr = g.preset, g.optimizer, g.cell, g.by_lr
        tuned = tuned_lrs(by_lr, one_lr_too=(g.preset, g.optimizer, g.signature) in tuned_families)
        if tuned:  # each router at its own lr: one section, paired across lrs
            by_lr = {None: [r for runs_at_lr in by_lr.values() for r in runs_at_lr]}
        title = "".join(f", {t}" for t in (cell_text(cell), differs_text(g.differs)) if t)  # what sets the group apart
        stem = "-".join([_stem(preset, optim, cell), *([differs_stem(g.differs)] if g.differs else [])])
        differs = {"differs": {k: json.loads(v) for k, v in g.differs}} if g.differs else {}
        rows = summarize_sweep(by_lr) if len(by_lr) > 1 else []
        if rows:
            sweeps.append({"preset": preset, "optimizer": optim, "cell": cell, **differs, "rows": rows, "by_lr": by_lr,
                           "title": title, "stem": stem})
            lin = next((r["best_lr"] for r in rows if r["label"] == "linear"), None)
            compared += [(f"{r['label']} at lr {r['best_lr']:g} vs linear at lr {lin:g} (sweep `{preset}`/`{optim}`{title})", r)
                         for r in rows if r["diff"] is not None]
        for lr, section in sorted(by_lr.items(), key=lambda kv: kv[0] or 0.0):
            check_no_duplicates(section, lambda r: variant_label(*r.variant))
            rows = summarize_section(section)
            for row in rows if tuned else []:
                row["lr"] = tuned[(row["router"], row["scale"], row["target"])]
            where = f"`{preset}`/`{optim}`{title}" + (f", lr {lr:g}" if len(by_lr) > 1 else "")
            sections.append({"preset": preset, "optimizer": optim, "cell": cell, "signature": g.signature, **differs, "lr": lr, "rows": rows,
                             "tuned": bool(tuned),
                             "runs": section, "multi_lr": len(by_lr) > 1, "title": title,
                             "stem": stem + (f"-lr{lr:g}" if len(by_lr) > 1 else "")})
            compared += [(f"{r['label']} ({where})", r) for r in rows if r["diff"] is not None]
    between = summarize_between_cells(sections, given, variant_label)
    compared += [(f"{r['label']} {r['key']}={r['value']} vs {r['baseline']} ({r['where']})", r) for r in between]
    versus = summarize_versus(sections, variant_label)
    compared += [(f"{r['label']} vs {r['reference']} ({r['where']})", r) for r in versus]
    n = adjust_comparisons([row for _, row in compared])
    significant = [name for name, row in compared if row["p_holm"] is not None and row["p_holm"] < ALPHA]
    untested = sum(1 for _, row in compared if row["p"] is None)
    # in a folder that is not ours, every file about to be written is checked before the first one is
    plots = [f"{sw['stem']}-lr_sweep.png" for sw in sweeps] + [f for sec in sections if sec["rows"] for f in section_plots(sec["stem"])]
    check_outputs_ours(out, [REPORT, REPORT_JSON, *(plots if pyplot() is not None else [])])

    lines = [f"{REPORT_TITLE}`{out}`", "", multiplicity_line(n, significant, untested, sum(1 for r in between if r["p"] is not None),
                                                             sum(1 for r in versus if r["p"] is not None)), ""]
    for s in sessions:
        if not s.get("runs_trained", True):
            continue  # a call that found everything done
        lines.append(f"- trained {len(s.get('runs_trained', []))} run(s): `{s.get('command', '?')}` · {describe(s)}")
    lines.append(f"- report: `mpirouter compare --out {shlex.quote(str(out))} --report-only` · {describe(now)}")
    diverged = [r for r in runs if r.final is None and r.diverged]
    if diverged:
        lines.append(f"- **diverged runs (non-finite loss; left out of the tables, and an lr where one diverged is never a "
                     f"sweep's best):** " + ", ".join(f"`{r.run_dir.relative_to(out)}`" for r in diverged))
    unfinished = [r for r in runs if r.final is None and not r.diverged]
    if unfinished:
        lines.append(f"- **incomplete runs (left out of the table):** " + ", ".join(f"`{r.run_dir.relative_to(out)}`" for r in unfinished))
    for sw in sweeps:
        preset, optim, by_lr, title = sw["preset"], sw["optimizer"], sw.pop("by_lr"), sw.pop("title")
        first = next(iter(by_lr.values()))[0]
        lrs = "lrs " + " / ".join(f"{lr:g}" for lr in sorted(by_lr))
        lines += ["", f"## lr sweep: preset `{preset}`, optimizer `{optim}`{title}", "",
                  _section_header(first.config, next(iter(first.events("start")), {}), lrs), "",
                  format_sweep(sw["rows"], _diff_cell), "", SWEEP_NOTES, ""]
        lines += [f"![{f}]({f})" for f in sweep_plot(sw["rows"], out, sw.pop("stem"))]
    for sec in sections:
        preset, optim, lr, rows, section, title = sec["preset"], sec["optimizer"], sec["lr"], sec["rows"], sec.pop("runs"), sec.pop("title")
        start = next(iter(section[0].events("start")), {})
        lines += ["", f"## preset `{preset}`, optimizer `{optim}`{title}" + (f", lr {lr:g}" if sec["multi_lr"] else ""), "",
                  _section_header(section[0].config, start, "each router at its own lr (in the table)" if sec["tuned"] else None), ""]
        stem = sec.pop("stem")
        if not rows:
            lines.append("No finished runs yet.")
            continue
        curves = [r.curve() for r in section if r.final is not None]
        lines += [f"Curves and speed-up: validation {estimator_title(curves)}.", "", format_rows(rows), ""]
        lines += [f"![{f}]({f})" for f in _plots(section, rows, out, stem)]
    if between:
        lines += ["", "## Between cells", "", format_between_cells(between, _diff_cell), "", CELL_NOTES]
    if versus:
        lines += ["", "## Against mpi", "", format_versus(versus, _diff_cell), "", VERSUS_NOTES]
    lines += ["", "Columns:", "", NOTES, ""]
    summary = {"sessions": sessions, "report_env": now,
               "comparisons": {"n": n, "adjustment": "holm", "alpha": ALPHA, "significant": significant, "untested": untested},
               "sweeps": sweeps, "sections": [sec for sec in sections if sec["rows"]], "between_cells": between,
               "against_mpi": versus}
    atomic_write_text(out / REPORT, "\n".join(lines))
    atomic_write_text(out / REPORT_JSON, json.dumps(summary, indent=2, default=str))
    return out / REPORT
