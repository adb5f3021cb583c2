"""MoE layer against a naive per-token reference; balance losses and statistics on hand-made cases."""

import re

import pytest
import torch
import torch.nn.functional as F

from mpirouter.core.experts import grouped_linear, moe_forward_sorted, naive_moe_reference

from mpirouter.core.moe import MoE, MoEConfig

from mpirouter.core.routing import Routing, load_balance_loss, max_violation, route, router_entropy, router_z_loss, tokens_per_expert
from mpirouter.core.routers import RouterConfig


def per_token_reference(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: softmax, top-k, renormalize, weighted expert sum."""
    cfg = moe.config
    logits = moe.router(x_TD, moe.w_gate, moe.w_up)
    outs = []
    for t in range(x_TD.shape[0]):
        p = torch.softmax(logits[t].float(), -1)
        w, idx = torch.topk(p, cfg.top_k)
        if cfg.renormalize:
            w = w / w.sum()
        y = 0
        for wi, e in zip(w, idx):
            h = F.silu(moe.w_gate[e] @ x_TD[t]) * (moe.w_up[e] @ x_TD[t])
            y = y + wi * (moe.w_down[e] @ h)
        outs.append(y)
    return torch.stack(outs)


DISPATCH = ["loop", "grouped_mm"] if hasattr(torch, "_grouped_mm") else ["loop"]


@pytest.mark.parametrize("dispatch", DISPATCH)
@pytest.mark.parametrize(
    "E,K,renorm,kind",
    [(4, 1, True, "linear"), (8, 2, True, "mpi"), (6, 3, False, "retract"), (4, 4, True, "power"), (5, 2, True, "mpi-inplace")],
    ids=["E4k1-linear", "E8k2-mpi", "E6k3-norenorm-retract", "E4k4-all-power", "E5k2-inplace"],
)
def test_dispatch_matches_per_token_reference_forward_and_backward(dispatch, E, K, renorm, kind):
    torch.manual_seed(0)
    moe = MoE(12, MoEConfig(num_experts=E, top_k=K, hidden=8, renormalize=renorm, dispatch=dispatch, router=RouterConfig(kind=kind)))
    x = torch.randn(2, 9, 12, dtype=torch.float32, requires_grad=True)
    out = moe(x).out
    ref = per_token_reference(moe, x.reshape(-1, 12)).view_as(out)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    params = [x, moe.w_gate, moe.w_up, moe.w_down, moe.router.weight]
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, g_out, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, params, g_out, allow_unused=True)
    for name, a, b in zip(["x", "w_gate", "w_up", "w_down", "router"], grads, grads_ref):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_naive_reference_matches_sorted_dispatch():
    torch.manual_seed(1)
    x = torch.randn(30, 8)
    wg, wu, wd = torch.randn(4, 6, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 6)
    routing = route(torch.randn(30, 4), 2)
    out, counts = moe_forward_sorted(x, routing, wg, wu, wd, "loop")
    torch.testing.assert_close(out, naive_moe_reference(x, routing, wg, wu, wd))
    assert counts.sum() == 60


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_grouped_mm_falls_back_to_the_loop_for_unaligned_sizes():
    x, w, counts = torch.randn(6, 5), torch.randn(3, 7, 5), torch.tensor([1, 2, 3])  # 20- and 28-byte rows
    torch.testing.assert_close(grouped_linear(x, w, counts, "grouped_mm"), grouped_linear(x, w, counts, "loop"))


def test_all_tokens_to_one_expert_gives_zero_gradient_to_the_others():
    x = torch.randn(16, 8)
    wg = torch.randn(4, 6, 8, requires_grad=True)
    routing = Routing(torch.full((16, 4), 0.25), torch.ones(16, 1), torch.full((16, 1), 2))
    out, counts = moe_forward_sorted(x, routing, wg, torch.randn(4, 6, 8), torch.randn(4, 8, 6), "loop")
    out.sum().backward()
    assert counts.tolist() == [0, 0, 16, 0]
    assert wg.grad[[0, 1, 3]].abs().max() == 0 and wg.grad[2].abs().max() > 0


def test_grouped_linear_rejects_missing_grouped_mm(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    with pytest.raises(RuntimeError, match="dispatch='loop'"):
        grouped_linear(torch.randn(4, 3), torch.randn(2, 5, 3), torch.tensor([2, 2]), "grouped_mm")


@pytest.mark.parametrize("scope", ["sequence", "batch", "global"])
def test_aux_loss_equals_coef_at_perfectly_uniform_routing(scope):
    B, S, E, K = 3, 8, 4, 2
    probs = torch.full((B, S, E), 1.0 / E)
    experts = torch.stack([torch.tensor([(2 * s) % E, (2 * s + 1) % E]) for s in range(S)]).expand(B, S, K)
    assert load_balance_loss(probs, experts, coef=0.01, scope=scope).item() == pytest.approx(0.01)


def test_aux_loss_sequence_and_batch_scopes_differ_when_sequences_are_unbalanced():
    # sequence 0 sends everything to expert 0, sequence 1 to expert 1: balanced overall, not per sequence
    probs = torch.tensor([[[0.9, 0.1]] * 4, [[0.1, 0.9]] * 4])
    experts = torch.tensor([[[0]] * 4, [[1]] * 4])
    per_seq = load_balance_loss(probs, experts, 1.0, "sequence").item()
    batch = load_balance_loss(probs, experts, 1.0, "batch").item()
    assert per_seq == pytest.approx(2 * 0.9)  # E * f(=1) * P(=0.9)
    assert batch == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5))


def test_global_aux_loss_without_torch_distributed_is_the_batch_loss():
    """One process: the expert counts summed over "all ranks" are this process's, so "global" = "batch"."""
    assert not torch.distributed.is_initialized()
    torch.manual_seed(4)
    probs = torch.softmax(torch.randn(3, 7, 5), -1).requires_grad_(True)
    experts = torch.topk(probs.detach() + 0.3 * torch.rand(3, 7, 5), 2).indices
    batch = load_balance_loss(probs, experts, 0.1, "batch")
    glob = load_balance_loss(probs, experts, 0.1, "global")
    torch.testing.assert_close(glob, batch)
    torch.testing.assert_close(torch.autograd.grad(glob, probs)[0], torch.autograd.grad(batch, probs)[0])
    assert load_balance_loss(probs, experts, 0.1, "sequence").item() != pytest.approx(batch.item())  # the cases differ


def test_moe_layer_with_global_scope_matches_batch_scope_in_one_process():
    torch.manual_seed(5)
    layers = {scope: MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8, aux_loss_coef=0.05, aux_loss_scope=scope)) for scope in ("batch", "global")}
    layers["global"].load_state_dict(layers["batch"].state_dict())
    x = torch.randn(3, 5, 16)
    aux = {scope: m(x).stats.aux_loss for scope, m in layers.items()}
    torch.testing.assert_close(aux["global"], aux["batch"])
    grads = {scope: torch.autograd.grad(a, layers[scope].router.weight)[0] for scope, a in aux.items()}
    torch.testing.assert_close(grads["global"], grads["batch"])


