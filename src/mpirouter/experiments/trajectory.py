"""Where router-expert alignment comes from: R turning toward G's top direction, or G's top direction turning toward R.

    mpirouter trajectory results/alignment-source --out results/alignment-source   # every run under a compare folder
    mpirouter trajectory runs/a runs/b --out runs/traj                               # or run folders

Reads every checkpoint of each run (keep them: `--set ckpt_keep=100` and `--ckpt-every 50`), plus the initial
weights rebuilt from the run's seed, and per checkpoint t, layer and expert i, with v_i the top right-singular
vector of the expert's power target (G_i by default) and R_i the raw router row:

- alignment |cos(R_t, v_t)| and |cos(φ_t, v_t)| (docs/method.md, eq. 9);
- drift since the start: angle(R_t, R_0) and angle(v_t, v_0), and per checkpoint interval: angle(R_t, R_t−1)
  and angle(v_t, v_t−1), all sign-free (v has no sign), in degrees;
- the two ways alignment could arise: |cos(R_t, v_0)| (R reaching where the top direction started) and
  |cos(v_t, R_0)| (the top direction reaching where R started);
- the change of |cos(R, v)| since step 0 split exactly into the part R's moves made and the part v's moves
  made: per checkpoint interval, the mean over both orders of moving one then the other (`alignment_parts`),
  summed over the intervals so far.

Means over layers and experts per run, then mean ± std over seeds per router. Writes trajectory.md,
trajectory.json and trajectory.png into --out (rebuilt outputs: those three names are replaced, nothing else).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common.config import from_dict
from ..common.files import atomic_write_text
from ..common.provenance import describe, environment
from ..core.model import MoELM
from ..core.routers import ROW_KINDS, concat_rows, select_target, top_singular_directions
from ..trainer.checkpoint import load_model_tensors, load_checkpoint, step_folders
from ..trainer.config import TrainConfig
from ..trainer.loop import build_model
from .plots import pyplot
from .report import RunRecord, cell_text, discover_runs, read_sessions, variant_label, vary_keys
from .stats import mean_std

OUTPUTS = ("trajectory.md", "trajectory.json", "trajectory.png")
SERIES = ("align_R", "align_phi", "drift_R", "drift_v", "step_R", "step_v", "R_to_v0", "v_to_R0", "from_R", "from_v")
"""Per-checkpoint means, in the order of the module docstring."""


# ----------------------------------------------------------------------------- pure functions


def abs_cos(a_ED: torch.Tensor, b_ED: torch.Tensor) -> torch.Tensor:
    """|cos| between matching rows, shape (E,): sign-free, as singular vectors have no sign."""
    a_ED, b_ED = a_ED.detach().double(), b_ED.detach().double()
    return ((a_ED * b_ED).sum(-1) / (a_ED.norm(dim=-1) * b_ED.norm(dim=-1)).clamp_min(1e-300)).abs()


def angle_deg(a_ED: torch.Tensor, b_ED: torch.Tensor) -> torch.Tensor:
    """Sign-free angle between matching rows in degrees, shape (E,): arccos |cos| in [0, 90], computed as
    2·atan2(‖â − s·b̂‖, ‖â + s·b̂‖) with s = sign(â·b̂), which stays exact near 0° where arccos does not."""
    a_ED = a_ED.detach().double() / a_ED.detach().double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    b_ED = b_ED.detach().double() / b_ED.detach().double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    s_E1 = torch.where((a_ED * b_ED).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(a_ED)
    return torch.rad2deg(2 * torch.atan2((a_ED - s_E1 * b_ED).norm(dim=-1), (a_ED + s_E1 * b_ED).norm(dim=-1)))


def alignment_parts(r0_ED: torch.Tensor, v0_ED: torch.Tensor, r1_ED: torch.Tensor, v1_ED: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much of a(r1, v1) − a(r0, v0), a = |cos|, comes from r moving and how much from v moving, shape (E,) each.

    Each part is the mean over the two orders (move r first, or v first) of that move's change, so the parts
    add up to the whole change exactly, and a move that changes nothing gets 0 in both orders.
    """
    a = abs_cos
    from_r = 0.5 * ((a(r1_ED, v0_ED) - a(r0_ED, v0_ED)) + (a(r1_ED, v1_ED) - a(r0_ED, v1_ED)))
    from_v = 0.5 * ((a(r0_ED, v1_ED) - a(r0_ED, v0_ED)) + (a(r1_ED, v1_ED) - a(r1_ED, v0_ED)))
    return from_r, from_v


@dataclass
class Snapshot:
    """One checkpoint's router rows and top directions, each (layers, E, D) float64."""

    step: int
    r_LED: torch.Tensor
    phi_LED: torch.Tensor
    v_LED: torch.Tensor


