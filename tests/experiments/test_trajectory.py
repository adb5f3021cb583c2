"""`mpirouter trajectory`: angles and alignment on constructed cases, then on a real grid's kept checkpoints."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from mpirouter.experiments.compare import CompareConfig, run_grid
from mpirouter.experiments.trajectory import (Snapshot, abs_cos, alignment_parts, angle_deg, find_runs, run_snapshots,
                                              table_steps, trajectory_series, write_trajectory)
from mpirouter.trainer.checkpoint import load_model
from mpirouter.trainer.data import DataConfig, prepare_data


def test_angles_are_sign_free_degrees():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[-2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    torch.testing.assert_close(abs_cos(a, b), torch.tensor([1.0, 0.0, 2 ** -0.5], dtype=torch.float64))
    torch.testing.assert_close(angle_deg(a, b), torch.tensor([0.0, 90.0, 45.0], dtype=torch.float64))


def rotating(theta: float) -> torch.Tensor:
    return torch.tensor([[[math.cos(theta), math.sin(theta)]]], dtype=torch.float64)


@pytest.mark.parametrize("mover", ["R", "v"])
def test_series_say_which_side_moved(mover):
    """R (or v) turns from 90° to 0° toward the other, which stays put: only the mover's drift grows."""
    fixed, snaps = rotating(0.0), []
    for i, theta in enumerate([math.pi / 2, math.pi / 4, 0.0]):
        moving = rotating(theta)
        r, v = (moving, fixed) if mover == "R" else (fixed, moving)
        snaps.append(Snapshot(i * 10, r, r, v))
    s = trajectory_series(snaps)
    assert s["step"] == [0, 10, 20]
    assert s["align_R"] == pytest.approx([0.0, 2 ** -0.5, 1.0])
    moved, still = ("drift_R", "drift_v") if mover == "R" else ("drift_v", "drift_R")
    assert s[moved] == pytest.approx([0.0, 45.0, 90.0]) and s[still] == pytest.approx([0.0, 0.0, 0.0])
    assert math.isnan(s["step_R"][0]) and s[f"step_{mover}"][1:] == pytest.approx([45.0, 45.0])
    reached = "R_to_v0" if mover == "R" else "v_to_R0"
    assert s[reached][-1] == pytest.approx(1.0)
    # the whole gain in alignment (0 -> 1) is credited to the side that moved
    assert s[f"from_{mover}"] == pytest.approx([0.0, 2 ** -0.5, 1.0])
    assert s["from_v" if mover == "R" else "from_R"] == pytest.approx([0.0, 0.0, 0.0])


def test_table_shows_doubling_steps_and_the_last():
    assert [[0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50][i] for i in table_steps([0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50])] == [0, 5, 10, 20, 40, 50]
    assert table_steps([0]) == [0] and table_steps([0, 2]) == [0, 1]


def test_alignment_parts_add_up_to_the_change_when_both_move():
    g = torch.Generator().manual_seed(0)
    r0, v0, r1, v1 = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(4))
    dr, dv = alignment_parts(r0, v0, r1, v1)
    torch.testing.assert_close(dr + dv, abs_cos(r1, v1) - abs_cos(r0, v0))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    full = prepare_data(DataConfig(), seq_len=32)
    data = dataclasses.replace(full, train_ids=full.train_ids[:100_000], val_ids=full.val_ids[:2048])
    out = tmp_path_factory.mktemp("traj") / "grid"
    cfg = CompareConfig(routers=["linear", "mpi", "mpi-inplace"], seeds=[0], preset="debug", steps=8, batch_size=8, lrs=[1e-2],
                        eval_every=4, eval_batches=2, ckpt_every=2, out_dir=str(out), progress=False,
                        overrides=["model.max_seq_len=32", "eval_batch_size=16", "ckpt_keep=100"])
    run_grid(cfg, data=data)
    return out


def test_every_kept_checkpoint_and_the_rebuilt_start_are_read(grid):
    run = grid / "debug" / "adamw-lr0.01" / "mpi-C1" / "seed0"
    cfg, snaps = run_snapshots(run)
    assert [s.step for s in snaps] == [0, 2, 4, 6, 8]
    model, _ = load_model(run)  # the last checkpoint: the last snapshot holds its weights
    assert torch.equal(snaps[-1].r_LED[0], model.moe_layers()[0].router.weight.double())
    series = trajectory_series(snaps)
    assert series["drift_R"][0] == 0 and series["drift_v"][0] == 0 and series["drift_R"][1] > 0


def test_report_per_router_and_the_mpi_rows_lead_their_raw_rows(grid, tmp_path):
    md = write_trajectory([str(grid)], tmp_path / "t", "mpirouter trajectory GRID --out T")
    summary = json.loads((tmp_path / "t" / "trajectory.json").read_text())["summary"]
    assert sorted(summary) == ["linear", "mpi C'=1", "mpi-inplace C'=1"] and all(s["seeds"] == [0] for s in summary.values())
    last = lambda router, key: summary[router][key][-1][0]  # noqa: E731
    assert last("mpi C'=1", "align_phi") > last("mpi C'=1", "align_R") and last("mpi C'=1", "align_phi") > last("linear", "align_phi")
    assert last("linear", "align_phi") == pytest.approx(last("linear", "align_R"))  # φ = R for a linear router
    text = md.read_text()
    assert "| mpi-inplace C'=1 (n=1) | 8 |" in text and (tmp_path / "t" / "trajectory.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_without_checkpoints_is_one_clear_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "mpirouter", "trajectory", str(tmp_path / "run"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "has no checkpoints" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def fake_grid(out, cells):
    """Run folders with configs only (what `find_runs` reads), two seeds per cell, and the session naming the axis."""
    (out / "sessions").mkdir(parents=True)
    (out / "sessions" / "s.json").write_text(json.dumps({"config": {"vary": {"model.moe.score_func": cells}}}))
    for cell in cells:
        for seed in (0, 1):
            run = out / cell / f"seed{seed}"
            run.mkdir(parents=True)
            config = {"preset": "debug", "seed": seed, "optim": {"name": "adamw", "lr": 0.01},
                      "model": {"moe": {"score_func": cell, "router": {"kind": "mpi", "scale_prime": 1.0, "target": "gate"}}}}
            (run / "config.json").write_text(json.dumps(config))
            (run / "metrics.jsonl").write_text("")
            (run / "checkpoints" / "step_0000002").mkdir(parents=True)  # named only: find_runs reads no weights


def test_runs_of_different_cells_are_never_pooled_as_seeds(tmp_path):
    fake_grid(tmp_path / "g", ["softmax", "sigmoid"])
    groups = {}
    for run, group in find_runs([str(tmp_path / "g")]):
        groups.setdefault(group, []).append(run.name)
    assert groups == {"mpi C'=1 [debug/adamw, lr 0.01, score_func=softmax]": ["seed0", "seed1"],
                      "mpi C'=1 [debug/adamw, lr 0.01, score_func=sigmoid]": ["seed0", "seed1"]}
    with pytest.raises(ValueError, match="differ in a setting other than the seed"):
        find_runs([str(tmp_path / "g" / "softmax" / "seed0"), str(tmp_path / "g" / "sigmoid" / "seed0")])
