"""`mpirouter compare --vary KEY=V1,V2 --targets ...`: grid layout, one report section per cell, Holm over all of them."""

import argparse
import dataclasses
import json
import shlex

import pytest

from mpirouter.experiments.compare import CompareConfig, add_arguments, command_line, config_from_args, grid_runs, run_grid
from mpirouter.trainer.data import DataConfig, prepare_data

VARY = {"model.moe.score_func": ["softmax", "sigmoid"], "model.moe.balance": ["aux", "bias"]}


def cfg(out, **kw) -> CompareConfig:
    base = dict(routers=["linear", "mpi"], seeds=[0, 1], preset="debug", steps=4, batch_size=8, lrs=[1e-2], eval_every=4,
                eval_batches=2, out_dir=str(out), progress=False, overrides=["model.max_seq_len=32", "eval_batch_size=16"])
    base.update(kw)
    return CompareConfig(**base)


def test_layout_every_cell_and_target_and_routers_without_a_target_run_once(tmp_path):
    runs = grid_runs(cfg(tmp_path, routers=["linear", "mpi", "retract"], seeds=[3], vary=VARY, targets=["gate", "up"]))
    names = [str(r.run_dir.relative_to(tmp_path)) for r in runs]
    cells = ["score_func=softmax,balance=aux", "score_func=softmax,balance=bias", "score_func=sigmoid,balance=aux",
             "score_func=sigmoid,balance=bias"]
    assert names == [f"debug/adamw-lr0.01/{c}/{n}/seed3" for c in cells for n in ("linear", "mpi-C1", "mpi-C1-up", "retract-C1")]
    for r in runs:
        moe = r.config.model.moe
        assert f"score_func={moe.score_func},balance={moe.balance}" in str(r.run_dir)
        assert moe.router.target == ("up" if r.run_dir.parent.name.endswith("-up") else "gate")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Two cells in one call, then a second call that adds the up target to one cell (as the targets grid does)."""
    full = prepare_data(DataConfig(), seq_len=32)
    data = dataclasses.replace(full, train_ids=full.train_ids[:100_000], val_ids=full.val_ids[:2048])
    out = tmp_path_factory.mktemp("cells") / "grid"
    run_grid(cfg(out, vary={"model.moe.score_func": ["sigmoid", "softmax"], "model.moe.n_shared": ["0"]}), data=data)
    run_grid(cfg(out, vary={"model.moe.score_func": ["softmax"], "model.moe.n_shared": ["0"]}, targets=["up"]), data=data)
    return out, (out / "report.md").read_text(), json.loads((out / "report.json").read_text())


def test_each_cell_is_a_section_in_the_order_given_with_its_own_baseline(report):
    out, text, summary = report
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## preset `debug`, optimizer `adamw`, score_func=sigmoid, n_shared=0",
                      "## preset `debug`, optimizer `adamw`, score_func=softmax, n_shared=0", "## Between cells"]
    labels = [[r["label"] for r in sec["rows"]] for sec in summary["sections"]]
    assert labels == [["linear", "mpi C'=1"], ["linear", "mpi C'=1", "mpi C'=1 target=up"]]
    assert all(sec["rows"][0]["diff"] is None and all(r["diff_n"] == 2 for r in sec["rows"][1:]) for sec in summary["sections"])
    # Holm runs over every comparison of the report: 1 + 2 in the sections, and softmax vs sigmoid for the two
    # variants both cells have (n_shared has one value: nothing to pair)
    assert [(r["label"], r["value"], r["baseline"]) for r in summary["between_cells"]] == [
        ("linear", "softmax", "sigmoid"), ("mpi C'=1", "softmax", "sigmoid")]
    assert summary["comparisons"]["n"] == 5 and "makes 5 paired comparisons (3 against linear, 2 between cells)" in text
    assert (out / "debug-adamw-score_func_softmax-n_shared_0-val_loss.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cell_values_reached_the_runs(report):
    out, _, _ = report
    configs = [json.loads(p.read_text()) for p in out.rglob("config.json") if "checkpoints" not in p.parts]
    assert len(configs) == 2 * 2 + 3 * 2
    for c in configs:
        assert c["model"]["moe"]["score_func"] in ("sigmoid", "softmax") and c["model"]["moe"]["n_shared"] == 0
    assert sum(c["model"]["moe"]["router"]["target"] == "up" for c in configs) == 2


BAD = [
    ("vary-a-grid-key", dict(vary={"seed": ["1", "2"]}), "grid key"),
    ("vary-the-target", dict(vary={"model.moe.router.target": ["up"]}), "grid key"),
    ("vary-and-set", dict(vary={"model.moe.top_k": ["1", "2"]}, overrides=["model.moe.top_k=2"]), "both varied"),
    ("empty-values", dict(vary={"model.moe.top_k": []}), "distinct non-empty"),
    ("duplicate-values", dict(vary={"model.moe.top_k": ["1", "1"]}), "distinct non-empty"),
    ("slash-in-value", dict(vary={"model.moe.dispatch": ["a/b"]}), "without '/'"),
    ("unknown-target", dict(targets=["down"]), "unknown power target"),
    ("vary-the-corpus", dict(vary={"data.path": ["kjv", "shakespeare"]}), "one corpus"),
    ("vary-the-preset", dict(vary={"preset": ["debug", "tiny"]}), "one model preset"),
]


@pytest.mark.parametrize("kw,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_axes_are_refused_with_the_reason(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **kw)


def test_an_unknown_field_is_refused_before_anything_trains(tmp_path):
    with pytest.raises(ValueError, match="no_such_field"):
        grid_runs(cfg(tmp_path, vary={"model.moe.no_such_field": ["1"]}))


def test_command_line_with_axes_round_trips_through_the_parser(tmp_path):
    c = cfg(tmp_path, vary=VARY, targets=["gate", "gate_up"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = shlex.split(command_line(c))
    assert "--vary" in argv and "--targets" in argv
    assert config_from_args(parser.parse_args(argv[2:])) == c
    with pytest.raises(ValueError, match="given twice"):
        config_from_args(parser.parse_args(["--vary", "model.moe.top_k=1", "--vary", "model.moe.top_k=2"]))
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        config_from_args(parser.parse_args(["--vary", "model.moe.top_k"]))
