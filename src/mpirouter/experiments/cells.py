"""Between `--vary` cells: each cell against the first value of its key, per router, paired over seeds.

    mpirouter compare --routers linear,mpi --seeds 0,1,2,3,4 --vary precision=fp32,bf16 --out runs/precision

A section compares routers inside one cell; this compares a cell with its neighbour along one `--vary` key
(every other key, the preset, optimizer, lr and config signature held equal), e.g. bf16 against fp32 for each
router: Δ final validation loss (paired t-interval over the seeds both cells have), Δ MaxVio, and the ratio of
median step times. Each Δ loss is one comparison of the report's Holm family (report.py).
"""

from __future__ import annotations

import json
import math
import statistics

from .stats import mean_std, paired_ci, paired_t_pvalue


def _context(sec: dict, drop: int) -> tuple:
    """What must be equal for two sections to be compared along the cell's key number `drop`: everything but that
    key's value (the config signature holds every field that is not a `--vary` key: steps, data, model, ...)."""
    cell = tuple((k, _value(v)) for k, v in sec["cell"])
    return (sec["preset"], sec["optimizer"], sec["lr"], repr(sec["signature"]), cell[:drop] + cell[drop + 1:])


def _value(text: str):
    """A `--vary` value as the config holds it, so "1e-1" on the command line pairs with the config's 0.1."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _finals(sec: dict) -> dict[tuple, dict[int, dict]]:
    """variant -> seed -> (final eval record, timing record) of the section's finished runs."""
    out: dict[tuple, dict[int, dict]] = {}
    for r in sec["runs"]:
        if r.final is not None:
            out.setdefault(r.variant, {})[r.config["seed"]] = {"final": r.final, "timing": r.timing}
    return out


def summarize_between_cells(sections: list[dict], given: dict[str, list[str]], label) -> list[dict]:
    """One row per (key, value other than the key's first, context, variant present in both cells).

    `sections`: the report's sections (with "runs", "cell", "signature", "preset", "optimizer", "lr"); `given`: `vary_values`;
    `label(router, scale, target)`: the row's router label. "p_holm" stays None until `adjust_comparisons`."""
    first = {key.split(".")[-1]: values[0] for key, values in given.items() if values}
    rows = []
    for sec in sections:
        for i, (key, value) in enumerate(sec["cell"]):
            if key not in first or _value(value) == _value(first[key]):
                continue
            base = next((b for b in sections if _context(b, i) == _context(sec, i) and b["cell"][i][0] == key
                         and _value(b["cell"][i][1]) == _value(first[key])), None)
            if base is None:
                continue
            base_value = base["cell"][i][1]
            mine, theirs = _finals(sec), _finals(base)
            for variant in sorted(set(mine) & set(theirs), key=repr):
                seeds = sorted(set(mine[variant]) & set(theirs[variant]))
                if not seeds:
                    continue
                a, b = mine[variant], theirs[variant]
                diffs = [a[s]["final"]["val_loss"] - b[s]["final"]["val_loss"] for s in seeds]
                p = paired_t_pvalue(diffs)
                ratios = [a[s]["timing"]["step_ms"] / b[s]["timing"]["step_ms"] for s in seeds
                          if a[s]["timing"].get("step_ms") and b[s]["timing"].get("step_ms")]
                rest = [f"{k}={v}" for k, v in sec["cell"] if k != key]
                rows.append({
                    "key": key, "value": value, "baseline": base_value, "label": label(*variant),
                    "where": f"`{sec['preset']}`/`{sec['optimizer']}`" + "".join(f", {t}" for t in rest)
                             + (f", lr {sec['lr']:g}" if sec.get("multi_lr") else ""),
                    "seeds": seeds, "diff": paired_ci(diffs), "diff_n": len(diffs), "diffs": diffs,
                    "p": None if math.isnan(p) else p, "p_holm": None,
                    "val_loss": mean_std([a[s]["final"]["val_loss"] for s in seeds]),
                    "val_loss_baseline": mean_std([b[s]["final"]["val_loss"] for s in seeds]),
                    "maxvio_diff": paired_ci([a[s]["final"]["maxvio"] - b[s]["final"]["maxvio"] for s in seeds]),
                    "step_ratio": statistics.median(ratios) if ratios else None,
                    "step_ratio_range": (min(ratios), max(ratios)) if ratios else None,
                })
    return rows


def format_between_cells(rows: list[dict], diff_cell) -> str:
    """The markdown table of `summarize_between_cells`' rows; `diff_cell(row)`: the report's Δ cell."""
    cols = ["cell vs", "where", "router", "seeds", "val loss (vs)", "Δ val loss [95% CI], p_Holm", "Δ MaxVio [95% CI]",
            "step time ratio, median [min–max]"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r["maxvio_diff"]
        maxvio = f"{m[0]:+.4f}" + ("" if math.isnan(m[1]) else f" [{m[1]:+.4f}, {m[2]:+.4f}]")
        ratio = "–" if r["step_ratio"] is None else f"{r['step_ratio']:.2f} [{r['step_ratio_range'][0]:.2f}–{r['step_ratio_range'][1]:.2f}]"
        cells = [f"{r['key']}={r['value']} vs {r['baseline']}", r["where"], r["label"], str(r["diff_n"]),
                 f"{r['val_loss'][0]:.4f} ({r['val_loss_baseline'][0]:.4f})", diff_cell(r), maxvio, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """Each row pairs a cell with the cell holding its key's first `--vary` value (everything else equal), per router,
over the seeds both have: Δ = this cell − that cell (final validation loss; MaxVio), a paired t-interval. The step
time ratio is per seed (this cell's median step time ÷ that cell's), then median [min–max] over the seeds; runs that
shared the machine with others time each other's contention too. Each Δ val loss is one comparison of the Holm family."""
