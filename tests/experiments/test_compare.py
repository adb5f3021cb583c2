"""`mpirouter compare`: matched grid, resume of a half-finished grid, complete report, report-only rebuild."""

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
import shlex
from pathlib import Path

import pytest
import torch

from mpirouter.experiments.report import write_report
from mpirouter.experiments.compare import (
    CompareConfig,
    add_arguments,
    check_config,
    cli_main,
    command_line,
    config_from_args,
    grid_runs,
    run_grid,
    run_status,
)
import mpirouter
from mpirouter.common.config import flatten, to_dict
from mpirouter.trainer.data import DataConfig, prepare_data
from mpirouter.experiments.demo import demo_config
from mpirouter.trainer.metrics import read_metrics
from mpirouter.common.provenance import ENV_KEYS, cpu_model
from mpirouter.trainer.config import TrainConfig
from mpirouter.trainer.loop import build_model, train

STEPS = 8


@pytest.fixture(scope="module")
def data():
    full = prepare_data(DataConfig(), seq_len=32)
    return dataclasses.replace(full, train_ids=full.train_ids[:200_000], val_ids=full.val_ids[:4096])


def small_cfg(out, **kw) -> CompareConfig:
    base = dict(routers=["linear", "mpi"], seeds=[0, 1], preset="debug", steps=STEPS, batch_size=8, lrs=[1e-2],
                eval_every=4, eval_batches=2, ckpt_every=2, out_dir=str(out), progress=False,
                overrides=["model.max_seq_len=32", "eval_batch_size=16", "log_every=2"])
    base.update(kw)
    return CompareConfig(**base)


def earlier_call(cfg: CompareConfig) -> None:
    """The session record an earlier (interrupted) compare call left in its folder, as `run_grid` writes it."""
    path = Path(cfg.out_dir) / "sessions" / "20000101-000000-000000000-1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"command": command_line(cfg), "config": to_dict(cfg), "runs_trained": []}))


def snapshot(run_dir: Path) -> tuple[int, str]:
    path = run_dir / "metrics.jsonl"
    return path.stat().st_mtime_ns, path.read_text()


@pytest.fixture(scope="module")
def grid(tmp_path_factory, data):
    """A 2-router x 2-seed grid trained in three calls: one run, an interrupted run, then the rest."""
    out = tmp_path_factory.mktemp("compare") / "grid"
    cfg = small_cfg(out)
    runs = grid_runs(cfg)
    run_grid(cfg, data=data, limit=1)
    assert [run_status(r.run_dir, STEPS)[0] for r in runs] == ["done", "new", "new", "new"]
    train(runs[1].config, data=data, stop_at=3)  # "preempted" at step 3 (checkpoint written there)
    assert run_status(runs[1].run_dir, STEPS) == ("partial", 3)
    # tag the interrupted call's records: a resumed run keeps them, a run restarted from scratch would not
    tagged = [{**r, "from_first_call": True} for r in read_metrics(runs[1].run_dir)]
    (runs[1].run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tagged))
    before = {"first": snapshot(runs[0].run_dir)}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        report = run_grid(cfg, data=data)
    return dict(cfg=cfg, out=out, runs=runs, before=before, log=log.getvalue(), report=report)


def test_finished_run_is_skipped_not_retrained(grid):
    first = grid["runs"][0]
    assert snapshot(first.run_dir) == grid["before"]["first"]
    assert "run 1/4: linear seed 0 [adamw lr 0.01]: done, skipped" in grid["log"]


def test_half_finished_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(grid, data, tmp_path):
    run = grid["runs"][1]
    assert "run 2/4: mpi C'=1 seed 0 [adamw lr 0.01]: resuming from step 3" in grid["log"]
    records = read_metrics(run.run_dir)
    assert [r["event"] for r in records].count("start") == 1
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps == list(range(2, STEPS + 1, 2))
    assert [r["step"] for r in records if r.get("from_first_call")] == [0, 2]  # start + step 2 kept, not redone
    fresh = train(dataclasses.replace(run.config, out_dir=str(tmp_path / "fresh")), data=data)
    resumed_evals = [(r["step"], r["val_loss"]) for r in records if r["event"] == "eval"]
    assert resumed_evals == [(r["step"], r["val_loss"]) for r in fresh.history if r["event"] == "eval"]


def test_every_run_finished_with_a_timing_record(grid):
    for run in grid["runs"]:
        assert run_status(run.run_dir, STEPS) == ("done", STEPS)
        assert read_metrics(run.run_dir)[-1]["event"] == "timing"


