"""The scale ladder's report (experiments/ladder.py) and its trend statistic, on run folders written here."""

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpirouter.cli import main
from mpirouter.common.config import to_dict
from mpirouter.core.model import MoELM, preset_config
from mpirouter.experiments.compare import CompareConfig, grid_runs
from mpirouter.experiments.ladder import JSON, MD, TITLE, IncompleteLadder, build_ladder, format_ladder, write_ladder
from mpirouter.experiments.stats import holm, paired_t_pvalue, t_quantile, weighted_slope

DIMS = {"small-rung": 32, "mid-rung": 64, "big-rung": 128}


def test_weighted_slope_matches_float64_weighted_least_squares():
    rng = np.random.default_rng(0)
    x, se = np.log10([8e4, 4e5, 1e6, 1.7e6]), np.array([0.004, 0.006, 0.005, 0.008])
    y = -0.03 + 0.01 * x + rng.normal(0, 0.005, 4)
    fit = weighted_slope(x.tolist(), y.tolist(), se.tolist(), df=9)
    (slope, intercept), cov = np.polyfit(x, y, 1, w=1 / se, cov="unscaled")  # polyfit weights residuals: w = 1/se
    assert fit["slope"] == pytest.approx(slope, rel=1e-10) and fit["intercept"] == pytest.approx(intercept, rel=1e-10)
    assert fit["se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)
    assert fit["hi"] - fit["slope"] == pytest.approx(t_quantile(0.975, 9) * fit["se"])
    assert fit["q"] == pytest.approx(float(np.sum(((y - intercept - slope * x) / se) ** 2)), rel=1e-10)


def test_weighted_slope_of_points_on_a_line():
    fit = weighted_slope([0.0, 1.0, 2.0], [1.0, 3.0, 5.0], [0.1, 0.2, 0.1], df=5)
    assert fit["slope"] == pytest.approx(2.0) and fit["q"] == pytest.approx(0.0, abs=1e-18)
    assert fit["se"] == pytest.approx(200 ** -0.5) and fit["p"] < 1e-5  # weights 100, 25, 100 about x̄ = 1


@pytest.mark.parametrize("xs, ses, df, message", [([0.0, 1.0], [0.1, 0.1], 3, "at least 3"),
                                                  ([0.0, 1.0, 2.0], [0.1, 0.0, 0.1], 3, "must be > 0"),
                                                  ([1.0, 1.0, 1.0], [0.1, 0.1, 0.1], 3, "two distinct")],
                         ids=["two-points", "zero-se", "one-x"])
def test_weighted_slope_refuses_what_it_cannot_fit(xs, ses, df, message):
    with pytest.raises(ValueError, match=message):
        weighted_slope(xs, [0.0] * len(xs), ses, df=df)


def write_run(folder, rung, router, cell, seed, loss, lr=0.01, maxvio=0.1):
    cfg = preset_config("debug", dim=DIMS[rung])
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, balance=cell, router=dataclasses.replace(cfg.moe.router, kind=router)))
    run = folder / rung / "confirm" / rung / cell / router / f"seed{seed}"
    run.mkdir(parents=True)
    config = {"model": dataclasses.asdict(cfg), "optim": {"lr": lr}, "preset": rung, "steps": 10, "batch_size": 2,
              "grad_accum": 1, "seq_len": None, "seed": seed, "eval_batches": None}
    (run / "config.json").write_text(json.dumps(config))
    evals = [{"event": "eval", "step": s, "tokens": s * 128, "val_loss": loss + (10 - s) * 0.1, "maxvio": maxvio, "align": 0.5}
             for s in (5, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))


# Δ (mpi − linear) per rung and cell: a line in log10 N under bias, a constant under aux, plus seed noise
NOISE = [0.004, -0.003, 0.001, -0.002]


def ladder_folder(tmp_path, slope=0.01):
    ns = {rung: MoELM(preset_config("debug", dim=d)).num_params()["active_non_embedding"] for rung, d in DIMS.items()}
    for rung in DIMS:
        for seed, noise in enumerate(NOISE):
            base = 2.0 + 0.01 * seed
            for cell, delta in (("bias", -0.05 + slope * math.log10(ns[rung]) + noise), ("aux", 0.002 + noise / 2)):
                write_run(tmp_path, rung, "linear", cell, seed, base)
                write_run(tmp_path, rung, "mpi", cell, seed, base + delta, lr=0.02)
    return ns


