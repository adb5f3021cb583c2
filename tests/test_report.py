"""Report numbers by hand: the per-section table and the lr-sweep table (each router at its own best lr)."""

import math
from pathlib import Path

import pytest

from mpirouter.report import RunRecord, format_rows, format_sweep, summarize_section, summarize_sweep
from mpirouter.stats import paired_ci


def fake_run(router, seed, curve, step_ms=10.0, router_ms=0.1, scale=1.0):
    """A finished run record: evals at 100 and 200 tokens with the given validation losses."""
    evals = [{"event": "eval", "step": 4 * (i + 1), "tokens": 100 * (i + 1), "val_loss": v, "maxvio": 0.1, "align": 0.5,
              "align_raw": 0.4, "align_layers": [0.4, 0.6], "align_raw_layers": [0.3, 0.5]} for i, v in enumerate(curve)]
    config = {"seed": seed, "steps": 8, "model": {"moe": {"router": {"kind": router, "scale_prime": scale}}}}
    return RunRecord(Path(f"{router}/seed{seed}"), config, [*evals, {"event": "timing", "step": 8, "step_ms": step_ms, "router_ms": router_ms}])


def test_summary_numbers_by_hand():
    runs = [fake_run("linear", 0, [4.0, 3.0], 10.0, 0.1), fake_run("linear", 1, [4.2, 3.2], 10.0, 0.1),
            fake_run("mpi", 0, [3.0, 2.9], 11.0, 0.5), fake_run("mpi", 1, [3.4, 3.0], 11.0, 0.5),
            fake_run("retract", 0, [3.6, 3.5], 10.0, 0.2)]
    rows = {r["label"]: r for r in summarize_section(runs)}
    assert list(rows) == ["linear", "mpi C'=1", "retract C'=1"]
    lin, mpi, ret = rows["linear"], rows["mpi C'=1"], rows["retract C'=1"]
    assert lin["diff"] is None and lin["tokens_to_target"] == pytest.approx(200) and lin["speedup"] == pytest.approx(1.0)
    # diffs -0.1, -0.2: mean -0.15, sd 0.0707, n=2 -> ± 12.706 * 0.0707 / sqrt(2)
    half = 12.706204736 * math.sqrt(0.005) / math.sqrt(2)
    assert mpi["diff"] == (pytest.approx(-0.15), pytest.approx(-0.15 - half), pytest.approx(-0.15 + half))
    # target = linear's final mean 3.1; mpi's mean curve (3.2, 2.95) crosses it at 100 + 0.1/0.25 * 100 = 140 tokens
    assert mpi["tokens_to_target"] == pytest.approx(140) and mpi["speedup"] == pytest.approx(200 / 140)
    assert mpi["overhead"] == pytest.approx(0.5 / 11) and mpi["step_vs_linear"] == pytest.approx(1.1)
    assert ret["tokens_to_target"] is None and ret["speedup"] is None and ret["diff_n"] == 1 and math.isnan(ret["diff"][1])
    table = format_rows(list(rows.values()))
    assert "-0.1500 [" in table and "1.429×" in table and "4.55%" in table
    assert "not reached / 0.2k" in table and "(n=1, no CI)" in table


def test_sweep_compares_each_router_at_its_own_best_lr():
    # linear is best at lr 2 (mean 3.0), mpi at lr 1 (mean 2.95); retract has only lr 1 and no seed 1
    finals = {1.0: {"linear": [3.2, 3.4], "mpi": [2.9, 3.0], "retract": [3.5]}, 2.0: {"linear": [2.9, 3.1], "mpi": [3.0, 3.3]}}
    by_lr = {lr: [fake_run(router, seed, [9.0, v]) for router, vs in per.items() for seed, v in enumerate(vs)]
             for lr, per in finals.items()}
    rows = {r["label"]: r for r in summarize_sweep(by_lr)}
    assert list(rows) == ["linear", "mpi C'=1", "retract C'=1"]
    lin, mpi, ret = rows["linear"], rows["mpi C'=1"], rows["retract C'=1"]
    assert lin["best_lr"] == 2.0 and mpi["best_lr"] == 1.0 and ret["best_lr"] == 1.0
    assert lin["by_lr"][1.0][:2] == [pytest.approx(3.3), pytest.approx(math.sqrt(0.02))] and lin["by_lr"][1.0][2] == 2
    assert lin["diff"] is None
    # mpi@1 minus linear@2, seed by seed: (2.9 - 2.9, 3.0 - 3.1)
    assert mpi["diff"] == pytest.approx(paired_ci([0.0, -0.1])) and mpi["diff_n"] == 2
    assert ret["diff_n"] == 1 and ret["diff"][0] == pytest.approx(0.6) and math.isnan(ret["diff"][1])
    table = format_sweep(list(rows.values()))
    assert "| router | lr 1 | lr 2 | best lr |" in table
    assert "**3.0000 ± 0.1414 (n=2)**" in table  # linear's best cell is bold
    assert "| retract C'=1 | **3.5000 ± 0.0000 (n=1)** | – | 1 | +0.6000 (n=1, no CI) |" in table
    assert "-0.0500 [" in table


def test_sweep_without_a_linear_run_says_so():
    rows = summarize_sweep({1.0: [fake_run("mpi", 0, [9.0, 3.0])], 2.0: [fake_run("mpi", 0, [9.0, 2.0])]})
    assert rows[0]["best_lr"] == 2.0 and rows[0]["diff"] is None
    assert "no linear run" in format_sweep(rows)
