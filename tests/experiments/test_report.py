"""Report numbers by hand: the per-section table, the lr-sweep table (each router at its own best lr), one
estimator per validation curve, the paired per-seed speed-up and the Holm adjustment across a report."""

import json
import math
from pathlib import Path

import pytest

from mpirouter.experiments.report import (
    MARK,
    _diff_cell,
    RunRecord,
    adjust_comparisons,
    eval_curve,
    estimator_title,
    format_rows,
    multiplicity_line,
    summarize_section,
    summarize_sweep,
)
from mpirouter.experiments.stats import paired_ci, ratio_ci
from mpirouter.experiments.sweeps import format_sweep


def fake_run(router, seed, curve, step_ms=10.0, router_ms=0.1, scale=1.0, eval_batches=None, prefix=None):
    """A finished run record: evals at 100, 200, ... tokens with the given validation losses (the last is the final
    whole-split eval). With `eval_batches`, the periodic evals are capped and `prefix` (if given) is the final
    eval's `val_loss_prefix`; without `prefix` the run looks like one trained before that key existed."""
    steps = 4 * len(curve)
    evals = [{"event": "eval", "step": 4 * (i + 1), "tokens": 100 * (i + 1), "val_loss": v, "maxvio": 0.1, "align": 0.5,
              "align_raw": 0.4, "align_layers": [0.4, 0.6], "align_raw_layers": [0.3, 0.5]} for i, v in enumerate(curve)]
    if prefix is not None:
        evals[-1].update(val_loss_prefix=prefix, maxvio_prefix=0.2, val_scope="whole")
    config = {"seed": seed, "steps": steps, "eval_batches": eval_batches,
              "model": {"moe": {"router": {"kind": router, "scale_prime": scale}}}}
    return RunRecord(Path(f"{router}/seed{seed}"), config, [*evals, {"event": "timing", "step": steps, "step_ms": step_ms, "router_ms": router_ms}])


def test_summary_numbers_by_hand():
    runs = [fake_run("linear", 0, [4.0, 3.0], 10.0, 0.1), fake_run("linear", 1, [4.2, 3.2], 10.0, 0.1),
            fake_run("mpi", 0, [3.0, 2.9], 11.0, 0.5), fake_run("mpi", 1, [3.4, 3.0], 11.0, 0.5),
            fake_run("retract", 0, [3.6, 3.5], 10.0, 0.2)]
    rows = {r["label"]: r for r in summarize_section(runs)}
    assert list(rows) == ["linear", "mpi C'=1", "retract C'=1"]
    lin, mpi, ret = rows["linear"], rows["mpi C'=1"], rows["retract C'=1"]
    assert lin["diff"] is None and lin["speedup"] is None and lin["p"] is None
    # diffs -0.1, -0.2: mean -0.15, sd 0.0707, n=2 -> ± 12.706 * 0.0707 / sqrt(2)
    half = 12.706204736 * math.sqrt(0.005) / math.sqrt(2)
    assert mpi["diff"] == (pytest.approx(-0.15), pytest.approx(-0.15 - half), pytest.approx(-0.15 + half))
    # t = -0.15 / 0.05 = -3 on 1 df (Cauchy): p = 1 - 2·atan(3)/π
    assert mpi["p"] == pytest.approx(1 - 2 * math.atan(3) / math.pi, abs=1e-9) and mpi["p_holm"] is None
    # seed 0: target 3.0 (linear at 200 tokens), mpi is at 3.0 already at 100 -> ratio 2
    # seed 1: target 3.2, mpi's 3.4 -> 3.0 crosses it at 100 + 0.2/0.4·100 = 150 -> ratio 200/150
    sp = mpi["speedup"]
    assert [sp["per_seed"][s]["tokens"] for s in (0, 1)] == [pytest.approx(100), pytest.approx(150)]
    assert sp["ratio"] == pytest.approx(ratio_ci([2.0, 4 / 3])) and sp["ratio"][0] == pytest.approx(math.sqrt(8 / 3))
    assert (sp["n"], sp["reached"], sp["not_reached"], sp["lacking"]) == (2, 2, [], [])
    assert mpi["overhead"] == pytest.approx(0.5 / 11) and mpi["step_vs_linear"] == pytest.approx(1.1)
    assert ret["speedup"]["ratio"] is None and ret["speedup"]["not_reached"] == [0]  # counted, not dropped
    assert ret["diff_n"] == 1 and math.isnan(ret["diff"][1]) and ret["p"] is None
    table = format_rows(list(rows.values()))
    assert "-0.1500 [" in table and "1.633× [" in table and "(2/2 reached)" in table and "4.55%" in table
    assert "– (0/1 reached; 1 not reached)" in table and "(n=1, no CI)" in table
    assert "p_Holm" not in table.split("\n", 2)[2]  # not adjusted yet: no p shown rather than an unadjusted one


