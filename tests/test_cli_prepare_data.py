"""`mpirouter prepare-data` end to end: prepare, train on the folder with the printed flags, verify, refuse."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from mpirouter.cli import main
from mpirouter.trainer.data import load_corpus

TEXT = "".join(f"{i}: Now is the winter of our discontent made glorious summer by this sun of York.\n" for i in range(150))
FAST = ["--preset", "debug", "--steps", "2", "--batch-size", "2", "--set", "eval_every=0", "--set", "eval_batch_size=8",
        "--set", "progress=false", "--set", "eval_batches=1"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_prepare_then_train_with_the_printed_flags(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare-data", "--out", str(out), "--data", str(corpus), "--val-fraction", "0.1"]) == 0
    printed = capsys.readouterr().out
    assert f"prepared {out}: " in printed and "(uint16), tokenizer byte (256 tokens)" in printed
    train_line = printed.splitlines()[-1]
    assert train_line.startswith("train on it: mpirouter train --data ") and "--set data.val_fraction=0.1" in train_line
    flags = shlex.split(train_line.removeprefix("train on it: mpirouter train "))

    run = tmp_path / "run"
    assert main(["train", *flags, *FAST, "--out", str(run)]) == 0
    start = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert start["corpus_sha256"] == load_corpus(str(corpus)).sha256  # the raw corpus's identity, carried by meta.json
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(out)

    assert main(["prepare-data", "--verify", str(out)]) == 0
    assert "ok (" in capsys.readouterr().out


def test_an_existing_folder_is_never_overwritten(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare-data", "--out", str(out), "--data", str(corpus)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert main(["prepare-data", "--out", str(out), "--data", str(corpus), "--val-fraction", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mpirouter prepare-data: error: " in err and "already exists and is not empty" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_contradicting_tokenizer_and_damaged_folder_exit_2(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare-data", "--out", str(out), "--data", str(corpus)]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(out), "--tokenizer", "bpe", *FAST, "--out", str(tmp_path / "run")]) == 2
    assert "prepared with tokenizer 'byte'" in capsys.readouterr().err
    with open(out / "val.bin", "r+b") as f:
        f.write(b"\xff\xff")  # same size, other bytes
    assert main(["prepare-data", "--verify", str(out)]) == 2
    assert "val.bin does not match its sha256" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--verify", "y"], "not allowed with argument"),
    ([], "one of the arguments --out --verify is required"),
], ids=["out-and-verify", "neither"])
def test_out_xor_verify(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare-data", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_parquet_without_datasets_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    assert main(["prepare-data", "--out", str(tmp_path / "prep"), "--data", str(tmp_path / "c.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'mpirouter[datasets]'" in err
    assert not (tmp_path / "prep").exists()


def test_a_fifo_is_refused_not_read_forever(tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    # A subprocess: reading a fifo that no one writes blocks, and only a timeout would end the test.
    for argv in (["prepare-data", "--out", str(tmp_path / "prep")], ["train", *FAST, "--out", str(tmp_path / "run")]):
        proc = subprocess.run([sys.executable, "-m", "mpirouter", argv[0], "--data", str(fifo), *argv[1:]],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and f"corpus path {fifo} is a fifo, not a regular file" in proc.stderr
    assert not (tmp_path / "prep").exists()


def test_train_on_a_folder_with_an_edited_dtype_is_one_line(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare-data", "--out", str(out), "--data", str(corpus)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    for split in ("train", "val"):  # sizes stay consistent: 2 uint16 bytes per token become 4 per uint32
        with open(out / f"{split}.bin", "ab") as f:
            f.write(b"\0\0" * (meta[f"{split}_tokens"] % 2))
        meta[f"{split}_tokens"] = (out / f"{split}.bin").stat().st_size // 4
    (out / "meta.json").write_text(json.dumps({**meta, "dtype": "uint32"}))
    capsys.readouterr()
    assert main(["train", "--data", str(out), *FAST, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "says dtype uint32, but a vocabulary of 256 tokens is stored as uint16" in err


def test_train_on_a_folder_without_meta_json_names_it(corpus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare-data", "--out", str(out), "--data", str(corpus)]) == 0
    (out / "meta.json").unlink()
    capsys.readouterr()
    assert main(["train", "--data", str(out), *FAST, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "meta.json is missing" in err and "no .txt" not in err


def test_out_of_memory_in_prepare_data_gives_advice_that_fits_it(tmp_path, monkeypatch, capsys):
    """Issue #22 row 26: prepare-data out of memory said "use a smaller batch or model"."""
    import mpirouter.trainer.data as data

    def too_big(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(data, "load_corpus", too_big)
    (tmp_path / "c.txt").write_text("text")
    assert main(["prepare-data", "--data", str(tmp_path / "c.txt"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "split the corpus into parts" in err and "batch" not in err
