"""Property test: whatever `--set` overrides and flags a user types, the CLI never shows a traceback.

    MPIROUTER_FUZZ_EXAMPLES=500 .venv/bin/python -m pytest tests/test_cli_fuzz.py     # a longer, random search

Each example is a tiny `mpirouter train` (or `sample`) on a small corpus. The outcome must be
success (0), bad input (2) or a training stopped by a non-finite loss (3); an error is exactly
one line on stderr starting with "mpirouter <command>:". By default a few dozen examples with a
fixed seed (reproducible in CI); the environment variable sets more, drawn at random.
"""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mpirouter.cli import main
from mpirouter.common.config import to_dict
from mpirouter.trainer.config import TrainConfig

EXAMPLES = int(os.environ.get("MPIROUTER_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 30, derandomize=not EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# Fields not drawn: where the run goes, and switches that only cost time (a cold torch.compile, TensorBoard).
SKIP = {"out_dir", "progress", "compile", "tensorboard", "data.path", "data.cache_dir"}


def _paths(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out += _paths(v, f"{prefix}{k}.")
    return out


KEYS = sorted(p for p in _paths(to_dict(TrainConfig())) if p not in SKIP)
VALUES = st.one_of(
    st.integers(-3, 8).map(str), st.sampled_from(["0.5", "1e-3", "-0.1", "nan", "inf", "-inf", "1e39", "2.5"]),
    st.sampled_from(["true", "false", "none", "", "abc", "[0.9]", "[0.9, 0.95]", "{}", '{"top_k": 1}', "[1,", "cpu", "cuda", "meta",
                     "sequence", "batch", "mpi", "linear", "wsd", "bf16", "loop", "grouped_mm", "gate_up"]),
)
OVERRIDES = st.lists(st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=3)
FLAGS = st.lists(st.one_of(
    st.tuples(st.just("--steps"), st.sampled_from(["-1", "0", "1", "2", "x"])),
    st.tuples(st.just("--batch-size"), st.sampled_from(["-2", "0", "1", "3"])),
    st.tuples(st.just("--lr"), st.sampled_from(["0", "-1", "nan", "1e39", "1e-3", "50"])),
    st.tuples(st.just("--stop-at"), st.sampled_from(["-1", "0", "1"])),
    st.tuples(st.just("--scale"), st.sampled_from(["0", "inf", "2"])),
    st.tuples(st.just("--device"), st.sampled_from(["foo", "cpu", "cuda:7", "auto"])),
    st.tuples(st.just("--optimizer"), st.sampled_from(["muon", "adamh", "sgd"])),
), max_size=2).map(lambda pairs: [x for pair in pairs for x in pair])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}.\n" for i in range(600)))
    return path


def check_outcome(argv: list[str], capsys) -> int:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse rejects malformed flags itself, with its usage text and code 2
        code = e.code
        assert code in (0, 2), argv
        capsys.readouterr()
        return code
    err = capsys.readouterr().err
    assert code in (0, 2, 3), (argv, code, err)
    if code:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"mpirouter {argv[0]}:"), (argv, err)
    return code


@FUZZ
@given(overrides=OVERRIDES, flags=FLAGS)
def test_train_with_random_overrides_never_shows_a_traceback(overrides, flags, corpus, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("run") / "r"
    base = ["train", "--preset", "debug", "--steps", "2", "--batch-size", "2", "--data", str(corpus), "--out", str(out),
            "--set", "progress=false", "--set", "eval_every=0", "--set", "model.max_seq_len=16"]
    check_outcome(base + flags + [a for o in overrides for a in ("--set", o)], capsys)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "r"
    assert main(["train", "--preset", "debug", "--steps", "2", "--batch-size", "2", "--data", str(corpus), "--out", str(out),
                 "--set", "progress=false", "--set", "eval_every=0", "--set", "model.max_seq_len=16"]) == 0
    return out


@FUZZ
@given(top_k=st.sampled_from([None, "-1", "0", "1", "999"]), tokens=st.sampled_from(["-5", "0", "3"]),
       temperature=st.sampled_from(["-1", "0", "nan", "0.7", "inf"]), prompt=st.text(max_size=6),
       device=st.sampled_from(["cpu", "cuda", "foo", "auto"]))
def test_sample_with_random_flags_never_shows_a_traceback(top_k, tokens, temperature, prompt, device, trained, capsys):
    argv = ["sample", str(trained), "--tokens", tokens, "--temperature", temperature, "--prompt", prompt, "--device", device]
    code = check_outcome(argv + (["--top-k", top_k] if top_k else []), capsys)
    assert code in (0, 2)


# ----------------------------------------------------------------------------- folders the toolkit does not own

NAMES = ["checkpoints", "config.json", "metrics.jsonl", "summary.json", "summary.md", "sessions", "report.md", "latest",
         "step_0000001", "linear", "mpi", "train.bin", "meta.json", "export.json", "model.safetensors", "notes.txt", ".ssh"]
NEAR_MISSES = ['{"event": "train", "step": 1}\n', '{"lr": 1}', '{"rows": 5, "info": 1}', '{"command": "ls", "config": {}}',
               "epoch_3", '{"format": "other-tokens"}', '{"format": "not-an-export"}', "mine", ""]
"""File contents that resemble what the toolkit writes without being its markers."""
ENTRY = st.tuples(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3), st.one_of(st.none(), st.sampled_from(NEAR_MISSES)))
TREES = st.lists(ENTRY, min_size=1, max_size=6)
"""A user's folder: paths of up to 3 parts, each a folder (None) or a file with one of NEAR_MISSES."""


def build_tree(root: Path, entries) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for parts, content in entries:
        path = root.joinpath(*parts)
        if any(p.exists() and not p.is_dir() for p in [*path.parents, path] if root in p.parents or p == root):
            continue  # a file already stands where this entry needs a folder
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
        elif not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@FUZZ
@given(tree=TREES, command=st.sampled_from(["train", "compare", "demo", "export", "prepare-data"]), force=st.booleans(),
       nested=st.booleans())
@example(tree=[(["report.md"], "mine"), (["notes.txt"], "x")], command="compare", force=False, nested=False)  # row 1
@example(tree=[([".ssh"], None), (["linear", "config.json"], '{"lr": 1}'), (["summary.md"], "mine")], command="demo",
         force=False, nested=False)  # row 2
@example(tree=[([".ssh"], None), (["checkpoints"], None), (["notes.txt"], "x")], command="train", force=True, nested=False)  # row 3
def test_a_users_folder_is_never_changed_moved_or_deleted(tree, command, force, nested, corpus, trained, tmp_path_factory, capsys):
    """Whatever a user's folder holds, a command pointed at it (or at a new folder inside it) changes nothing that
    was there: a folder that is not the toolkit's own is refused, --force or not (issue #22 rows 1-3)."""
    base = tmp_path_factory.mktemp("user")
    root = base / "home"
    build_tree(root, tree)
    before = snapshot(base)
    out = root / "new" if nested else root
    small = ["--set", "progress=false", "--set", "model.max_seq_len=16"]
    argv = {"train": ["train", "--preset", "debug", "--steps", "2", "--batch-size", "2", "--data", str(corpus),
                      "--set", "eval_every=0", *small, "--out", str(out)] + (["--force"] if force else []),
            "compare": ["compare", "--preset", "debug", "--steps", "2", "--batch-size", "2", "--seeds", "0", "--routers", "linear",
                        "--data", str(corpus), "--eval-every", "0", "--no-progress", "--set", "model.max_seq_len=16",
                        "--out", str(out)],
            "demo": ["demo", "--preset", "debug", "--steps", "2", "--routers", "linear", "--data", str(corpus), "--out", str(out)],
            "export": ["export", str(trained), "--out", str(out)] + (["--force"] if force else []),
            "prepare-data": ["prepare-data", "--data", str(corpus), "--out", str(out)]}[command]
    code = check_outcome(argv, capsys)
    after = snapshot(base)
    assert {k: v for k, v in after.items() if k in before} == before, (command, tree)  # nothing there changed
    assert set(before) <= set(after), (command, tree)  # nor moved or deleted
    if not nested:
        assert code == 2 and after == before, (command, tree)  # refused, and nothing added either