def test_speedup_compares_like_with_like_on_capped_runs():
    # periodic evals capped; the final whole-split value (2.9) reads lower than the prefix estimator (3.1)
    lin = fake_run("linear", 0, [3.5, 2.9], eval_batches=16, prefix=3.1)
    mpi = fake_run("mpi", 0, [3.3, 2.85], eval_batches=16, prefix=3.0)
    rows = {r["label"]: r for r in summarize_section([lin, mpi])}
    sp = rows["mpi C'=1"]["speedup"]
    # target = linear's final PREFIX value 3.1; mpi's prefix curve 3.3 -> 3.0 crosses it at 100 + 0.2/0.3·100
    assert sp["per_seed"][0]["target"] == 3.1 and sp["per_seed"][0]["tokens"] == pytest.approx(100 + 200 / 3)
    assert sp["ratio"][0] == pytest.approx(200 / (100 + 200 / 3))
    assert rows["mpi C'=1"]["diff"][0] == pytest.approx(-0.05)  # Δ stays on the whole split


def test_old_capped_runs_without_the_final_prefix_eval_get_no_speedup():
    runs = [fake_run("linear", s, [3.5, 3.0, 2.9], eval_batches=16) for s in (0, 1)] + \
           [fake_run("mpi", s, [3.4, 2.9, 2.8], eval_batches=16) for s in (0, 1)]
    rows = {r["label"]: r for r in summarize_section(runs)}
    sp = rows["mpi C'=1"]["speedup"]
    assert sp["per_seed"] == {} and sp["lacking"] == [0, 1] and sp["ratio"] is None
    assert "n/a: runs lack the final prefix eval" in format_rows(list(rows.values()))
    assert rows["mpi C'=1"]["diff"][0] == pytest.approx(-0.1)  # the final whole-split Δ is unaffected


CURVES = [
    ("uncapped-whole-everywhere", dict(eval_batches=None), "val_loss", [3.0, 2.0, 1.0], "whole", True),
    ("capped-final-prefix", dict(eval_batches=16, prefix=1.5), "val_loss", [3.0, 2.0, 1.5], "prefix", True),
    ("capped-old-run-ends-early", dict(eval_batches=16), "val_loss", [3.0, 2.0], "prefix", False),
    ("capped-maxvio-prefix", dict(eval_batches=16, prefix=1.5), "maxvio", [0.1, 0.1, 0.2], "prefix", True),
]


@pytest.mark.parametrize("kw,key,values,scope,has_final", [c[1:] for c in CURVES], ids=[c[0] for c in CURVES])
def test_eval_curve_uses_one_estimator_at_every_point(kw, key, values, scope, has_final):
    run = fake_run("linear", 0, [3.0, 2.0, 1.0], **kw)
    curve = eval_curve(run.config, run.records, key)
    assert curve.values == values and curve.tokens == [100, 200, 300][:len(values)]
    assert (curve.scope, curve.has_final) == (scope, has_final)


def test_estimator_titles_name_the_estimator():
    new, old = fake_run("linear", 0, [3.0, 2.0], eval_batches=16, prefix=2.1), fake_run("linear", 0, [3.0, 2.0], eval_batches=16)
    assert estimator_title([new.curve()]) == "first 16 batches, every point"
    assert "curves end at the last periodic eval" in estimator_title([new.curve(), old.curve()])
    assert estimator_title([fake_run("mpi", 0, [3.0]).curve()]) == "whole validation split, every point"


def test_holm_across_rows_marks_only_survivors():
    # p = 0.01, 0.04, 0.03, 0.005 (Holm by hand: 0.03, 0.06, 0.06, 0.02); one row without a test
    rows = [{"label": f"r{i}", "diff": (-0.1, -0.2, 0.0), "diff_n": 3, "p": p, "p_holm": None}
            for i, p in enumerate([0.01, None, 0.04, 0.03, 0.005])]
    assert adjust_comparisons(rows) == 4
    assert [r["p_holm"] for r in rows] == [pytest.approx(0.03), None, pytest.approx(0.06), pytest.approx(0.06), pytest.approx(0.02)]
    table = format_sweep([{**r, "by_lr": {1.0: [3.0, 0.1, 3]}, "best_lr": 1.0} for r in rows], _diff_cell)
    assert f"p_Holm=0.03 {MARK}" in table and f"p_Holm=0.02 {MARK}" in table and "p_Holm=0.06 |" in table
    assert "no test (zero variance)" in table
    line = multiplicity_line(4, ["r0", "r4"], 1)
    assert line.startswith("This report makes 4 paired comparisons against linear; 'significant' below means "
                           "Holm-adjusted p < 0.05 across all 4.") and f"({MARK}): r0; r4." in line and "1 more" in line
    assert "No comparison is significant." in multiplicity_line(2, [], 0)


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
    assert mpi["p"] == pytest.approx(0.5, abs=1e-9)  # t = -0.05 / (0.0707/√2) = -1 on 1 df: p = 1 - 2·atan(1)/π
    assert ret["diff_n"] == 1 and ret["diff"][0] == pytest.approx(0.6) and math.isnan(ret["diff"][1])
    table = format_sweep(list(rows.values()), _diff_cell)
    assert "| router | lr 1 | lr 2 | best lr |" in table
    assert "**3.0000 ± 0.1414 (n=2)**" in table  # linear's best cell is bold
    assert "| retract C'=1 | **3.5000 ± 0.0000 (n=1)** | – | 1 | +0.6000 (n=1, no CI) |" in table
    assert "-0.0500 [" in table