def test_ladder_pairs_each_rung_and_fits_the_trend(tmp_path):
    ns = ladder_folder(tmp_path)
    summary = build_ladder(tmp_path)
    assert [r["rung"] for r in summary["ladder"]] == ["small-rung", "mid-rung", "big-rung"]  # sorted by N
    assert len(summary["rows"]) == 6 and len(summary["trends"]) == 2 and summary["comparisons"] == 8
    bias = {r["rung"]: r for r in summary["rows"] if r["cell"] == "bias"}
    for rung, row in bias.items():
        assert row["n"] == ns[rung] and row["lr"] == 0.02 and row["lr_linear"] == 0.01
        expected = [-0.05 + 0.01 * math.log10(ns[rung]) + e for e in NOISE]
        assert row["diff"][0] == pytest.approx(np.mean(expected), abs=1e-12)
        assert row["p"] == pytest.approx(paired_t_pvalue(expected), rel=1e-6)
    trend = {t["cell"]: t for t in summary["trends"]}
    assert trend["bias"]["slope"] == pytest.approx(0.01, abs=1e-9)  # the same noise on every rung: the means lie on the line
    assert abs(trend["aux"]["slope"]) < 1e-9
    tested = summary["rows"] + summary["trends"]
    assert [r["p_holm"] for r in tested] == pytest.approx(holm([r["p"] for r in tested]))


def test_ladder_report_is_written_and_rewritten_but_never_over_a_foreign_file(tmp_path):
    ladder_folder(tmp_path)
    path = write_ladder(tmp_path, "mpirouter ladder --out x")
    text = path.read_text()
    assert text.startswith(TITLE) and "This report makes 8 comparisons" in text and "| mpi C'=1 | bias |" in text
    assert write_ladder(tmp_path, "mpirouter ladder --out x") == path  # its own files are replaced
    (tmp_path / MD).write_text("my notes\n")
    with pytest.raises(FileExistsError, match="was not written by mpirouter ladder"):
        write_ladder(tmp_path, "mpirouter ladder --out x")
    assert (tmp_path / MD).read_text() == "my notes\n"


def test_ladder_refuses_a_rung_with_two_lrs_for_one_router(tmp_path):
    ladder_folder(tmp_path)
    write_run(tmp_path, "mid-rung", "mpi", "bias", 9, 2.0, lr=0.04)
    with pytest.raises(ValueError, match="mpi C'=1 under balance=bias ran at several lrs"):
        build_ladder(tmp_path)


def test_weighted_slope_refuses_non_finite_inputs():
    with pytest.raises(ValueError, match="finite inputs"):
        weighted_slope([0.0, 1.0, 2.0], [0.0, math.nan, 0.0], [0.1, 0.1, 0.1], df=3)


def compare_rung(out, rung, routers=("linear", "mpi"), seeds=(0, 1, 2), cells=("bias", "aux"), session=True, skip=()):
    """A rung folder laid out as `mpirouter compare` writes it (grid_runs' folders and configs, its session record);
    each run finished (eval at its last step) unless its folder ends with one of `skip`."""
    cfg = CompareConfig(routers=list(routers), seeds=list(seeds), preset="debug", steps=10, batch_size=2, lrs=[0.01],
                        vary={"model.moe.balance": list(cells)}, out_dir=str(out / rung / "confirm"))
    for g in grid_runs(cfg):
        run = Path(g.config.out_dir)
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps(to_dict(g.config)))
        steps = (5,) if str(run).endswith(tuple(skip)) else (5, 10)
        (run / "metrics.jsonl").write_text("".join(json.dumps({"event": "eval", "step": s, "tokens": s * 128, "val_loss": 2.0 + g.seed / 100
                                                                + (s == 10) * 0.01 * (g.router != "linear"), "maxvio": 0.1, "align": 0.5}) + "\n"
                                                    for s in steps))
    if session:
        (out / rung / "confirm" / "sessions").mkdir(exist_ok=True)
        (out / rung / "confirm" / "sessions" / f"{'-'.join(routers)}.json").write_text(json.dumps({"command": "mpirouter compare ...", "config": to_dict(cfg)}))
    return cfg