@pytest.mark.parametrize("kind", ["linear", "mpi", "power", "retract", "mpi-inplace"])
def test_router_rows_of_an_expert_shard_are_that_shard_of_the_rows(kind):
    """What expert parallelism relies on: φ_i needs only R_i and G_i (and U_i), so each rank computes its own rows."""
    torch.manual_seed(6)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8, router=RouterConfig(kind=kind, target="gate_up")))
    shard = slice(2, 4)
    rows = moe.router.rows(moe.w_gate[shard], moe.w_up[shard], moe.router.weight[shard])
    torch.testing.assert_close(rows, moe.router_rows()[shard])


def test_inplace_update_of_a_shard_writes_only_that_shard():
    torch.manual_seed(7)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8, router=RouterConfig(kind="mpi-inplace")))
    before = moe.router.weight.detach().clone()
    with torch.no_grad():
        moe.w_gate.add_(0.05 * torch.randn_like(moe.w_gate))  # an optimizer step: R is no longer the projection
        full = moe.router.weight.clone()
        moe.router.inplace_update(moe.w_gate, moe.w_up, full)
        moe.router.inplace_update(moe.w_gate[2:], moe.w_up[2:], moe.router.weight[2:])
    assert torch.equal(moe.router.weight[:2], before[:2])
    torch.testing.assert_close(moe.router.weight[2:], full[2:])
    assert not torch.equal(full[2:], before[2:])


def test_fold_router_refuses_a_layer_with_sharded_experts():
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8))
    moe.ep = object()  # stands for a parallel.expert.ExpertParallel plan
    with pytest.raises(RuntimeError, match="fold_router needs the full expert stacks"):
        moe.fold_router()


@pytest.mark.parametrize(
    "loads, expected",
    [([10, 10, 10, 10], 0.0), ([40, 0, 0, 0], 3.0), ([15, 5, 10, 10], 0.5)],
    ids=["even", "all-on-one", "mixed"],
)
def test_max_violation_on_hand_made_loads(loads, expected):
    assert max_violation(torch.tensor(loads)).item() == pytest.approx(expected)


