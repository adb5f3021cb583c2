"""The `mpirouter` commands end to end on the embedded corpus (debug preset, a few steps)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mpirouter.cli import main
from mpirouter.trainer.checkpoint import load_model

FAST = ["--preset", "debug", "--steps", "6", "--batch-size", "4", "--set", "eval_every=0", "--set", "eval_batch_size=64", "--set", "progress=false"]


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


def cli(argv, capsys):
    """(exit code, stdout, stderr) of `mpirouter ARGV` run in this process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage errors (2), --help/--version (0)
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_flags_given_on_the_command_line_win_over_config(run_dir, tmp_path, capsys):
    before = (run_dir / "metrics.jsonl").read_text()
    out = tmp_path / "b"
    code, _, _ = cli(["train", "--config", str(run_dir / "config.json"), "--out", str(out), "--steps", "3", "--router", "linear"], capsys)
    cfg = json.loads((out / "config.json").read_text())
    assert code == 0 and cfg["steps"] == 3 and cfg["out_dir"] == str(out) and cfg["model"]["moe"]["router"]["kind"] == "linear"
    assert cfg["batch_size"] == 4 and cfg["preset"] == "debug"  # the rest comes from the file
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_training_into_an_existing_run_is_refused_and_force_moves_it_aside(run_dir, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    metrics = (copy / "metrics.jsonl").read_text()
    code, _, err = cli(["train", *FAST, "--out", str(copy)], capsys)
    assert code == 2 and "--resume" in one_error_line(err) and "--force" in err
    assert (copy / "metrics.jsonl").read_text() == metrics
    code, out, _ = cli(["train", *FAST, "--out", str(copy), "--force"], capsys)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("copy.old-")]
    assert code == 0 and len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == metrics and str(aside[0]) in out


def test_a_second_job_on_the_same_folder_is_refused(tmp_path, capsys):
    from mpirouter.trainer.rundir import RunLock

    (tmp_path / "r").mkdir()
    with RunLock(tmp_path / "r"):
        code, _, err = cli(["train", *FAST, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "in use by another job (pid" in one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".lock"]


def test_resume_continues_a_moved_run_and_refuses_what_cannot_change(tmp_path, capsys):
    first = tmp_path / "first"
    assert cli(["train", *FAST, "--out", str(first), "--stop-at", "3"], capsys)[0] == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    code, _, err = cli(["train", "--resume", "--out", str(moved), "--router", "linear"], capsys)
    assert code == 2 and "cannot change on resume: model.moe.router.kind ('mpi' -> 'linear')" in one_error_line(err)
    code, _, err = cli(["train", "--resume", "--out", str(moved), "--set", "model.moe.top_k=1"], capsys)
    assert code == 2 and "model.moe.top_k (2 -> 1)" in one_error_line(err)
    code, out, _ = cli(["train", "--resume", "--out", str(moved), "--steps", "8", "--stop-at", "7"], capsys)
    assert code == 0 and "extending the run from 6 to 8 steps" in out
    assert (moved / "checkpoints" / "latest").read_text() == "step_0000007" and not first.exists()


def test_signal_during_training_checkpoints_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from mpirouter.core.model import MoELM

    real, calls = MoELM.forward, {"n": 0}

    def interrupting(self, idx, targets=None):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, idx, targets)

    monkeypatch.setattr(MoELM, "forward", interrupting)
    code, _, err = cli(["train", *FAST, "--out", str(tmp_path / "r")], capsys)
    line = [l for l in err.splitlines() if l.startswith("mpirouter train:")][0]
    assert code == 130 and f"to continue: mpirouter train --resume --out {tmp_path / 'r'}" in line and "step 2" in line
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_0000002"