@torch.no_grad()
def snapshot(model: MoELM, step: int) -> Snapshot:
    rs, phis, vs = [], [], []
    kind = model.config.moe.router.kind
    if kind not in ROW_KINDS:
        raise ValueError(f"trajectory follows router rows φ against the experts; a {kind!r} router has none")
    for moe in model.moe_layers():
        mats = select_target(moe.router.config.target, moe.w_gate, moe.w_up)
        rs.append(moe.router.weight.detach().double())
        phis.append(moe.router.rows(moe.w_gate, moe.w_up).detach().double())
        vs.append(top_singular_directions(concat_rows(*mats)).double())
    return Snapshot(step, torch.stack(rs), torch.stack(phis), torch.stack(vs))


def trajectory_series(snaps: list[Snapshot]) -> dict[str, list[float]]:
    """The SERIES at every snapshot (means over layers and experts); interval drifts are NaN at the first one."""
    first = snaps[0]
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  (layers·E, D)
    out: dict[str, list[float]] = {"step": [s.step for s in snaps], **{k: [] for k in SERIES}}
    from_r = from_v = torch.zeros(flat(first.r_LED).shape[0], dtype=torch.float64)
    for i, s in enumerate(snaps):
        prev = snaps[i - 1] if i else None
        if prev is not None:
            dr, dv = alignment_parts(flat(prev.r_LED), flat(prev.v_LED), flat(s.r_LED), flat(s.v_LED))
            from_r, from_v = from_r + dr, from_v + dv
        values = {
            "align_R": abs_cos(flat(s.r_LED), flat(s.v_LED)), "align_phi": abs_cos(flat(s.phi_LED), flat(s.v_LED)),
            "drift_R": angle_deg(flat(s.r_LED), flat(first.r_LED)), "drift_v": angle_deg(flat(s.v_LED), flat(first.v_LED)),
            "step_R": angle_deg(flat(s.r_LED), flat(prev.r_LED)) if prev else None,
            "step_v": angle_deg(flat(s.v_LED), flat(prev.v_LED)) if prev else None,
            "R_to_v0": abs_cos(flat(s.r_LED), flat(first.v_LED)), "v_to_R0": abs_cos(flat(s.v_LED), flat(first.r_LED)),
            "from_R": from_r, "from_v": from_v,
        }
        for k in SERIES:
            out[k].append(math.nan if values[k] is None else values[k].mean().item())
    return out


# ----------------------------------------------------------------------------- runs


def run_snapshots(run_dir: Path) -> tuple[TrainConfig, list[Snapshot]]:
    """The initial weights (rebuilt from the seed, as `train` builds them) and every kept checkpoint of a run."""
    folders = step_folders(run_dir / "checkpoints")
    if not folders:
        raise FileNotFoundError(f"{run_dir} has no checkpoints; train with --set ckpt_keep=100 to keep them")
    saved, _, _ = load_checkpoint(folders[0], with_state=False, weights=False)
    cfg = from_dict(TrainConfig, saved)
    model = build_model(cfg, cfg.model.vocab_size, torch.device("cpu"))
    snaps = [snapshot(model, 0)]
    for folder in folders:
        _, tensors, _ = load_checkpoint(folder, with_state=False)
        load_model_tensors(model, tensors)
        snaps.append(snapshot(model, int(folder.name.split("_")[-1])))
    return cfg, snaps


def find_runs(paths: list[str]) -> list[tuple[Path, str]]:
    """(run folder, group) for each path holding config.json, else for every run folder under it. A group is
    one row of the summary: the router variant, plus preset, optimizer, lr and `--vary` cell where runs differ
    in them (runs of one group differ only in their seed). Runs under a folder whose router has no rows are left out."""
    found: list[tuple[RunRecord, tuple]] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"no such run or folder: {p}")
        if (p / "config.json").is_file():
            if not step_folders(p / "checkpoints"):
                raise FileNotFoundError(f"{p} has no checkpoints; train with --set ckpt_keep=100 to keep them")
            found.append((RunRecord(p, json.loads((p / "config.json").read_text()), []), ()))
        else:
            keys = vary_keys(read_sessions(p))
            # routers without rows (cosine, kmeans, aoe) have no trajectory of R and φ to follow
            found += [(r, r.cell(keys)) for r in discover_runs(p) if r.config["model"]["moe"]["router"]["kind"] in ROW_KINDS]
    if not found:
        raise FileNotFoundError(f"no run folders under {', '.join(paths)}")
    contexts = {r.run_dir: (r.config.get("preset", "?"), r.config["optim"]["name"], r.config["optim"].get("lr"), cell)
                for r, cell in found}
    differ = len(set(contexts.values())) > 1
    out = []
    for r, cell in found:
        preset, optim, lr, _ = contexts[r.run_dir]
        parts = [f"{preset}/{optim}", *([f"lr {lr:g}"] if lr is not None else []), *([cell_text(cell)] if cell else [])]
        out.append((r.run_dir, variant_label(*r.variant) + (f" [{', '.join(parts)}]" if differ else "")))
    seen: dict[tuple, Path] = {}
    for (run_dir, group), (r, _) in zip(out, found):
        other = seen.setdefault((group, r.config.get("seed")), run_dir)
        if other != run_dir:
            raise ValueError(f"{other} and {run_dir} are both {group} seed {r.config.get('seed')}: they differ in a setting "
                             f"other than the seed; measure them in separate calls")
    return out


