"""experiments/cells.py: a `--vary` cell against its key's first value, per router, paired over seeds (by hand)."""

import json

import pytest

from mpirouter.experiments.stats import paired_ci, paired_t_pvalue

from test_report import write_run

LOSS = {("fp32", "linear"): [2.00, 2.10, 2.05], ("bf16", "linear"): [2.01, 2.12, 2.05],
        ("fp32", "mpi"): [1.90, 2.00, 1.97], ("bf16", "mpi"): [1.93, 2.00, 1.98]}
STEP_MS = {"fp32": 10.0, "bf16": 25.0}


@pytest.fixture
def grid(tmp_path, monkeypatch):
    from mpirouter.experiments import report

    monkeypatch.setattr(report, "pyplot", lambda: None)
    out = tmp_path / "precision"
    for (precision, router), losses in LOSS.items():
        for seed, loss in enumerate(losses):
            run = write_run(out / precision, router, seed, [loss + 1, loss], steps=40)
            config = json.loads((run / "config.json").read_text())
            config["precision"] = precision
            (run / "config.json").write_text(json.dumps(config))
            metrics = (run / "metrics.jsonl").read_text().replace('"step_ms": 10.0', f'"step_ms": {STEP_MS[precision]}')
            (run / "metrics.jsonl").write_text(metrics)
    (out / "sessions").mkdir()
    (out / "sessions" / "0001.json").write_text(json.dumps({"command": "mpirouter compare ...", "config": {"vary": {"precision": ["fp32", "bf16"]}}}))
    return out


def test_each_router_pairs_bf16_with_fp32_over_the_seeds(grid):
    from mpirouter.experiments.report import write_report

    text = write_report(grid).read_text()
    summary = json.loads((grid / "report.json").read_text())
    rows = summary["between_cells"]
    assert [(r["label"], r["key"], r["value"], r["baseline"]) for r in rows] == [("linear", "precision", "bf16", "fp32"),
                                                                                  ("mpi C'=1", "precision", "bf16", "fp32")]
    for r, router in zip(rows, ("linear", "mpi")):
        diffs = [b - a for a, b in zip(LOSS[("fp32", router)], LOSS[("bf16", router)])]
        assert r["diffs"] == pytest.approx(diffs)
        assert r["diff"] == pytest.approx(list(paired_ci(diffs)))
        assert r["p"] == pytest.approx(paired_t_pvalue(diffs))
        assert r["step_ratio"] == pytest.approx(2.5)
    # Holm over the report's whole family: mpi vs linear in each of the two cells, and the two between-cell rows
    assert summary["comparisons"]["n"] == 4 and "makes 4 paired comparisons (2 against linear, 2 between cells)" in text
    table = text.split("## Between cells")[1]
    assert "| precision=bf16 vs fp32 | `debug`/`adamw` | mpi C'=1 | 3 |" in table
    assert "2.50 [2.50–2.50]" in table


def test_cells_pair_only_with_equal_configs_and_numeric_values_match_as_the_config_holds_them(tmp_path, monkeypatch):
    """Two calls into one folder: weight_decay 0 and 1e-1 at 40 steps, and 1e-1 alone at 60 steps. The 60-step cell
    has no 40-step partner (another signature), and "0"/"1e-1" typed on the command line pair with the config's 0.0/0.1."""
    from mpirouter.experiments import report

    monkeypatch.setattr(report, "pyplot", lambda: None)
    out = tmp_path / "wd"
    for steps, wds in ((40, (0.0, 0.1)), (60, (0.1,))):
        for wd in wds:
            for router in ("linear", "mpi"):
                for seed in (0, 1):
                    run = write_run(out / f"s{steps}-wd{wd}", router, seed, [3.0, 2.0 + wd + 0.01 * seed], steps=steps)
                    config = json.loads((run / "config.json").read_text())
                    config["optim"]["weight_decay"] = wd
                    (run / "config.json").write_text(json.dumps(config))
    (out / "sessions").mkdir()
    (out / "sessions" / "0001.json").write_text(json.dumps({"config": {"vary": {"optim.weight_decay": ["0", "1e-1"]}}}))
    report.write_report(out)
    rows = json.loads((out / "report.json").read_text())["between_cells"]
    assert [(r["label"], r["value"], r["baseline"], r["diff_n"]) for r in rows] == [("linear", "0.1", "0.0", 2), ("mpi C'=1", "0.1", "0.0", 2)]
    assert all(r["diff"][0] == pytest.approx(0.1) for r in rows)
