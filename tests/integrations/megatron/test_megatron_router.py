"""MPI routers in Megatron-Core's MoE layer, one CPU process: logits against a float64 formula, Megatron's routing
features unchanged, gradients only into R and the targeted fc1 rows, both expert weight layouts, the spec."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

pytest.importorskip("megatron", reason="the megatron extra is not installed (pip install 'mpirouter[megatron]')")

import mcore_shims  # noqa: E402
from mcore_shims import fresh_router_metrics, megatron_on_cpu  # noqa: E402,F401  (autouse fixtures)

mcore_shims.stub_triton_kernels()

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mpirouter.integrations.megatron import MPIConfig, MPIMoELayer, MPITopKRouter, mpi_layer_spec  # noqa: E402
from mpirouter.integrations.megatron.rows import fc1_weights, target_rows  # noqa: E402

E, D, F = 4, 32, 16
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
KINDS, TARGETS = ("mpi", "power", "retract", "linear"), ("gate", "up", "gate_up")


def config(**overrides) -> TransformerConfig:
    base = dict(num_layers=1, hidden_size=D, num_attention_heads=4, num_moe_experts=E, moe_router_topk=2, ffn_hidden_size=F,
                moe_ffn_hidden_size=F, gated_linear_unit=True, use_cpu_initialization=True, moe_token_dispatcher_type="alltoall",
                add_bias_linear=False, moe_router_dtype="fp32", params_dtype=torch.float32, moe_aux_loss_coeff=0.0)
    return TransformerConfig(**{**base, **overrides})


def build(mpi: MPIConfig = MPIConfig(), seed: int = 0, **overrides) -> MPIMoELayer:
    torch.manual_seed(seed)
    spec = mpi_layer_spec(get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False), mpi)
    return spec.submodules.mlp(config=config(**overrides))


def reference_rows(kind: str, target: str, r_ED: torch.Tensor, fc1_EXD: torch.Tensor, scale_prime: float) -> torch.Tensor:
    """φ in float64, written from the paper: power step R_i Σ W_iᵀ W_i over the target matrices, then C·normalize."""
    r, w = r_ED.double(), fc1_EXD.double()
    mats = {"gate": [w[:, :F]], "up": [w[:, F:]], "gate_up": [w[:, :F], w[:, F:]]}[target]
    C = scale_prime / math.sqrt(E)
    if kind == "linear":
        return r
    if kind == "retract":
        return C * r / r.norm(dim=1, keepdim=True)
    step = sum(torch.einsum("ed,efd,efk->ek", r, m, m) for m in mats)
    return step if kind == "power" else C * step / step.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_are_x_phi_with_phi_from_the_formula(kind, target):
    moe = build(MPIConfig(kind=kind, target=target, scale_prime=2.0))
    fc1 = torch.stack([e.linear_fc1.weight.detach() for e in moe.experts.local_experts])
    x = torch.randn(5, 3, D)
    logits = moe.router.gating(x)
    phi = reference_rows(kind, target, moe.router.weight.detach(), fc1, 2.0)
    torch.testing.assert_close(logits.double(), x.double() @ phi.T, rtol=1e-5, atol=1e-5)


class TEGroupedStandIn(torch.nn.Module):
    """TEGroupedMLP's fc1 layout (experts.py, `TEGroupedMLP`: one [2F, D] parameter `weight{i}` per local expert on
    `linear_fc1`), without TransformerEngine, which does not run on CPU."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.num_local_experts = len(weights)
        self.linear_fc1 = torch.nn.Module()
        for i, w in enumerate(weights):
            self.linear_fc1.register_parameter(f"weight{i}", torch.nn.Parameter(w.detach().clone()))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_te_grouped_layout_gives_the_same_logits(kind, target):
    moe = build(MPIConfig(kind=kind, target=target))
    x = torch.randn(6, D)
    sequential = moe.router.gating(x)
    moe.router.attach_experts(TEGroupedStandIn(fc1_weights(moe.experts)))
    torch.testing.assert_close(moe.router.gating(x), sequential, rtol=0, atol=0)


