"""MPI routers in torchtitan models, one CPU process: logits, routing semantics, gradients, folding, HF export."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed (pip install 'mpirouter[titan]')")

from tiny import MODELS, VOCAB, tiny_qwen3_moe
from torchtitan.config import apply_overrides
from torchtitan.config.override import OverrideConfig
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.moe import GroupedExperts, MoE, TokenChoiceTopKRouter
from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

from mpirouter.integrations.torchtitan import MPIGate, MPIMoE, folded_state_dict, to_mpi, to_stock
from mpirouter.integrations.torchtitan.config_registry import qwen3_moe_1b_model

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    model = config.build()
    model.init_states(buffer_device=torch.device("cpu"))
    return model


def moe_layers(model) -> list:
    return [m for m in model.modules() if isinstance(m, MoE)]


def tokens(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def reference_rows(kind: str, target: str, r_ED, w1_EFD, w3_EFD, scale: float) -> torch.Tensor:
    """φ in float64 written out from the paper's formula, independently of mpirouter's functions."""
    r, w1, w3 = r_ED.double(), w1_EFD.double(), w3_EFD.double()
    if kind == "linear":
        return r
    if kind == "retract":
        return scale * r / r.norm(dim=1, keepdim=True)
    mats = {"gate": [w1], "up": [w3], "gate_up": [w1, w3]}[target]
    step = sum(torch.einsum("ed,efd,efk->ek", r, m, m) for m in mats)  # R_i W_iᵀ W_i
    return step if kind == "power" else scale * step / step.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("target", ["gate", "up", "gate_up"])
@pytest.mark.parametrize("kind", ["mpi", "power", "retract", "linear"])
def test_router_logits_equal_the_formula(kind, target):
    model = build(to_mpi(tiny_qwen3_moe(), kind=kind, target=target, scale_prime=2.0))
    moe = moe_layers(model)[0]
    gate, experts = moe.router.gate, moe.routed_experts.inner_experts
    x_BLD = torch.randn(2, 5, 32)
    scale = 2.0 / math.sqrt(8)
    expected = x_BLD.double() @ reference_rows(kind, target, gate.weight, experts.w1_EFD, experts.w3_EFD, scale).T
    torch.testing.assert_close(gate(x_BLD).double(), expected, rtol=1e-5, atol=1e-6)


ROUTINGS = {
    "softmax": dict(score_func="softmax"),
    "softmax-route_norm": dict(score_func="softmax", route_norm=True),
    "sigmoid-scale": dict(score_func="sigmoid", route_scale=2.5),
    "sigmoid-groups": dict(score_func="sigmoid", num_expert_groups=4, num_limited_groups=2, route_norm=True),
}


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "expert-bias"])
@pytest.mark.parametrize("routing", ROUTINGS.values(), ids=ROUTINGS.keys())
def test_routing_semantics_are_torchtitans_on_the_mpi_rows(routing, bias):
    """The MPI router = torchtitan's stock router whose gate weight is φ (scores, bias, groups, norm, scale)."""
    E, D, F = 8, 16, 12
    stock_cfg = TokenChoiceTopKRouter.Config(num_experts=E, top_k=3, gate=Linear.Config(in_features=D, out_features=E), **routing)
    mpi_cfg = TokenChoiceTopKRouter.Config(num_experts=E, top_k=3, **routing,
                                           gate=MPIGate.Config(in_features=D, out_features=E, kind="mpi"))
    torch.manual_seed(0)
    stock, mpi = stock_cfg.build(), mpi_cfg.build()
    experts = GroupedExperts.Config(dim=D, hidden_dim=F, num_experts=E).build()
    for p in [*experts.parameters(), mpi.gate.weight]:
        torch.nn.init.normal_(p)
    mpi.gate.bind_experts(experts)
    with torch.no_grad():
        stock.gate.weight.copy_(mpi.gate.rows())
    bias_E = torch.randn(E) * 0.1 if bias else None
    x_BLD = torch.randn(3, 7, D)
    for got, want in zip(mpi(x_BLD, bias_E), stock(x_BLD, bias_E)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("target", ["gate", "up", "gate_up"])
def test_gradients_reach_the_router_and_the_target_experts(target):
    model = build(to_mpi(tiny_qwen3_moe(), target=target))
    moe = moe_layers(model)[0]
    # the router-path gradient alone: the routing weights are the only way the router rows touch the loss
    scores = moe.router(torch.randn(2, 5, 32))[0]
    scores.pow(2).sum().backward()
    experts = moe.routed_experts.inner_experts
    assert moe.router.gate.weight.grad.abs().sum() > 0
    assert (experts.w1_EFD.grad is not None) == (target in ("gate", "gate_up"))
    assert (experts.w3_EFD.grad is not None) == (target in ("up", "gate_up"))
    for w in (experts.w1_EFD, experts.w3_EFD):
        assert w.grad is None or w.grad.abs().sum() > 0


@pytest.mark.parametrize("family", MODELS)
def test_the_whole_model_trains_on_mpi_rows(family):
    model = build(to_mpi(MODELS[family]()))
    assert all(isinstance(m, MPIMoE) for m in moe_layers(model)) and moe_layers(model)
    model(tokens()).float().logsumexp(-1).mean().backward()
    for moe in moe_layers(model):
        assert torch.isfinite(moe.router.gate.weight.grad).all() and moe.router.gate.weight.grad.abs().sum() > 0
        assert moe.routed_experts.inner_experts.w1_EFD.grad.abs().sum() > 0
        assert moe.routed_tokens_E.sum() == 2 * 12 * moe.router.top_k  # every routed slot counted once


@pytest.mark.parametrize("family", MODELS)
def test_folded_weights_load_in_stock_torchtitan_with_identical_logits(family):
    mpi_config = to_mpi(MODELS[family]())
    mpi = build(mpi_config).eval()
    stock = build(to_stock(mpi_config), seed=1).eval()
    assert type(moe_layers(stock)[0]) is MoE and type(moe_layers(stock)[0].router.gate) is Linear
    stock.load_state_dict(folded_state_dict(mpi), strict=True)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(stock(x), mpi(x), rtol=0, atol=1e-6)
        # without folding the stock model reads R as its router weight: other router scores
        stock.load_state_dict(mpi.state_dict(), strict=True)
        x_BLD = torch.randn(2, 5, 32)
        stock_scores, mpi_scores = moe_layers(stock)[0].router(x_BLD)[2], moe_layers(mpi)[0].router(x_BLD)[2]
        assert (stock_scores - mpi_scores).abs().max() > 1e-2


def test_conversions_leave_the_given_config_alone_and_round_trip():
    stock = tiny_qwen3_moe()
    mpi = to_mpi(stock, kind="power", target="up")
    assert type(stock.layers[0].moe) is MoE.Config and type(stock.layers[0].moe.router.gate) is Linear.Config
    gate = mpi.layers[0].moe.router.gate
    assert type(mpi.layers[0].moe) is MPIMoE.Config and (gate.kind, gate.target) == ("power", "up")
    back = to_stock(mpi)
    assert type(back.layers[0].moe) is MoE.Config and type(back.layers[0].moe.router.gate) is Linear.Config
    assert type(mpi.layers[0].moe) is MPIMoE.Config  # to_stock copied too
    assert set(build(back).state_dict()) == set(build(mpi).state_dict()) == set(build(stock).state_dict())


def test_the_override_entry_swaps_every_moe_layer_with_its_kwargs():
    config = tiny_qwen3_moe()
    lines = apply_overrides(OverrideConfig(imports=[("mpirouter.integrations.torchtitan.convert.mpi_moe",
                                                     {"kind": "retract", "scale_prime": 3.0})]), config)
    assert len(lines) == len(config.layers) == 2
    assert all(isinstance(layer.moe, MPIMoE.Config) for layer in config.layers)
    assert {(layer.moe.router.gate.kind, layer.moe.router.gate.scale_prime) for layer in config.layers} == {("retract", 3.0)}


@pytest.mark.parametrize("field, value", [("kind", "mpi-inplace"), ("target", "down"), ("scale_prime", 0.0)])
def test_bad_router_settings_are_refused_when_the_config_is_made(field, value):
    with pytest.raises(ValueError, match=field.replace("_prime", "")):
        to_mpi(tiny_qwen3_moe(), **{field: value})


def test_tensor_parallelism_is_refused_with_a_clear_error():
    class Dims:
        tp = 2

    moe = moe_layers(build(to_mpi(tiny_qwen3_moe())))[0]
    with pytest.raises(ValueError, match="tensor parallelism is not supported"):
        moe.parallelize(Dims())


def test_the_1b_class_flavour_has_the_documented_size():
    with torch.device("meta"):
        model = to_mpi(qwen3_moe_1b_model()).build()
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if "routed_experts" in n)
    assert 1.2e9 < total < 1.4e9 and 0.45e9 < total - experts * (1 - 8 / 64) < 0.55e9


def test_folded_weights_export_to_transformers_with_the_same_logits(tmp_path):
    """torchtitan's HF adapter writes transformers' keys; Qwen3MoeForCausalLM loads them with no mpirouter code."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    mpi_config = to_mpi(tiny_qwen3_moe(n_layers=2))
    mpi = build(mpi_config).eval()
    hf_state = Qwen3StateDictAdapter(to_stock(mpi_config), None).to_hf(folded_state_dict(mpi))
    save_file({k: v.contiguous() for k, v in hf_state.items()}, tmp_path / "model.safetensors")
    hf_config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=64, mlp_only_layers=[],
        output_router_logits=False)
    hf_config.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = tokens()
    with torch.no_grad():
        ours, theirs = mpi(x).float(), hf(x).logits
    # torchtitan's experts compute in bf16 and transformers' in float32: the logits differ at bf16 rounding
    assert (ours - theirs).abs().max() < 2e-2 * ours.abs().max()
    top_ours, top_theirs = ours.argmax(-1), theirs.argmax(-1)
    assert (top_ours == top_theirs).float().mean() > 0.9