def test_report_is_complete(grid):
    text = grid["report"].read_text()
    for needle in ("| linear | 2 |", "| mpi C'=1 | 2 |", "baseline", "(n=2)", "mpirouter compare --routers linear,mpi --seeds 0,1",
                   "commit ", "cores", f"torch {torch.__version__}", "UTC", "router overhead", "speed-up",
                   f"mpirouter {mpirouter.__version__}", f"{cpu_model()} (", " threads", " · cpu · ",
                   "Curves and speed-up: validation first 2 batches", "p_Holm="):
        assert needle in text, needle
    assert text.splitlines()[2].startswith("This report makes 1 paired comparisons against linear; 'significant' below "
                                           "means Holm-adjusted p < 0.05 across all 1.")
    assert "incomplete" not in text
    assert "trained 1 run(s)" in text and "trained 3 run(s)" in text  # one line per call that trained something
    pngs = [line[line.index("(") + 1:-1] for line in text.splitlines() if line.startswith("![")]
    assert sorted(pngs) == sorted(f"debug-adamw-{k}.png" for k in ("val_loss", "maxvio", "align", "align_layers"))
    for name in pngs:
        assert (grid["out"] / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((grid["out"] / "report.json").read_text())["sections"][0]["rows"]
    assert [(r["label"], r["seeds"]) for r in rows] == [("linear", [0, 1]), ("mpi C'=1", [0, 1])]
    mpi = rows[1]
    assert mpi["diff_n"] == 2 and mpi["diff"][1] <= mpi["diff"][0] <= mpi["diff"][2]
    assert 0 < mpi["p"] <= mpi["p_holm"] <= 1 and rows[0]["p"] is None  # one comparison: Holm leaves p as is
    assert mpi["p_holm"] == pytest.approx(mpi["p"])
    assert mpi["align"][0] > rows[0]["align"][0]  # MPI rows are aligned by construction
    assert 0 < mpi["overhead"] < 1 and mpi["step_vs_linear"] > 0


def test_report_only_rebuilds_the_report_without_training(grid):
    out = grid["out"]
    for f in [out / "report.md", *out.glob("*.png")]:
        f.unlink()
    stamps = [snapshot(r.run_dir) for r in grid["runs"]]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert cli_main(parser.parse_args(["--out", str(out), "--report-only"])) == 0
    assert "| mpi C'=1 | 2 |" in (out / "report.md").read_text()
    assert len(list(out.glob("*.png"))) == 4
    assert [snapshot(r.run_dir) for r in grid["runs"]] == stamps


def test_report_lists_an_unfinished_run_and_leaves_it_out_of_the_table(grid, data, tmp_path):
    cfg = small_cfg(tmp_path / "g", routers=["linear"], seeds=[0], steps=4, eval_every=2)
    train(grid_runs(cfg)[0].config, data=data, stop_at=2)
    report = cli_main(argparse.Namespace(report_only=True, out=str(tmp_path / "g")))
    text = (tmp_path / "g" / "report.md").read_text()
    assert report == 0 and "incomplete runs" in text and "linear/seed0" in text and "No finished runs yet." in text


def test_matched_runs_share_initial_weights_and_differ_only_in_the_router(tmp_path):
    cfg = small_cfg(tmp_path, routers=["linear", "mpi", "retract", "mpi-inplace"], seeds=[0, 1])
    runs = grid_runs(cfg)
    flat = lambda c: flatten(to_dict(c))
    base = flat(runs[0].config)
    for run in runs[1:4]:  # seed 0
        diff = {k for k, v in flat(run.config).items() if base[k] != v}
        assert diff <= {"model.moe.router.kind", "model.moe.router.scale_prime", "out_dir"}, diff
    models = [build_model(r.config, 256, torch.device("cpu")).state_dict() for r in runs]
    for name, ref in models[0].items():
        for run, sd in zip(runs[1:4], models[1:4]):
            if name.endswith("router.weight") and run.router == "mpi-inplace":
                continue  # projected once at init by design
            assert torch.equal(sd[name], ref), (run.router, name)
    assert not torch.equal(models[4]["tok_emb.weight"], models[0]["tok_emb.weight"])  # seed 1 differs


def test_grid_layout_and_routers_that_ignore_the_scale_run_once(tmp_path):
    cfg = small_cfg(tmp_path, routers=["linear", "mpi", "power", "retract"], seeds=[3], scales=[0.5, 2.0])
    runs = grid_runs(cfg)
    names = [str(r.run_dir.relative_to(tmp_path)) for r in runs]
    assert names == [f"debug/adamw-lr0.01/{n}/seed3" for n in ("linear", "mpi-C0.5", "mpi-C2", "power", "retract-C0.5", "retract-C2")]
    assert [r.config.model.moe.router.scale_prime for r in runs if r.router == "mpi"] == [0.5, 2.0]
    assert all(r.config.seed == 3 and r.config.model.max_seq_len == 32 and r.config.ckpt_every == 2 for r in runs)


BAD = [("override-sets-seed", dict(overrides=["seed=3"])), ("override-sets-router", dict(overrides=["model.moe.router.kind=mpi"])),
       ("unknown-router", dict(routers=["linear", "nope"])), ("duplicate-seed", dict(seeds=[0, 0])), ("no-seeds", dict(seeds=[]))]


@pytest.mark.parametrize("kw", [b[1] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_grid_configs_are_refused(tmp_path, kw):
    with pytest.raises(ValueError):
        small_cfg(tmp_path, **kw)


def test_unknown_optimizer_name_is_refused_by_the_trainer_config(tmp_path):
    with pytest.raises(ValueError, match="not-an-optimizer"):
        grid_runs(small_cfg(tmp_path, optimizers=["not-an-optimizer"]))


def test_reusing_a_folder_trained_with_another_config_is_refused(tmp_path):
    run = grid_runs(small_cfg(tmp_path))[0]
    run.run_dir.mkdir(parents=True)
    saved = to_dict(run.config)
    (run.run_dir / "config.json").write_text(json.dumps(saved))
    check_config(run)  # same config: fine
    lazy = dataclasses.replace(run, config=dataclasses.replace(run.config, optim=dataclasses.replace(run.config.optim, lr=None)))
    check_config(lazy)  # None (a default the trainer resolves) accepts the value the run actually used
    saved["steps"] = 99
    (run.run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="steps: 99 -> 8"):
        check_config(run)


def test_a_grid_run_may_change_processes_but_not_its_global_batch(tmp_path, monkeypatch):
    """Continuing a grid under torchrun: dist.* may change, the global batch (processes x batch_size) may not."""
    run = grid_runs(small_cfg(tmp_path))[0]
    run.run_dir.mkdir(parents=True)
    saved = to_dict(run.config)
    saved["dist"]["ep"] = 2
    (run.run_dir / "config.json").write_text(json.dumps(saved))
    check_config(run)  # dist differs: fine
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=rf"global batch \(processes x batch_size\): {run.config.batch_size} -> {2 * run.config.batch_size}"):
        check_config(run)
    (run.run_dir / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0, "world_size": 2}) + "\n")
    check_config(run)  # trained by 2 processes too


