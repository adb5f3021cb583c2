"""Router math against references: SVD, the Riemannian-ascent form, gradcheck, folding."""

import math
import re

import pytest
import torch

from mpirouter.core.routers import (
    MPI_FAMILY,
    MPIRouter,
    Router,
    RouterConfig,
    alignment,
    mpi_rows,
    mpi_scale,
    power_step,
    random_alignment_baseline,
    relative_gain,
    retract,
    riemannian_ascent_step,
    top_singular_directions,
)


def matrix_with_spectrum(rows: int, cols: int, sigmas: list[float], seed: int = 0) -> torch.Tensor:
    """G = U diag(σ) Vᵀ with the given singular values (float64)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    for i, sig in enumerate(sigmas):
        s[i, i] = sig
    return u @ s @ v.T


def test_mpi_scale_is_c_prime_over_sqrt_n():
    assert mpi_scale(64) == pytest.approx(0.125)  # the authors' hard-coded C at N = 64
    assert mpi_scale(16, 2.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be > 0"):
        mpi_scale(8, 0.0)
    with pytest.raises(ValueError, match="must be > 0 and finite, got inf"):
        mpi_scale(8, math.inf)


def test_power_step_equals_explicit_gram_product():
    g = torch.Generator().manual_seed(0)
    r, w = torch.randn(4, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    expected = torch.stack([r[i] @ w[i].T @ w[i] for i in range(4)])
    torch.testing.assert_close(power_step(r, w), expected)


def test_power_step_through_two_matrices_equals_concatenation():
    g = torch.Generator().manual_seed(1)
    r, a, b = torch.randn(3, 6, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(3, 5, 6, generator=g)
    torch.testing.assert_close(power_step(r, a, b), power_step(r, torch.cat([a, b], dim=1)))


def test_power_step_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"expected \(E, F, D\)"):
        power_step(torch.randn(4, 8), torch.randn(4, 5, 7))


@pytest.mark.parametrize("scale", [0.125, 1.0, 3.0], ids=lambda s: f"C={s}")
def test_retraction_norm_equals_scale(scale):
    v = torch.randn(16, 32)
    torch.testing.assert_close(retract(v, scale).norm(dim=-1), torch.full((16,), scale))


def test_iterated_mpi_converges_to_top_singular_direction_at_rate_sigma_ratio_squared():
    sig = [1.0, 0.8, 0.3, 0.1]
    G = matrix_with_spectrum(12, 8, sig)
    v1 = torch.linalg.svd(G)[2][0]  # reference: top right-singular vector
    r = torch.randn(1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tans = []
    for _ in range(30):
        r = mpi_rows(r.double(), G.unsqueeze(0), scale=1.0).double()
        cos = (r[0] @ v1).abs() / r[0].norm()
        tans.append(math.sqrt(max(1 - cos.item() ** 2, 0.0)) / cos.item())
    assert tans[-1] < 1e-5  # converged to ±v1
    ratios = [tans[i + 1] / tans[i] for i in range(10, 20)]  # past the transient of the smaller σ's
    assert ratios == pytest.approx([(sig[1] / sig[0]) ** 2] * len(ratios), rel=0.02)


def test_one_mpi_step_is_riemannian_ascent_with_step_one_over_rho():
    G = matrix_with_spectrum(10, 6, [2.0, 1.5, 1.0, 0.5, 0.2, 0.1], seed=4)
    A = G.T @ G
    v = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    v = v / v.norm()
    mpi = mpi_rows(v.unsqueeze(0), G.unsqueeze(0), scale=1.0)[0].double()
    torch.testing.assert_close(mpi, riemannian_ascent_step(v, A), atol=1e-6, rtol=1e-6)


def test_mpi_rows_float64_gradcheck():
    g = torch.Generator().manual_seed(6)
    r = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    fn = lambda r_, w_: retract(power_step(r_, w_), 0.7)  # mpi_rows = this after a float32 cast
    assert torch.autograd.gradcheck(fn, (r, w))


def test_mpi_rows_computed_in_float32_from_bf16_weights():
    r = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(4, 8, 16, dtype=torch.bfloat16)
    phi = mpi_rows(r, w, scale=0.5)
    assert phi.dtype == torch.float32
    torch.testing.assert_close(phi, mpi_rows(r.float(), w.float(), scale=0.5))


@pytest.mark.parametrize("case", ["zero_row", "orthogonal_to_expert"])
def test_degenerate_rows_give_zero_rows_and_finite_gradients(case):
    r = torch.randn(3, 6)
    w = torch.randn(3, 4, 6)
    if case == "zero_row":
        r[1] = 0.0
    else:
        w[1, :, :3] = 0.0  # expert 1 only sees the last 3 coordinates
        r[1, 3:] = 0.0  # router row lives in the first 3: R Gᵀ = 0
    r.requires_grad_(True)
    w.requires_grad_(True)
    phi = mpi_rows(r, w, scale=1.0)
    assert torch.isfinite(phi).all()
    assert phi[1].abs().max() == 0
    phi.sum().backward()
    assert torch.isfinite(r.grad).all() and torch.isfinite(w.grad).all()
    assert phi[0].norm().item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("where", ["router_row", "gate_weights"])
def test_nan_in_one_expert_gives_nan_logits_for_that_expert_only(where):
    torch.manual_seed(0)
    router = MPIRouter(8, 4)
    w_gate = torch.randn(4, 5, 8)
    with torch.no_grad():
        if where == "router_row":
            router.weight[2, 3] = math.nan
        else:
            w_gate[2, 1, 4] = math.nan
    logits = router(torch.randn(6, 8), w_gate)
    assert torch.isnan(logits[:, 2]).all()  # not a valid-looking logit 0
    assert torch.isfinite(logits[:, [0, 1, 3]]).all()


def test_retract_keeps_nan_rows_and_zeroes_only_degenerate_ones():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0], [math.nan, 1.0], [math.inf, 1.0]])
    phi = retract(v, 2.0)
    torch.testing.assert_close(phi[:2], torch.tensor([[1.2, 1.6], [0.0, 0.0]]))
    assert torch.isnan(phi[2]).all() and not torch.isfinite(phi[3]).all()


def test_alignment_is_one_for_the_top_direction_and_small_for_random():
    w = torch.stack([matrix_with_spectrum(32, 256, [3.0, 1.0, 0.5], seed=s) for s in range(4)]).float()
    top = top_singular_directions(w)
    assert alignment(-top, w) == pytest.approx(torch.ones(4), abs=1e-5)  # sign-free
    rand = alignment(torch.randn(4, 256, generator=torch.Generator().manual_seed(0)), w)
    assert rand.mean().item() < 3 * random_alignment_baseline(256)


def test_relative_gain_is_one_on_the_top_direction_and_sigma_ratio_on_the_second():
    sig = [3.0, 2.4, 0.5]
    w = torch.stack([matrix_with_spectrum(32, 64, sig, seed=s) for s in range(3)])
    _, _, vh = torch.linalg.svd(w)
    assert relative_gain(-5 * vh[:, 0], w) == pytest.approx(torch.ones(3), abs=1e-5)  # sign- and norm-free
    assert relative_gain(vh[:, 1], w) == pytest.approx(torch.full((3,), 2.4 / 3.0), abs=1e-5)
    mix = (vh[:, 0] + vh[:, 1]) / math.sqrt(2)  # half the energy on each: gain² = (σ1² + σ2²) / 2 / σ1²
    assert relative_gain(mix, w) == pytest.approx(torch.full((3,), math.sqrt((9 + 2.4**2) / 2) / 3), abs=1e-5)
    # through [G; U] the reference is the concatenation's top singular value
    u = torch.stack([matrix_with_spectrum(32, 64, [1.0, 0.9], seed=10 + s) for s in range(3)])
    top = top_singular_directions(torch.cat([w, u], dim=1))
    assert relative_gain(top, w, u) == pytest.approx(torch.ones(3), abs=1e-5)


# ----------------------------------------------------------------------------- modules


def _router_and_weights(kind, target="gate", E=4, D=16, Fh=8, seed=0):
    torch.manual_seed(seed)
    router = Router(D, E, RouterConfig(kind=kind, target=target))
    return router, torch.randn(E, Fh, D), torch.randn(E, Fh, D)


@pytest.mark.parametrize("kind", MPI_FAMILY)
def test_router_rows_follow_their_definition(kind):
    router, wg, wu = _router_and_weights(kind)
    R, C = router.weight.detach(), router.scale
    expected = {
        "linear": R,
        "mpi-inplace": R,
        "retract": C * R / R.norm(dim=-1, keepdim=True),
        "power": power_step(R, wg),
        "mpi": C * power_step(R, wg) / power_step(R, wg).norm(dim=-1, keepdim=True),
    }[kind]
    torch.testing.assert_close(router.rows(wg, wu), expected)
    x = torch.randn(10, 16)
    torch.testing.assert_close(router(x, wg, wu), x @ expected.T)


@pytest.mark.parametrize("target", ["gate", "up", "gate_up"])
def test_power_target_selects_expert_matrices(target):
    router, wg, wu = _router_and_weights("mpi", target)
    mats = {"gate": (wg,), "up": (wu,), "gate_up": (torch.cat([wg, wu], 1),)}[target]
    torch.testing.assert_close(router.rows(wg, wu), mpi_rows(router.weight, *mats, scale=router.scale))


def test_mpi_router_gradients_reach_router_and_gate_weights():
    router, wg, wu = _router_and_weights("mpi")
    wg.requires_grad_(True)
    wu.requires_grad_(True)
    router(torch.randn(10, 16), wg, wu).square().sum().backward()
    assert router.weight.grad.abs().sum() > 0 and wg.grad.abs().sum() > 0
    assert wu.grad is None  # target="gate": the up projection does not drive the router


def test_inplace_update_projects_rows_without_graph():
    router, wg, wu = _router_and_weights("mpi-inplace")
    before = router.weight.detach().clone()
    router.inplace_update(wg, wu)
    torch.testing.assert_close(router.weight.detach(), mpi_rows(before, wg, scale=router.scale))
    assert router.weight.grad_fn is None
    lin, _, _ = _router_and_weights("linear")
    w0 = lin.weight.detach().clone()
    lin.inplace_update(wg, wu)  # no-op for every other kind
    assert torch.equal(lin.weight.detach(), w0)


@pytest.mark.parametrize("kind", MPI_FAMILY)
def test_folded_router_gives_the_same_logits_at_linear_cost(kind):
    router, wg, wu = _router_and_weights(kind)
    folded = router.fold(wg, wu)
    assert folded.kind == "linear"
    x = torch.randn(20, 16)
    torch.testing.assert_close(folded(x), router(x, wg, wu), atol=1e-6, rtol=1e-5)


def test_mpi_router_class_is_the_paper_default():
    r = MPIRouter(32, 64)
    assert r.kind == "mpi" and r.scale == pytest.approx(0.125) and r.weight.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kind="sigmoid"), "unknown router kind 'sigmoid'"),
        (dict(target="down"), "unknown power target 'down'"),
        (dict(scale_prime=-1.0), "must be > 0"),
        (dict(scale_prime=float("inf")), r"scale_prime \(C'\) must be > 0 and finite, got inf"),
        (dict(scale_prime=float("nan")), r"scale_prime \(C'\) must be > 0 and finite, got nan"),
    ],
    ids=["unknown-kind", "unknown-target", "negative-scale", "infinite-scale", "nan-scale"],
)
def test_router_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(**kwargs)


@pytest.mark.parametrize(
    "make, message",
    [(lambda: Router(0, 4), "dim must be >= 1, got 0"), (lambda: MPIRouter(-8, 4), "dim must be >= 1, got -8"),
     (lambda: Router(8.0, 4), "dim must be an integer, got float 8.0"), (lambda: Router(8, 0), "num_experts must be >= 1, got 0"),
     (lambda: MPIRouter(8, -2), "num_experts must be >= 1, got -2")],
    ids=["Router-zero-dim", "MPIRouter-negative-dim", "Router-float-dim", "Router-no-experts", "MPIRouter-negative-experts"],
)
def test_router_constructors_reject_sizes_that_are_not_positive_integers(make, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        make()


@pytest.mark.parametrize("shape", [(2, 7), (2, 5, 8), (8,)], ids=["wrong-width", "3d", "1d"])
def test_router_forward_names_the_expected_input_shape(shape):
    router = Router(8, 4, RouterConfig(kind="linear"))
    expected = f"Router expects x of shape (tokens, dim=8), got {shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        router(torch.randn(shape))


def test_mpi_router_needs_gate_weights():
    router = Router(8, 4, RouterConfig(kind="mpi"))
    with pytest.raises(ValueError, match="needs the expert gate weights"):
        router(torch.randn(2, 8))


@pytest.mark.parametrize("kind", MPI_FAMILY)
def test_router_stays_float32_under_bf16_autocast(kind):
    router, wg, wu = _router_and_weights(kind)
    x = torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router(x.bfloat16(), wg.bfloat16(), wu.bfloat16())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, router(x.bfloat16().float(), wg.bfloat16().float(), wu.bfloat16().float()))
