"""Optimizers (issue 4): Newton-Schulz, Muon per expert, Hyperball, grouping, AdamW parity, resume, training."""

import dataclasses
import io
import math

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Partial

from mpirouter.trainer.data import DataConfig, prepare_data
from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.precision import bf16_matmuls
from mpirouter.optim import (
    DEFAULT_LR,
    OPTIMIZERS,
    CombinedOptimizer,
    Hyperball,
    StackedMuon,
    build_optimizer,
    classify,
    frobenius_normalize,
    hyperball_radius,
    hyperball_step,
    muon_lr_scale,
    newton_schulz,
    with_optimizer,
)
from mpirouter.core.routers import RouterConfig
from mpirouter.optim import OptimConfig, param_groups
from mpirouter.optim import hyperball_radii, load_hyperball_radii, torch_optimizers, whole_matrix_placements
from mpirouter.trainer.checkpoint import load_model
from mpirouter.trainer.config import TrainConfig, resolve_config
from mpirouter.trainer.loop import train
from mpirouter.trainer.schedule import ScheduleConfig

ROUTER_MODES = ("matrix", "rows", "adamw")


def random_matrix(m: int, n: int, gen: torch.Generator, smin: float = 0.05, scale: float = 1.0) -> torch.Tensor:
    """U diag(s) Vᵀ with singular values spread over [smin, 1] · scale (known conditioning)."""
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = torch.linspace(smin, 1.0, k)
    return scale * (u * s) @ v.T


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return (u @ vh).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


# ----------------------------------------------------------------------------- Newton-Schulz


@pytest.mark.parametrize("shape", [(48, 48), (96, 24), (24, 96)], ids=["square", "tall", "wide"])
def test_newton_schulz_singular_values_near_one_and_matches_svd_polar_factor(shape):
    gen = torch.Generator().manual_seed(0)
    x = random_matrix(*shape, gen, scale=7.3)
    o = newton_schulz(x).float()
    assert o.shape == x.shape
    sv = torch.linalg.svdvals(o.double())
    # Keller Jordan's coefficients trade exact convergence for speed: σ lands in ~[0.7, 1.2]
    assert sv.min() > 0.6 and sv.max() < 1.25, sv
    assert cosine(o, polar_factor(x)) > 0.98
    # the same iteration with the convergent cubic coefficients (1.5, -0.5, 0) reaches U Vᵀ itself
    exact = newton_schulz(x, steps=40, coefficients=(1.5, -0.5, 0.0), dtype=torch.float32)
    torch.testing.assert_close(torch.linalg.svdvals(exact), torch.ones(min(shape)), atol=1e-4, rtol=0)
    torch.testing.assert_close(exact, polar_factor(x), atol=1e-4, rtol=0)


def test_newton_schulz_is_per_expert_on_stacks():
    """Each matrix of a 3-D stack is orthogonalized on its own, whatever the others' scale."""
    gen = torch.Generator().manual_seed(1)
    scales = (1e-3, 1.0, 1e3)
    x = torch.stack([random_matrix(32, 16, gen, scale=s) for s in scales])
    o = newton_schulz(x).float()
    for e in range(len(scales)):
        sv = torch.linalg.svdvals(o[e].double())
        assert sv.min() > 0.6 and sv.max() < 1.25, (e, sv)
        assert cosine(o[e], polar_factor(x[e])) > 0.98
        torch.testing.assert_close(o[e], newton_schulz(x[e]).float())  # same as one matrix at a time
    assert torch.equal(newton_schulz(torch.zeros(2, 4, 8)), torch.zeros(2, 4, 8, dtype=torch.bfloat16))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_newton_schulz_equals_torch_muon_iteration():
    from torch.optim._muon import _zeropower_via_newtonschulz

    gen = torch.Generator().manual_seed(2)
    for shape in [(40, 40), (64, 16), (16, 64)]:
        x = torch.randn(*shape, generator=gen)
        ref = _zeropower_via_newtonschulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        torch.testing.assert_close(newton_schulz(x).float(), ref.float(), atol=2e-2, rtol=0)


