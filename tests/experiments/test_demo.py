"""The demo's output folder: an earlier demo is moved aside, never overwritten; anything else is refused."""

import pytest

from mpirouter.experiments.demo import claim_demo_folder


START = '{"event": "start", "step": 0, "params_total": 10}\n'


def make_demo(out):
    (out / "linear").mkdir(parents=True)
    (out / "linear" / "metrics.jsonl").write_text(START)
    (out / "summary.json").write_text('{"info": {}, "rows": []}')
    (out / "summary.md").write_text("table")
    return out


def test_earlier_demo_is_moved_aside_with_its_files(tmp_path):
    out = make_demo(tmp_path / "demo")
    said = []
    claim_demo_folder(out, say=said.append)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("demo.old-")]
    assert len(aside) == 1 and (aside[0] / "linear" / "metrics.jsonl").read_text() == START and str(aside[0]) in said[0]
    assert out.is_dir() and not any(out.iterdir())


def tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


@pytest.mark.parametrize("extra", ["user-files", "config-json-of-a-project", "demo-plus-ssh", "summary-md-only", "link"])
def test_a_folder_that_is_not_only_demo_output_is_never_moved(tmp_path, extra):
    """Issue #22 row 2: any subfolder with a config.json used to count as an earlier demo, and the whole folder moved."""
    out = tmp_path / "home2"
    out.mkdir()
    if extra == "user-files":
        for d in (".ssh", "myproject", "docs"):
            (out / d).mkdir()
        (out / ".ssh" / "id").write_text("key")
    elif extra == "config-json-of-a-project":
        (out / "myproject").mkdir()
        (out / "myproject" / "config.json").write_text('{"lr": 1}')
    elif extra == "demo-plus-ssh":
        make_demo(out)
        (out / ".ssh").mkdir()
        (out / ".ssh" / "id").write_text("key")
    elif extra == "summary-md-only":
        (out / "summary.md").write_text("my summary")
    else:
        make_demo(tmp_path / "real")
        (out / "linear").symlink_to(tmp_path / "real" / "linear")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="is not an earlier demo"):
        claim_demo_folder(out)
    assert tree(tmp_path) == before


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
    make_demo(out)
    with RunLock(out / "linear"):
        with pytest.raises(RunLockedError, match="in use by another job"):
            claim_demo_folder(out)
    assert (out / "linear" / "metrics.jsonl").read_text() == START and [p.name for p in tmp_path.iterdir()] == ["demo"]
