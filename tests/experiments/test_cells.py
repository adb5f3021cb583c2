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


def test_without_the_first_value_there_is_nothing_to_pair(grid):
    from mpirouter.experiments.cells import summarize_between_cells

    sections = [{"preset": "debug", "optimizer": "adamw", "lr": 0.01, "cell": (("precision", "bf16"),), "runs": []}]
    assert summarize_between_cells(sections, {"precision": ["fp32", "bf16"]}, str) == []
