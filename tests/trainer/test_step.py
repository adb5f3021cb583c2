"""The training step: no host reads between log steps, φ once per optimizer step, on-device metrics."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.moe import MoEConfig, choose_dispatch, tokens_per_expert
from mpirouter.core.routers import RouterConfig, RowsPerStep
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


def test_the_syncing_op_guard_sees_ops_called_from_cpp():
    """What the step test relies on: bincount and .item() are seen (the loop path's bounds too)."""
    with NoSyncingOps() as ops:
        torch.bincount(torch.tensor([0, 2, 2]))
        torch.tensor(1.0).item()
    assert ops.seen == ["bincount", "_local_scalar_dense"]


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


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")
SYNCING_OPS = ("_local_scalar_dense", "bincount", "nonzero", "masked_select", "unique", "_unique2", "repeat_interleave")
"""aten ops that read a value to the host or whose output size depends on the data (a sync on CUDA)."""


class NoSyncingOps(TorchDispatchMode):
    """Records every aten op of SYNCING_OPS run inside it, including those called from C++."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_a_step_reads_nothing_on_the_host(monkeypatch):
    """A CPU stand-in for CUDA's sync check: no tensor is read to Python inside train_step or the watch.

    grouped_mm dispatch (the CUDA path) and SGD (AdamW's CPU step counter is a host tensor by design;
    on CUDA the fused AdamW keeps it on the device); the GPU tier checks the real thing with
    torch.cuda.set_sync_debug_mode("error").
    """
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    model = model_for("mpi", dispatch="grouped_mm")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = micro_batches(model, 2)
    watch = NonFiniteWatch(torch.device("cpu"))
    train_step(model, model, opt, batches, amp=None, grad_clip=1.0)  # warm-up outside the check
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with NoSyncingOps() as ops:
        out = train_step(model, model, opt, batches, amp=None, grad_clip=1.0)
        watch.update(0, out)
    assert reads == [], f"host reads inside a step: {sorted(set(reads))}"
    assert ops.seen == [], f"syncing aten ops inside a step: {sorted(set(ops.seen))}"
    monkeypatch.undo()
    assert watch.check() is None and set(out.read()) == set(StepOutput._fields[:5])


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
