"""Against mpi: in a section holding a router beyond the MPI family (a coupling design, or MPI with a router
loss), every router but linear and mpi is also compared with mpi, paired over seeds.

    mpirouter compare --routers linear,mpi,mpi+erc,svd,cosine --seeds 0,1,2 --out runs/zoo

A section's table compares each router with linear; this adds Δ final validation loss against the section's
one mpi variant (paired t-interval over the seeds both have) and Δ MaxVio. Each Δ loss is one comparison of
the report's Holm family (report.py). Sections of MPI and its ablations alone are left as they were.
"""

from __future__ import annotations

import math

from ..core.routers import MPI_FAMILY
from .stats import paired_ci, paired_t_pvalue

REFERENCE = "mpi"


def _is_design(router: str) -> bool:
    """A router name beyond the MPI family: another kind, or any kind with router losses ("linear+erc")."""
    return "+" in router or router not in MPI_FAMILY


def summarize_versus(sections: list[dict], label) -> list[dict]:
    """One row per (section holding a design and exactly one mpi variant, router other than linear and mpi).

    `sections`: the report's sections (with "runs", "preset", "optimizer", "title", "lr"); `label(router, scale,
    target)`: the row's router label. "p_holm" stays None until `adjust_comparisons`."""
    rows = []
    for sec in sections:
        finals: dict[tuple, dict[int, dict]] = {}
        for r in sec["runs"]:
            if r.final is not None:
                finals.setdefault(r.variant, {})[r.config["seed"]] = r.final
        refs = [key for key in finals if key[0] == REFERENCE]
        if len(refs) != 1 or not any(_is_design(key[0]) for key in finals):
            continue
        ref = finals[refs[0]]
        where = f"`{sec['preset']}`/`{sec['optimizer']}`{sec['title']}" + (f", lr {sec['lr']:g}" if sec["multi_lr"] else "")
        for key, mine in finals.items():
            if key[0] in ("linear", REFERENCE):
                continue
            seeds = sorted(set(mine) & set(ref))
            if not seeds:
                continue
            diffs = [mine[s]["val_loss"] - ref[s]["val_loss"] for s in seeds]
            p = paired_t_pvalue(diffs)
            rows.append({"label": label(*key), "reference": label(*refs[0]), "where": where, "seeds": seeds,
                         "diff": paired_ci(diffs), "diff_n": len(diffs), "p": None if math.isnan(p) else p, "p_holm": None,
                         "maxvio_diff": paired_ci([mine[s]["maxvio"] - ref[s]["maxvio"] for s in seeds])})
    return rows


def format_versus(rows: list[dict], diff_cell) -> str:
    """The "Against mpi" table; `diff_cell(row)` formats a Δ with its interval and Holm-adjusted p."""
    cols = ["where", "router", "vs", "seeds", "Δ val loss vs mpi [95% CI], p_Holm", "Δ MaxVio vs mpi [95% CI]"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        m = r["maxvio_diff"]
        maxvio = f"{m[0]:+.3f}" if math.isnan(m[1]) else f"{m[0]:+.3f} [{m[1]:+.3f}, {m[2]:+.3f}]"
        lines.append(f"| {r['where']} | {r['label']} | {r['reference']} | {len(r['seeds'])} | {diff_cell(r)} | {maxvio} |")
    return "\n".join(lines)


NOTES = """\
Against mpi: per-seed paired difference of the final whole-split validation loss (router − mpi, same seed =
same data and, for the parameters both share, the same initial weights), mean with a 95% paired t-interval;
negative = better than mpi. Each row is one comparison of the report's Holm family."""