def test_an_ungated_unit_has_only_the_gate_target():
    w = [torch.randn(F, D) for _ in range(E)]
    assert target_rows(w, "gate", gated=False)[0].shape == (E, F, D)
    with pytest.raises(ValueError, match="needs a gated unit"):
        target_rows(w, "up", gated=False)


FEATURES = {
    "softmax": {},
    "softmax-pre": dict(moe_router_pre_softmax=True),
    "sigmoid-expert-bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    "sqrtsoftplus": dict(moe_router_score_function="sqrtsoftplus"),
    "aux-micro-batch": dict(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1),
    "aux-sequence": dict(moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.1),
    "aux-global": dict(moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=0.1),
    "z-loss": dict(moe_z_loss_coeff=0.01),
    "group-limited": dict(moe_router_num_groups=2, moe_router_group_topk=1),
    "topk-scaling": dict(moe_router_topk_scaling_factor=2.5),
    "capacity-probs-drop": dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="probs"),
    "capacity-position-pad": dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="position",
                                  moe_pad_expert_input_to_capacity=True),
    "router-fp64": dict(moe_router_dtype="fp64"),
}


@pytest.mark.parametrize("feature", FEATURES)
def test_routing_features_act_as_on_a_stock_router_whose_weight_is_phi(feature):
    """Probabilities, routing map and the input gradient (aux losses and z-loss included) of the MPI router equal those
    of Megatron's own TopKRouter holding φ as its weight."""
    moe = build(**FEATURES[feature])
    stock = TopKRouter(config=moe.config, pg_collection=_pg())
    with torch.no_grad():
        stock.weight.copy_(moe.router.rows())
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.copy_(torch.linspace(-0.1, 0.1, E))
            stock.expert_bias.copy_(moe.router.expert_bias)
    moe.router.train(), stock.train()
    x = torch.randn(8, 2, D)
    results = []
    for router in (moe.router, stock):
        xi = x.clone().requires_grad_()
        probs, routing_map = router(xi)
        (probs * torch.arange(1.0, E + 1)).sum().backward()
        results.append((probs.detach(), routing_map, xi.grad))
    (p1, m1, g1), (p2, m2, g2) = results
    assert torch.equal(m1, m2)
    torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


def _pg():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


@pytest.mark.parametrize("target", TARGETS)
def test_gradients_reach_r_and_exactly_the_targeted_fc1_rows(target):
    moe = build(MPIConfig(target=target))
    moe.router.gating(torch.randn(6, D)).square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0
    rows = {"gate": slice(0, F), "up": slice(F, 2 * F), "gate_up": slice(0, 2 * F)}[target]
    for expert in moe.experts.local_experts:
        g = expert.linear_fc1.weight.grad
        assert g[rows].abs().sum() > 0
        mask = torch.ones(2 * F, dtype=torch.bool)
        mask[rows] = False
        assert (g[mask] == 0).all()
        assert expert.linear_fc2.weight.grad is None


def test_the_spec_conversion_in_both_spec_styles_and_its_refusals():
    mpi = MPIConfig(kind="power", target="up")
    local = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    converted = mpi_layer_spec(local, mpi)
    assert converted.submodules.mlp.func is MPIMoELayer and local.submodules.mlp.func is MoELayer  # a copy
    router = converted.submodules.mlp.keywords["submodules"].router
    assert isinstance(router, functools.partial) and router.func is MPITopKRouter and router.keywords["mpi"] == mpi
    as_module_spec = dataclasses.replace(local, submodules=dataclasses.replace(
        local.submodules, mlp=ModuleSpec(module=MoELayer, submodules=local.submodules.mlp.keywords["submodules"])))
    assert mpi_layer_spec(as_module_spec, mpi).submodules.mlp.module is MPIMoELayer  # megatron-core 0.16's style
    with pytest.raises(ValueError, match="no MoE layer"):
        mpi_layer_spec(get_gpt_layer_local_spec())
    with pytest.raises(ValueError, match="choose one of"):
        MPIConfig(kind="mpi-inplace")
    with pytest.raises(ValueError, match="MPIMoELayer needs an MPITopKRouter"):
        MPIMoELayer(config=config(), submodules=MoESubmodules(experts=local.submodules.mlp.keywords["submodules"].experts))