def test_disk_full_during_a_save_is_one_line_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    import mpirouter.trainer.checkpoint as ckpt_mod

    real_save, calls = ckpt_mod.torch.save, {"n": 0}

    def fills_up(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(*a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", fills_up)
    code, _, err = cli(["train", *FAST, "--out", str(tmp_path / "r"), "--set", "ckpt_every=2"], capsys)
    assert code == 2 and one_error_line(err).startswith("mpirouter train: error: no space left on device: writing the checkpoint")
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert not list((tmp_path / "r" / "checkpoints").glob(".tmp-*"))
    assert cli(["train", "--resume", "--out", str(tmp_path / "r")], capsys)[0] == 0
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_0000006"


def test_unwritable_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)  # as root, chmod cannot make a folder read-only
    code, _, err = cli(["train", *FAST, "--out", str(tmp_path / "ro" / "r")], capsys)
    assert code == 2 and one_error_line(err) == f"mpirouter train: error: Permission denied: {tmp_path / 'ro' / 'r'}"


def test_corrupt_weights_are_skipped_by_sample_with_a_warning_and_resume_falls_back(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(["train", *FAST, "--out", str(out), "--set", "ckpt_every=2", "--stop-at", "4"], capsys)[0] == 0
    (out / "checkpoints" / "step_0000004" / "model.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = cli(["sample", str(out), "--tokens", "3"], capsys)
    assert code == 0 and "step_0000004 is unreadable" in err and err.strip().endswith("step_0000002")
    code, _, err = cli(["sample", str(out / "checkpoints" / "step_0000004"), "--tokens", "3"], capsys)
    assert code == 2 and "step_0000004 is unreadable" in one_error_line(err)  # one checkpoint asked for: nothing to fall back to
    code, out_text, _ = cli(["train", "--resume", "--out", str(out)], capsys)
    assert code == 0 and "falling back to" in out_text and "step_0000002" in out_text


@pytest.mark.parametrize(
    "argv, message",
    [(["sample", "RUN", "--top-k", "0"], "top_k"), (["sample", "RUN", "--device", "cuda"], "CUDA is not available"),
     (["sample", "RUN", "--tokens", "-1"], "max_new_tokens"), (["train", "--device", "foo", "--out", "OUT"], "unknown device 'foo'"),
     (["train", "--set", "model.moe=5", "--out", "OUT"], "model.moe"), (["train", "--set", "optim.betas=[0.9]", "--out", "OUT"], "optim.betas"),
     (["train", "--set", "log_every=0", "--out", "OUT"], "log_every must be >= 1"), (["train", "--stop-at", "-1", "--out", "OUT"], "stop_at must be >= 1"),
     (["train", "--resume", "--out", "OUT"], "does not exist"), (["train", "--config", "RUN", "--out", "OUT"], "is a folder"),
     (["bench", "--reps", "0"], "--reps must be >= 1"), (["train", "--config", "", "--out", "OUT"], "--config must not be empty"),
     (["train", "--out", ""], "--out must not be empty"), (["train", "--data", "", "--out", "OUT"], "--data must not be empty"),
     (["train", "--config", "DEEP", "--out", "OUT"], "nested too deeply"), (["bench", "--json", "RUN"], "already exists"),
     (["compare", "--seeds", "a", "--out", "OUT"], "--seeds 'a': expected comma-separated int"),
     (["compare", "--preset", "debug", "--out", "RUN"], "is a training run folder"),
     (["train", "--resume", "--out", "RUN/checkpoints/step_0000006"], "inside the checkpoints of the run")],
    ids=["sample-topk-0", "sample-no-cuda", "sample-negative-tokens", "train-device", "section-as-int", "betas-length", "log-every-0",
         "stop-at-negative", "resume-missing", "config-is-a-folder", "bench-reps-0", "empty-config", "empty-out", "empty-data",
         "deep-json", "bench-json-exists", "compare-seeds", "compare-into-a-run", "resume-inside-checkpoints"],
)
def test_more_bad_input_is_one_clear_line(argv, message, run_dir, tmp_path, capsys):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    argv = [a.replace("RUN", str(run_dir)) if a.startswith("RUN") else str(tmp_path / "out") if a == "OUT"
            else str(tmp_path / "deep.json") if a == "DEEP" else a for a in argv]
    code, _, err = cli(argv[:1] + (FAST if argv[0] == "train" and "--resume" not in argv else []) + argv[1:], capsys)
    assert code == 2 and message in one_error_line(err)


def test_empty_prompt_samples_from_a_newline_without_a_nul_byte(run_dir, capsys):
    code, out, _ = cli(["sample", str(run_dir), "--prompt", "", "--tokens", "12"], capsys)
    assert code == 0 and "\x00" not in out and len(out.encode()) >= 10


def test_version_and_help_show_description_and_defaults(capsys):
    from mpirouter import __version__

    code, out, _ = cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"mpirouter {__version__}"
    code, out, _ = cli(["train", "--help"], capsys)
    assert code == 0 and out.count("mpirouter train --preset tiny") == 1 and "--resume" in out and "(default: 500)" in out


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from mpirouter.core.model import MoELM

    def no_memory(self, *a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(MoELM, "forward", no_memory)
    code, _, err = cli(["train", *FAST, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "out of memory" in one_error_line(err) and "smaller batch" in err


def test_a_tiny_temperature_samples_the_most_likely_token(run_dir, capsys):
    greedy = cli(["sample", str(run_dir), "--tokens", "8", "--temperature", "0"], capsys)
    tiny = cli(["sample", str(run_dir), "--tokens", "8", "--temperature", "1e-45"], capsys)
    assert greedy[0] == tiny[0] == 0 and greedy[1] == tiny[1]


def test_one_process_commands_refuse_to_run_under_torchrun(tmp_path, monkeypatch, capsys):
    """Every rank would export (or sample, inspect, prepare data) into the same place: refused, once, by rank 0."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == ("mpirouter export: error: export runs in one process; start it without torchrun "
                                               "(only train and compare run as a job of several processes)")
    monkeypatch.setenv("RANK", "1")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == ""  # the other ranks stay quiet
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["prepare-data", "export"])
def test_a_long_but_legal_out_name_works(run_dir, tmp_path, capsys, command):
    """Issue #22 row 24: a 250-character --out failed on its hidden temporary sibling ("File name too long")."""
    out = tmp_path / ("o" * 250)
    if command == "export":
        argv = ["export", str(run_dir), "--out", str(out)]
    else:
        (tmp_path / "c.txt").write_text("some text to tokenize, line after line.\n" * 50)
        argv = ["prepare-data", "--data", str(tmp_path / "c.txt"), "--out", str(out)]
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    assert out.is_dir() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_force_with_out_dot_starts_the_new_run_beside_the_old_one_not_inside_it(tmp_path, monkeypatch, capsys):
    """From inside a run, `train --out . --force` moved the run aside and then wrote the new one into it (the working
    folder moves with it): the old run's config, metrics and checkpoints were replaced or rotated away."""
    run = tmp_path / "a"
    assert cli(["train", *FAST, "--out", str(run), "--set", "ckpt_every=2", "--set", "ckpt_keep=5"], capsys)[0] == 0
    old = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    monkeypatch.chdir(run)
    assert cli(["train", *FAST, "--steps", "3", "--out", ".", "--force"], capsys)[0] == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("a.old-")]
    assert len(aside) == 1
    assert {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file() and p.name != ".lock"} == old
    assert json.loads((run / "config.json").read_text())["steps"] == 3 and (run / "checkpoints" / "step_0000003").is_dir()


def test_demo_with_out_dot_inside_an_earlier_demo_leaves_it_whole(tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    demo = ["demo", "--preset", "debug", "--steps", "2", "--routers", "linear", "--data", str(corpus)]
    assert cli([*demo, "--out", str(tmp_path / "d")], capsys)[0] == 0
    old = {p.relative_to(tmp_path / "d"): p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file() and p.name != ".lock"}
    monkeypatch.chdir(tmp_path / "d")
    assert cli([*demo, "--out", "."], capsys)[0] == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("d.old-")]
    assert len(aside) == 1
    assert {p.relative_to(aside[0]): p.read_bytes() for p in aside[0].rglob("*") if p.is_file() and p.name != ".lock"} == old
    assert (tmp_path / "d" / "summary.json").is_file()
