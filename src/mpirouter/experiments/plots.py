"""Plotting: matplotlib when it is installed (the `plot` extra), nothing otherwise."""

from __future__ import annotations

from pathlib import Path

from ..common.files import replacing


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Write `fig` as a PNG and close it; a failed write (a full disk) leaves neither a truncated PNG nor its
    temporary file, and the old PNG, if any, stays as it was."""
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")  # the temporary name has no .png to infer the format from
    finally:
        pyplot().close(fig)
