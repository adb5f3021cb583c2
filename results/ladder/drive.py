"""python results/ladder/drive.py [RUNG ...]   (default: every rung, bottom-up; needs `mpirouter` on PATH, e.g. .venv/bin)

Runs the scale ladder's plan (results/ladder/PLAN.md) stage by stage through results/ladder/run.sh: per rung,
the lr sweep with the plan's edge rule (a best lr at the grid's edge extends the grid by one factor of 2 in
that direction, both routers, both seeds, and the rule is applied again), then the test at each router's best
lr. `cpu-1.7m` sweeps each router over its `tiny` lr times 1/2, 1 and 2, one call per router. Everything
resumes: finished runs are skipped, so rerunning this after an interruption continues where it stopped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNGS = ("debug", "cpu-440k", "tiny", "cpu-1.7m")
GRID = {"debug": [0.003, 0.006, 0.012, 0.024], "cpu-440k": [0.003, 0.006, 0.012, 0.024], "tiny": [0.003, 0.006, 0.012]}


def run_sh(*args: str, **env: str) -> None:
    print(">> " + " ".join(f"{k}={v}" for k, v in env.items()) + " run.sh " + " ".join(args), flush=True)
    subprocess.run(["bash", str(HERE / "run.sh"), *args], env={**os.environ, **env}, check=True)


def best_lrs(rung: str) -> dict[str, float]:
    """Each router's best lr in the rung's sweep report (the sweep table's rule: lowest mean final loss among
    the lrs where no run diverged)."""
    report = json.loads((HERE / rung / "sweep" / "report.json").read_text())
    rows = {row["label"].split(" ")[0]: row for sweep in report["sweeps"] for row in sweep["rows"]}
    return {name: rows[name]["best_lr"] for name in ("linear", "mpi") if name in rows}


def sweep(rung: str, lrs: list[float], routers: str = "linear,mpi") -> dict[str, float]:
    """The rung's sweep, extended at an edge until each router's best lr is inside its grid."""
    lrs = sorted(lrs)
    while True:
        run_sh("sweep", rung, LRS=",".join(f"{x:g}" for x in lrs), ROUTERS=routers)
        best, extend = best_lrs(rung), set()
        for name in routers.split(","):
            if best[name] == lrs[0]:
                extend.add(lrs[0] / 2)
            if best[name] == lrs[-1]:
                extend.add(lrs[-1] * 2)
        print(f"{rung}: best lr {best}" + (f", extending the grid by {sorted(extend)}" if extend else ""), flush=True)
        if not extend:
            return best
        lrs = sorted(set(lrs) | extend)


def main(rungs: list[str]) -> int:
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown:
        print(f"drive.py: unknown rung {unknown[0]} (the plan's: {', '.join(RUNGS)})", file=sys.stderr)
        return 2
    for rung in rungs:
        if rung == "cpu-1.7m":
            below = best_lrs("tiny")
            best = {name: sweep(rung, [below[name] / 2, below[name], below[name] * 2], routers=name)[name] for name in ("linear", "mpi")}
        else:
            best = sweep(rung, GRID[rung])
        run_sh("confirm", rung, f"{best['linear']:g}", f"{best['mpi']:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(RUNGS)))
