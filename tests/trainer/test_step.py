"""The training step: no host reads between log steps, φ once per optimizer step, on-device metrics."""

from __future__ import annotations

import copy
import dataclasses

import json
from pathlib import Path

import pytest
import torch
from sync_proxy import SyncProxy

from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.dispatch import choose_dispatch
from mpirouter.core.moe import MoEConfig
from mpirouter.core.routing import tokens_per_expert
from mpirouter.core.routers import RouterConfig, RowsPerStep
from mpirouter.optim import OptimConfig
from mpirouter.trainer.device import StepTimer
from mpirouter.trainer.step import NonFiniteWatch, StepOutput, train_step


def model_for(kind: str = "mpi", dispatch: str = "auto", seed: int = 0) -> MoELM:
    cfg = preset_config("debug")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch, router=RouterConfig(kind=kind)))
    torch.manual_seed(seed)
    return MoELM(cfg)


def micro_batches(model: MoELM, n: int, batch: int = 2, seq: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    return [(torch.randint(V, (batch, seq), generator=g), torch.randint(V, (batch, seq), generator=g)) for _ in range(n)]


def grads(model: MoELM) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["mpi", "power", "retract"])
def test_rows_once_per_step_give_the_same_gradients(kind):
    """φ shared by 3 micro-batches: gradients equal recomputing it per micro-batch, up to summation order."""
    a = model_for(kind)
    b = copy.deepcopy(a)
    batches = micro_batches(a, 3)
    for x, y in batches:  # reference: φ recomputed in every micro-batch
        (a(x, y).loss / 3).backward()
    shared = RowsPerStep(b.router_rows(), 3)
    for i, (x, y) in enumerate(batches):
        (b(x, y, router_rows=shared.for_micro_batch(i)).loss / 3).backward()
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any("router" in k for k in ga)


def test_rows_are_computed_once_per_step_and_their_backward_runs_in_the_last_micro_batch(monkeypatch):
    """R's gradient (which flows only through φ) appears during the last micro-batch's backward, not after it:
    that is where DDP/FSDP expect every gradient."""
    model = model_for("mpi")
    calls = {"rows": 0}
    router_cls = type(model.moe_layers()[0].router)
    real_rows = router_cls.rows

    def counting_rows(self, *a, **k):
        calls["rows"] += 1
        return real_rows(self, *a, **k)

    monkeypatch.setattr(router_cls, "rows", counting_rows)
    r = model.moe_layers()[0].router.weight
    seen = []
    r.register_post_accumulate_grad_hook(lambda p: seen.append(micro))
    batches = micro_batches(model, 4)
    shared = RowsPerStep(model.router_rows(), 4)
    for micro, (x, y) in enumerate(batches):
        model(x, y, router_rows=shared.for_micro_batch(micro)).loss.backward()
        if micro < 3:
            assert r.grad is None, "φ's backward ran before the last micro-batch"
    assert seen == [3]
    assert calls["rows"] == len(model.moe_layers())  # once per layer for the whole step


def test_rows_per_step_rejects_bad_indices_and_a_second_last_take():
    shared = RowsPerStep([torch.zeros(2, 3, requires_grad=True)], 2)
    with pytest.raises(ValueError, match="outside 0..1"):
        shared.for_micro_batch(2)
    with pytest.raises(ValueError, match="micro_batches"):
        RowsPerStep([], 0)
    shared.for_micro_batch(1)
    with pytest.raises(RuntimeError, match="already taken"):
        shared.for_micro_batch(1)


def test_an_empty_last_micro_batch_still_delivers_the_earlier_gradients():
    """A layer that sees no tokens keeps the given rows on its output's graph, so φ's backward still runs."""
    model = model_for("mpi")
    moe = model.moe_layers()[0]
    x = torch.randn(2, 4, model.config.dim)
    shared = RowsPerStep([moe.router_rows()], 2)
    moe(x, shared.for_micro_batch(0)[0]).out.square().sum().backward()
    moe(x[:0], shared.for_micro_batch(1)[0]).out.sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_linear_routers_are_not_shared():
    assert model_for("linear").router_rows() is None and model_for("mpi-inplace").router_rows() is None


