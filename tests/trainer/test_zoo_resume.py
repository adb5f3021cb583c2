"""Exact resume of the stateful router designs (docs/zoo.md): kmeans (centroids), remoe (l1_coef), linear+erc
(erc_seed/erc_step, which fix the proxies' noise), and mpi with the expert bias as a control.

A run trained STEPS steps straight and the same run stopped at STOP (checkpoint there) and resumed from it
must log the same losses and end with the same weights and state buffers, bit for bit (one process, CPU).
Each design's state must also have moved from its initial value, so the comparison is not of untouched buffers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mpirouter.core.model import preset_config
from mpirouter.core.routers import RouterConfig
from mpirouter.optim import OptimConfig
from mpirouter.trainer.checkpoint import load_model
from mpirouter.trainer.config import TrainConfig
from mpirouter.trainer.data import DataConfig, prepare_data
from mpirouter.trainer.loop import build_model, train
from mpirouter.trainer.schedule import ScheduleConfig

STEPS, STOP, SEQ = 6, 3, 16

CASES = {
    # grad_accum=2: the step's statistics (routed sums, gate density) add up over micro-batches before post_step
    "kmeans": (dict(router=RouterConfig(kind="kmeans", kmeans=dict(momentum=0.2))), dict(grad_accum=2)),
    # init_l1_coef 1e-3: the L1 term is large enough to show in the logged aux loss
    "remoe": (dict(router=RouterConfig(kind="remoe", remoe=dict(init_l1_coef=1e-3))), {}),
    # balance=bias: no balance loss, so the logged aux loss is ERC's alone
    "linear+erc": (dict(router=RouterConfig(kind="linear", erc=dict(enabled=True)), balance="bias"), dict(grad_accum=2)),
    "mpi+bias": (dict(router=RouterConfig(kind="mpi"), balance="bias", bias_update_rate=0.01), {}),
}
BUFFERS = {"kmeans": ["router.centroids"], "remoe": ["l1_coef"], "linear+erc": ["erc_seed", "erc_step"], "mpi+bias": ["expert_bias"]}
"""The per-layer state each design keeps beside its parameters (suffixes of state-dict names)."""


@pytest.fixture(scope="module")
def data():
    full = prepare_data(DataConfig(), seq_len=SEQ)
    return dataclasses.replace(full, train_ids=full.train_ids[:50_000], val_ids=full.val_ids[:1024])


def cfg_for(out, case: str) -> TrainConfig:
    moe, extra = CASES[case]
    return TrainConfig(model=preset_config("debug", max_seq_len=SEQ, moe=moe), preset="debug", steps=STEPS, batch_size=4,
                       eval_every=2, eval_batches=1, eval_batch_size=8, log_every=1, ckpt_every=2, out_dir=str(out),
                       progress=False, schedule=ScheduleConfig(warmup_steps=2), optim=OptimConfig(lr=1e-2), **extra)


def strip(history: list[dict]) -> list[dict]:
    """The train and eval records without wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in history
            if r["event"] in ("train", "eval")]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory, data):
    """(case, straight run, stopped-and-resumed run, the stopped run's result) of one design."""
    case = request.param
    root = tmp_path_factory.mktemp(case.replace("+", "-"))
    full = train(cfg_for(root / "full", case), data=data, say=lambda *_: None)
    cfg = cfg_for(root / "split", case)
    part = train(cfg, data=data, stop_at=STOP, say=lambda *_: None)
    resumed = train(cfg, data=data, resume=True, say=lambda *_: None)
    return case, full, resumed, part


def test_the_run_was_really_stopped_and_resumed(pair):
    case, full, resumed, part = pair
    assert part.step == STOP and resumed.step == full.step == STEPS
    assert [r["step"] for r in part.history if r["event"] == "train"] == list(range(1, STOP + 1))
    events = [r["event"] for r in resumed.history]
    assert events.count("start") == 1 and events.count("resume") == 1, events
    assert [r["step"] for r in resumed.history if r["event"] == "resume"] == [STOP]


def test_resumed_run_logs_the_same_losses(pair):
    case, full, resumed, _ = pair
    assert len([r for r in strip(full.history) if r["event"] == "train"]) == STEPS
    assert strip(resumed.history) == strip(full.history)


def test_resumed_run_ends_with_the_same_weights_and_state_buffers(pair):
    case, full, resumed, _ = pair
    a, _ = load_model(full.run_dir)
    b, _ = load_model(resumed.run_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    for layer_a, layer_b in zip(a.moe_layers(), b.moe_layers()):
        for key in BUFFERS[case]:
            assert torch.equal(layer_a.get_buffer(key), layer_b.get_buffer(key)), key


def test_the_state_buffers_moved_during_training(pair, tmp_path):
    """Buffers that never changed would make the resume comparison vacuous."""
    case, full, _, _ = pair
    trained, _ = load_model(full.run_dir)
    cfg = cfg_for(tmp_path, case)
    init = build_model(cfg, trained.config.vocab_size, torch.device("cpu"))
    for layer, start in zip(trained.moe_layers(), init.moe_layers()):
        if case == "kmeans":
            moved = (layer.router.centroids - start.router.centroids).norm() / start.router.centroids.norm()
            assert 1e-3 < moved < 1, float(moved)
        elif case == "remoe":
            ratio = float(layer.l1_coef / start.l1_coef)
            # λ ← λ · 1.2^±1 each step: after STEPS steps an integer power of 1.2 other than 1
            exponent = round(torch.log(torch.tensor(ratio, dtype=torch.float64)).item() / torch.log(torch.tensor(1.2, dtype=torch.float64)).item())
            assert exponent != 0 and ratio == pytest.approx(1.2**exponent, rel=1e-9), ratio
            assert layer.l1_coef.dtype == torch.float64
        elif case == "linear+erc":
            assert int(layer.erc_step) == STEPS and int(start.erc_step) == 0
            assert int(layer.erc_seed) == int(start.erc_seed) != 0  # drawn at init, kept for the run
        else:
            assert layer.expert_bias.abs().sum() > 0


@pytest.mark.parametrize("pair", ["linear+erc"], indirect=True)
def test_erc_noise_after_resume_is_the_noise_of_the_uninterrupted_run(pair):
    """The ERC proxies' uniform draw is a function of (erc_seed, erc_step): a model loaded from the resumed run
    draws what the straight run's model draws, and the next step's draw differs from this one."""
    _, full, resumed, _ = pair
    a, _ = load_model(full.run_dir)
    b, _ = load_model(resumed.run_dir)
    la, lb = a.moe_layers()[0], b.moe_layers()[0]
    like = la.router.weight.detach()
    ua, ub = la._erc_uniform(like), lb._erc_uniform(like)
    assert torch.equal(ua, ub)
    lb.erc_step.add_(1)
    lb._erc_counter = None  # re-read the buffers, as a load does
    assert not torch.equal(ua, lb._erc_uniform(like))


def test_the_logged_aux_loss_carries_the_router_losses(pair):
    """ERC and ReMoE's λ·L1 count as auxiliary losses: with no balance loss (bias; remoe has none) the logged
    aux loss is theirs alone; the bias control logs none."""
    case, full, _, _ = pair
    aux = [r["aux_loss"] for r in full.history if r["event"] == "train"]
    if case == "mpi+bias":
        assert all(v == 0 for v in aux), aux
    elif case == "remoe":
        assert all(v > 0 for v in aux), aux
    elif case == "linear+erc":  # a hinge loss: 0 at steps where no margin is violated
        assert all(v >= 0 for v in aux) and any(v > 0 for v in aux), aux
