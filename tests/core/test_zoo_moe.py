"""The MoE layer with the coupling designs (svd, cosine, kmeans, aoe, remoe, the ERC and SimBal losses): the layer's
output, gradients and router losses against a float64 per-token reference written from the papers' equations; paired
initialization; folding; the state each design updates after an optimizer step."""

import math
import re

import pytest
import torch

from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.moe import MoE, MoEConfig
from mpirouter.core.routers import RouterConfig

f64 = torch.float64
D, E, K, FH = 12, 4, 2, 6

DESIGNS = {
    "svd": dict(kind="svd"),
    "cosine": dict(kind="cosine", cosine=dict(dim=5, init_temperature=0.3)),
    "kmeans": dict(kind="kmeans", kmeans=dict(temperature=0.2, momentum=0.3)),
    "aoe": dict(kind="aoe"),
    "remoe": dict(kind="remoe"),
    "linear+erc": dict(kind="linear", erc=dict(enabled=True, coef=0.7)),
    "mpi+erc": dict(kind="mpi", erc=dict(enabled=True, margin=0.5)),
    "linear+simbal": dict(kind="linear", simbal=dict(enabled=True, coef=0.3)),
}


def build(name: str, seed: int = 0, spread: bool = True, num_experts: int = E, **moe) -> MoE:
    """A float64 layer of design `name`; `spread` redraws the weights at std 0.5 so that routing and the SwiGLU
    are far from their near-uniform, near-linear start (the centroids and τ keep their own init)."""
    torch.manual_seed(seed)
    m = MoE(D, MoEConfig(num_experts=num_experts, top_k=K, hidden=FH, router=RouterConfig(**DESIGNS[name]), **moe)).double()
    if spread:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n != "router.temperature":
                    p.normal_(std=0.5)
    return m


def xs(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=f64)


# ----------------------------------------------------------------------------- the float64 reference


def params64(m: MoE) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in m.named_parameters()}


