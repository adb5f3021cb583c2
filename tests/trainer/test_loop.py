"""Trainer: loss goes down, determinism, exact resume, NaN handling, schedules, parameter groups."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import mpirouter.trainer.checkpoint as ckpt
from mpirouter.trainer.data import DataConfig, prepare_data
from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.routers import RouterConfig
from mpirouter.optim import OptimConfig, param_groups
from mpirouter.trainer.checkpoint import load_model
from mpirouter.trainer.config import TrainConfig
from mpirouter.trainer.evaluation import evaluate
from mpirouter.trainer.loop import NonFiniteLossError, TrainingInterrupted, train
from mpirouter.trainer.schedule import ScheduleConfig, lr_multiplier


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


FEATURES = dict(router=RouterConfig(kind="mpi"), score_func="sigmoid", balance="both", n_shared=1, bias_update_rate=0.01)


@pytest.mark.parametrize("moe", [None, FEATURES], ids=["default", "sigmoid-bias-shared"])
def test_resume_continues_exactly_as_if_never_stopped(tmp_path, data, moe):
    kw = {} if moe is None else {"model": preset_config("debug", max_seq_len=32, moe=moe), "grad_accum": 2}
    full = train(cfg_for(tmp_path / "full", steps=16, ckpt_every=4, **kw), data=data)
    cfg = cfg_for(tmp_path / "split", steps=16, ckpt_every=4, **kw)
    part = train(cfg, data=data, stop_at=10)  # "preempted": last checkpoint at step 10 (written at stop)
    assert part.step == 10
    resumed = train(cfg, data=data, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in h if r["event"] in ("train", "eval")]
    assert strip(resumed.history) == strip(full.history)
    m_full, _ = load_model(full.run_dir)
    m_res, _ = load_model(resumed.run_dir)
    for (n, p), (_, q) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
        assert torch.equal(p, q), n
    if moe is not None:  # the expert bias is part of the state, and it moved
        assert all(m.expert_bias.abs().sum() > 0 for m in m_res.moe_layers())


def test_a_run_saved_before_the_newer_moe_fields_existed_still_resumes(tmp_path, data):
    cfg = cfg_for(tmp_path, steps=8, ckpt_every=4)
    train(cfg, data=data, stop_at=4)
    for path in [Path(cfg.out_dir) / "config.json", *Path(cfg.out_dir).glob("checkpoints/step_*/config.json")]:
        saved = json.loads(path.read_text())
        for key in ("score_func", "balance", "bias_update_rate", "n_shared"):  # what the config held before they were added
            del saved["model"]["moe"][key]
        path.write_text(json.dumps(saved))
    assert train(cfg, data=data, resume=True).step == 8


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
    import mpirouter.trainer.checkpoint as mod

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
    from mpirouter.optim import build_optimizer

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
    from mpirouter.optim import build_optimizer

    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer(MoELM(preset_config("debug")), OptimConfig(name="sgd"))
    with pytest.raises(ValueError, match="seq_len=64 must be in"):
        cfg_for(tmp_path, seq_len=64)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        cfg_for(tmp_path, batch_size=0)


def test_bf16_autocast_runs_experts_in_bf16_and_trains(tmp_path, data):
    from mpirouter.core.experts import grouped_linear

    x, w = torch.randn(8, 16), torch.randn(2, 4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_linear(x, w, torch.tensor([3, 5]), "loop")
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    result = train(cfg_for(tmp_path, steps=20, precision="bf16", eval_every=0), data=data)
    losses = curve(result, "lm_loss")
    assert losses[-1] < losses[0] - 0.5


def _strip(history):
    return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in history if r["event"] in ("train", "eval")]


def test_resume_uses_the_folder_given_and_falls_back_past_a_corrupt_checkpoint(tmp_path, data):
    """A moved run resumes where it is now; a corrupt newest checkpoint is skipped with a message."""
    full = train(cfg_for(tmp_path / "full", steps=12, ckpt_every=4), data=data)
    orig = cfg_for(tmp_path / "orig", steps=12, ckpt_every=4)
    train(orig, data=data, stop_at=10)
    moved = tmp_path / "moved"
    shutil.copytree(orig.out_dir, moved)
    before = (Path(orig.out_dir) / "metrics.jsonl").read_text()
    (moved / "checkpoints" / "step_0000010" / ckpt.WEIGHTS).write_bytes(b"not a safetensors file")
    (moved / "checkpoints" / ".tmp-step_0000011").mkdir()  # left by a save that hit a full disk
    said = []
    resumed = train(dataclasses.replace(orig, out_dir=str(moved)), data=data, resume=True, say=said.append)
    assert any("step_0000010 is unreadable" in m for m in said) and any("falling back to" in m and "step_0000008" in m for m in said)
    assert (Path(orig.out_dir) / "metrics.jsonl").read_text() == before  # the original is not touched
    assert _strip(resumed.history) == _strip(full.history)
    assert not (moved / "checkpoints" / ".tmp-step_0000011").exists()
    assert [p.name.split(".")[0] for p in (moved / "checkpoints").glob("*.corrupt-*")] == ["step_0000010"]  # kept, set aside


def test_resume_refuses_a_stop_at_that_is_already_behind_it(tmp_path, data):
    cfg = cfg_for(tmp_path, steps=8, ckpt_every=4)
    train(cfg, data=data, stop_at=4)
    with pytest.raises(ValueError, match="--stop-at 3 is not after the checkpoint's step 4"):
        train(cfg, data=data, resume=True, stop_at=3)


def test_a_damaged_metrics_line_costs_only_itself_on_resume(tmp_path, data):
    cfg = cfg_for(tmp_path, steps=8, ckpt_every=4, log_every=1)
    train(cfg, data=data, stop_at=4)
    path = Path(cfg.out_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:15]  # a garbled line in the middle
    path.write_text("\n".join(lines) + "\n")
    resumed = train(cfg, data=data, resume=True)
    assert [r["step"] for r in resumed.history if r["event"] == "train"] == [1, 3, 4, 5, 6, 7, 8]


def test_resume_honours_steps_and_refuses_other_changes(tmp_path, data):
    cfg = cfg_for(tmp_path, steps=8, ckpt_every=4)
    train(cfg, data=data, stop_at=4)
    with pytest.raises(ValueError, match=r"cannot change on resume: model.moe.router.kind \('mpi' -> 'linear'\)"):
        train(cfg_for(tmp_path, router="linear", steps=8, ckpt_every=4, out_dir=cfg.out_dir), data=data, resume=True)
    with pytest.raises(ValueError, match="cannot change on resume: optim.lr"):
        train(dataclasses.replace(cfg, optim=OptimConfig(lr=5e-3)), data=data, resume=True)
    for steps in (3, 4):
        with pytest.raises(ValueError, match=f"--steps {steps} must be above the checkpoint's step 4"):
            train(dataclasses.replace(cfg, steps=steps), data=data, resume=True)
    with pytest.raises(ValueError, match="cannot change on resume: eval_batches"):
        train(dataclasses.replace(cfg, eval_batches=1), data=data, resume=True)
    said = []
    longer = train(dataclasses.replace(cfg, steps=12, log_every=2), data=data, resume=True, say=said.append)
    assert longer.step == 12 and [r["step"] for r in longer.history if r["event"] == "timing"] == [12]
    assert any("extending the run from 8 to 12 steps" in m and "schedule is recomputed" in m for m in said)
    assert json.loads((Path(cfg.out_dir) / "config.json").read_text())["steps"] == 12


def test_resume_of_a_finished_run_changes_nothing(tmp_path, data):
    cfg = cfg_for(tmp_path, steps=6)
    done = train(cfg, data=data)
    metrics = (Path(cfg.out_dir) / "metrics.jsonl").read_text()
    said = []
    again = train(cfg, data=data, resume=True, say=said.append)
    assert "already finished its 6 steps" in said[-1]
    assert (Path(cfg.out_dir) / "metrics.jsonl").read_text() == metrics and '"event": "timing"' in metrics
    assert again.final_eval == done.final_eval


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, data, monkeypatch):
    full = train(cfg_for(tmp_path / "full", steps=10, ckpt_every=0), data=data)
    cfg = cfg_for(tmp_path / "split", steps=10, ckpt_every=0)
    real_forward, calls = MoELM.forward, {"n": 0}

    def forward_then_signal(self, idx, targets=None):
        calls["n"] += 1 if self.training else 0
        if self.training and calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step 5 (0-based)
        return real_forward(self, idx, targets)

    monkeypatch.setattr(MoELM, "forward", forward_then_signal)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, data=data)
    monkeypatch.setattr(MoELM, "forward", real_forward)
    assert info.value.step == 6 and info.value.exit_code == 128 + signal.SIGTERM
    assert ckpt.resolve_checkpoint(cfg.out_dir).name == "step_0000006"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    resumed = train(cfg, data=data, resume=True)
    assert _strip(resumed.history) == _strip(full.history)


def test_non_finite_weights_stop_the_run_and_are_never_checkpointed(tmp_path, data):
    """Adam with eps=0 divides 0 by 0 for rows without gradient: the weights turn NaN while the loss is still finite."""
    cfg = cfg_for(tmp_path, steps=6, ckpt_every=1, optim=OptimConfig(lr=1e-2, eps=0.0))
    with pytest.raises(NonFiniteLossError, match="weights became non-finite at step 1 .*No checkpoint was written yet"):
        train(cfg, data=data)
    assert not list((Path(cfg.out_dir) / "checkpoints").glob("step_*"))


@pytest.mark.parametrize("ckpt_every, eval_every, steps, interval", [(None, 8, 24, 8), (None, 0, 20, 2), (None, 0, 5, 1), (0, 8, 24, 0), (3, 8, 24, 3)],
                         ids=["at-evals", "tenth-without-evals", "short-run", "off", "explicit"])
def test_checkpoints_are_periodic_by_default(tmp_path, ckpt_every, eval_every, steps, interval):
    assert cfg_for(tmp_path, steps=steps, ckpt_every=ckpt_every, eval_every=eval_every).ckpt_interval == interval


def test_final_eval_also_reports_the_periodic_estimator(tmp_path, data):
    torch.manual_seed(0)
    cfg = cfg_for(tmp_path, eval_batches=2)
    model = MoELM(preset_config("debug", max_seq_len=32))
    prefix = evaluate(model, data.val_ids, cfg, torch.device("cpu"), max_batches=2)
    whole = evaluate(model, data.val_ids, cfg, torch.device("cpu"), prefix_batches=2)
    assert prefix["val_scope"] == "prefix" and prefix["val_batches"] == 2
    assert whole["val_scope"] == "whole" and whole["val_batches"] == 16  # 4096 tokens / 32 / 8
    assert whole["val_loss_prefix"] == prefix["val_loss"] and whole["maxvio_prefix"] == prefix["maxvio"]
    assert whole["val_loss"] != prefix["val_loss"]


@pytest.mark.parametrize(
    "override, message",
    [("grad_clip=-1", "grad_clip must be >= 0"), ("eval_every=-1", "eval_every must be >= 0"), ("log_every=0", "log_every must be >= 1"),
     ("schedule.min_lr_ratio=5", r"min_lr_ratio must be in \[0, 1\]"), ("optim.lr=1e39", r"optim.lr must be in \(0, 1000\]"),
     ("optim.eps=nan", "optim.eps must be >= 0 and finite, got nan"), ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\] must be in \[0, 1\)"),
     ("device=foo", "unknown device 'foo'"), ("seed=-1", r"seed must be in \[0, "), ("ckpt_keep=0", "ckpt_keep must be >= 1"),
     ("schedule.warmup_steps=-2", "warmup_steps must be >= 0"), ("optim.weight_decay=inf", "weight_decay must be >= 0 and finite, got inf")],
    ids=["grad-clip", "eval-every", "log-every", "min-lr-ratio", "huge-lr", "nan-eps", "beta-one", "device", "seed", "ckpt-keep",
         "warmup", "inf-decay"],
)
def test_nonsense_numbers_are_rejected(override, message):
    from mpirouter.common.config import apply_overrides

    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_stop_at_must_be_positive(tmp_path, data):
    with pytest.raises(ValueError, match="stop_at must be >= 1"):
        train(cfg_for(tmp_path), data=data, stop_at=-1)


def test_a_signal_during_the_last_step_still_stops_the_caller(tmp_path, data, monkeypatch):
    """demo and compare must not go on to the next run when the signal came in the final step or eval."""
    import mpirouter.trainer.loop as train_mod

    real = train_mod.router_cost_ms

    def signal_then_measure(model, *a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real(model, *a, **k)

    monkeypatch.setattr(train_mod, "router_cost_ms", signal_then_measure)
    cfg = cfg_for(tmp_path, steps=4)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, data=data)
    assert info.value.step == 4 and ckpt.resolve_checkpoint(cfg.out_dir).name == "step_0000004"


def test_force_with_bad_input_does_not_move_the_old_run(tmp_path, data):
    cfg = cfg_for(tmp_path, steps=2)
    train(cfg, data=data)
    with pytest.raises(ValueError, match="CUDA is not available"):
        train(dataclasses.replace(cfg, device="cuda"), data=data, force=True)
    assert (Path(cfg.out_dir) / "config.json").is_file() and not list(tmp_path.glob("*.old-*"))


def test_an_extended_run_keeps_one_estimator_in_its_curve(tmp_path, data):
    from mpirouter.experiments.report import eval_curve

    cfg = cfg_for(tmp_path, steps=8, eval_every=4, eval_batches=1)
    train(cfg, data=data)
    longer = train(dataclasses.replace(cfg, steps=12), data=data, resume=True)
    evals = {r["step"]: r for r in longer.history if r["event"] == "eval"}
    curve = eval_curve(json.loads((Path(cfg.out_dir) / "config.json").read_text()), longer.history)
    assert curve.values == [evals[4]["val_loss"], evals[8]["val_loss_prefix"], evals[12]["val_loss_prefix"]]


@pytest.mark.slow
def test_compiled_model_with_accumulation_matches_eager(tmp_path, data, monkeypatch):
    """--compile with φ shared across micro-batches (the rows passed as a forward argument) gives the eager losses.

    aot_eager traces exactly what inductor would compile (dynamo graphs + autograd) without its ~30 s of codegen here.
    """
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager", **kw))
    eager = train(cfg_for(tmp_path / "eager", steps=3, grad_accum=2, log_every=1, eval_every=0), data=data)
    compiled = train(cfg_for(tmp_path / "compiled", steps=3, grad_accum=2, log_every=1, eval_every=0, compile=True), data=data)
    assert curve(compiled) == pytest.approx(curve(eager), rel=1e-6)


def test_a_signal_during_a_mid_run_eval_checkpoints_that_step(tmp_path, data, monkeypatch):
    import mpirouter.trainer.loop as train_mod

    real = train_mod.evaluate

    def signal_then_evaluate(*a, **k):
        if not getattr(signal_then_evaluate, "sent", False):
            signal_then_evaluate.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "evaluate", signal_then_evaluate)
    cfg = cfg_for(tmp_path, steps=8, eval_every=4, ckpt_every=0)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, data=data)
    assert info.value.step == 4 and ckpt.resolve_checkpoint(cfg.out_dir).name == "step_0000004"