def test_report_takes_runs_without_a_router_cost(grid, tmp_path):
    """Runs trained under torchrun record router_ms as null (a one-process measurement): the report still builds."""
    out = tmp_path / "grid"
    shutil.copytree(grid["out"], out)
    for metrics in out.rglob("metrics.jsonl"):
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        metrics.write_text("".join(json.dumps({**r, "router_ms": None} if r["event"] == "timing" else r) + "\n" for r in records))
    rows = json.loads(write_report(out).with_suffix(".json").read_text())["sections"][0]["rows"]
    assert all(r["router_ms"] is None and r["overhead"] is None and r["step_ms"] > 0 for r in rows)


@pytest.mark.parametrize("kw", [dict(), dict(data="my corpus/x.txt", tokenizer="bpe")], ids=["embedded-corpus", "custom-data"])
def test_command_line_round_trips_through_the_parser(tmp_path, kw):
    cfg = small_cfg(tmp_path / "out dir", scales=[0.5, 1.0], warmup_steps=3, eval_batches=None, lrs=[], **kw)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = shlex.split(command_line(cfg))
    assert argv[:2] == ["mpirouter", "compare"]
    assert config_from_args(parser.parse_args(argv[2:])) == cfg


def test_lr_sweep_split_over_two_calls_sharing_one_folder(data, tmp_path):
    """Two calls with disjoint seeds (as two processes, one per core, would run) fill one folder and one report."""
    out = tmp_path / "sweep"
    for seed in (0, 1):
        run_grid(small_cfg(out, seeds=[seed], lrs=[1e-2, 2e-2], steps=4, eval_every=4), data=data)
    sessions = sorted((out / "sessions").glob("*.json"))
    assert len(sessions) == 2 and all(len(json.loads(p.read_text())["runs_trained"]) == 4 for p in sessions)
    assert sorted(str(p.relative_to(out).parent) for p in out.rglob("metrics.jsonl")) == [
        f"debug/adamw-lr{lr}/{router}/seed{s}" for lr in ("0.01", "0.02") for router in ("linear", "mpi-C1") for s in (0, 1)]
    text = (out / "report.md").read_text()
    assert "## lr sweep: preset `debug`, optimizer `adamw`" in text and "| router | lr 0.01 | lr 0.02 | best lr |" in text
    assert "tokens, lrs 0.01 / 0.02, " in text and "tokens, lr 0.01, " in text
    assert "## preset `debug`, optimizer `adamw`, lr 0.01" in text and "## preset `debug`, optimizer `adamw`, lr 0.02" in text
    assert "--seeds 0 " in text and "--seeds 1 " in text and "--lr 0.01,0.02" in text
    sweep = json.loads((out / "report.json").read_text())["sweeps"][0]["rows"]
    assert [r["label"] for r in sweep] == ["linear", "mpi C'=1"] and sweep[1]["diff_n"] == 2
    assert {float(lr) for lr in sweep[0]["by_lr"]} == {1e-2, 2e-2}
    for name in ("debug-adamw-lr_sweep.png", "debug-adamw-lr0.01-val_loss.png", "debug-adamw-lr0.02-align_layers.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        small_cfg(out, lrs=[0.0])


def test_compare_trains_on_the_data_given_with_data(tmp_path):
    words = ["router", "expert", "gate", "token", "power", "manifold", "iteration", "sparse", "mixture", "loss"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % 10] for j in range(12)) for i in range(800)))  # ~60 KB
    out = tmp_path / "g"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--routers", "linear", "--seeds", "0", "--preset", "debug", "--steps", "2", "--batch-size", "2",
                              "--eval-every", "0", "--data", str(corpus), "--out", str(out), "--no-progress",
                              "--set", "eval_batch_size=64", "--set", "model.max_seq_len=32"])
    assert cli_main(args) == 0
    saved = json.loads((out / "debug" / "adamw" / "linear" / "seed0" / "config.json").read_text())
    assert saved["data"]["path"] == str(corpus) and saved["data"]["tokenizer"] == "byte"
    start = read_metrics(out / "debug" / "adamw" / "linear" / "seed0")[0]
    assert start["corpus"] != DataConfig().path and str(corpus) in start["corpus"]
    session = json.loads(next((out / "sessions").glob("*.json")).read_text())
    assert set(ENV_KEYS) <= set(session) and "--data " + str(corpus) in session["command"]