@pytest.mark.parametrize("shared", [0, 24], ids=["routed-only", "shared-experts"])
def test_the_mpi_layer_equals_the_stock_layer_holding_phi(shared):
    """Dispatch, experts and shared experts are Megatron's: only the router's rows differ, and φ reproduces them."""
    overrides = dict(moe_shared_expert_intermediate_size=shared) if shared else {}
    moe = build(MPIConfig(target="gate_up"), **overrides)
    torch.manual_seed(1)
    stock = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False).submodules.mlp(config=moe.config)
    state = moe.state_dict()
    with torch.no_grad():
        state["router.weight"] = moe.router.rows()
    stock.load_state_dict(state)
    x = torch.randn(6, 2, D)
    torch.testing.assert_close(stock(x)[0], moe(x)[0], rtol=0, atol=0)


def test_expert_tensor_parallelism_is_refused_clearly():
    moe = build()
    moe.router.config = dataclasses.replace(moe.config, expert_tensor_parallel_size=2)
    with pytest.raises(ValueError, match="expert tensor parallelism"):
        moe.router.attach_experts(moe.experts)


@pytest.mark.parametrize("setting,match", [(dict(moe_mlp_glu_interleave_size=4), "interleaves the gate and up rows"),
                                           (dict(moe_latent_size=8), "latent")], ids=["glu-interleave", "latent"])
def test_layouts_the_router_would_misread_are_refused(setting, match):
    moe = build()
    moe.router.config = dataclasses.replace(moe.config, **setting)
    with pytest.raises(ValueError, match=match):
        moe.router.attach_experts(moe.experts)


def test_a_spec_with_a_router_of_its_own_is_refused_and_a_block_spec_converts_layer_by_layer():
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    local = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    dense = get_gpt_layer_local_spec()
    block = TransformerBlockSubmodules(layer_specs=[dense, local, dense, local])
    converted = mpi_layer_spec(block)
    assert [getattr(s.submodules.mlp, "func", None) is MPIMoELayer for s in converted.layer_specs] == [False, True, False, True]
    assert converted.layer_specs[0] is dense and block.layer_specs[1] is local  # dense layers kept, input not changed
    subs = local.submodules.mlp.keywords["submodules"]
    custom = dataclasses.replace(local, submodules=dataclasses.replace(local.submodules, mlp=functools.partial(
        MoELayer, submodules=dataclasses.replace(subs, router=MPITopKRouter))))
    with pytest.raises(ValueError, match="replaces Megatron's TopKRouter only"):
        mpi_layer_spec(custom)


def test_bf16_weights_give_the_float32_formula_within_bf16_rounding():
    moe = build(MPIConfig(target="gate_up"), params_dtype=torch.bfloat16, bf16=True)
    assert moe.router.weight.dtype == torch.bfloat16
    fc1 = torch.stack([e.linear_fc1.weight.detach().float() for e in moe.experts.local_experts])
    x = torch.randn(5, D).to(torch.bfloat16)
    phi = reference_rows("mpi", "gate_up", moe.router.weight.detach().float(), fc1, 1.0)
    torch.testing.assert_close(moe.router.gating(x).double(), x.double() @ phi.T, rtol=0, atol=1e-5)  # φ from the bf16 weights, in float32


def test_padding_tokens_are_left_out_of_maxvio():
    from mpirouter.core.routing import max_violation
    from mpirouter.integrations.megatron.tracking import MAXVIO_TRACKER, record_maxvio

    moe = build()
    moe.router.train()
    moe.router.layer_number = 1
    routing_map = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    padding = torch.tensor([True, False, False, False])  # Megatron's expert-bias count: True is padding
    record_maxvio(moe.router, routing_map, padding)
    expected = max_violation(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert MAXVIO_TRACKER.metrics["mpi_maxvio"].values[0] == expected == 0
