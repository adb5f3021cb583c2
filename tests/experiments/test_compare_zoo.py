"""`mpirouter compare` with the router designs of docs/zoo.md: router names with losses (mpi+erc, linear+simbal) and
the new kinds in the grid, its run folders and report, and `mpirouter export` of runs of each kind (refused for the
kinds that do not fold into a linear router)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mpirouter.cli import main
from mpirouter.common.config import flatten, to_dict
from mpirouter.core.routers import ROUTER_KINDS, UNFOLDABLE_WHY
from mpirouter.experiments.compare import CompareConfig, grid_runs, run_config, run_grid, run_status
from mpirouter.experiments.report import RunRecord
from mpirouter.trainer.checkpoint import load_model
from mpirouter.trainer.data import DataConfig, prepare_data

NEW_KINDS = ("svd", "cosine", "kmeans", "aoe", "remoe")
STEPS = 2
GRID_ROUTERS = ["linear", "mpi+erc", "linear+simbal", *NEW_KINDS]


def small_cfg(out, **kw) -> CompareConfig:
    base = dict(routers=["linear", "mpi+erc"], seeds=[0], preset="debug", steps=STEPS, batch_size=4, lrs=[1e-2],
                eval_every=STEPS, eval_batches=1, ckpt_every=STEPS, out_dir=str(out), progress=False,
                overrides=["model.max_seq_len=16", "eval_batch_size=16", "log_every=1"])
    base.update(kw)
    return CompareConfig(**base)


# ----------------------------------------------------------------------------- the grid's configuration


def test_every_router_kind_and_the_router_losses_are_accepted(tmp_path):
    names = [*ROUTER_KINDS, "mpi+erc", "linear+erc", "linear+simbal", "mpi+simbal", "svd+erc", "remoe+simbal",
             "linear+erc+simbal"]
    cfg = small_cfg(tmp_path, routers=names)
    assert cfg.routers == names
    runs = grid_runs(cfg)
    assert sorted({r.router for r in runs}) == sorted(names)
    assert set(NEW_KINDS) <= set(ROUTER_KINDS)


BAD_ROUTERS = [
    ("aoe+erc", "compare: --routers: 'aoe+erc': the erc loss needs router rows; 'aoe' has none"),
    ("cosine+simbal", "compare: --routers: 'cosine+simbal': the simbal loss needs router rows; 'cosine' has none"),
    ("kmeans+erc", "compare: --routers: 'kmeans+erc': the erc loss needs router rows; 'kmeans' has none"),
    ("linear+foo", "compare: --routers: unknown router loss 'foo' in 'linear+foo'; choose one of erc, simbal"),
    ("foo", "compare: --routers: unknown router kind 'foo' in 'foo'; choose one of " + ", ".join(ROUTER_KINDS)),
    ("foo+erc", "compare: --routers: unknown router kind 'foo' in 'foo+erc'; choose one of " + ", ".join(ROUTER_KINDS)),
    ("mpi+erc+erc", "compare: --routers: 'mpi+erc+erc' names a router loss twice"),
]


@pytest.mark.parametrize("name, message", BAD_ROUTERS, ids=[b[0] for b in BAD_ROUTERS])
def test_a_bad_router_name_is_refused_with_one_clear_message(tmp_path, name, message):
    with pytest.raises(ValueError) as info:
        small_cfg(tmp_path, routers=["linear", name])
    assert str(info.value) == message


@pytest.mark.parametrize("name, message", BAD_ROUTERS[:5], ids=[b[0] for b in BAD_ROUTERS[:5]])
def test_a_bad_router_name_is_one_line_on_the_command_line_and_creates_nothing(tmp_path, capsys, name, message):
    out = tmp_path / "g"
    code = main(["compare", "--routers", f"linear,{name}", "--seeds", "0", "--preset", "debug", "--steps", "2",
                 "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"mpirouter compare: error: {message}\n"
    assert not out.exists()


def test_the_grid_may_not_set_a_router_loss_through_an_override(tmp_path):
    for key in ("model.moe.router.erc.enabled", "model.moe.router.simbal.enabled"):
        with pytest.raises(ValueError, match="sets a grid key"):
            small_cfg(tmp_path, overrides=[f"{key}=true"])
        with pytest.raises(ValueError, match="is a grid key"):
            small_cfg(tmp_path, vary={key: ["true", "false"]})


def test_the_run_config_of_a_router_with_losses(tmp_path):
    cfg = small_cfg(tmp_path)
    run = run_config(cfg, "mpi+erc", 0, "adamw", 1.0)
    router = run.model.moe.router
    assert router.kind == "mpi" and router.erc.enabled and not router.simbal.enabled
    assert "mpi+erc" in Path(run.out_dir).parts[-2] and Path(run.out_dir).parts[-2] == "mpi+erc-C1"
    both = run_config(cfg, "linear+erc+simbal", 0, "adamw", None).model.moe.router
    assert both.kind == "linear" and both.erc.enabled and both.simbal.enabled
    plain = run_config(cfg, "mpi", 0, "adamw", 1.0)
    assert not plain.model.moe.router.erc.enabled and Path(plain.out_dir).parts[-2] == "mpi-C1"
    # the losses are the only difference from the plain run of the same seed (and the folder)
    diff = {k for k, v in flatten(to_dict(run)).items() if flatten(to_dict(plain))[k] != v}
    assert diff == {"model.moe.router.erc.enabled", "out_dir"}


def test_kinds_that_ignore_c_prime_or_the_target_run_once_per_seed(tmp_path):
    """cosine, kmeans, aoe and remoe use neither C' nor a power target; svd scales its exact rows by C and takes
    its direction from the target's matrix, so it is trained at every C' and target; the losses follow their kind."""
    cfg = small_cfg(tmp_path, routers=[*NEW_KINDS, "linear+simbal", "mpi+erc"], scales=[0.5, 2.0], targets=["gate", "up"])
    names = [str(r.run_dir.relative_to(tmp_path)) for r in grid_runs(cfg)]
    folders = [n.split("/")[2] for n in names]
    assert folders == ["svd-C0.5", "svd-C0.5-up", "svd-C2", "svd-C2-up", "cosine", "kmeans", "aoe", "remoe", "linear+simbal",
                       "mpi+erc-C0.5", "mpi+erc-C0.5-up", "mpi+erc-C2", "mpi+erc-C2-up"]
    assert all(n.startswith("debug/adamw-lr0.01/") and n.endswith("/seed0") for n in names)


def config_dict(kind: str, **addons) -> dict:
    router = {"kind": kind, "scale_prime": 1.0, "target": "gate", **{a: {"enabled": on} for a, on in addons.items()}}
    return {"model": {"moe": {"router": router}}}


@pytest.mark.parametrize("config, name, scale", [
    (config_dict("mpi", erc=True, simbal=False), "mpi+erc", 1.0),
    (config_dict("linear", erc=False, simbal=True), "linear+simbal", None),
    (config_dict("linear", erc=True, simbal=True), "linear+erc+simbal", None),
    (config_dict("kmeans", erc=False, simbal=False), "kmeans", None),
    (config_dict("svd"), "svd", 1.0),
    (config_dict("mpi"), "mpi", 1.0),  # a run saved before the router losses existed
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_run_record_names_its_router_with_its_losses(config, name, scale):
    record = RunRecord(Path("run"), config, [])
    assert record.router == name and record.scale == scale


# ----------------------------------------------------------------------------- a trained grid, its report, export


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    full = prepare_data(DataConfig(), seq_len=16)
    data = dataclasses.replace(full, train_ids=full.train_ids[:50_000], val_ids=full.val_ids[:1024])
    out = tmp_path_factory.mktemp("zoo") / "grid"
    cfg = small_cfg(out, routers=GRID_ROUTERS)
    report = run_grid(cfg, data=data)
    return dict(cfg=cfg, out=out, report=report, runs={r.router: r for r in grid_runs(cfg)})


def test_every_run_of_the_grid_trained_the_router_it_names(grid):
    assert set(grid["runs"]) == set(GRID_ROUTERS)
    for name, run in grid["runs"].items():
        assert run_status(run.run_dir, STEPS) == ("done", STEPS), name
        saved = json.loads((run.run_dir / "config.json").read_text())
        assert RunRecord(run.run_dir, saved, []).router == name
        model, _ = load_model(run.run_dir)
        assert {m.kind for m in model.moe_layers()} == {name.split("+")[0]}
        buffers = {n.split(".ffn.", 1)[1] for n, _ in model.named_buffers() if ".ffn." in n}
        assert ({"erc_seed", "erc_step"} <= buffers) == ("+erc" in name), (name, buffers)
    assert grid["runs"]["mpi+erc"].run_dir.parent.name == "mpi+erc-C1"


def test_the_report_names_runs_with_router_losses_by_their_router_name(grid):
    rows = json.loads((grid["out"] / "report.json").read_text())["sections"][0]["rows"]
    labels = [r["label"] for r in rows]
    # sorted by kind in ROUTER_KINDS order, then by name; C' shown for the kinds that use it
    assert labels == ["linear", "linear+simbal", "mpi+erc C'=1", "svd C'=1", "cosine", "kmeans", "aoe", "remoe"]
    assert all(r["seeds"] == [0] for r in rows)
    text = grid["report"].read_text()
    assert "| mpi+erc C'=1 | 1 |" in text and "| linear+simbal | 1 |" in text
    assert "mpirouter compare --routers " + ",".join(GRID_ROUTERS) in text


@pytest.mark.parametrize("kind", sorted(UNFOLDABLE_WHY))
def test_export_of_a_kind_that_does_not_fold_is_refused_in_one_line(grid, tmp_path, capsys, kind):
    assert kind in ("cosine", "kmeans", "aoe")
    out = tmp_path / "exported"
    code = main(["export", str(grid["runs"][kind].run_dir), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err == f"mpirouter export: error: cannot fold a {kind!r} router into a linear one: {UNFOLDABLE_WHY[kind]}\n"
    assert captured.out == ""
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either


@pytest.mark.parametrize("name, folded", [("svd", "linear"), ("remoe", "remoe"), ("mpi+erc", "linear")])
def test_export_of_a_kind_that_folds_keeps_the_logits(grid, tmp_path, capsys, name, folded):
    """svd folds to a linear router with weight φ; remoe keeps its ReLU gate over R; an ERC run's loss (and its
    noise state) is dropped with it."""
    run = grid["runs"][name].run_dir
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0, capsys.readouterr().err
    assert f"exported to {out}" in capsys.readouterr().out
    original, _ = load_model(run)
    exported, cfg = load_model(out)
    assert cfg.model.moe.router.kind == folded and not cfg.model.moe.router.erc.enabled
    assert all(m.kind == folded for m in exported.moe_layers())
    assert not any(n.endswith(("erc_seed", "erc_step")) for n, _ in exported.named_buffers())
    idx = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, original(idx).logits, atol=1e-5, rtol=1e-5)
    layer, folded_layer = original.moe_layers()[0], exported.moe_layers()[0]
    torch.testing.assert_close(folded_layer.router.weight, layer.router_rows().detach())
    if name == "remoe":  # λ is training state of the L1 controller; the folded layer keeps the trained value
        assert torch.equal(folded_layer.l1_coef, layer.l1_coef)
