"""The lr sweep of a compare report: a table of each router's final loss at every lr with its best lr, and a plot.

`report.summarize_sweep` makes the rows (and their Δ against linear at its best lr, one Holm comparison each).
"""

from __future__ import annotations

from pathlib import Path

from .plots import pyplot, save_figure
from .stats import MARK


def format_sweep(rows: list[dict], diff_cell) -> str:
    """The sweep's markdown table (best lr of each row in bold); `diff_cell(row)` formats its Δ."""
    lrs = sorted({lr for r in rows for lr in r["by_lr"]})
    lines = ["| router | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | Δ vs linear, each at its best lr [95% CI], p_Holm |",
             "|" + "---|" * (len(lrs) + 3)]
    for r in rows:
        cells = []
        for lr in lrs:
            m, sd, n = r["by_lr"].get(lr, (None, None, 0))
            text = "–" if m is None else f"{m:.4f} ± {sd:.4f} (n={n})"
            if r.get("diverged", {}).get(lr):
                text += f", {r['diverged'][lr]} diverged"
            cells.append(f"**{text}**" if lr == r["best_lr"] else text)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['best_lr']:g} | {diff_cell(r)} |")
    return "\n".join(lines)


SWEEP_NOTES = f"""\
Cells: final validation loss, mean ± std over seeds, at each peak lr (same steps and tokens for every
cell); "k diverged": runs stopped on a non-finite loss, left out of the mean. Each router's best lr (bold) is
the one with the lowest mean among the lrs where no run diverged; Δ pairs each seed of that router at
its best lr with the same seed of linear at linear's best lr (95% paired t-interval, unadjusted; p_Holm
and {MARK} as in the section tables, adjusted over all N comparisons of the report). Picking the best of
several settings on the same seeds is optimistic, and a router swept over more settings (several C') gets
more picks; read a lone C' row as the fair one-for-one comparison."""


def sweep_plot(rows: list[dict], out: Path, stem: str) -> list[str]:
    """The sweep plot (final loss against lr per router) as `{stem}-lr_sweep.png`; its file names ([] without matplotlib)."""
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
    save_figure(fig, out / name)
    return [name]