def test_muon_lr_scale_rules():
    assert muon_lr_scale(256, 64, "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert muon_lr_scale(64, 256, "match_rms_adamw") == pytest.approx(0.2 * 16)
    assert muon_lr_scale(256, 64, "original") == pytest.approx(2.0)
    assert muon_lr_scale(64, 256, "original") == 1.0
    with pytest.raises(ValueError, match="unknown Muon lr scaling"):
        muon_lr_scale(4, 4, "bogus")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("rule", ["original", "match_rms_adamw"])
def test_stacked_muon_equals_torch_muon_per_expert(rule):
    """StackedMuon on an (E, F, D) stack = torch.optim.Muon on each expert's F×D matrix."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(3, 24, 16, generator=gen)
    stack = torch.nn.Parameter(w.clone())
    singles = [torch.nn.Parameter(w[e].clone()) for e in range(3)]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn=rule)
    o_stack = StackedMuon([stack], **kw)
    o_single = torch.optim.Muon(singles, **kw)
    for _ in range(3):
        g = torch.randn(3, 24, 16, generator=gen)
        g[1] = 0.0  # an expert that got no tokens this step
        stack.grad = g.clone()
        for e in range(3):
            singles[e].grad = g[e].clone()
        o_stack.step()
        o_single.step()
    for e in range(3):
        torch.testing.assert_close(stack.data[e], singles[e].data, atol=2e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- Hyperball


def test_hyperball_step_fixes_weight_norm_and_update_norm():
    gen = torch.Generator().manual_seed(4)
    w, u = torch.randn(4, 16, 8, generator=gen), torch.randn(4, 16, 8, generator=gen) * torch.tensor([1e-3, 1.0, 1e3, 0.0]).view(4, 1, 1)
    r = hyperball_radius(w, "sqrt_fan_out")
    assert torch.equal(r.flatten(), torch.full((4,), 4.0))
    w = frobenius_normalize(w) * r
    lr = 0.05
    new = hyperball_step(w, u, lr, r)
    torch.testing.assert_close(torch.linalg.matrix_norm(new), r.flatten(), rtol=1e-6, atol=0)
    # before the retraction each (nonzero) update has norm lr·r whatever the base update's scale
    delta = torch.linalg.matrix_norm(w - lr * r * frobenius_normalize(u) - w)
    torch.testing.assert_close(delta[:3], lr * r.flatten()[:3])
    torch.testing.assert_close(new[3], w[3])  # zero update: the weight stays where it is
    # the angle moved is arcsin-like in lr: cos(W, W') = 1/sqrt(1 + lr²) for an orthogonal update
    u_perp = torch.randn(16, 8, generator=gen)
    w0 = w[0]
    u_perp = u_perp - (u_perp * w0).sum() / (w0 * w0).sum() * w0
    assert cosine(hyperball_step(w0, u_perp, lr, r[0]), w0) == pytest.approx(1 / math.sqrt(1 + lr**2), abs=1e-6)


@pytest.mark.parametrize("name", ["adamh", "muonh"])
@pytest.mark.parametrize("router_mode", ROUTER_MODES)
def test_hyperball_keeps_every_wrapped_weight_norm_exactly(name, router_mode):
    torch.manual_seed(0)
    model = MoELM(preset_config("debug"))
    cfg = OptimConfig(name=name, lr=0.05, router=router_mode)
    opt = build_optimizer(model, cfg)
    moe = model.blocks[0].ffn
    idx = torch.randint(0, 256, (4, 33))
    before = moe.w_gate.detach().clone()
    for _ in range(3):
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(before, moe.w_gate)
    hyper = [g for g in opt.param_groups if g["hyperball"]]
    assert {g["name"] for g in hyper} == ({"matrices"} if router_mode == "adamw" else {"matrices", "router"})
    for g in hyper:
        assert g["weight_decay"] == 0.0
        for p in g["params"]:
            m = p.unsqueeze(-2) if g["rows"] else p
            expected = torch.full(m.shape[:-2], math.sqrt(m.shape[-2]))  # sqrt(fan_out) per matrix / expert / row
            torch.testing.assert_close(torch.linalg.matrix_norm(m.detach()), expected, rtol=2e-6, atol=0)
    # not wrapped: embeddings, head and gains move freely
    assert all(not g["hyperball"] for g in opt.param_groups if g["name"] in ("embeddings", "norms"))


def test_hyperball_radius_init_keeps_initial_norms_and_rejects_weight_decay():
    torch.manual_seed(0)
    model = MoELM(preset_config("debug"))
    w_down = model.blocks[1].ffn.w_down
    norms0 = torch.linalg.matrix_norm(w_down.detach()).clone()
    opt = build_optimizer(model, OptimConfig(name="muonh", hyperball_radius="init", lr=0.1))
    idx = torch.randint(0, 256, (4, 33))
    model(idx[:, :-1], idx[:, 1:]).loss.backward()
    opt.step()
    torch.testing.assert_close(torch.linalg.matrix_norm(w_down.detach()), norms0, rtol=2e-6, atol=0)
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="replaces weight decay"):
        Hyperball(torch.optim.Adam([p], weight_decay=0.1))


# ----------------------------------------------------------------------------- grouping and AdamW parity


@pytest.mark.parametrize("tie", [False, True])
def test_every_parameter_is_in_exactly_one_group_for_every_optimizer(tie):
    model = MoELM(preset_config("debug", tie_embeddings=tie, n_dense_layers=1))
    model.blocks[0].attn_norm.weight.requires_grad_(False)  # frozen: in no group
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    found = classify(model)
    names = lambda k: {n for n, _ in found[k]}  # noqa: E731
    assert names("router") == {"blocks.1.ffn.router.weight"}
    assert "blocks.1.ffn.w_gate" in names("matrices") and "blocks.0.ffn.w_gate.weight" in names("matrices")
    assert names("embeddings") == ({"tok_emb.weight"} if tie else {"tok_emb.weight", "head.weight"})
    assert all(p.dim() == 1 for _, p in found["norms"])
    for name in OPTIMIZERS:
        for mode in ROUTER_MODES:
            cfg = OptimConfig(name=name, router=mode)
            groups = param_groups(model, cfg)
            ids = [id(p) for g in groups for p in g["params"]]
            assert len(ids) == len(set(ids)) and set(ids) == trainable
            built = build_optimizer(MoELM(preset_config("debug", tie_embeddings=tie, n_dense_layers=1)), cfg)
            assert len([p for g in built.param_groups for p in g["params"]]) == len(trainable) + 1  # + the unfrozen gain
            by_name = {g["name"]: g for g in groups}
            assert by_name["norms"]["weight_decay"] == 0.0 and by_name["embeddings"]["algo"] == "adamw"
            router = by_name["router"]
            if mode == "adamw" or name == "adamw":
                assert router["algo"] == "adamw" and not router["hyperball"]
            else:
                assert router["algo"] == by_name["matrices"]["algo"] and router["hyperball"] == name.endswith("h")
                assert router["rows"] == (mode == "rows")


def test_adamw_path_is_torch_adamw_bitwise():
    torch.manual_seed(0)
    m1, m2 = MoELM(preset_config("debug")), MoELM(preset_config("debug"))
    m2.load_state_dict(m1.state_dict())
    o1 = build_optimizer(m1, OptimConfig(name="adamw", lr=2e-3, weight_decay=0.1, router_weight_decay=0.0))
    assert isinstance(o1, torch.optim.AdamW) and type(o1).__name__ == "AdamW"  # build.AdamW: torch's, stepped by layout
    router_ids = {id(moe.router.weight) for moe in m2.moe_layers()}
    o2 = torch.optim.AdamW([
        {"params": [p for p in m2.parameters() if p.dim() >= 2 and id(p) not in router_ids], "weight_decay": 0.1},
        {"params": [p for p in m2.parameters() if id(p) in router_ids], "weight_decay": 0.0},
        {"params": [p for p in m2.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ], lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
    idx = torch.randint(0, 256, (2, 33))
    for _ in range(3):
        for m, o in ((m1, o1), (m2, o2)):
            m(idx[:, :-1], idx[:, 1:]).loss.backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n


def test_adam_stepped_in_parts_equals_torch_runs_step_hooks_once_and_keeps_its_groups(monkeypatch):
    """build.AdamW/Adam with every group stepped in parts (here: one parameter each; `layout_parts` splits by
    DTensor layout, tests/parallel/test_gpu_paths.py): bitwise torch's optimizer, step hooks run once per step
    (also once a plain torch optimizer has hooked torch's step), and param_groups are the groups built, also
    after a step that raised."""
    import mpirouter.optim.build as build

    monkeypatch.setattr(build, "layout_parts", lambda params: [[p] for p in params])
    for mine, theirs in ((build.AdamW, torch.optim.AdamW), (build.Adam, torch.optim.Adam)):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        opt = mine([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0, "lr": 0.05}], lr=0.1, weight_decay=0.1)
        ref = theirs([{"params": qs[:2]}, {"params": qs[2:], "weight_decay": 0.0, "lr": 0.05}], lr=0.1, weight_decay=0.1)
        groups, calls = opt.param_groups, []
        opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(len(o.param_groups)))
        for _ in range(3):
            for p, q in zip(ps, qs):
                p.grad = q.grad = torch.randn(3)
            opt.step()
            ref.step()
        assert all(torch.equal(p, q) for p, q in zip(ps, qs))
        assert calls == [2, 2, 2] and opt.param_groups is groups

        def fails():
            raise RuntimeError("closure")

        with pytest.raises(RuntimeError, match="closure"):
            opt.step(fails)
        assert opt.param_groups is groups


def test_adamw_side_of_muon_matches_torch_adamw_at_adam_lr_and_lr_scale_is_not_compounded():
    torch.manual_seed(0)
    m1, m2 = MoELM(preset_config("debug")), MoELM(preset_config("debug"))
    m2.load_state_dict(m1.state_dict())
    cfg = OptimConfig(name="muon", lr=0.02, adam_lr=4e-3)
    o1 = build_optimizer(m1, cfg)
    emb2 = [m2.tok_emb.weight, m2.head.weight]
    norms2 = [p for p in m2.parameters() if p.dim() < 2]
    o2 = torch.optim.AdamW([{"params": emb2, "weight_decay": 0.1}, {"params": norms2, "weight_decay": 0.0}],
                           lr=4e-3, betas=(0.9, 0.95), eps=1e-8)
    side_ids = {id(p) for p in emb2 + norms2}
    idx = torch.randint(0, 256, (2, 33))
    for _ in range(3):
        for g in o1.param_groups:
            g["lr"] = 0.02  # what the training loop does
        with torch.no_grad():  # same Muon-side weights in both models, so the gradients agree
            for p, q in zip(m1.parameters(), m2.parameters()):
                if id(q) not in side_ids:
                    q.copy_(p)
        for m in (m1, m2):
            m(idx[:, :-1], idx[:, 1:]).loss.backward()
        o1.step()
        o2.step()
        o1.zero_grad()
        o2.zero_grad()
        assert all(g["lr"] == 0.02 for g in o1.param_groups)
    torch.testing.assert_close(m1.tok_emb.weight, m2.tok_emb.weight)
    torch.testing.assert_close(m1.head.weight, m2.head.weight)
    for p, q in zip([p for p in m1.parameters() if p.dim() < 2], norms2):
        torch.testing.assert_close(p, q)


def test_lr_defaults_validation_and_grid_helper():
    model = MoELM(preset_config("debug"))
    cfg = OptimConfig(name="muonh")
    assert cfg.lr is None and cfg.peak_lr == DEFAULT_LR["muonh"]
    build_optimizer(model, cfg)
    assert cfg.lr is None and cfg.adam_lr is None  # the user's config is never written to
    resolved = resolve_config(TrainConfig(model=preset_config("debug"), optim=cfg), vocab_size=256)
    assert resolved.optim.lr == DEFAULT_LR["muonh"] and resolved.optim.adam_lr == DEFAULT_LR["adamw"] and cfg.lr is None
    base = TrainConfig(model=preset_config("debug"), optim=OptimConfig(name="adamw", lr=1e-2), out_dir="runs/x")
    variant = with_optimizer(base, "muon", out_dir="runs/x-muon")
    assert variant.optim.name == "muon" and variant.optim.lr is None and variant.out_dir == "runs/x-muon"
    assert base.optim.name == "adamw" and base.optim.lr == 1e-2
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        OptimConfig(name="sgd")
    with pytest.raises(ValueError, match="optim.router='cols'"):
        OptimConfig(router="cols")
    with pytest.raises(ValueError, match=r"optim.lr must be in \(0, 1000\]"):
        OptimConfig(lr=0.0)


@pytest.mark.parametrize("name", ["muon", "adamh", "muonh"])
def test_state_dict_round_trip_continues_identically(name):
    """A fresh optimizer that loads the state dict steps exactly like the original."""
    torch.manual_seed(0)
    m1, m2 = MoELM(preset_config("debug")), MoELM(preset_config("debug"))
    o1 = build_optimizer(m1, OptimConfig(name=name))
    idx = torch.randint(0, 256, (2, 33))
    for _ in range(2):
        m1(idx[:, :-1], idx[:, 1:]).loss.backward()
        o1.step()
        o1.zero_grad()
    o2 = build_optimizer(m2, OptimConfig(name=name))
    m2.load_state_dict(m1.state_dict())
    buf = io.BytesIO()  # through torch.save/load, as a checkpoint does (load_state_dict does not copy tensors)
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    o2.load_state_dict(torch.load(buf, weights_only=False))
    for m, o in ((m1, o1), (m2, o2)):
        m(idx[:, :-1], idx[:, 1:]).loss.backward()
        o.step()
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(p, q), n
    assert isinstance(o1, CombinedOptimizer)
    with pytest.raises(ValueError, match="optimizer state is for"):
        build_optimizer(MoELM(preset_config("debug")), OptimConfig(name="adamh" if name != "adamh" else "muon")).load_state_dict(o1.state_dict())


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data():
    full = prepare_data(DataConfig(), seq_len=32)
    return dataclasses.replace(full, train_ids=full.train_ids[:200_000], val_ids=full.val_ids[:2048])


def cfg_for(tmp_path, name, steps, **kw) -> TrainConfig:
    base = dict(
        model=preset_config("debug", max_seq_len=32, moe=dict(router=RouterConfig(kind="mpi"))),
        preset="debug", steps=steps, batch_size=8, eval_every=4, eval_batches=1, eval_batch_size=8, log_every=2,
        out_dir=str(tmp_path / name), progress=False, schedule=ScheduleConfig(warmup_steps=3), optim=OptimConfig(name=name),
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_lowers_the_loss_on_a_tiny_run(tmp_path, data, name):
    result = train(cfg_for(tmp_path, name, steps=30, eval_every=0, schedule=ScheduleConfig(warmup_steps=5)), data=data)
    losses = [r["lm_loss"] for r in result.history if r["event"] == "train"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert math.isfinite(result.final_eval["val_loss"]) and result.final_eval["val_loss"] < 4.5


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path, data, name):
    full = train(cfg_for(tmp_path / "full", name, steps=10, ckpt_every=4), data=data)
    cfg = cfg_for(tmp_path / "split", name, steps=10, ckpt_every=4)
    part = train(cfg, data=data, stop_at=6)
    assert part.step == 6
    resumed = train(cfg, data=data, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in h if r["event"] in ("train", "eval")]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    m_full, saved_cfg = load_model(full.run_dir)
    m_res, _ = load_model(resumed.run_dir)
    assert saved_cfg.optim.lr == DEFAULT_LR[name]  # the resolved default is recorded in the run's config
    for (n, p), (_, q) in zip(m_full.state_dict().items(), m_res.state_dict().items()):
        assert torch.equal(p, q), n


# ----------------------------------------------------------------------------- sharded parameters, sharded checkpoints (1-process parts)
# The 2-rank FSDP2/DDP checks are in test_optim_dist.py.


def test_whole_matrix_placements_keep_stack_shards_and_replicate_split_matrices():
    assert whole_matrix_placements((Shard(0),), 3) == (Shard(0),)  # experts of an (E, F, D) stack: whole per rank
    assert whole_matrix_placements((Shard(0),), 2) == (Replicate(),)  # rows of one matrix: must be gathered
    assert whole_matrix_placements((Shard(0),), 2, matrix_dims=1) == (Shard(0),)  # "rows" view: each row is a matrix
    assert whole_matrix_placements((Shard(0), Shard(1), Shard(-1)), 3) == (Shard(0), Replicate(), Replicate())
    assert whole_matrix_placements((Replicate(), Partial()), 3) == (Replicate(), Replicate())


def test_newton_schulz_of_an_empty_stack_is_empty():
    """A rank may hold no expert of an unevenly sharded stack (E = 1 over 2 ranks)."""
    assert newton_schulz(torch.zeros(0, 8, 4)).shape == (0, 8, 4)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_stacked_muon_on_a_matrix_is_torch_muon_bitwise_on_cpu():
    """StackedMuon's iteration on a 2-D weight is torch.optim.Muon's, bitwise on CPU when both multiply the same way:
    newton_schulz emulates bf16 GEMMs where the CPU has no bf16 kernels (core.precision), so torch's runs under the
    same emulation there."""
    gen = torch.Generator().manual_seed(5)
    for shape in [(192, 64), (64, 64), (4, 64)]:
        w = torch.randn(*shape, generator=gen)
        a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
        kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")
        oa, ob = StackedMuon([a], **kw), torch.optim.Muon([b], **kw)
        for _ in range(2):
            g = torch.randn(*shape, generator=gen)
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            with bf16_matmuls("cpu"):
                ob.step()
        assert torch.equal(a, b), shape


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_torch_optimizers_and_hyperball_radii_hold_the_whole_state(name):
    """What a sharded checkpoint saves: the torch optimizers (every parameter in exactly one) and the radii."""
    torch.manual_seed(0)
    model = MoELM(preset_config("debug"))
    opt = build_optimizer(model, OptimConfig(name=name, hyperball_radius="init"))
    inner = torch_optimizers(opt)
    assert all(isinstance(o, torch.optim.Optimizer) for o in inner)
    ids = [id(p) for o in inner for g in o.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    radii = hyperball_radii(model, opt)
    names = {n for n, p in model.named_parameters() if any(p is q for g in opt.param_groups if g["hyperball"] for q in g["params"])}
    assert set(radii) == names and (names != set()) == name.endswith("h")
    if not radii:
        return
    name0 = next(iter(radii))
    saved = {k: v.clone() * 2 for k, v in radii.items()}
    load_hyperball_radii(model, opt, saved)
    assert torch.equal(hyperball_radii(model, opt)[name0], saved[name0])
    with pytest.raises(ValueError, match="Hyperball radii do not match the optimizer: missing"):
        load_hyperball_radii(model, opt, {k: v for k, v in saved.items() if k != name0})
    with pytest.raises(ValueError, match="not an optimizer of build_optimizer"):
        torch_optimizers(object())
