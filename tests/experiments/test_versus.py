"""Reports of the coupling designs: each router at its own lr in one section (`report.tuned_lrs`), the
"Against mpi" table (`experiments.versus`), and the designs table of `mpirouter bench --designs`."""

import dataclasses
import math
from types import SimpleNamespace

import pytest

from mpirouter.experiments.bench_routers import DESIGNS, bench_router_designs, design_config, print_router_designs
from mpirouter.experiments.compare import CompareConfig, run_grid
from mpirouter.experiments.report import tuned_lrs, variant_label, write_report
from mpirouter.experiments.versus import summarize_versus
from mpirouter.trainer.data import DataConfig, prepare_data


def run(router, seed, loss, maxvio=0.1, scale=None):
    scale = 1.0 if router.split("+")[0] in ("mpi", "svd") and scale is None else scale
    return SimpleNamespace(variant=(router, scale, None), config={"seed": seed}, final={"val_loss": loss, "maxvio": maxvio})


def section(runs, title=""):
    return {"runs": runs, "preset": "debug", "optimizer": "adamw", "title": title, "lr": None, "multi_lr": False}


def test_tuned_lrs_only_when_every_variant_has_one_lr():
    a, b = run("linear", 0, 2.0), run("cosine", 0, 1.9)
    assert tuned_lrs({0.01: [a], 0.02: [b]}) == {a.variant: 0.01, b.variant: 0.02}
    assert tuned_lrs({0.01: [a, b]}) is None  # one lr: an ordinary section
    assert tuned_lrs({0.01: [a, b], 0.02: [run("linear", 0, 2.1), run("cosine", 0, 1.8)]}) is None  # a sweep


def test_against_mpi_pairs_each_design_with_mpi_by_seed():
    runs = [run("linear", s, 2.0 + s) for s in range(3)] + [run("mpi", s, 1.75 + s) for s in range(3)]
    runs += [run("cosine", s, 1.8 + s + 0.01 * s) for s in range(3)] + [run("mpi+erc", s, 2.0 + s) for s in (0, 1)]
    rows = summarize_versus([section(runs)], variant_label)
    by = {r["label"]: r for r in rows}
    assert set(by) == {"cosine", "mpi+erc C'=1"}  # neither linear nor mpi itself
    diffs = [(1.8 + s + 0.01 * s) - (1.75 + s) for s in range(3)]
    assert by["cosine"]["diff"][0] == pytest.approx(sum(diffs) / 3)
    assert by["cosine"]["reference"] == "mpi C'=1" and by["cosine"]["seeds"] == [0, 1, 2]
    assert by["mpi+erc C'=1"]["diff_n"] == 2 and by["mpi+erc C'=1"]["diff"][0] == 0.25
    assert by["mpi+erc C'=1"]["p"] is None  # zero variance: no test, not counted by Holm


@pytest.mark.parametrize("routers", [["linear", "mpi", "power"], ["linear", "cosine"], ["linear", "mpi", "mpi"]],
                         ids=["mpi-family-only", "no-mpi", "two-mpi-variants"])
def test_against_mpi_leaves_sections_without_a_design_or_one_mpi(routers):
    runs = [run(r, s, 2.0, scale=1.0 if r == "mpi" and i == 1 else (2.0 if r == "mpi" else None))
            for i, r in enumerate(routers) for s in range(2)]
    assert summarize_versus([section(runs)], variant_label) == []


@pytest.fixture(scope="module")
def data():
    full = prepare_data(DataConfig(), seq_len=32)
    return dataclasses.replace(full, train_ids=full.train_ids[:100_000], val_ids=full.val_ids[:2048])


def test_report_of_routers_at_their_own_lrs_pairs_them_and_compares_with_mpi(tmp_path, data):
    out = tmp_path / "zoo"
    common = dict(seeds=[0, 1], preset="debug", steps=4, batch_size=4, eval_every=2, eval_batches=1, out_dir=str(out),
                  progress=False, overrides=["model.max_seq_len=32", "eval_batch_size=8"])
    run_grid(CompareConfig(routers=["linear", "mpi"], lrs=[1e-2], **common), data=data)
    run_grid(CompareConfig(routers=["cosine", "mpi+erc"], lrs=[2e-2], **common), data=data)
    text = write_report(out).read_text()
    assert "each router at its own lr" in text and "linear @ lr 0.01" in text and "cosine @ lr 0.02" in text
    assert "## lr sweep" not in text  # no router was trained at two lrs
    assert "## Against mpi" in text and "| cosine | mpi C'=1 | 2 |" in text
    assert "(3 against linear, 2 against mpi)" in text
    assert "| cosine @ lr 0.02 | 2 |" in text and "| nan | nan |" in text  # cosine has no rows to align