def test_a_rung_written_as_compare_writes_it_is_complete(tmp_path):
    compare_rung(tmp_path, "debug", routers=("linear", "linear+erc", "mpi"))
    summary = build_ladder(tmp_path, expect=["debug"], routers=["linear", "mpi"], cells=["bias", "aux"])
    assert summary["incomplete"] == [] and summary["ladder"][0]["missing"] == []
    assert sorted((r["cell"], r["router"]) for r in summary["rows"]) == [("aux", "linear+erc"), ("aux", "mpi C'=1"), ("bias", "linear+erc"), ("bias", "mpi C'=1")]
    assert all(r["seeds"] == [0, 1, 2] and r["diff"][0] == pytest.approx(0.01) for r in summary["rows"])


def test_two_processes_of_one_grid_are_listed_once(tmp_path):
    compare_rung(tmp_path, "debug")
    sessions = tmp_path / "debug" / "confirm" / "sessions"
    (sessions / "rank1.json").write_text((sessions / "linear-mpi.json").read_text())  # the grid's second process
    summary = build_ladder(tmp_path, expect=["debug"], routers=["linear", "mpi"], cells=["bias", "aux"])
    assert len(summary["runs"]["debug"]) == 1 and summary["runs"]["debug"][0].endswith("`mpirouter compare ...`")


def test_ladder_refuses_an_incomplete_ladder_unless_partial(tmp_path):
    compare_rung(tmp_path, "debug", skip=("bias/mpi-C1/seed2",))  # stopped before its last step
    compare_rung(tmp_path, "tiny", routers=("linear",), cells=("bias",))  # mpi's call and the aux cell never started
    compare_rung(tmp_path, "other", session=False)  # not one of --rungs: left out
    with pytest.raises(IncompleteLadder) as info:
        build_ladder(tmp_path, expect=["debug", "tiny", "top"], routers=["linear", "mpi"], cells=["bias", "aux"])
    message = str(info.value)
    assert "rung top has no finished runs" in message and "--partial" in message
    # the unfinished run, and linear's seed 2 left without its pair
    assert "debug: 2 planned run(s) not finished or unpaired, e.g. debug/adamw-lr0.01/balance=bias/mpi-C1/seed2" in message
    assert "tiny: no finished run of mpi under balance=bias" in message and "tiny: no finished run of linear under balance=aux" in message
    summary = build_ladder(tmp_path, expect=["debug", "tiny", "top"], routers=["linear", "mpi"], cells=["bias", "aux"], partial=True)
    assert summary["left_out"] == ["other"] and {r["rung"] for r in summary["rows"]} == {"debug"}
    bias = next(r for r in summary["rows"] if r["cell"] == "bias")
    assert bias["seeds"] == [0, 1]  # the unfinished seed 2 is not a pair
    assert summary["trends"] == []
    text = write_ladder(tmp_path, "mpirouter ladder --out x --partial", partial=True).read_text()
    assert "**Interim report: the ladder is incomplete**" in text


@pytest.mark.parametrize("setup, gap", [
    (lambda out: compare_rung(out, "debug", session=False, seeds=(0, 1, 2)) and shutil.rmtree(out / "debug/confirm/debug/adamw-lr0.01/balance=aux/linear/seed1"),
     "balance=aux: mpi C'=1 seed 1 has no linear run"),
    (lambda out: compare_rung(out, "debug", session=False) and shutil.rmtree(out / "debug/confirm/debug/adamw-lr0.01/balance=aux/linear"),
     "balance=aux: mpi C'=1 has runs but linear has none to pair them with"),
    (lambda out: compare_rung(out, "debug") and compare_rung(out, "tiny", skip=("seed0", "seed1", "seed2")),
     "rung tiny has no finished runs"),
], ids=["unpaired-seed", "no-linear-in-a-cell", "rung-with-no-finished-run"])
def test_ladder_names_what_is_unpaired_or_unstarted(tmp_path, setup, gap):
    setup(tmp_path)
    with pytest.raises(IncompleteLadder, match=re.escape(gap)):
        build_ladder(tmp_path)


