"""Sigmoid scores, aux-loss-free expert bias and shared experts in the built-in MoE, against written-out definitions."""

import pytest
import torch
import torch.nn.functional as F

from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.experts import naive_moe_reference
from mpirouter.core.moe import MoE, MoEConfig
from mpirouter.core.routing import expert_bias_update, load_balance_loss, route
from mpirouter.core.routers import RouterConfig

D, E, K, FH = 16, 6, 2, 8


def per_token(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The definition one token at a time (docs/method.md eqs. 1, 3, 11–13), from the layer's own φ and bias."""
    cfg = moe.config
    logits_TE = x_TD @ moe.router_rows().T
    bias_E = moe.expert_bias if cfg.uses_expert_bias else torch.zeros(E)
    outs = []
    for t in range(x_TD.shape[0]):
        s = torch.softmax(logits_TE[t], -1) if cfg.score_func == "softmax" else torch.sigmoid(logits_TE[t])
        idx = torch.topk(s + bias_E, cfg.top_k).indices
        w = s[idx] / s[idx].sum()
        y = sum(wi * (moe.w_down[e] @ (F.silu(moe.w_gate[e] @ x_TD[t]) * (moe.w_up[e] @ x_TD[t]))) for wi, e in zip(w, idx))
        if moe.shared is not None:
            sh = moe.shared
            y = y + sh.w_down @ (F.silu(sh.w_gate @ x_TD[t]) * (sh.w_up @ x_TD[t]))
        outs.append(y)
    return torch.stack(outs)


def layer(kind="mpi", **moe) -> MoE:
    torch.manual_seed(0)
    m = MoE(D, MoEConfig(num_experts=E, top_k=K, hidden=FH, router=RouterConfig(kind=kind), **moe))
    if m.config.uses_expert_bias:
        m.expert_bias.copy_(torch.randn(E) * 0.3)  # a bias that changes the choice for some tokens
    return m


CASES = [
    dict(score_func="softmax"),
    dict(score_func="sigmoid"),
    dict(score_func="softmax", balance="bias"),
    dict(score_func="sigmoid", balance="both"),
    dict(score_func="sigmoid", balance="bias", n_shared=2),
    dict(score_func="softmax", n_shared=1),
]


@pytest.mark.parametrize("kind", ["linear", "mpi"])
@pytest.mark.parametrize("moe", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_layer_matches_the_per_token_definition(kind, moe):
    m = layer(kind, **moe)
    x = torch.randn(3, 5, D)
    out, _ = m(x)
    torch.testing.assert_close(out.reshape(15, D), per_token(m, x.reshape(15, D)), atol=1e-5, rtol=1e-4)


def test_the_bias_changes_the_choice_and_never_the_weights():
    logits = torch.randn(64, E)
    plain = route(logits, K, score_func="sigmoid")
    bias = torch.zeros(E)
    bias[0] = 10.0  # expert 0 is chosen for every token
    biased = route(logits, K, score_func="sigmoid", bias_E=bias)
    assert (biased.experts_TK == 0).any(-1).all() and not (plain.experts_TK == 0).any(-1).all()
    s = torch.sigmoid(logits)
    w = s.gather(-1, biased.experts_TK)
    torch.testing.assert_close(biased.weights_TK, w / w.sum(-1, keepdim=True))
    # a bias that moves every expert by the same amount chooses exactly as no bias does
    same = route(logits, K, score_func="sigmoid", bias_E=torch.full((E,), 3.0))
    assert torch.equal(same.experts_TK, plain.experts_TK)
    torch.testing.assert_close(same.weights_TK, plain.weights_TK)


def test_sigmoid_balance_probabilities_are_the_scores_normalized_to_sum_one():
    logits = torch.randn(4, 8, E)
    r = route(logits.reshape(32, E), K, score_func="sigmoid")
    s = torch.sigmoid(logits.reshape(32, E))
    torch.testing.assert_close(r.probs_TE, s / s.sum(-1, keepdim=True))
    loss = load_balance_loss(r.probs_TE.view(4, 8, E), r.experts_TK.view(4, 8, K), coef=1.0)
    f_BE = torch.stack([torch.bincount(r.experts_TK.view(4, 8, K)[b].flatten(), minlength=E) for b in range(4)]).float() / (8 * K)
    torch.testing.assert_close(loss, E * (f_BE * r.probs_TE.view(4, 8, E).mean(1)).sum(-1).mean())


def test_sigmoid_scores_that_all_underflow_stay_finite():
    r = route(torch.full((3, E), -200.0), K, score_func="sigmoid")
    assert torch.isfinite(r.probs_TE).all() and torch.isfinite(r.weights_TK).all()
    assert torch.isfinite(load_balance_loss(r.probs_TE.view(1, 3, E), r.experts_TK.view(1, 3, K), coef=1.0))


def test_softmax_without_bias_is_the_old_routing_bit_for_bit():
    logits = torch.randn(50, E)
    r = route(logits, K)
    p = torch.softmax(logits, -1)
    w, i = torch.topk(p, K)
    assert torch.equal(r.experts_TK, i) and torch.equal(r.weights_TK, w / w.sum(-1, keepdim=True)) and torch.equal(r.probs_TE, p)


def test_bias_update_is_the_sign_rule_and_pure():
    bias = torch.tensor([0.0, 0.5, -0.5, 0.0])
    load = torch.tensor([10, 2, 4, 4])  # mean 5
    new = expert_bias_update(bias, load, 0.01)
    torch.testing.assert_close(new, torch.tensor([-0.01, 0.51, -0.49, 0.01]))
    assert torch.equal(bias, torch.tensor([0.0, 0.5, -0.5, 0.0]))
    assert torch.equal(expert_bias_update(bias, torch.full((4,), 7), 0.01), bias)  # even load: nothing moves


def test_bias_follows_the_whole_steps_load_and_only_training_forwards_count():
    m = layer("mpi", score_func="sigmoid", balance="bias", bias_update_rate=0.05)
    start = m.expert_bias.clone()
    xs = [torch.randn(2, 8, D) for _ in range(3)]
    with torch.no_grad():
        m.eval()
        m(xs[0])  # an evaluation: not counted
        m.train()
    load = torch.zeros(E, dtype=torch.int64)
    for x in xs:  # three micro-batches of one optimizer step
        out, st = m(x)
        out.sum().backward()
        load += st.tokens_per_expert_E
    m.post_step()
    torch.testing.assert_close(m.expert_bias, start + 0.05 * torch.sign(load.float().mean() - load.float()))
    after = m.expert_bias.clone()
    m.post_step()  # no forward since: no load, no update
    assert torch.equal(m.expert_bias, after)
    assert m.expert_bias.grad is None and "expert_bias" in m.state_dict()


@pytest.mark.parametrize("balance,has_aux", [("aux", True), ("bias", False), ("both", True)])
def test_balance_modes_switch_the_loss_and_the_bias(balance, has_aux):
    m = layer("mpi", balance=balance)
    _, st = m(torch.randn(2, 8, D))
    assert (st.aux_loss.item() > 0) == has_aux
    assert hasattr(m, "expert_bias") == (balance != "aux")


def test_shared_experts_are_one_swiglu_equal_to_the_sum_of_n():
    m = layer("linear", n_shared=3)
    x = torch.randn(10, D)
    sh = m.shared
    parts = [(sh.w_gate[i * FH:(i + 1) * FH], sh.w_up[i * FH:(i + 1) * FH], sh.w_down[:, i * FH:(i + 1) * FH]) for i in range(3)]
    separate = sum(F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d) for g, u, d in parts)
    torch.testing.assert_close(sh(x), separate, atol=1e-6, rtol=1e-5)
    routing = route(m.router(x, m.w_gate, m.w_up), K)
    out, _ = m(x.view(1, 10, D))
    torch.testing.assert_close(out.view(10, D), naive_moe_reference(x, routing, m.w_gate, m.w_up, m.w_down) + separate,
                               atol=1e-6, rtol=1e-5)


def test_shared_experts_count_as_always_active_parameters():
    plain, shared = MoELM(preset_config("debug")).num_params(), MoELM(preset_config("debug", moe=dict(n_shared=2))).num_params()
    added = 2 * 2 * (3 * 64 * 64)  # two layers × n_shared=2 × (gate + up + down), D = F = 64
    assert shared["total"] - plain["total"] == added and shared["active"] - plain["active"] == added


def test_model_with_every_feature_trains_and_the_folded_router_keeps_the_bias():
    torch.manual_seed(0)
    model = MoELM(preset_config("debug", vocab_size=64, moe=dict(score_func="sigmoid", balance="both", n_shared=1)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        out = model(idx[:, :-1], idx[:, 1:])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        model.post_step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert all(m.expert_bias.abs().sum() > 0 for m in model.moe_layers())
    model.eval()
    with torch.no_grad():
        before = model(idx[:, :-1]).logits
        model.fold_routers()
        torch.testing.assert_close(model(idx[:, :-1]).logits, before, atol=1e-5, rtol=1e-5)
    assert model.config.moe.router.kind == "linear" and model.config.moe.balance == "both"


@pytest.mark.parametrize("field,value,match", [
    ("score_func", "tanh", "score_func must be"),
    ("balance", "none", "balance must be"),
    ("n_shared", -1, "n_shared"),
    ("bias_update_rate", 0.0, "bias_update_rate"),
], ids=["score_func", "balance", "n_shared", "bias_rate"])
def test_bad_settings_are_refused_with_their_name(field, value, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{field: value})
