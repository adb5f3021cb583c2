"""Trainer: loss goes down, determinism, exact resume, NaN handling, schedules, parameter groups."""

import dataclasses
import json

import pytest
import torch

from mpirouter import checkpoint as ckpt
from mpirouter.data import DataConfig, prepare_data
from mpirouter.model import MoELM, preset_config
from mpirouter.routers import RouterConfig
from mpirouter.train import (
    NonFiniteLossError,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    load_model,
    lr_multiplier,
    param_groups,
    train,
)


@pytest.fixture(scope="module")
def data():
    full = prepare_data(DataConfig(), seq_len=32)
    # a slice keeps the whole-validation-set evals fast; the splits stay disjoint
    return dataclasses.replace(full, train_ids=full.train_ids[:200_000], val_ids=full.val_ids[:4096])


def cfg_for(tmp_path, router="mpi", steps=24, **kw) -> TrainConfig:
    base = dict(
        model=preset_config("debug", max_seq_len=32, moe=dict(router=RouterConfig(kind=router))),
        preset="debug", steps=steps, batch_size=8, eval_every=8, eval_batches=2, eval_batch_size=8, log_every=4,
        out_dir=str(tmp_path / router), progress=False, schedule=ScheduleConfig(warmup_steps=4), optim=OptimConfig(lr=1e-2),
    )
    base.update(kw)
    return TrainConfig(**base)


def curve(result, key="loss", event="train"):
    return [r[key] for r in result.history if r["event"] == event]


@pytest.mark.parametrize("router", ["linear", "mpi", "power", "retract", "mpi-inplace"])
def test_tiny_training_run_lowers_the_loss(tmp_path, data, router):
    result = train(cfg_for(tmp_path, router, steps=30, eval_every=0, ckpt_every=0), data=data)
    losses = curve(result, "lm_loss")
    assert losses[-1] < losses[0] - 0.5, losses
    assert result.final_eval["val_loss"] < 5.0
    assert len(result.final_eval["align_layers"]) == 2 and 0 <= result.final_eval["maxvio"]


def test_same_seed_same_loss_curve_and_different_seed_differs(tmp_path, data):
    a = train(cfg_for(tmp_path / "a", steps=12), data=data)
    b = train(cfg_for(tmp_path / "b", steps=12), data=data)
    c = train(cfg_for(tmp_path / "c", steps=12, seed=1), data=data)
    assert curve(a) == curve(b)
    assert curve(a) != curve(c)


def test_resume_continues_exactly_as_if_never_stopped(tmp_path, data):
    full = train(cfg_for(tmp_path / "full", steps=16, ckpt_every=4), data=data)
    cfg = cfg_for(tmp_path / "split", steps=16, ckpt_every=4)
    part = train(cfg, data=data, stop_at=10)  # "preempted": last checkpoint at step 10 (written at stop)
    assert part.step == 10
    resumed = train(cfg, data=data, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in h if r["event"] in ("train", "eval")]
    assert strip(resumed.history) == strip(full.history)
    m_full, _ = load_model(full.run_dir)
    m_res, _ = load_model(resumed.run_dir)
    for (n, p), (_, q) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
        assert torch.equal(p, q), n


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, data, monkeypatch):
    cfg = cfg_for(tmp_path, steps=12, ckpt_every=4)
    real_forward = MoELM.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        out = real_forward(self, idx, targets)
        calls["n"] += 1 if self.training else 0
        if self.training and calls["n"] == 7:
            return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(MoELM, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 6.*step_0000004"):
        train(cfg, data=data)
    last = ckpt.resolve_checkpoint(cfg.out_dir)
    assert last.name == "step_0000004"
    _, tensors, state = ckpt.load_checkpoint(cfg.out_dir)
    assert state["step"] == 4 and all(torch.isfinite(t).all() for t in tensors.values())


def test_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = MoELM(preset_config("debug"))
    ckpt.save_checkpoint(tmp_path, 1, model, {"a": 1}, {"step": 1})
    import mpirouter.checkpoint as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, {"a": 2}, {"step": 2})
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_0000001"
    assert json.loads((ckpt.resolve_checkpoint(tmp_path) / "config.json").read_text()) == {"a": 1}


def test_checkpoint_keeps_only_the_newest(tmp_path):
    model = MoELM(preset_config("debug"))
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, {}, None, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000003"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        ckpt.resolve_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "kind, step, expected",
    [("cosine", 0, 0.1), ("cosine", 9, 1.0), ("cosine", 100, 0.1), ("cosine", 55, 0.55),
     ("wsd", 50, 1.0), ("wsd", 79, 1.0), ("wsd", 89, 0.55), ("wsd", 99, 0.1), ("constant", 70, 1.0)],
    ids=lambda v: str(v),
)
def test_lr_schedule_values(kind, step, expected):
    sched = ScheduleConfig(kind=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert lr_multiplier(step, 100, sched) == pytest.approx(expected, abs=1e-9)


def test_param_groups_cover_every_parameter_once_with_intended_decay():
    model = MoELM(preset_config("debug", tie_embeddings=True))
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1, router_weight_decay=0.0))}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert groups["norms"]["weight_decay"] == 0.0 and groups["router"]["weight_decay"] == 0.0
    assert len(groups["router"]["params"]) == model.config.n_layers
    assert any(p is model.blocks[0].ffn.w_gate for p in groups["matrices"]["params"])


def test_adamw_path_matches_torch_adamw(tmp_path, data):
    """One step of our optimizer setup equals torch.optim.AdamW applied by hand with the same groups."""
    from mpirouter.train import build_optimizer

    torch.manual_seed(0)
    m1 = MoELM(preset_config("debug"))
    m2 = MoELM(preset_config("debug"))
    m2.load_state_dict(m1.state_dict())
    opt_cfg = OptimConfig(lr=1e-3, weight_decay=0.1)
    o1 = build_optimizer(m1, opt_cfg)
    o2 = torch.optim.AdamW([{"params": [p for n, p in m2.named_parameters() if p.dim() >= 2], "weight_decay": 0.1},
                            {"params": [p for n, p in m2.named_parameters() if p.dim() < 2], "weight_decay": 0.0}],
                           lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    idx = data.train_ids[:33].view(1, 33)
    for m, o in ((m1, o1), (m2, o2)):
        m(idx[:, :-1], idx[:, 1:]).loss.backward()
        o.step()
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_unknown_optimizer_and_bad_train_config_fail_clearly(tmp_path, data):
    from mpirouter.train import build_optimizer

    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(MoELM(preset_config("debug")), OptimConfig(name="sgd"))
    with pytest.raises(ValueError, match="seq_len=64 must be in"):
        cfg_for(tmp_path, seq_len=64)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        cfg_for(tmp_path, batch_size=0)


def test_bf16_autocast_runs_experts_in_bf16_and_trains(tmp_path, data):
    from mpirouter.moe import grouped_linear

    x, w = torch.randn(8, 16), torch.randn(2, 4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, torch.tensor([3, 5]), "loop")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    result = train(cfg_for(tmp_path, steps=20, precision="bf16", eval_every=0), data=data)
    losses = curve(result, "lm_loss")
    assert losses[-1] < losses[0] - 0.5
