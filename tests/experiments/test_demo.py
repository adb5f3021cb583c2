"""The demo's output folder: an earlier demo is moved aside, never overwritten; anything else is refused."""

import pytest

from mpirouter.experiments.demo import claim_demo_folder


def test_earlier_demo_is_moved_aside_with_its_files(tmp_path):
    out = tmp_path / "demo"
    (out / "linear").mkdir(parents=True)
    (out / "linear" / "metrics.jsonl").write_text("x")
    (out / "summary.json").write_text("{}")
    said = []
    claim_demo_folder(out, say=said.append)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("demo.old-")]
    assert len(aside) == 1 and (aside[0] / "linear" / "metrics.jsonl").read_text() == "x" and str(aside[0]) in said[0]
    assert out.is_dir() and not any(out.iterdir())


@pytest.mark.parametrize("make", ["file", "other-folder"])
def test_anything_but_an_earlier_demo_is_refused_untouched(tmp_path, make):
    out = tmp_path / "demo"
    if make == "file":
        out.write_text("mine")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="choose another --out"):
        claim_demo_folder(out)
    assert (out if make == "file" else out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_duplicate_routers_are_refused_before_anything_is_trained(tmp_path):
    from mpirouter.experiments.demo import run_demo

    with pytest.raises(ValueError, match="distinct routers"):
        run_demo(out_dir=str(tmp_path / "d"), steps=2, routers=["linear", "linear"], preset="debug")
    assert not (tmp_path / "d").exists()


def test_an_earlier_demo_with_a_job_still_training_is_not_moved(tmp_path):
    from mpirouter.trainer.rundir import RunLock, RunLockedError

    out = tmp_path / "demo"
    (out / "linear").mkdir(parents=True)
    (out / "linear" / "metrics.jsonl").write_text("x")
    with RunLock(out / "linear"):
        with pytest.raises(RunLockedError, match="in use by another job"):
            claim_demo_folder(out)
    assert (out / "linear" / "metrics.jsonl").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["demo"]