def summarize(per_run: list[dict]) -> dict[str, dict]:
    """Per group (`find_runs`): mean and std over seeds of every series at every step the group's runs share."""
    by_router: dict[str, list[dict]] = {}
    for r in per_run:
        by_router.setdefault(r["router"], []).append(r)
    out = {}
    for router, runs in by_router.items():
        steps = sorted(set.intersection(*(set(r["series"]["step"]) for r in runs)))
        summary = {"seeds": sorted(r["seed"] for r in runs), "step": steps}
        for k in SERIES:
            at = [[r["series"][k][r["series"]["step"].index(s)] for r in runs] for s in steps]
            summary[k] = [mean_std(v) if not math.isnan(v[0]) else (math.nan, math.nan) for v in at]
        out[router] = summary
    return out


def table_steps(steps: list[int]) -> list[int]:
    """Indices of the steps a table shows: the first, then doubling step counts from the first kept checkpoint
    (s₁, 2s₁, 4s₁, ...: early moves are fast, late ones slow), and the last."""
    picks, target = {0, len(steps) - 1}, steps[1] if len(steps) > 1 else 0
    while len(steps) > 1 and target <= steps[-1]:
        picks.add(next(i for i, st in enumerate(steps) if st >= target))
        target *= 2
    return sorted(picks)


def format_table(summary: dict[str, dict]) -> str:
    """Markdown: one row per group and shown step (`table_steps`), mean ± std over seeds."""
    cols = ["router", "step", "align R", "align φ", "Δ align R from R's moves", "from v's moves", "angle(R, R₀)°", "angle(v, v₀)°",
            "|cos(R, v₀)|", "|cos(v, R₀)|"]
    keys = ["align_R", "align_phi", "from_R", "from_v", "drift_R", "drift_v", "R_to_v0", "v_to_R0"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for router, s in summary.items():
        for i in table_steps(s["step"]):
            cells = [f"{s[k][i][0]:.3f} ± {s[k][i][1]:.3f}" if "drift" not in k else f"{s[k][i][0]:.1f} ± {s[k][i][1]:.1f}" for k in keys]
            lines.append(f"| {router} (n={len(s['seeds'])}) | {s['step'][i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("alignment with the current top direction v (φ solid, R dashed)", [("align_phi", "-"), ("align_R", "--")], "|cos|"),
              ("drift since step 0 (R solid, v dashed)", [("drift_R", "-"), ("drift_v", "--")], "degrees"),
              ("change of |cos(R, v)| since step 0 made by R's moves (solid) and by v's moves (dashed)",
               [("from_R", "-"), ("from_v", "--")], "Δ|cos|"),
              ("|cos(R, v₀)| solid: R reaches v's start; |cos(v, R₀)| dashed: v reaches R's start", [("R_to_v0", "-"), ("v_to_R0", "--")], "|cos|")]
    colors = {router: plt.get_cmap("tab10")(i) for i, router in enumerate(summary)}
    for ax, (title, series, ylabel) in zip(axes.flat, panels):
        for router, s in summary.items():
            for key, style in series:
                m = [v[0] for v in s[key]]
                sd = [0.0 if math.isnan(v[1]) else v[1] for v in s[key]]
                ax.plot(s["step"], m, style, color=colors[router], label=router if style == "-" else None, marker="o", ms=2)
                ax.fill_between(s["step"], [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=colors[router], alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("source of router-expert alignment: mean over layers and experts, ± std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_trajectory(paths: list[str], out: str | Path, command: str) -> Path:
    """Measure every run under `paths` and write the three outputs into `out`; returns trajectory.md."""
    out = Path(out)
    per_run = []
    for run_dir, group in find_runs(paths):
        cfg, snaps = run_snapshots(run_dir)
        per_run.append({"run": str(run_dir), "router": group, "seed": cfg.seed, "series": trajectory_series(snaps)})
    summary = summarize(per_run)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    has_plot = plot(summary, out / OUTPUTS[2])
    lines = ["# Source of router-expert alignment", "", f"- `{command}` · {describe(env)}", "",
             "Mean over layers and experts, then mean ± std over seeds. v: the top right-singular vector of each",
             "expert's power target; angles are sign-free, in degrees; step 0 is the initial weights (rebuilt from the seed).", "",
             format_table(summary), ""]
    lines += [f"![trajectory]({OUTPUTS[2]})", ""] if has_plot else []
    atomic_write_text(out / OUTPUTS[1], json.dumps({"command": command, "env": env, "summary": summary, "runs": per_run}, indent=1))
    atomic_write_text(out / OUTPUTS[0], "\n".join(lines))
    return out / OUTPUTS[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", help="run folders, or compare folders (every run under them)")
    p.add_argument("--out", required=True, help="folder for trajectory.md, .json and .png (those three are replaced)")


def cli_main(args: argparse.Namespace) -> int:
    command = " ".join(["mpirouter", "trajectory", *args.paths, "--out", args.out])
    print(f"trajectory: {write_trajectory(args.paths, args.out, command)}")
    return 0