def test_z_loss_and_entropy_values():
    logits = torch.zeros(5, 4)
    assert router_z_loss(logits, 0.1).item() == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() ** 2)
    assert router_entropy(torch.softmax(logits, -1)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_route_renormalizes_top_k_in_float32():
    r = route(torch.randn(7, 6, dtype=torch.bfloat16), 3)
    assert r.probs_TE.dtype == torch.float32
    torch.testing.assert_close(r.weights_TK.sum(-1), torch.ones(7))
    assert tokens_per_expert(r.experts_TK, 6).sum() == 21


@pytest.mark.parametrize("top_k", [0, 7, -1], ids=["zero", "more-than-experts", "negative"])
def test_route_rejects_top_k_outside_one_to_num_experts(top_k):
    with pytest.raises(ValueError, match=rf"top_k must be in \[1, num_experts=6\], got {top_k}"):
        route(torch.randn(3, 6), top_k)


@pytest.mark.parametrize(
    "make",
    [lambda: route(torch.randn(3, 6), 2, score_func="bogus"), lambda: MoEConfig(score_func="bogus")],
    ids=["route", "MoEConfig"],
)
def test_unknown_score_func_is_rejected_with_the_choices(make):
    """route() used to fall through to sigmoid; both places now share the list of choices and the message."""
    with pytest.raises(ValueError, match='^score_func must be one of softmax, sigmoid, got "bogus"$'):
        make()


@pytest.mark.parametrize(
    "dim, message",
    [(0, "dim must be >= 1, got 0"), (-16, "dim must be >= 1, got -16"), (16.0, "dim must be an integer, got float 16.0")],
    ids=["zero", "negative", "float"],
)
def test_moe_rejects_a_dim_that_is_not_a_positive_integer(dim, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        MoE(dim, MoEConfig(num_experts=4, top_k=2, hidden=8))


@pytest.mark.parametrize("shape", [(32, 16), (16,), (2, 3, 5, 16), (2, 5, 12)], ids=["2d-tokens", "1d", "4d", "wrong-width"])
def test_moe_forward_names_the_expected_input_shape(shape):
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8))
    expected = f"MoE expects x of shape (batch, seq, dim=16), got {shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        moe(torch.randn(shape))


@pytest.mark.parametrize("shape", [(0, 5, 16), (3, 0, 16)], ids=["no-sequences", "empty-sequences"])
@pytest.mark.parametrize("scope", ["sequence", "batch", "global"])
def test_empty_batch_gives_empty_output_and_zero_stats(shape, scope):
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8, aux_loss_coef=0.02, z_loss_coef=0.001, aux_loss_scope=scope))
    x = torch.randn(shape, requires_grad=True)
    out, st = moe(x)
    assert out.shape == shape and out.dtype == x.dtype
    assert torch.equal(st.tokens_per_expert_E, torch.zeros(4, dtype=torch.int64))
    for value in (st.max_vio, st.aux_loss, st.z_loss, st.entropy):
        assert value.shape == () and value.item() == 0.0
    (out.sum() + st.aux_loss + st.z_loss).backward()
    assert x.grad.shape == shape


def test_layer_stats_are_consistent():
    torch.manual_seed(2)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8, aux_loss_coef=0.02, z_loss_coef=0.001))
    out = moe(torch.randn(3, 5, 16))
    st = out.stats
    assert st.tokens_per_expert_E.sum().item() == 3 * 5 * 2
    assert st.max_vio.item() == pytest.approx(max_violation(st.tokens_per_expert_E).item())
    assert st.aux_loss.requires_grad and st.aux_loss.item() > 0
    assert st.z_loss.item() > 0 and 0 < st.entropy.item() <= torch.log(torch.tensor(4.0)).item() + 1e-6
    al = moe.alignment()
    assert al["phi"].shape == (4,) and ((al["phi"] >= 0) & (al["phi"] <= 1 + 1e-6)).all()


def test_fold_router_keeps_layer_outputs():
    torch.manual_seed(3)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8))
    x = torch.randn(2, 5, 16)
    before = moe(x).out
    cfg = moe.config
    moe.fold_router()
    assert moe.router.kind == "linear" and moe.config.router.kind == "linear"
    assert cfg.router.kind == "mpi"  # the config the layer was built from is not rewritten
    torch.testing.assert_close(moe(x).out, before, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(num_experts=4, top_k=5), r"top_k must be in \[1, num_experts=4\]"),
     (dict(aux_loss_scope="token"), "aux_loss_scope must be 'sequence', 'batch' or 'global', got 'token'"),
     (dict(dispatch="triton"), "dispatch must be"), (dict(top_k=0), r"top_k must be in \[1, num_experts=8\], got 0"),
     (dict(num_experts=0, top_k=0), "num_experts must be >= 1, got 0"), (dict(hidden=0), "hidden .* must be >= 1, got 0"),
     (dict(aux_loss_coef=float("nan")), "aux_loss_coef must be >= 0 and finite, got nan"),
     (dict(aux_loss_coef=-0.1), "aux_loss_coef must be >= 0 and finite, got -0.1"),
     (dict(z_loss_coef=float("inf")), "z_loss_coef must be >= 0 and finite, got inf"), (dict(top_k=2.0), "top_k must be an integer, got float 2.0"),
     (dict(router=5), "router must be a RouterConfig or a dict of its fields, got int 5"),
     (dict(router=dict(kind="sigmoid")), '"sigmoid" is not one of linear'), (dict(router=dict(scale=1.0)), "router: unknown RouterConfig field")],
    ids=["topk-gt-experts", "bad-scope", "bad-dispatch", "topk-zero", "no-experts", "no-hidden", "nan-aux-coef", "negative-aux-coef",
         "inf-z-coef", "float-topk", "router-not-a-config", "router-dict-bad-kind", "router-dict-unknown-key"],
)
def test_moe_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)