def test_sweep_without_a_linear_run_says_so():
    rows = summarize_sweep({1.0: [fake_run("mpi", 0, [9.0, 3.0])], 2.0: [fake_run("mpi", 0, [9.0, 2.0])]})
    assert rows[0]["best_lr"] == 2.0 and rows[0]["diff"] is None
    assert "no linear run" in format_sweep(rows, _diff_cell)


# ----------------------------------------------------------------------------- runs that may not be pooled


def write_run(folder, router, seed, losses, steps):
    """A finished run folder as `mpirouter compare` leaves it: config.json, metrics.jsonl with evals at steps/2 and steps."""
    from mpirouter.common.config import to_dict
    from mpirouter.experiments.compare import CompareConfig, run_config

    cfg = CompareConfig(routers=[router], seeds=[seed], preset="debug", steps=steps, batch_size=8, lrs=[1e-2], eval_batches=None,
                        out_dir=str(folder), progress=False)
    config = run_config(cfg, router, seed, "adamw", None if router == "linear" else 1.0, 1e-2)
    run_dir = Path(config.out_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(config)))
    evals = [{"event": "eval", "step": s, "tokens": 100 * s, "val_loss": v, "maxvio": 0.1, "align": 0.5, "align_raw": 0.4,
              "align_layers": [0.4, 0.6], "align_raw_layers": [0.3, 0.5]} for s, v in zip((steps // 2, steps), losses)]
    records = [{"event": "start", "step": 0, "world_size": 1}, *evals, {"event": "timing", "step": steps, "step_ms": 10.0, "router_ms": 0.1}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.fixture
def no_plots(monkeypatch):
    from mpirouter.experiments import report

    monkeypatch.setattr(report, "pyplot", lambda: None)


def test_runs_with_other_steps_get_their_own_section_named_by_the_difference(tmp_path, no_plots):
    from mpirouter.experiments.report import write_report

    for grid, steps, base in (("long", 60, 2.0), ("short", 40, 3.0)):
        for seed in (0, 1):
            write_run(tmp_path / "mix" / grid, "linear", seed, [base + 1, base + 0.1 * seed], steps)
            write_run(tmp_path / "mix" / grid, "mpi", seed, [base + 1, base - 0.1 + 0.1 * seed], steps)
    text = write_report(tmp_path / "mix").read_text()
    lines = text.splitlines()
    titles = [i for i, line in enumerate(lines) if line.startswith("## ")]
    assert [lines[i] for i in titles] == ["## preset `debug`, optimizer `adamw`, steps=40, schedule.warmup_steps=4",
                                          "## preset `debug`, optimizer `adamw`, steps=60, schedule.warmup_steps=6"]
    assert [lines[i + 2].split(" × ")[0] for i in titles] == ["40 steps", "60 steps"]  # each header is its own runs'
    sections = json.loads((tmp_path / "mix" / "report.json").read_text())["sections"]
    assert [s["differs"] for s in sections] == [{"steps": 40, "schedule.warmup_steps": 4}, {"steps": 60, "schedule.warmup_steps": 6}]
    assert [[r["val_loss"][0] for r in s["rows"]] for s in sections] == [[pytest.approx(3.05), pytest.approx(2.95)],
                                                                        [pytest.approx(2.05), pytest.approx(1.95)]]
    assert [s["rows"][1]["diff_n"] for s in sections] == [2, 2]  # paired within its section only


def test_two_runs_of_one_variant_and_seed_are_refused_naming_both_folders(tmp_path, no_plots):
    from mpirouter.experiments.report import write_report

    first = write_run(tmp_path / "mix" / "a", "mpi", 0, [3.0, 2.0], 40)
    copy = write_run(tmp_path / "mix" / "b", "mpi", 0, [3.0, 2.5], 40)
    with pytest.raises(ValueError, match="are both mpi C'=1 seed 0 with the same config") as e:
        write_report(tmp_path / "mix")
    assert str(first) in str(e.value) and str(copy) in str(e.value)
    assert not (tmp_path / "mix" / "report.md").exists()
