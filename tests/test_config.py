"""Config dicts and `key.sub=value` overrides."""

import pytest

from mpirouter.config import apply_overrides, from_dict, to_dict
from mpirouter.train import TrainConfig


def test_round_trip_through_dict():
    cfg = TrainConfig(steps=7)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_overrides_reach_nested_fields_with_types():
    cfg = apply_overrides(TrainConfig(), ["model.moe.top_k=4", "model.moe.router.kind=retract", "schedule.kind=wsd",
                                          "optim.lr=1e-3", "compile=true", "eval_batches=none", "data.path=/tmp/x.txt"])
    assert cfg.model.moe.top_k == 4 and cfg.model.moe.router.kind == "retract"
    assert cfg.schedule.kind == "wsd" and cfg.optim.lr == 1e-3 and cfg.compile is True
    assert cfg.eval_batches is None and cfg.data.path == "/tmp/x.txt"


@pytest.mark.parametrize(
    "override, message",
    [("model.moe.topk=2", "has no field 'topk'"), ("nosuch.x=1", "has no section 'nosuch'"), ("steps=ten", "not a valid int"),
     ("schedule.kind=linear", "not one of cosine, wsd, constant"), ("model.moe.router.kind=sigmoid", "not one of linear, mpi"),
     ("model.moe.top_k=99", "top_k must be"), ("steps", "must look like key.sub=value")],
    ids=["unknown-field", "unknown-section", "bad-int", "bad-literal", "unknown-router", "invalid-value", "no-equals"],
)
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_unknown_keys_in_a_config_file_are_named():
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        from_dict(TrainConfig, {"stepz": 3})
