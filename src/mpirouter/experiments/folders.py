"""What makes a folder a compare folder, and which report files in a folder are ours to replace.

A compare folder is recognised only by files `mpirouter compare` wrote itself: a `sessions/*.json` record
of a compare call, or the legacy `grid.json`. Any other non-empty folder is the user's: `compare` refuses to
train into it, and `--report-only` (which may pool the run folders under any folder) replaces only report
files that it wrote itself.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT, REPORT_JSON, GRID_FILE, SESSIONS = "report.md", "report.json", "grid.json", "sessions"
REPORT_TITLE = "# Router comparison: "
"""The first line of every report.md we write."""


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def is_session(record) -> bool:
    """Whether a parsed `sessions/*.json` is the record of a compare call (as `run_grid` writes it)."""
    return (isinstance(record, dict) and isinstance(record.get("command"), str)
            and record["command"].startswith("mpirouter compare") and isinstance(record.get("config"), dict))


def read_session_files(out: Path) -> list[dict]:
    """The compare calls recorded in `out/sessions/*.json`, oldest first (files of another shape are not ours)."""
    return [s for s in (_json(p) for p in sorted((Path(out) / SESSIONS).glob("*.json"))) if is_session(s)]


def legacy_grid(out: Path) -> dict | None:
    """The legacy grid.json (one file listing every call) when `out` has one of our shape."""
    grid = _json(Path(out) / GRID_FILE) if (Path(out) / GRID_FILE).is_file() else None
    return grid if isinstance(grid, dict) and isinstance(grid.get("sessions"), list) else None


def is_compare_folder(out: Path) -> bool:
    return Path(out).is_dir() and (legacy_grid(out) is not None or bool(read_session_files(out)))


def check_free_for_compare(out: Path) -> None:
    """FileExistsError unless `out` is absent, empty or a compare folder (a grid may train into it)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is an existing file, not a compare folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not is_compare_folder(out):
        raise FileExistsError(f"--out {out} exists, is not empty and is not a compare folder (no {SESSIONS}/*.json or "
                              f"{GRID_FILE} of mpirouter compare); choose another --out")


def _ours(path: Path) -> bool:
    """Whether an existing report output was written by `write_report` (its content says so)."""
    if not path.is_file():
        return False
    if path.name == REPORT:
        with open(path, "rb") as f:
            return f.readline().startswith(REPORT_TITLE.encode())
    if path.name == REPORT_JSON:
        summary = _json(path)
        return isinstance(summary, dict) and {"comparisons", "sections", "sweeps"} <= set(summary)
    with open(path, "rb") as f:  # a plot: matplotlib names itself in the PNG's header chunks
        head = f.read(512)
    return head.startswith(b"\x89PNG") and b"Matplotlib" in head


def check_outputs_ours(out: Path, names: list[str]) -> None:
    """FileExistsError if `out` is not a compare folder and one of the files `names` exists that we did not write."""
    out = Path(out)
    if is_compare_folder(out):
        return
    theirs = [n for n in names if (out / n).exists() and not _ours(out / n)]
    if theirs:
        more = f" (and {len(theirs) - 1} more of the report's file names)" if len(theirs) > 1 else ""
        raise FileExistsError(f"{out} is not a compare folder and its {theirs[0]}{more} was not written by mpirouter "
                              f"compare; move it away or choose another --out")
