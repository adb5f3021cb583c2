"""`export_checkpoint`: folded routers, and an export that never deletes what it did not create."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mpirouter.trainer.export as export
from mpirouter.trainer.checkpoint import save_checkpoint
from mpirouter.common.config import to_dict
from mpirouter.trainer.export import MARKER, export_checkpoint, is_export
from mpirouter.core.model import MoELM, preset_config
from mpirouter.trainer.checkpoint import load_model
from mpirouter.trainer.config import TrainConfig


def make_run(run_dir: Path, step: int = 1, seed: int = 0) -> Path:
    """A run folder as training leaves it: config.json, metrics.jsonl, checkpoints/step_X (MPI routers)."""
    cfg = TrainConfig(model=preset_config("debug"), preset="debug")
    torch.manual_seed(seed)
    model = MoELM(cfg.model)
    save_checkpoint(run_dir, step, model, to_dict(cfg), None)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": step, "loss": 5.0}) + "\n")
    return run_dir


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("template") / "a")


@pytest.fixture
def runs(tmp_path, template) -> Path:
    """runs/a (the source) and runs/b (another run), fresh copies per test."""
    root = tmp_path / "runs"
    shutil.copytree(template, root / "a")
    shutil.copytree(template, root / "b")
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included), by relative path, byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".export-" in p.name)


def probe_logits(path) -> torch.Tensor:
    model, _ = load_model(path)
    return model(torch.arange(16).view(2, 8)).logits


def test_export_into_a_sibling_folds_routers_keeps_logits_and_marks_it(runs):
    before = snapshot(runs)
    out = export_checkpoint(runs / "a", runs / "a-export")
    assert out == runs / "a-export"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", MARKER, "model.safetensors"]
    exported, cfg = load_model(out)
    assert all(m.router.kind == "linear" for m in exported.moe_layers()) and cfg.model.moe.router.kind == "linear"
    torch.testing.assert_close(probe_logits(out), probe_logits(runs / "a"), atol=1e-5, rtol=1e-5)
    marker = json.loads((out / MARKER).read_text())
    source = (runs / "a" / "checkpoints" / "step_0000001").resolve()
    assert marker == {"format": "mpirouter-export", "version": 1, "source": str(source), "step": 1, "mpirouter_version": marker["mpirouter_version"]}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["folded_routers"] == "true"
    assert is_export(out)
    after = snapshot(runs)
    assert {k: v for k, v in after.items() if not k.startswith("a-export/")} == before  # the source and the other run untouched
    assert leftovers(runs) == []


def test_tokenizer_of_the_run_is_copied(runs):
    (runs / "a" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    out = export_checkpoint(runs / "a", runs / "a-export", verify=False)
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'


@pytest.mark.parametrize(
    "out, message",
    [(".", "is or contains the source"), ("a", "is or contains the source"), ("a/checkpoints/step_0000001", "is or contains the source"),
     ("a/checkpoints", "is or contains the source"), ("a/export", "is inside the source run"), ("a/checkpoints/step_0000002", "is inside the source run")],
    ids=["parent-of-all-runs", "the-source-run", "the-source-checkpoint", "the-checkpoints-folder", "new-folder-inside-the-run",
         "new-folder-in-checkpoints"],
)
def test_destinations_that_hold_or_sit_in_the_source_are_refused(runs, out, message):
    before = snapshot(runs)
    with pytest.raises(FileExistsError, match=message):
        export_checkpoint(runs / "a", runs / out, force=True)
    assert snapshot(runs) == before
    assert not (runs / "a" / "export").exists() and leftovers(runs) == []


def test_the_checkpoint_folder_as_source_is_protected_too(runs):
    before = snapshot(runs)
    ckpt_dir = runs / "a" / "checkpoints" / "step_0000001"
    with pytest.raises(FileExistsError, match="is or contains the source"):
        export_checkpoint(ckpt_dir, runs / "a", force=True)
    assert snapshot(runs) == before


def test_existing_file_is_refused_and_kept(runs):
    target = runs / "notes.txt"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt is an existing file; choose another --out"):
        export_checkpoint(runs / "a", target, force=True)
    assert target.read_text() == "mine"


@pytest.mark.parametrize("marker", [False, True], ids=["plain-folder", "export-with-a-user-file"])
def test_folder_that_is_not_an_export_is_refused_and_kept(runs, marker):
    folder = runs / "mine"
    if marker:
        export_checkpoint(runs / "a", folder, verify=False)
    folder.mkdir(exist_ok=True)
    (folder / "keep.txt").write_text("user data")
    before = snapshot(runs)
    with pytest.raises(FileExistsError, match="exists and is not an mpirouter export; refusing to replace it"):
        export_checkpoint(runs / "a", folder, force=True)
    assert snapshot(runs) == before and leftovers(runs) == []


def test_another_run_is_not_an_export(runs):
    before = snapshot(runs / "b")
    with pytest.raises(FileExistsError, match="not an mpirouter export"):
        export_checkpoint(runs / "a", runs / "b", force=True)
    assert snapshot(runs / "b") == before


def test_empty_existing_folder_is_used(runs):
    (runs / "empty").mkdir()
    export_checkpoint(runs / "a", runs / "empty", verify=False)
    assert is_export(runs / "empty")


def test_earlier_export_needs_force_then_is_replaced(runs):
    out = runs / "a-export"
    export_checkpoint(runs / "a", out, verify=False)
    (out / "tokenizer.json").write_text("{}")  # something the new export does not have: must be gone afterwards
    earlier = snapshot(out)
    make_run(runs / "a", step=2, seed=1)
    with pytest.raises(FileExistsError, match="a-export is an earlier export; pass --force to replace it"):
        export_checkpoint(runs / "a", out)
    assert snapshot(out) == earlier
    export_checkpoint(runs / "a", out, force=True)
    assert json.loads((out / MARKER).read_text())["step"] == 2
    assert not (out / "tokenizer.json").exists()
    torch.testing.assert_close(probe_logits(out), probe_logits(runs / "a"), atol=1e-5, rtol=1e-5)
    assert leftovers(runs) == []


def test_export_written_before_the_marker_counts_as_an_earlier_export(runs):
    out = runs / "legacy"
    export_checkpoint(runs / "a", out, verify=False)
    (out / MARKER).unlink()
    assert is_export(out)
    with pytest.raises(FileExistsError, match="is an earlier export"):
        export_checkpoint(runs / "a", out)
    export_checkpoint(runs / "a", out, force=True)
    assert (out / MARKER).is_file()
    # a checkpoint folder of a run is not one: its weights are not folded
    assert not is_export(runs / "b" / "checkpoints" / "step_0000001")


@pytest.mark.parametrize("earlier", [False, True], ids=["no-earlier-export", "earlier-export-kept"])
def test_failure_while_writing_leaves_no_temporary_folder(runs, monkeypatch, earlier):
    out = runs / "a-export"
    if earlier:
        export_checkpoint(runs / "a", out, verify=False)
    before = snapshot(runs)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.ckpt, "save_file", disk_full)  # export writes weights through checkpoint.save_weights
    with pytest.raises(OSError, match="no space left on device: writing the export .* nothing was written there"):
        export_checkpoint(runs / "a", out, force=True)
    assert snapshot(runs) == before and leftovers(runs) == []
    assert out.exists() == earlier


def test_failed_final_rename_restores_the_earlier_export(runs, monkeypatch):
    out = runs / "a-export"
    export_checkpoint(runs / "a", out, verify=False)
    before = snapshot(runs)
    real_rename = os.rename

    def rename(src, dst):
        if ".export-tmp-" in str(src):
            raise OSError("simulated rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(export.os, "rename", rename)
    with pytest.raises(OSError, match="simulated rename failure"):
        export_checkpoint(runs / "a", out, verify=False, force=True)
    monkeypatch.undo()
    assert snapshot(runs) == before and leftovers(runs) == []


def test_folded_logits_that_differ_write_nothing(runs, monkeypatch):
    fold = MoELM.fold_routers

    def broken_fold(self):
        fold(self)
        self.head.weight.add_(1.0)

    monkeypatch.setattr(MoELM, "fold_routers", broken_fold)
    before = snapshot(runs)
    with pytest.raises(RuntimeError, match="logits differ by .* not exporting"):
        export_checkpoint(runs / "a", runs / "a-export")
    assert snapshot(runs) == before and not (runs / "a-export").exists() and leftovers(runs) == []


def test_bad_atol_is_rejected(runs):
    with pytest.raises(ValueError, match="atol must be a finite number >= 0, got nan"):
        export_checkpoint(runs / "a", runs / "x", atol=float("nan"))


def test_exported_files_have_the_usual_permissions(runs):
    umask = os.umask(0)
    os.umask(umask)
    out = export_checkpoint(runs / "a", runs / "a-export", verify=False)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