@pytest.mark.parametrize("accum", [1, 3], ids=["one-micro-batch", "three-micro-batches"])
def test_train_step_matches_a_plain_step(accum):
    """train_step (φ shared when accumulating) == forward/backward per micro-batch + clip + SGD, on CPU."""
    a = model_for("mpi")
    b = copy.deepcopy(a)
    batches = micro_batches(a, accum)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    losses = []
    for x, y in batches:
        out = a(x, y)
        (out.loss / accum).backward()
        losses.append(out.loss.item())
    norm = torch.nn.utils.clip_grad_norm_(a.parameters(), 1.0)
    opt_a.step()
    a.post_step()
    got = train_step(b, b, opt_b, batches, amp=None, grad_clip=1.0).read()
    assert got["loss"] == pytest.approx(sum(losses) / accum, rel=1e-6)
    assert got["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    for (k, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-7, msg=k)


PROXY_CASES = {
    "item": lambda x, m: x.sum().item(),
    "bool": lambda x, m: bool(x.sum() > 0),
    "to-cpu": lambda x, m: x.to("cpu"),
    "cpu": lambda x, m: x.cpu(),
    "mask-index": lambda x, m: x[m],
    "mask-assign": lambda x, m: x.clone().__setitem__(m, 0.0),
    "nonzero": lambda x, m: m.nonzero(),
    "bincount": lambda x, m: torch.bincount(m.long()),
    "grouped-mm-fp32": lambda x, m: torch._grouped_mm(torch.randn(8, 16), torch.randn(2, 16, 8), offs=torch.tensor([4, 8], dtype=torch.int32)),
}


@pytest.mark.parametrize("case", list(PROXY_CASES))
def test_the_sync_proxy_catches_each_kind_of_host_read(case):
    """Issue #23 item 5: the proxy did not see boolean-mask indexing, .to("cpu") or float32 grouped_mm."""
    x = torch.randn(6, 16)
    with SyncProxy() as proxy:
        PROXY_CASES[case](x, x[:, 0] > 0)
    assert proxy.found, case
    with SyncProxy() as proxy:
        x @ x.T, torch.where(x > 0, x, 0.0), x.to(torch.bfloat16)
        if hasattr(torch, "_grouped_mm"):
            torch._grouped_mm(torch.randn(8, 16).bfloat16(), torch.randn(2, 16, 8).bfloat16(), offs=torch.tensor([4, 8], dtype=torch.int32))
    assert proxy.found == []  # and what does not sync is not reported


@pytest.mark.parametrize("accum", [1, 2], ids=["one-micro-batch", "two-micro-batches"])
def test_a_step_reads_nothing_on_the_host(monkeypatch, accum):
    """A CPU stand-in for CUDA's sync check (tests/sync_proxy.py) over what a GPU step runs: the grouped_mm
    dispatch under bf16 autocast, the real optimizer (`build_optimizer`, AdamW with the fused kernel CUDA picks),
    the watch. The GPU tier checks the real thing with torch.cuda.set_sync_debug_mode("error")."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    import mpirouter.optim.build as build

    monkeypatch.setattr(build, "fused_adamw_supported", lambda params: True)  # CPU's AdamW reads its step count
    model = model_for("mpi", dispatch="grouped_mm")
    opt = build.build_optimizer(model, OptimConfig())
    batches = micro_batches(model, accum)
    watch = NonFiniteWatch(torch.device("cpu"))
    train_step(model, model, opt, batches, amp=torch.bfloat16, grad_clip=1.0)  # warm-up outside the check
    with SyncProxy() as proxy:
        out = train_step(model, model, opt, batches, amp=torch.bfloat16, grad_clip=1.0)
        watch.update(0, out)
    assert proxy.found == [], f"host reads inside a step: {proxy.found}"
    assert watch.check() is None and set(out.read()) == set(StepOutput._fields[:5])


def test_a_two_rank_step_reads_nothing_on_the_host(torchrun):
    """The same check on every rank of a 2-rank DDP and FSDP2 step (expert parallelism's split-size read is the one
    documented exception: docs/distributed.md)."""
    done = torchrun(Path(__file__).parent / "dist_sync.py", 2)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"ddp": [[], []], "fsdp": [[], []]}, found


def test_the_watch_names_the_first_non_finite_step():
    watch = NonFiniteWatch(torch.device("cpu"))
    ok = StepOutput(*(torch.tensor(1.0, dtype=torch.float64) for _ in StepOutput._fields))
    watch.update(0, ok)
    assert watch.check() is None
    watch.update(1, ok._replace(grad_norm=torch.tensor(float("inf"), dtype=torch.float64)))
    watch.update(2, ok._replace(loss=torch.tensor(float("nan"), dtype=torch.float64)))
    assert watch.check() == "gradient norm became inf at step 1"
    fresh = NonFiniteWatch(torch.device("cpu"))
    fresh.update(5, ok._replace(loss=torch.tensor(float("nan"), dtype=torch.float64)))
    assert fresh.check() == "loss became nan at step 5"


def test_expert_counts_have_a_static_shape():
    experts_TK = torch.tensor([[0, 3], [3, 1], [0, 3]])
    counts_E = tokens_per_expert(experts_TK, 6)
    assert counts_E.shape == (6,) and counts_E.dtype == torch.int64
    assert torch.equal(counts_E, torch.bincount(experts_TK.reshape(-1), minlength=6))


def test_auto_dispatch_on_cpu_is_the_measured_loop():
    for dtype in (torch.float32, torch.bfloat16):
        assert choose_dispatch(torch.device("cpu"), dtype) == "loop"
    assert MoEConfig().dispatch == "auto"


def test_cpu_step_timer_reports_each_step_once():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        timer.start()
        timer.stop()
    first = timer.read()
    assert len(first) == 3 and all(t >= 0 for t in first)
    assert timer.read() == []
    with pytest.raises(RuntimeError, match="without start"):
        timer.stop()