def test_a_session_that_records_no_config_is_refused(tmp_path):
    compare_rung(tmp_path, "debug")
    (tmp_path / "debug" / "confirm" / "sessions" / "old.json").write_text('{"command": "mpirouter compare"}')
    with pytest.raises(ValueError, match="records no config"):
        build_ladder(tmp_path)


def test_ladder_keeps_a_router_that_diverged_on_every_seed(tmp_path):
    ladder_folder(tmp_path)
    for seed in range(len(NOISE)):
        (tmp_path / "mid-rung" / "confirm" / "mid-rung" / "aux" / "mpi" / f"seed{seed}" / "diverged.json").write_text('{"step": 3}')
    run = tmp_path / "small-rung" / "confirm" / "small-rung" / "bias" / "mpi" / "seed0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records[-1]["val_loss"] = math.nan  # non-finite at the end without compare's marker: diverged all the same
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = build_ladder(tmp_path)
    mid_aux = next(r for r in summary["rows"] if (r["rung"], r["cell"]) == ("mid-rung", "aux"))
    assert mid_aux["diff"] is None and mid_aux["p"] is None and mid_aux["diverged"] == [0, 1, 2, 3]
    small_bias = next(r for r in summary["rows"] if (r["rung"], r["cell"]) == ("small-rung", "bias"))
    assert small_bias["seeds"] == [1, 2, 3] and small_bias["diverged"] == [0]
    assert [t["cell"] for t in summary["trends"]] == ["bias"] and summary["comparisons"] == 5 + 1
    assert "no seed with both runs finite: no test" in format_ladder(summary, "x")


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(batch_size=4), "mixes training settings: global_batch is 2 in"),
    (lambda c: c.update(eval_batches=3), "mixes training settings: eval_batches"),
    (lambda c: c.pop("seed"), "lacks seed"),
    (lambda c: c.pop("steps"), "lacks steps"),
    (lambda c: c["model"]["moe"].pop("router"), "lacks model.moe.router"),
], ids=["other-batch", "other-eval", "missing-seed", "missing-steps", "missing-router"])
def test_ladder_refuses_runs_that_are_not_one_rung(tmp_path, change, message):
    ladder_folder(tmp_path)
    path = tmp_path / "big-rung" / "confirm" / "big-rung" / "aux" / "linear" / "seed2" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        build_ladder(tmp_path)


def test_ladder_refuses_two_runs_of_one_seed(tmp_path):
    ladder_folder(tmp_path)
    write_run(tmp_path / "big-rung" / "confirm" / "again", "big-rung", "mpi", "bias", 1, 2.0, lr=0.02)
    with pytest.raises(ValueError, match="two runs of mpi C'=1 seed 1 under balance=bias"):
        build_ladder(tmp_path)


def ladder_cli(argv, capsys):
    """(exit code, stderr) of `mpirouter ladder ARGV` in this process (the console entry point's own path is the last check below)."""
    try:
        code = main(["ladder", *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_ladder_cli_names_the_problem_in_one_line(tmp_path, capsys):
    ladder_folder(tmp_path)
    (tmp_path / JSON).write_text('{"ladder": "mine"}')  # a file merely naming the key is not ours
    code, err = ladder_cli(["--out", str(tmp_path)], capsys)
    assert code == 2 and "was not written by mpirouter ladder" in err.strip().splitlines()[-1]
    code, err = ladder_cli(["--out", str(tmp_path / "none")], capsys)
    assert code == 2 and "is not a folder" in err
    (tmp_path / JSON).unlink()
    plan = ["--out", str(tmp_path), "--rungs", "small-rung, mid-rung,big-rung,top-rung", "--routers", "linear,mpi", "--cells", "bias,aux"]
    code, err = ladder_cli(plan, capsys)
    assert code == 2 and "is incomplete (rung top-rung has no finished runs)" in err.strip().splitlines()[-1]
    result = subprocess.run([sys.executable, "-m", "mpirouter", "ladder", *plan, "--partial"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / MD).read_text()
    assert "**Interim report" in text and "--rungs small-rung,mid-rung,big-rung,top-rung --routers linear,mpi --cells bias,aux --partial" in text
