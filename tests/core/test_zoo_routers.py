"""The coupling designs' pure functions (cosine, k-means, AoE, ReMoE, ERC, SimBal, the exact `svd` rows) and the
router names, against float64 references written out from the papers' equations one token / one entry at a time."""

import math
import re

import pytest
import torch

from mpirouter.core.routers import (
    RouterConfig,
    aoe_hidden,
    aoe_low_rank,
    aoe_scores,
    centroid_update,
    cosine_logits,
    erc_activation_norms,
    erc_loss,
    erc_noise_bound,
    erc_proxies,
    exact_rows,
    kmeans_logits,
    l1_coef_step,
    parse_router_name,
    relu_gates,
    relu_slots,
    remoe_l1,
    routed_sums,
    router_name_overrides,
    simbal_loss,
    target_sparsity,
)

f64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen(seed), dtype=f64) * scale
    return t.requires_grad_(grad)


def grads(out: torch.Tensor, inputs, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """∂(Σ out ⊙ weight)/∂inputs in the inputs' dtype (None for an input out does not depend on)."""
    return torch.autograd.grad((out.double() * weight).sum(), inputs, allow_unused=True)


# ----------------------------------------------------------------------------- cosine (X-MoE)


def cosine_reference(x_TD, proj_PD, emb_EP, tau, min_tau):
    """s_ti = (W x_t)·e_i / (max(‖W x_t‖, 1e-4) max(‖e_i‖, 1e-4) max(τ, τ_min)), one entry at a time."""
    T, E = x_TD.shape[0], emb_EP.shape[0]
    t_eff = torch.maximum(tau, torch.tensor(min_tau, dtype=f64))
    out = []
    for t in range(T):
        h = proj_PD @ x_TD[t]
        hn = torch.sqrt((h * h).sum()).clamp_min(1e-4)
        row = []
        for i in range(E):
            en = torch.sqrt((emb_EP[i] * emb_EP[i]).sum()).clamp_min(1e-4)
            row.append((h * emb_EP[i]).sum() / (hn * en * t_eff))
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("tau", [0.07, 0.5], ids=lambda t: f"tau={t}")
def test_cosine_logits_and_gradients_match_the_float64_definition(tau):
    x, W, e = randn(7, 10, seed=0, grad=True), randn(4, 10, seed=1, grad=True), randn(5, 4, seed=2, grad=True)
    t = torch.tensor(tau, dtype=f64, requires_grad=True)
    got, ref = cosine_logits(x, W, e, t, 1e-4), cosine_reference(x, W, e, t, 1e-4)
    assert got.dtype == torch.float32 and got.shape == (7, 5)
    torch.testing.assert_close(got.double(), ref, atol=1e-5 / tau, rtol=1e-5)
    assert got.abs().max() <= 1 / tau + 1e-4  # cosines over τ
    z = randn(7, 5, seed=3)
    for g, r in zip(grads(got, (x, W, e, t), z), grads(ref, (x, W, e, t), z)):
        torch.testing.assert_close(g, r, atol=1e-4 * r.abs().max().item(), rtol=1e-4)


def test_cosine_temperature_is_clamped_below_and_then_gets_no_gradient():
    x, W, e = randn(3, 6, seed=4), randn(4, 6, seed=5), randn(2, 4, seed=6)
    t = torch.tensor(1e-6, dtype=f64, requires_grad=True)
    got = cosine_logits(x, W, e, t, min_temperature=1e-3)
    torch.testing.assert_close(got.double(), cosine_reference(x, W, e, t.detach(), 1e-3), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(got * 1e-3, cosine_logits(x, W, e, torch.tensor(1.0), 1e-3), atol=1e-6, rtol=1e-5)
    (g,) = torch.autograd.grad(got.sum(), t)
    assert g.item() == 0.0


def test_cosine_logits_of_a_zero_projection_are_zero_not_nan():
    got = cosine_logits(torch.zeros(2, 6), torch.randn(4, 6), torch.randn(3, 4), torch.tensor(0.1), 1e-4)
    assert torch.equal(got, torch.zeros(2, 3))


# ----------------------------------------------------------------------------- online k-means


def test_kmeans_logits_are_cosines_over_tau_and_leave_the_centroids_without_gradient():
    x, c = randn(6, 5, seed=7, grad=True), randn(3, 5, seed=8, scale=4.0, grad=True)
    got = kmeans_logits(x, c, 0.25)
    ref = torch.stack([torch.stack([(x[t] @ c[i]) / (x[t].norm() * c[i].norm() * 0.25) for i in range(3)]) for t in range(6)])
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert c.grad is None and x.grad is not None and x.grad.abs().sum() > 0


def test_routed_sums_add_each_slots_normalized_state_to_its_expert():
    x = randn(5, 4, seed=9, scale=3.0)
    experts = torch.tensor([[0, 2], [2, 1], [0, 2], [1, 0], [2, 0]])
    sums, counts = routed_sums(x, experts, num_experts=4)
    ref_s, ref_c = torch.zeros(4, 4, dtype=f64), torch.zeros(4, dtype=f64)
    for t in range(5):
        for k in range(2):
            ref_s[experts[t, k]] += x[t] / x[t].norm()
            ref_c[experts[t, k]] += 1
    assert sums.dtype == torch.float32 and counts.tolist() == [4.0, 2.0, 4.0, 0.0]
    torch.testing.assert_close(sums.double(), ref_s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(counts.double(), ref_c)
    assert sums[3].abs().sum() == 0  # expert 3 got no slot


def test_centroid_update_is_an_ema_of_the_mean_only_where_tokens_arrived():
    c, s = randn(3, 4, seed=10), randn(3, 4, seed=11)
    counts = torch.tensor([2.0, 0.0, 5.0], dtype=f64)
    got = centroid_update(c, s, counts, momentum=0.3)
    for i in range(3):
        want = c[i] if counts[i] == 0 else 0.7 * c[i] + 0.3 * s[i] / counts[i]
        torch.testing.assert_close(got[i], want)
    assert torch.equal(got[1], c[1])


# ----------------------------------------------------------------------------- Autonomy-of-Experts


def test_aoe_scores_are_the_norms_of_each_experts_low_rank_product():
    x, A = randn(5, 9, seed=12), randn(3, 4, 9, seed=13)
    logits, cache = aoe_scores(x, A)
    assert logits.shape == (5, 3) and cache.shape == (5, 3, 4) and cache.dtype == f64 and logits.dtype == torch.float32
    for t in range(5):
        for i in range(3):
            c = A[i] @ x[t]
            torch.testing.assert_close(cache[t, i], c)
            assert logits[t, i].item() == pytest.approx(math.sqrt(sum(v * v for v in c.tolist())), rel=1e-6)


@pytest.mark.parametrize("dim,hidden,low", [(768, 3072, 256), (64, 64, 21), (12, 6, 4), (128, 512, 7)],
                         ids=lambda v: str(v))
def test_aoe_hidden_matches_the_unfactorized_parameter_count_within_one_step(dim, hidden, low):
    fp = aoe_hidden(dim, hidden, low)
    params = lambda f: dim * low + low * f + 2 * dim * f
    target = 3 * dim * hidden
    assert abs(params(fp) - target) <= (low + 2 * dim) / 2  # nearest F': within half of one F' step
    assert abs(params(fp) - target) <= min(abs(params(fp - 1) - target), abs(params(fp + 1) - target))


def test_aoe_low_rank_defaults_to_a_third_of_the_width():
    assert aoe_low_rank(768, 0) == 256 and aoe_low_rank(64, 0) == 21 and aoe_low_rank(2, 0) == 1
    assert aoe_low_rank(64, 5) == 5
    with pytest.raises(ValueError, match="AoE hidden size must be >= 1, got 0"):
        aoe_hidden(64, 0, 21)


# ----------------------------------------------------------------------------- ReMoE


def test_relu_gates_and_slots_list_every_positive_pair_with_its_weight():
    logits = torch.tensor([[0.5, -1.0, 2.0], [-0.1, -0.2, -0.3], [1.0, 0.0, 3.0]], dtype=f64)
    gates = relu_gates(logits)
    assert gates.dtype == torch.float32
    assert gates.tolist() == [[0.5, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]]
    tokens, experts, weights = relu_slots(gates)
    pairs = [(t, i, gates[t, i].item()) for t in range(3) for i in range(3) if gates[t, i] > 0]  # token-major
    assert list(zip(tokens.tolist(), experts.tolist(), weights.tolist())) == pairs


@pytest.mark.parametrize("refined", [True, False], ids=["refined", "plain"])
def test_remoe_l1_is_the_load_weighted_mean_gate_and_the_load_gets_no_gradient(refined):
    T, E, K = 6, 4, 2
    gates = torch.relu(randn(T, E, seed=14)).requires_grad_(True)
    counts = (gates > 0).sum(0).double().requires_grad_(True)
    got = remoe_l1(gates, counts, K, refined)
    f = [E / (K * T) * sum(1 for t in range(T) if gates[t, i] > 0) if refined else 1.0 for i in range(E)]
    ref = sum(f[i] * sum(gates[t, i].item() for t in range(T)) / T for i in range(E))
    assert got.item() == pytest.approx(ref, rel=1e-6)
    got.backward()
    assert counts.grad is None
    torch.testing.assert_close(gates.grad, torch.tensor(f, dtype=f64).expand(T, E) / T)


def test_target_sparsity_and_the_l1_controller():
    assert target_sparsity(8, 2) == 0.75 and target_sparsity(4, 4) == 0.0
    lam = torch.tensor(1e-3, dtype=f64)
    dense, sparse, exact = (l1_coef_step(lam, torch.tensor(s, dtype=f64), 0.75, 1.2) for s in (0.5, 0.9, 0.75))
    assert dense.item() == pytest.approx(1.2e-3) and sparse.item() == pytest.approx(1e-3 / 1.2)
    assert exact.item() == 1e-3 and dense.dtype == f64


# ----------------------------------------------------------------------------- ERC


def test_erc_noise_bound_is_half_the_nearest_other_row_over_the_norm():
    rows = randn(5, 3, seed=15)
    got = erc_noise_bound(rows)
    for i in range(5):
        nearest = min((rows[i] - rows[j]).norm().item() for j in range(5) if j != i)
        assert got[i].item() == pytest.approx(nearest / (2 * rows[i].norm().item()), rel=1e-5)
    assert erc_noise_bound(rows.requires_grad_(True)).grad_fn is None  # the bound is detached


def test_erc_proxies_are_the_rows_at_u_half_and_stay_within_the_bound():
    rows, eps = randn(4, 6, seed=16, grad=True), torch.tensor([0.1, 0.0, 0.5, 0.3], dtype=f64)
    torch.testing.assert_close(erc_proxies(rows, eps, torch.full((4, 6), 0.5, dtype=f64)), rows.detach())
    torch.testing.assert_close(erc_proxies(rows, eps, torch.ones(4, 6, dtype=f64)), rows.detach() * (1 + eps[:, None]))
    torch.testing.assert_close(erc_proxies(rows, eps, torch.zeros(4, 6, dtype=f64)), rows.detach() * (1 - eps[:, None]))
    u = torch.rand(4, 6, generator=gen(17), dtype=f64)
    p = erc_proxies(rows, eps, u)
    ratio = p.detach() / rows.detach()
    assert ((ratio - 1).abs() <= eps[:, None] + 1e-12).all() and torch.equal(p[1].detach(), rows[1].detach())
    (g,) = torch.autograd.grad(p.sum(), rows)
    torch.testing.assert_close(g, 1 + eps[:, None] * (2 * u - 1))  # the noise is a constant factor


def test_erc_activation_norms_send_every_proxy_through_every_gate():
    p, G = randn(3, 5, seed=18), randn(3, 4, 5, seed=19)
    M = erc_activation_norms(p, G)
    assert M.shape == (3, 3) and M.dtype == torch.float32
    for i in range(3):
        for j in range(3):
            assert M[i, j].item() == pytest.approx((G[j] @ p[i]).norm().item(), rel=1e-5)


def erc_reference(M, alpha):
    E = M.shape[0]
    total = 0.0
    for i in range(E):
        for j in range(E):
            if j != i:
                total = total + torch.relu(M[i, j] - alpha * M[i, i]) + torch.relu(M[j, i] - alpha * M[i, i])
    return total / E**2


@pytest.mark.parametrize("alpha", [1.0, 0.5], ids=lambda a: f"margin={a}")
def test_erc_loss_is_equation_3(alpha):
    M = randn(5, 5, seed=20).abs().requires_grad_(True)
    got = erc_loss(M, alpha)
    assert got.item() > 0
    torch.testing.assert_close(got, erc_reference(M, alpha))
    assert torch.autograd.gradcheck(lambda m: erc_loss(m, alpha), (M,))


def test_erc_loss_is_zero_for_a_strongly_diagonal_matrix():
    M = torch.full((4, 4), 0.1, dtype=f64) + torch.eye(4, dtype=f64) * 2
    assert erc_loss(M, 1.0).item() == 0.0 and erc_loss(M, 0.5).item() == 0.0
    assert erc_loss(M, 0.01).item() > 0  # a margin below 0.1 / 2.1 makes the off-diagonal entries count


def test_erc_gradient_reaches_the_rows_and_the_gate_weights():
    rows, G = randn(4, 6, seed=21, grad=True), randn(4, 5, 6, seed=22, grad=True)
    u = torch.rand(4, 6, generator=gen(23), dtype=f64)
    eps = erc_noise_bound(rows)
    got = erc_loss(erc_activation_norms(erc_proxies(rows, eps, u), G), 1.0)
    # reference: proxies, norms and eq. 3 written out in float64
    eps_ref = torch.stack([min((rows[i] - rows[j]).norm() for j in range(4) if j != i) / (2 * rows[i].norm()) for i in range(4)]).detach()
    prox = rows * (1 + eps_ref[:, None] * (2 * u - 1))
    M = torch.stack([torch.stack([(G[j] @ prox[i]).norm() for j in range(4)]) for i in range(4)])
    ref = erc_reference(M, 1.0)
    assert ref.item() > 0
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)
    g_rows, g_G = torch.autograd.grad(got, (rows, G))
    r_rows, r_G = torch.autograd.grad(ref, (rows, G))
    assert g_rows.abs().sum() > 0 and g_G.abs().sum() > 0
    torch.testing.assert_close(g_rows, r_rows, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_G, r_G, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- SimBal


def test_simbal_loss_is_the_l1_norm_of_gram_minus_identity():
    R = randn(4, 7, seed=24)
    ref = sum(abs((R[i] @ R[j]).item() - (1.0 if i == j else 0.0)) for i in range(4) for j in range(4))
    assert simbal_loss(R).item() == pytest.approx(ref, rel=1e-5)
    q, _ = torch.linalg.qr(randn(7, 4, seed=25))  # orthonormal columns: Qᵀ has orthonormal rows
    assert simbal_loss(q.T).item() == pytest.approx(0.0, abs=1e-5)
    assert simbal_loss(2 * q.T).item() == pytest.approx(4 * 3.0, rel=1e-5)  # ‖2q‖² − 1 = 3 on each diagonal entry


# ----------------------------------------------------------------------------- svd: the exact top direction


def top_v(m_FD: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(m_FD.detach().double())[2][0]


@pytest.mark.parametrize("two", [False, True], ids=["gate", "gate_up"])
def test_exact_rows_are_c_times_the_signed_top_singular_vector(two):
    E, D, C = 4, 6, 0.3
    R, G, U = randn(E, D, seed=26), randn(E, 5, D, seed=27), randn(E, 3, D, seed=28)
    mats = (G, U) if two else (G,)
    got = exact_rows(R, *mats, scale=C)
    assert got.dtype == torch.float32
    for i in range(E):
        v = top_v(torch.cat([m[i] for m in mats], 0))
        s = 1.0 if (R[i] @ v).item() >= 0 else -1.0
        torch.testing.assert_close(got[i].double(), C * s * v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exact_rows(-R, *mats, scale=C), -got, atol=1e-5, rtol=1e-5)


def test_exact_rows_backward_is_one_mpi_step_from_the_detached_exact_direction():
    E, D, C = 3, 5, 0.5
    R, G = randn(E, D, seed=29, grad=True), randn(E, 4, D, seed=30, grad=True)
    got = exact_rows(R, G, scale=C)
    ref = []
    for i in range(E):
        v = top_v(G[i])
        start = (v if (R[i].detach() @ v) >= 0 else -v).detach()
        w = G[i].T @ (G[i] @ start)  # one power step
        ref.append(C * w / w.norm())
    ref = torch.stack(ref)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    z = randn(E, D, seed=31)
    g_R, g_G = grads(got, (R, G), z)
    (r_G,) = grads(ref, (G,), z)
    assert g_R is None  # R only picks the sign
    assert g_G.abs().sum() > 0
    torch.testing.assert_close(g_G, r_G, atol=1e-4 * r_G.abs().max().item(), rtol=1e-4)


# ----------------------------------------------------------------------------- names and config


@pytest.mark.parametrize("name,kind,addons", [
    ("mpi+erc", "mpi", ("erc",)),
    ("linear+simbal", "linear", ("simbal",)),
    ("linear+erc+simbal", "linear", ("erc", "simbal")),
    ("svd", "svd", ()),
    ("remoe+simbal", "remoe", ("simbal",)),
], ids=lambda v: v if isinstance(v, str) else None)
def test_router_names_parse_into_a_kind_and_its_losses(name, kind, addons):
    assert parse_router_name(name) == (kind, addons)
    over = router_name_overrides(name)
    assert over == [f"model.moe.router.kind={kind}", *(f"model.moe.router.{a}.enabled=true" for a in addons)]
    cfg = RouterConfig(kind=kind, **{a: dict(enabled=True) for a in addons})
    assert cfg.addons == addons


@pytest.mark.parametrize("name,message", [
    ("aoe+erc", "'aoe+erc': the erc loss needs router rows; 'aoe' has none"),
    ("cosine+simbal", "'cosine+simbal': the simbal loss needs router rows; 'cosine' has none"),
    ("linear+foo", "unknown router loss 'foo' in 'linear+foo'; choose one of erc, simbal"),
    ("foo", "unknown router kind 'foo' in 'foo'; choose one of linear, mpi"),
    ("linear+erc+erc", "'linear+erc+erc' names a router loss twice"),
], ids=["aoe+erc", "cosine+simbal", "linear+foo", "foo", "linear+erc+erc"])
def test_bad_router_names_are_refused_saying_why(name, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        parse_router_name(name)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        router_name_overrides(name)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="kmeans", erc=dict(enabled=True)), "the erc loss needs router rows; router kind 'kmeans' has none"),
    (dict(kind="aoe", simbal=dict(enabled=True)), "the simbal loss needs router rows; router kind 'aoe' has none"),
    (dict(cosine=dict(init_temperature=0.01, min_temperature=0.1)), "cosine.min_temperature 0.1 exceeds"),
    (dict(remoe=dict(l1_update=1.0)), "remoe.l1_update must be > 1"),
    (dict(erc=dict(noise=1.5)), "erc.noise must be in [0, 1]"),
    (dict(kmeans=dict(momentum=0.0)), "kmeans.momentum must be in (0, 1]"),
    (dict(aoe=5), "router.aoe must be a AoEConfig or a dict of its fields"),
], ids=["kmeans+erc", "aoe+simbal", "cosine-temperatures", "remoe-alpha", "erc-noise", "kmeans-momentum", "aoe-type"])
def test_router_config_refuses_bad_design_settings(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RouterConfig(**kwargs)


def test_router_config_builds_design_sections_from_dicts():
    cfg = RouterConfig(kind="cosine", cosine=dict(dim=8, init_temperature=0.2))
    assert cfg.cosine.dim == 8 and cfg.cosine.init_temperature == 0.2 and cfg.cosine.min_temperature == 1e-4
    assert cfg.addons == ()