def test_demo_config_takes_data_and_tokenizer_and_keeps_its_defaults(tmp_path):
    default = demo_config("mpi", 60, 0, tmp_path)
    assert default.data == DataConfig() and default.data == TrainConfig().data  # the demo's numbers stay the same
    custom = demo_config("mpi", 60, 0, tmp_path, data_path="x.jsonl", tokenizer="bpe")
    assert (custom.data.path, custom.data.tokenizer) == ("x.jsonl", "bpe")
    assert dataclasses.replace(custom, data=DataConfig()) == default


def test_run_stopped_before_its_first_checkpoint_restarts_and_a_locked_run_is_skipped(tmp_path, data):
    from mpirouter.trainer.rundir import RunLock

    cfg = small_cfg(tmp_path / "g", routers=["linear"], seeds=[0, 1])
    earlier_call(cfg)
    first, second = grid_runs(cfg)
    first.run_dir.mkdir(parents=True)
    (first.run_dir / "config.json").write_text(json.dumps(to_dict(first.config)))
    (first.run_dir / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')  # killed before any checkpoint
    second.run_dir.mkdir(parents=True)
    log = io.StringIO()
    with RunLock(second.run_dir), contextlib.redirect_stdout(log):
        run_grid(cfg, data=data)
    aside = [p for p in first.run_dir.parent.iterdir() if ".old-" in p.name]
    assert run_status(first.run_dir, STEPS)[0] == "done" and len(aside) == 1
    assert (aside[0] / "metrics.jsonl").read_text() == '{"event": "start", "step": 0}\n'
    assert "linear seed 1 [adamw lr 0.01]: being trained by another process, skipped" in log.getvalue()
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    assert [r["seeds"] for s in report["sections"] for r in s["rows"]] == [[0]]  # the moved-aside start is not a run


# ----------------------------------------------------------------------------- nothing lost (issue #22)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compare_refuses_a_non_empty_folder_that_is_not_a_compare_folder(tmp_path, data):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "report.md").write_text("mine\n")
    (notes / "todo.txt").write_text("x\n")
    mine = _tree(notes)
    tiny = dict(routers=["linear"], seeds=[0], steps=2, eval_every=2, ckpt_every=0)
    with pytest.raises(FileExistsError, match="is not a compare folder"):
        run_grid(small_cfg(notes, **tiny), data=data)
    assert _tree(notes) == mine
    # a sessions/ folder of another shape is not our marker
    (notes / "sessions").mkdir()
    (notes / "sessions" / "a.json").write_text(json.dumps({"command": "my own notes", "config": {}}))
    with pytest.raises(FileExistsError, match="is not a compare folder"):
        run_grid(small_cfg(notes, **tiny), data=data)
    assert not (notes / "debug").exists()


def test_report_only_never_writes_over_a_users_files_in_a_folder_that_is_not_a_compare_folder(grid, tmp_path):
    pool = tmp_path / "pool"
    shutil.copytree(grid["out"] / "debug", pool / "grid" / "debug")  # run folders, but no marker of ours at the top
    (pool / "report.md").write_text("my notes\n")
    args = _parser().parse_args(["--out", str(pool), "--report-only"])
    with pytest.raises(FileExistsError, match="report.md was not written by mpirouter compare"):
        cli_main(args)
    assert (pool / "report.md").read_text() == "my notes\n" and not list(pool.glob("*.png"))
    (pool / "report.md").unlink()
    assert cli_main(args) == 0 and cli_main(args) == 0  # the second call replaces only what the first one wrote
    assert "| mpi C'=1 | 2 |" in (pool / "report.md").read_text() and len(list(pool.glob("*.png"))) == 4


BAD_FLAGS = [["--limit", "-1"], ["--limit", "0"], ["--steps", "0"], ["--batch-size", "0"], ["--eval-every", "-1"],
             ["--eval-batches", "0"], ["--ckpt-every", "-1"], ["--warmup-steps", "-1"]]


@pytest.mark.parametrize("flag", BAD_FLAGS, ids=[" ".join(f) for f in BAD_FLAGS])
def test_bad_numeric_flags_are_refused_before_anything_is_created(tmp_path, flag):
    out = tmp_path / "g"
    args = _parser().parse_args(["--routers", "linear", "--seeds", "0", "--preset", "debug", "--steps", "2", "--no-progress",
                                 "--out", str(out), "--set", "model.max_seq_len=16", *flag])
    with pytest.raises(ValueError, match=f"{flag[0]} must be >= "):
        cli_main(args)
    assert not out.exists()


def test_a_bad_limit_is_one_line_on_the_command_line(tmp_path, capsys):
    from mpirouter.cli import main

    assert main(["compare", "--limit", "-1", "--preset", "debug", "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err == "mpirouter compare: error: compare: --limit must be >= 1, got -1\n"
    assert not (tmp_path / "g").exists()


def test_a_half_finished_run_that_another_process_trains_is_skipped_not_resumed(tmp_path, data):
    from mpirouter.trainer.rundir import RunLock

    cfg = small_cfg(tmp_path / "g", routers=["linear"], seeds=[0], steps=4, eval_every=2)
    earlier_call(cfg)  # the first of two identical compare calls, now training the run
    (run,) = grid_runs(cfg)
    train(run.config, data=data, stop_at=2)
    assert run_status(run.run_dir, 4) == ("partial", 2)
    log = io.StringIO()
    with RunLock(run.run_dir), contextlib.redirect_stdout(log):
        run_grid(cfg, data=data)
    assert "run 1/1: linear seed 0 [adamw lr 0.01]: being trained by another process, skipped" in log.getvalue()
    assert "resuming" not in log.getvalue()
    assert run_status(run.run_dir, 4) == ("partial", 2)


def test_report_only_on_a_full_disk_leaves_no_partial_file_and_says_so_in_one_line(grid, tmp_path, monkeypatch, capsys):
    import errno

    from matplotlib.figure import Figure

    from mpirouter.cli import main

    out = tmp_path / "grid"
    shutil.copytree(grid["out"], out)
    for png in out.glob("*.png"):
        png.unlink()
    before = _tree(out)

    def full_disk(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG\r\n\x1a\n")  # the first bytes made it, the rest did not
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    assert main(["compare", "--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mpirouter compare: error: No space left on device: ") and ".png" in err
    assert _tree(out) == before  # no truncated plot, no temporary file, the old report as it was


def test_a_grid_that_cannot_record_its_call_leaves_no_folder_behind(tmp_path, data, monkeypatch):
    """Else the retry would find a non-empty folder without a session of ours and refuse it."""
    import errno

    from mpirouter.experiments import compare

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(compare, "atomic_write_text", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        run_grid(small_cfg(tmp_path / "runs" / "g", routers=["linear"], seeds=[0], steps=2), data=data)
    assert list(tmp_path.iterdir()) == []
