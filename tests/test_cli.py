"""The `mpirouter` commands end to end on the embedded corpus (debug preset, a few steps)."""

import json
import subprocess
import sys

import pytest
import torch

from mpirouter.cli import main
from mpirouter.train import load_model

FAST = ["--preset", "debug", "--steps", "6", "--batch-size", "4", "--set", "eval_every=0", "--set", "eval_batch_size=64"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *FAST, "--router", "mpi", "--out", str(out)]) == 0
    return out


def test_train_writes_config_metrics_and_checkpoint(run_dir, capsys):
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["model"]["moe"]["router"]["kind"] == "mpi" and cfg["steps"] == 6
    events = [json.loads(l)["event"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == "start" and "eval" in events and events[-1] == "timing"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_0000006"


def test_sample_prints_text_continuing_the_prompt(run_dir, capsys):
    assert main(["sample", str(run_dir), "--prompt", "ROMEO.", "--tokens", "20", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO.") and len(text.encode()) >= len("ROMEO.") + 10


def test_export_folds_routers_and_keeps_logits(run_dir, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    original, _ = load_model(run_dir)
    exported, cfg = load_model(out)
    assert cfg.model.moe.router.kind == "linear"
    assert all(m.router.kind == "linear" for m in exported.moe_layers())
    idx = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(exported(idx).logits, original(idx).logits, atol=1e-5, rtol=1e-5)
    # the exported weights are exactly φ of the original
    m0, m1 = original.moe_layers()[0], exported.moe_layers()[0]
    torch.testing.assert_close(m1.router.weight, m0.router.rows(m0.w_gate, m0.w_up))


def test_inspect_prints_a_table_per_layer_and_expert(run_dir, capsys):
    assert main(["inspect", str(run_dir), "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "align φ" in out and "MaxVio" in out and "gain φ" in out
    layer_rows = [line.split() for line in out.splitlines() if " all " in line]
    assert len(layer_rows) == 2  # debug preset: 2 MoE layers
    assert all(0 < float(row[-2]) <= 1.0001 for row in layer_rows)  # gain φ = ‖Gφ̂‖/σ1 lies in (0, 1]


def test_resume_via_cli_finishes_the_run(tmp_path):
    out = tmp_path / "r"
    assert main(["train", *FAST, "--out", str(out), "--stop-at", "3"]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "step_0000003"
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert (out / "checkpoints" / "latest").read_text() == "step_0000006"


@pytest.mark.parametrize(
    "argv, message",
    [(["train", "--router", "sigmoid"], "invalid choice: 'sigmoid'"),
     (["train", "--preset", "debug", "--set", "model.moe.top_k=9"], "top_k must be in"),
     (["train", "--preset", "debug", "--set", "model.n_heads=3"], "n_heads=3 must divide dim=64"),
     (["train", "--preset", "debug", "--data", "/nonexistent/corpus.txt"], "nonexistent"),
     (["sample", "/nonexistent/run"], "does not exist")],
    ids=["unknown-router", "topk-gt-experts", "heads-not-dividing", "missing-data", "missing-checkpoint"],
)
def test_bad_input_fails_with_a_clear_message(argv, message, capsys, tmp_path):
    try:
        code = main(argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else []))
    except SystemExit as e:  # argparse rejects unknown choices itself
        code = e.code
    assert code != 0
    assert message in capsys.readouterr().err


def test_bench_runs_on_the_debug_shape(capsys, tmp_path):
    assert main(["bench", "--shapes", "debug", "--reps", "1", "--router-preset", "debug", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "sorted/loop" in out and "naive" in out and "MPI rows" in out
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res["shapes"]["debug"]["ms"]) >= {"sorted/loop", "naive", "dense"}


def test_demo_writes_table_and_plot(tmp_path, capsys):
    assert main(["demo", "--preset", "debug", "--steps", "6", "--out", str(tmp_path)]) == 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| linear |" in summary and "| mpi |" in summary
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [r["router"] for r in rows] == ["linear", "mpi"] and all(r["val loss"] > 0 for r in rows)


def test_console_script_runs_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "mpirouter.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "train" in r.stdout and "export" in r.stdout


@pytest.mark.parametrize("optimizer", ["muon", "muonh"])
def test_train_with_another_optimizer_records_its_default_lr(tmp_path, optimizer):
    from mpirouter.optim import DEFAULT_LR

    out = tmp_path / optimizer
    assert main(["train", *FAST, "--optimizer", optimizer, "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optim"]["name"] == optimizer and cfg["optim"]["lr"] == DEFAULT_LR[optimizer]