def norm(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((v * v).sum())


def ref_rows(m: MoE, P: dict) -> torch.Tensor:
    """φ (E, D): R (linear, remoe), C·normalize(G_iᵀG_i R_i) (mpi), or the svd router's rows: value C·s_i·v₁(G_i),
    gradient that of one power step from the detached signed direction."""
    kind, R, G = m.kind, P["router.weight"], P["w_gate"]
    C = m.config.router.scale_prime / math.sqrt(m.config.num_experts)
    if kind in ("linear", "remoe"):
        return R
    rows = []
    for i in range(R.shape[0]):
        if kind == "mpi":
            start = R[i]
        else:  # svd
            v = torch.linalg.svd(G[i].detach())[2][0]
            start = (v if (R[i].detach() @ v) >= 0 else -v).detach()
        w = G[i].T @ (G[i] @ start)
        rows.append(C * w / norm(w))
    return torch.stack(rows)


def ref_logits_t(m: MoE, P: dict, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """One token's logits (E,) from the design's equation."""
    kind, cfg = m.kind, m.config.router
    n_exp = m.config.num_experts
    if kind == "cosine":
        h = P["router.proj"] @ x
        tau = torch.maximum(P["router.temperature"], torch.tensor(cfg.cosine.min_temperature, dtype=f64))
        return torch.stack([(h @ P["router.weight"][i]) / (norm(h).clamp_min(1e-4) * norm(P["router.weight"][i]).clamp_min(1e-4) * tau)
                            for i in range(n_exp)])
    if kind == "kmeans":
        c = m.router.centroids.double()
        return torch.stack([(x @ c[i]) / (norm(x) * norm(c[i]) * cfg.kmeans.temperature) for i in range(n_exp)])
    if kind == "aoe":
        return torch.stack([norm(P["router.w_in"][i] @ x) for i in range(n_exp)])
    return torch.stack([x @ rows[i] for i in range(n_exp)])


def expert(P: dict, e: int, x: torch.Tensor, gate_in: torch.Tensor) -> torch.Tensor:
    """y_e(x) = D_e (silu(G_e · gate_in) ⊙ U_e x), silu(g) = g·σ(g)."""
    g = P["w_gate"][e] @ gate_in
    return P["w_down"][e] @ (g * torch.sigmoid(g) * (P["w_up"][e] @ x))


def reference(m: MoE, P: dict, x_TD: torch.Tensor, margin: float = 1e-6):
    """(out (T, D), logits (T, E), chosen experts per token) one token at a time: softmax + top-k + renormalized
    weights, or ReMoE's ReLU gates as weights over all experts with a positive gate (0..E of them)."""
    rows = ref_rows(m, P) if "router.weight" in P and m.kind not in ("cosine",) else None
    outs, logits, chosen = [], [], []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        lg = ref_logits_t(m, P, x, rows)
        logits.append(lg)
        y = torch.zeros(D, dtype=f64)
        if m.kind == "remoe":
            assert (lg.detach().abs() > margin).all(), "a gate within rounding of 0: pick another seed"
            picks = [i for i in range(len(lg)) if lg[i] > 0]
            for i in picks:
                y = y + lg[i] * expert(P, i, x, x)
        else:
            p = torch.exp(lg - lg.max())
            p = p / p.sum()
            order = sorted(range(len(p)), key=lambda i: -p[i].item())
            assert p[order[K - 1]] - p[order[K]] > margin, "a top-k tie within rounding: pick another seed"
            picks = order[:K]
            w_sum = sum(p[i] for i in picks)
            for i in picks:
                gate_in = P["router.w_in"][i] @ x if m.kind == "aoe" else x
                y = y + p[i] / w_sum * expert(P, i, x, gate_in)
        outs.append(y)
        chosen.append(sorted(picks))
    return torch.stack(outs), torch.stack(logits), chosen


def erc_uniform(m: MoE) -> torch.Tensor:
    """The layer's U(0,1) draw for this step's proxies: a function of its (erc_seed, erc_step) buffers."""
    g = torch.Generator().manual_seed((int(m.erc_seed) + 1_000_003 * int(m.erc_step)) % 2**63)
    return torch.rand((m.config.num_experts, D), generator=g, dtype=torch.float32).double()


def ref_router_loss(m: MoE, P: dict, x_TD: torch.Tensor) -> torch.Tensor:
    """ERC eq. 3-4 (double loop), SimBal ‖RRᵀ − I‖₁, ReMoE λ·Σ_i f_i mean_t G_ti, each times its coefficient."""
    cfg, n_exp, total = m.config.router, m.config.num_experts, torch.zeros((), dtype=f64)
    if cfg.erc.enabled:
        phi, G, u = ref_rows(m, P), P["w_gate"], erc_uniform(m)
        prox = []
        for i in range(n_exp):
            eps = cfg.erc.noise * min(norm(phi[i] - phi[j]).item() for j in range(n_exp) if j != i) / (2 * norm(phi[i]).item())
            prox.append(phi[i] * (1 + eps * (2 * u[i] - 1)))
        M = [[norm(G[j] @ prox[i]) for j in range(n_exp)] for i in range(n_exp)]
        a, erc = cfg.erc.margin, 0.0
        for i in range(n_exp):
            for j in range(n_exp):
                if j != i:
                    erc = erc + torch.relu(M[i][j] - a * M[i][i]) + torch.relu(M[j][i] - a * M[i][i])
        total = total + cfg.erc.coef * erc / n_exp**2
    if cfg.simbal.enabled:
        R = P["router.weight"]
        total = total + cfg.simbal.coef * sum((R[i] @ R[j] - (1.0 if i == j else 0.0)).abs() for i in range(n_exp) for j in range(n_exp))
    if m.kind == "remoe":
        T = x_TD.shape[0]
        G = torch.relu(reference(m, P, x_TD)[1])
        f = [n_exp / (K * T) * int((G[:, i] > 0).sum()) for i in range(n_exp)]
        total = total + m.l1_coef.double() * sum(f[i] * G[:, i].sum() / T for i in range(n_exp))
    return total


def check_grads(m: MoE, P: dict, got: torch.Tensor, ref: torch.Tensor, z: torch.Tensor | None = None) -> int:
    """Gradients of Σ got ⊙ z w.r.t. the layer's parameters against those of the reference; returns how many were compared."""
    z = torch.ones_like(ref) if z is None else z
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    mods = dict(m.named_parameters())
    g_got = torch.autograd.grad((got.double() * z).sum(), [mods[n] for n in names], allow_unused=True)
    g_ref = torch.autograd.grad((ref * z).sum(), [P[n] for n in names], allow_unused=True)
    for n, a, b in zip(names, g_got, g_ref):
        a = torch.zeros_like(P[n]) if a is None else a
        b = torch.zeros_like(P[n]) if b is None else b
        scale = max(b.abs().max().item(), 1e-12)
        torch.testing.assert_close(a.double(), b, atol=2e-5 * scale, rtol=1e-4, msg=lambda s: f"{n}: {s}")
    return len(names)


# ----------------------------------------------------------------------------- the layer against the reference


@pytest.mark.parametrize("name", list(DESIGNS))
def test_layer_output_and_gradients_match_the_per_token_reference(name):
    m = build(name)
    x = xs(2, 7, D, seed=1)
    out, st = m(x)
    assert out.dtype == f64
    P = params64(m)
    ref, _, chosen = reference(m, P, x.view(14, D))
    torch.testing.assert_close(out.view(14, D), ref.detach(), atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    if m.kind != "remoe":
        counts = [sum(i in c for c in chosen) for i in range(E)]
        assert st.tokens_per_expert_E.tolist() == counts
    n = check_grads(m, P, out.view(14, D), ref, xs(14, D, seed=2))
    assert n >= 3  # the experts at least; the router's own parameters where the design has them


def test_aoe_experts_are_factorized_and_widened_to_keep_the_parameter_count():
    m = build("aoe", spread=False)
    L = D // 3
    Fp = round((3 * D * FH - L * D) / (L + 2 * D))
    assert m.router.w_in.shape == (E, L, D) and m.w_gate.shape == (E, Fp, L) and m.w_up.shape == (E, Fp, D)
    per_expert = L * D + Fp * L + 2 * Fp * D
    assert abs(per_expert - 3 * D * FH) <= (L + 2 * D) / 2
    assert not hasattr(m.router, "weight")


def test_remoe_tokens_use_zero_to_all_experts():
    m = build("remoe")
    a = torch.zeros(D, dtype=f64)
    a[0] = 1.0
    with torch.no_grad():
        m.router.weight.copy_(a + 0.05 * xs(E, D, seed=3))  # every row ≈ a
    x = torch.stack([3 * a, -3 * a, *xs(4, D, seed=4)])  # all gates positive, none positive, mixed
    out, st = m(x.view(1, 6, D))
    ref, logits, chosen = reference(m, params64(m), x)
    assert chosen[0] == list(range(E)) and chosen[1] == []
    assert torch.equal(out[0, 1], torch.zeros(D, dtype=f64))
    torch.testing.assert_close(out[0], ref.detach(), atol=1e-6, rtol=1e-5)
    assert st.tokens_per_expert_E.tolist() == [sum(i in c for c in chosen) for i in range(E)]
    assert st.aux_loss.item() == 0.0  # ReMoE balances through its L1 term, not the Switch loss


# ----------------------------------------------------------------------------- router losses


@pytest.mark.parametrize("name,noise", [("linear+erc", 0.0), ("linear+erc", 1.0), ("mpi+erc", 1.0), ("mpi+erc", 0.4),
                                        ("linear+simbal", None), ("remoe", None)],
                         ids=["linear+erc-noise0", "linear+erc-noise1", "mpi+erc-noise1", "mpi+erc-noise0.4", "linear+simbal", "remoe"])
def test_router_loss_matches_its_formula_and_gradients(name, noise):
    m = build(name)
    if noise is not None:
        m.config.router.erc.noise = noise
    if name == "remoe":
        m.l1_coef.fill_(0.3)  # a visible λ (its init is 1e-8)
    x = xs(2, 5, D, seed=5)
    _, st = m(x)
    P = params64(m)
    ref = ref_router_loss(m, P, x.view(10, D))
    assert ref.item() > 1e-3 and st.router_loss is not None
    torch.testing.assert_close(st.router_loss.double(), ref.detach(), atol=1e-6, rtol=1e-5)
    assert check_grads(m, P, st.router_loss, ref) >= 3


@pytest.mark.parametrize("name", ["svd", "cosine", "kmeans", "aoe", "linear"])
def test_designs_without_router_losses_report_none(name):
    m = build(name) if name in DESIGNS else MoE(D, MoEConfig(num_experts=E, top_k=K, hidden=FH, router=RouterConfig(kind="linear")))
    assert m(xs(1, 4, D, seed=6).to(m.w_up.dtype)).stats.router_loss is None


# ----------------------------------------------------------------------------- paired initialization


@pytest.mark.parametrize("name", list(DESIGNS))
def test_every_design_starts_with_the_linear_models_shared_parameters(name):
    def model(design: dict) -> MoELM:
        torch.manual_seed(3)
        return MoELM(preset_config("debug", moe=dict(router=RouterConfig(**design))))

    linear = dict(model(dict(kind="linear")).named_parameters())
    other = dict(model(DESIGNS[name]).named_parameters())
    shared = [n for n, p in other.items() if n in linear and linear[n].shape == p.shape]
    simbal_rows = [n for n in shared if name.endswith("simbal") and n.endswith("router.weight")]
    for n in shared:
        if n in simbal_rows:  # SimBal's orthogonal start, drawn from a fork of the generator
            R = other[n].detach()
            torch.testing.assert_close(R @ R.T, torch.eye(R.shape[0]), atol=1e-5, rtol=0)
        else:
            assert torch.equal(other[n], linear[n]), n
    for n in ("tok_emb.weight", "blocks.0.attn.wqkv.weight", "blocks.1.attn.wo.weight", "head.weight", "blocks.1.ffn_norm.weight"):
        assert n in shared
    if name != "aoe":
        assert {"blocks.0.ffn.w_gate", "blocks.1.ffn.w_down"} <= set(shared)
    else:
        assert "blocks.0.ffn.w_gate" not in shared  # (E, F', L): another shape
    assert len(shared) >= (11 if name == "aoe" else 17)  # 2 blocks × (2 norms, wqkv, wo) + tok_emb, norm, head (+ 2 × 3 experts)
    torch.manual_seed(4)  # the pairing is a seed's, not a constant: another seed gives other weights
    assert not torch.equal(MoELM(preset_config("debug")).tok_emb.weight, other["tok_emb.weight"])



@pytest.mark.parametrize("name", ["cosine", "kmeans", "aoe", "linear+simbal"])
def test_a_designs_own_parameters_repeat_no_other_parameters_values(name):
    """They come from a reseeded fork of the generator: drawing from the bare fork would copy the values (or a
    multiple of them) the next parameters draw from the global stream."""
    torch.manual_seed(3)
    model = MoELM(preset_config("debug", moe=dict(router=RouterConfig(**DESIGNS[name]))))
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    linear_names = set(dict(MoELM(preset_config("debug", moe=dict(router=RouterConfig(kind="linear")))).named_parameters()))
    own = [n for n in tensors if "ffn" in n and (n not in linear_names or "router" in n) and tensors[n].numel() >= 8
           and tensors[n].dtype.is_floating_point]
    assert own, "the design adds or reshapes no parameter"
    for n in own:
        head = tensors[n].detach().flatten()[:8].double()
        for m, t in tensors.items():
            if m == n or t.numel() < 8 or not t.dtype.is_floating_point:
                continue
            other = t.detach().flatten()[:8].double()
            cos = (head @ other / (head.norm() * other.norm()).clamp_min(1e-30)).abs()
            assert cos < 0.999, (n, m)

# ----------------------------------------------------------------------------- folding


@pytest.mark.parametrize("name", ["svd", "remoe", "linear+erc", "mpi+erc", "linear+simbal"])
def test_fold_keeps_logits_and_outputs(name):
    m = build(name).eval()
    x = xs(2, 6, D, seed=7)
    with torch.no_grad():
        logits = x.view(12, D).float() @ m.router_rows().T
        out = m(x).out
        m.fold_router()
        assert m.kind == ("remoe" if name == "remoe" else "linear") and m.config.router.addons == ()
        torch.testing.assert_close(x.view(12, D).float() @ m.router_rows().T, logits, atol=1e-6, rtol=1e-5)
        folded = m(x)
    torch.testing.assert_close(folded.out, out, atol=1e-6, rtol=1e-5)
    assert "erc_seed" not in m.state_dict() and "erc_step" not in m.state_dict()
    assert (folded.stats.router_loss is None) == (name != "remoe")  # the training-only losses are gone, λ·L1 stays


@pytest.mark.parametrize("name,why", [
    ("cosine", "its logits cos(Wx, e_i)/τ normalize each token"),
    ("kmeans", "its logits are cosines of normalized tokens with the centroids"),
    ("aoe", "it has no router: experts are ranked by the norms"),
])
def test_fold_refuses_designs_that_are_not_linear_routers(name, why):
    m = build(name)
    with pytest.raises(ValueError, match=re.escape(f"cannot fold a {name!r} router into a linear one: {why}")):
        m.fold_router()
    assert m.kind == name


# ----------------------------------------------------------------------------- config and step state


@pytest.mark.parametrize("balance", ["bias", "both"])
def test_remoe_refuses_the_expert_bias(balance):
    with pytest.raises(ValueError, match=re.escape(f"router kind 'remoe' balances through its load-weighted L1 penalty "
                                                   f"(balance='aux'); it has no top-k for an expert bias to steer, got balance={balance!r}")):
        MoEConfig(balance=balance, router=RouterConfig(kind="remoe"))
    assert not MoEConfig(router=RouterConfig(kind="remoe")).uses_aux_loss


def test_kmeans_post_step_moves_the_centroids_toward_the_states_routed_to_them():
    m = build("kmeans", num_experts=E)
    c0 = m.router.centroids.clone()
    x1, x2 = xs(2, 7, D, seed=8), xs(1, 5, D, seed=9)
    m(x1)
    m(x2)  # two micro-batches of one step
    with torch.no_grad():
        m(xs(1, 9, D, seed=10))  # no gradient: not a training forward
    m.eval()
    m(xs(1, 9, D, seed=11))  # evaluation: not counted
    m.train()
    tokens = torch.cat([x1.view(-1, D), x2.view(-1, D)])
    _, _, chosen = reference(m, params64(m), tokens)
    mom = m.config.router.kmeans.momentum
    m.post_step()
    new = m.router.centroids
    seen = 0
    for i in range(E):
        routed = [tokens[t] / norm(tokens[t]) for t in range(len(tokens)) if i in chosen[t]]
        if not routed:
            torch.testing.assert_close(new[i], c0[i])
            continue
        seen += 1
        mean = torch.stack(routed).mean(0)
        torch.testing.assert_close(new[i], (1 - mom) * c0[i] + mom * mean, atol=1e-6, rtol=1e-6)
        assert norm(new[i] - mean) < norm(c0[i] - mean)
    assert seen >= 2
    after = new.clone()
    m.post_step()  # no forward since: nothing moves
    assert torch.equal(m.router.centroids, after)


def remoe_layer(positive_rows: int | None) -> MoE:
    """E = 8, K = 2 (target sparsity 0.75); rows ≈ ±a so that tokens ≈ a activate exactly `positive_rows` experts
    (None: random rows, about half the gates positive)."""
    m = build("remoe", num_experts=8)
    if positive_rows is not None:
        a = torch.zeros(D, dtype=f64)
        a[0] = 1.0
        sign = torch.tensor([1.0] * positive_rows + [-1.0] * (8 - positive_rows), dtype=f64)
        with torch.no_grad():
            m.router.weight.copy_(sign[:, None] * a + 0.05 * xs(8, D, seed=12))
    return m


@pytest.mark.parametrize("positive_rows,factor", [(None, 1.2), (1, 1 / 1.2), (2, 1.0)],
                         ids=["too-dense-raises", "too-sparse-lowers", "at-target-keeps"])
def test_remoe_post_step_moves_the_l1_coefficient_toward_the_target_sparsity(positive_rows, factor):
    m = remoe_layer(positive_rows)
    lam = m.l1_coef.item()
    a = torch.zeros(D, dtype=f64)
    a[0] = 1.0
    x = xs(2, 8, D, seed=13) if positive_rows is None else (2 * a + 0.05 * xs(2, 8, D, seed=13))
    gates = torch.relu(x.view(16, D) @ m.router.weight.detach().T)
    sparsity = 1 - (gates > 0).sum().item() / gates.numel()
    assert (sparsity < 0.75, sparsity > 0.75, sparsity == 0.75)[[1.2, 1 / 1.2, 1.0].index(factor)]
    m(x)
    with torch.no_grad():
        m(xs(1, 4, D, seed=14))  # not a training forward
    m.post_step()
    assert m.l1_coef.item() == pytest.approx(lam * factor, rel=1e-12)
    m.post_step()  # no forward since: λ stays
    assert m.l1_coef.item() == pytest.approx(lam * factor, rel=1e-12)


def test_erc_noise_is_fixed_within_a_step_and_redrawn_after_it():
    m = build("linear+erc")
    x = xs(1, 6, D, seed=15)
    first, second = m(x).stats.router_loss, m(xs(2, 3, D, seed=16)).stats.router_loss
    assert first.item() > 0 and first.item() == second.item()  # the loss depends on the weights and the step only
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.post_step()
    assert int(m.erc_step) == 1
    third = m(x).stats.router_loss
    assert third.item() != first.item()
    torch.testing.assert_close(third.double(), ref_router_loss(m, params64(m), x.view(6, D)).detach(), atol=1e-6, rtol=1e-5)
    resumed = build("linear+erc", seed=9)
    resumed.load_state_dict(state)  # a resumed run draws the noise of the step it resumes at
    assert resumed(x).stats.router_loss.item() == first.item()
    m.config.router.erc.noise = 0.0  # without noise the steps' losses agree: the difference was the noise
    quiet = m(x).stats.router_loss.item()
    m.post_step()
    assert m(x).stats.router_loss.item() == quiet


def test_cosine_loads_weights_saved_with_a_scalar_temperature():
    """Checkpoints from before the temperature became shape (1,) (FSDP2 refuses scalar parameters) still load."""
    torch.manual_seed(0)
    old = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8, router=RouterConfig(kind="cosine")))
    state = {k: (v.reshape(()) if k.endswith("temperature") else v) for k, v in old.state_dict().items()}
    assert state["router.temperature"].dim() == 0
    new = MoE(16, MoEConfig(num_experts=4, top_k=2, hidden=8, router=RouterConfig(kind="cosine")))
    with torch.no_grad():
        new.router.temperature.fill_(0.5)
    new.load_state_dict(state)
    assert new.router.temperature.shape == (1,) and torch.equal(new.router.temperature, old.router.temperature)
