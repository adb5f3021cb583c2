"""The one resolver of a `train` command's config: precedence defaults < preset < config file | checkpoint < --set < flags."""

import json

import pytest

from mpirouter.cli import main
from mpirouter.common.config import to_dict
from mpirouter.core.model import preset_config
from mpirouter.trainer.config import TrainConfig
from mpirouter.trainer.resolve import ConfigSources, default_out_dir, resolve_train_config

DEFAULTS = {"model.moe.router.kind": "mpi", "steps": 500, "batch_size": 16, "seed": 0, "optim.name": "adamw", "optim.lr": None}


@pytest.fixture
def config_file(tmp_path):
    cfg = TrainConfig(model=preset_config("debug"), preset="debug", steps=7, batch_size=3, out_dir="/somewhere/else/run")
    data = to_dict(cfg)
    data["optim"]["lr"] = 0.01
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def resolve(**kw):
    return resolve_train_config(ConfigSources(**kw))


# (name, sources given a config file path, field, expected value)
TABLE = [
    ("defaults", lambda f: dict(defaults=DEFAULTS), "steps", 500),
    ("defaults-preset", lambda f: dict(defaults=DEFAULTS), "preset", "tiny"),
    ("flag-preset", lambda f: dict(defaults=DEFAULTS, preset="debug"), "model.dim", preset_config("debug").dim),
    ("set-over-defaults", lambda f: dict(defaults=DEFAULTS, overrides=("steps=9",)), "steps", 9),
    ("flag-over-defaults", lambda f: dict(defaults=DEFAULTS, flags={"steps": 11}), "steps", 11),
    ("file-over-defaults", lambda f: dict(defaults=DEFAULTS, config_file=f), "steps", 7),
    ("file-ignores-flag-defaults", lambda f: dict(defaults=DEFAULTS, config_file=f), "batch_size", 3),
    ("set-over-file", lambda f: dict(config_file=f, overrides=("steps=9",)), "steps", 9),
    ("flag-over-file", lambda f: dict(config_file=f, flags={"steps": 11}), "steps", 11),
    ("preset-flag-replaces-files-model", lambda f: dict(config_file=f, preset="tiny"), "model.dim", preset_config("tiny").dim),
    ("preset-flag-keeps-files-router", lambda f: dict(config_file=f, preset="tiny", overrides=("model.moe.router.kind=linear",)),
     "model.moe.router.kind", "linear"),
    ("set-refines-preset-flag", lambda f: dict(config_file=f, preset="tiny", overrides=("model.moe.top_k=1",)), "model.moe.top_k", 1),
    ("new-optimizer-drops-files-lr", lambda f: dict(config_file=f, flags={"optim.name": "muon"}), "optim.lr", None),
    ("new-optimizer-with-set-lr", lambda f: dict(config_file=f, flags={"optim.name": "muon"}, overrides=("optim.lr=0.02",)), "optim.lr", 0.02),
    ("same-optimizer-keeps-files-lr", lambda f: dict(config_file=f, flags={"optim.name": "adamw"}), "optim.lr", 0.01),
    # a set adam_lr does not keep the old optimizer's lr (a muon lr is no adamw lr)
    ("new-optimizer-with-set-adam-lr-drops-files-lr", lambda f: dict(config_file=f, flags={"optim.name": "muon"},
                                                                     overrides=("optim.adam_lr=0.002",)), "optim.lr", None),
    ("set-optimizer-drops-files-lr", lambda f: dict(config_file=f, overrides=("optim.name=muon",)), "optim.lr", None),
    ("out-flag", lambda f: dict(defaults=DEFAULTS, flags={"out_dir": "runs/x"}), "out_dir", "runs/x"),
    ("set-out-dir", lambda f: dict(defaults=DEFAULTS, overrides=("out_dir=runs/y",)), "out_dir", "runs/y"),
    ("default-out-dir", lambda f: dict(defaults=DEFAULTS, flags={"seed": 3}), "out_dir", "runs/tiny-mpi-s3"),
    ("file-out-dir-not-used", lambda f: dict(config_file=f), "out_dir", "runs/debug-mpi-s0"),
]


@pytest.mark.parametrize("name, make, path, expected", TABLE, ids=[t[0] for t in TABLE])
def test_precedence_table(config_file, name, make, path, expected):
    cfg, _ = resolve(**make(config_file))
    value = to_dict(cfg)
    for key in path.split("."):
        value = value[key]
    assert value == expected


def test_a_config_files_out_dir_is_reported_not_used(config_file):
    cfg, notes = resolve(config_file=config_file)
    assert cfg.out_dir == default_out_dir(cfg) and len(notes) == 1 and "/somewhere/else/run" in notes[0] and "--out" in notes[0]


CONFLICTS = [
    ("out-flag-and-set-out-dir", dict(flags={"out_dir": "runs/od3"}, overrides=("out_dir=runs/od2",)), "--set out_dir=runs/od2 and --out"),
    ("steps-twice", dict(flags={"steps": 3}, overrides=("steps=4",)), "both set steps"),
    ("router-section-and-router-flag", dict(flags={"model.moe.router.kind": "mpi"}, overrides=('model.moe.router={"kind": "linear"}',)),
     "--router both set"),
    ("config-and-resume", dict(config_file="c.json", resume="runs/r"), "cannot be combined with --resume"),
    ("resume-and-set-out-dir", dict(resume="runs/r", overrides=("out_dir=runs/z",)), "stays in its folder"),
]


@pytest.mark.parametrize("name, kw, message", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_two_values_for_one_field_are_refused(name, kw, message):
    with pytest.raises(ValueError, match=message.replace("$", r"\$")):
        resolve(defaults=DEFAULTS, **kw)


def test_the_same_value_from_a_flag_and_a_set_is_still_one_too_many():
    with pytest.raises(ValueError, match="keep one"):
        resolve(defaults=DEFAULTS, flags={"steps": 3}, overrides=("steps=3",))


def test_user_sources_are_not_mutated(config_file):
    flags, overrides = {"steps": 11}, ("seed=2",)
    resolve(config_file=config_file, flags=flags, overrides=overrides)
    assert flags == {"steps": 11} and overrides == ("seed=2",)


# ------------------------------------------------------------------ the command line (issue #22 rows 5 and 6)

FAST = ["--preset", "debug", "--steps", "3", "--batch-size", "2", "--set", "eval_every=0", "--set", "progress=false",
        "--set", "model.max_seq_len=16"]


def test_out_and_set_out_dir_together_are_refused_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    """Row 5: `--set out_dir=runs/od2 --out runs/od3` trained into runs/od2."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", *FAST, "--set", "out_dir=runs/od2", "--out", "runs/od3"]) == 2
    err = capsys.readouterr().err
    assert "keep one" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_config_of_a_moved_run_trains_into_the_default_folder(tmp_path, monkeypatch, capsys):
    """Row 6: `train --config RUN/config.json` without --out wrote to the absolute path recorded in the config."""
    first = tmp_path / "first"
    assert main(["train", *FAST, "--out", str(first)]) == 0
    moved = tmp_path / "moved"
    first.rename(moved)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    capsys.readouterr()
    assert main(["train", "--config", str(moved / "config.json"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert (work / "runs" / "debug-mpi-s0" / "checkpoints" / "latest").is_file() and not first.exists()
    assert f"note: the out_dir in --config {moved / 'config.json'} ({first}) is not used" in out