def test_bench_designs_times_every_design_beside_linear():
    assert set(DESIGNS) >= {"linear", "mpi", "svd", "cosine", "kmeans", "aoe", "remoe", "linear+erc", "linear+simbal"}
    assert design_config("mpi+erc").erc.enabled and design_config("mpi+erc").kind == "mpi"
    r = bench_router_designs("debug", ["cosine", "aoe"], reps=1, repeat=1, batch_size=2)
    assert list(r["designs"]) == ["linear", "cosine", "aoe"]  # linear added as the baseline
    lin, cos, aoe = (r["designs"][k] for k in ("linear", "cosine", "aoe"))
    assert lin["step_ratio"]["median"] == 1.0
    assert cos["params"]["total"] > lin["params"]["total"] > aoe["params"]["total"]
    assert all(d["router_ms"]["median"] > 0 and math.isfinite(d["step_ms"]["median"]) for d in r["designs"].values())
    lines = []
    print_router_designs(r, lines.append)
    assert any(line.startswith("| aoe | 163,624 |") for line in lines)


def test_tuned_lrs_takes_a_one_lr_group_when_asked():
    a, b = run("linear", 0, 2.0), run("cosine", 0, 1.9)
    assert tuned_lrs({0.01: [a, b]}, one_lr_too=True) == {a.variant: 0.01, b.variant: 0.01}
    assert tuned_lrs({None: [a, b]}, one_lr_too=True) is None  # no lr recorded: nothing to show


def test_a_cell_at_one_lr_pairs_with_a_tuned_cell_between_cells(tmp_path, data):
    out = tmp_path / "zoo"
    common = dict(seeds=[0, 1], preset="debug", steps=4, batch_size=4, eval_every=2, eval_batches=1, out_dir=str(out),
                  progress=False, overrides=["model.max_seq_len=32", "eval_batch_size=8"])
    run_grid(CompareConfig(routers=["linear", "cosine"], lrs=[1e-2], vary={"model.moe.balance": ["aux"]}, **common), data=data)
    run_grid(CompareConfig(routers=["linear"], lrs=[1e-2], vary={"model.moe.balance": ["bias"]}, **common), data=data)
    run_grid(CompareConfig(routers=["cosine"], lrs=[2e-2], vary={"model.moe.balance": ["bias"]}, **common), data=data)
    text = write_report(out).read_text()
    assert text.count("each router at its own lr") == 2  # the one-lr aux cell too
    between = text.split("## Between cells")[1]
    assert "| linear |" in between and "| cosine |" in between  # both routers paired across the cells


@pytest.mark.parametrize("kind", ["cosine", "kmeans", "aoe"])
def test_trajectory_refuses_routers_without_rows(kind):
    from mpirouter.core.model import MoELM, preset_config
    from mpirouter.core.routers import RouterConfig
    from mpirouter.experiments.trajectory import snapshot

    model = MoELM(preset_config("debug", moe=dict(router=RouterConfig(kind=kind))))
    with pytest.raises(ValueError, match=f"a '{kind}' router has none"):
        snapshot(model, 0)


def test_a_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path, data, monkeypatch, capsys):
    import mpirouter.experiments.compare as compare
    from mpirouter.trainer.loop import NonFiniteLossError

    real = compare.train

    def train(config, **kw):  # cosine at the high lr blows up, as a too-high lr does
        if config.model.moe.router.kind == "cosine" and config.optim.lr == 2e-2:
            raise NonFiniteLossError("loss became nan at step 3; stopping.")
        return real(config, **kw)

    monkeypatch.setattr(compare, "train", train)
    out = tmp_path / "zoo"
    cfg = CompareConfig(routers=["linear", "cosine"], lrs=[1e-2, 2e-2], seeds=[0, 1], preset="debug", steps=4, batch_size=4,
                        eval_every=2, eval_batches=1, out_dir=str(out), progress=False,
                        overrides=["model.max_seq_len=32", "eval_batch_size=8"])
    run_grid(cfg, data=data)
    assert capsys.readouterr().out.count("diverged (loss became nan at step 3") == 2
    marker = out / "debug" / "adamw-lr0.02" / "cosine" / "seed0" / "diverged.json"
    assert marker.is_file() and '"step": 3' in marker.read_text()
    assert (out / "debug" / "adamw-lr0.02" / "linear" / "seed1" / "metrics.jsonl").is_file()  # the grid went on
    run_grid(cfg, data=data)  # a diverged run is a result: not retried
    assert capsys.readouterr().out.count("diverged, skipped") == 2


def test_an_lr_where_a_run_diverged_is_never_the_sweeps_best():
    from mpirouter.experiments.report import summarize_sweep
    from mpirouter.experiments.sweeps import format_sweep
    from mpirouter.experiments.report import _diff_cell

    def rec(router, seed, loss):
        r = run(router, seed, loss)
        r.diverged = loss is None
        r.final = None if loss is None else r.final
        return r

    by_lr = {0.01: [rec("linear", s, 2.0) for s in range(3)] + [rec("cosine", s, 1.9) for s in range(3)],
             0.02: [rec("linear", s, 2.1) for s in range(3)] + [rec("cosine", 0, None)] + [rec("cosine", s, 1.5) for s in (1, 2)]}
    rows = {r["label"]: r for r in summarize_sweep(by_lr)}
    assert rows["cosine"]["best_lr"] == 0.01  # 1.5 at 0.02 is lower, but a seed diverged there
    assert rows["cosine"]["diverged"] == {0.02: 1} and rows["linear"]["diverged"] == {}
    assert "1.5000 ± 0.0000 (n=2), 1 diverged" in format_sweep(list(rows.values()), _diff_cell)
