"""The built-in MoE and an HF MoE block retrofitted with `apply_mpi` route alike: same weights in, same output out.

DeepSeek-V3 (sigmoid scores, correction bias for selection only, normalized top-k weights, a shared expert) and
Qwen3-MoE (softmax, with and without top-k renormalization) against `core.moe.MoE` with the matching settings.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mpirouter import hf  # noqa: E402
from mpirouter.core.moe import MoE, MoEConfig  # noqa: E402
from mpirouter.core.routers import RouterConfig  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
ARCHS = {
    # one expert group (DeepSeek-V3's group-limited routing is not in the built-in model), routed scale 1
    "deepseek_v3": (dict(intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                         topk_group=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                         qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1, routed_scaling_factor=1.0, norm_topk_prob=True),
                    dict(score_func="sigmoid", balance="bias", n_shared=1)),
    "qwen3_moe": (dict(intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=16,
                       norm_topk_prob=True), dict()),
    "qwen3_moe-no-renorm": (dict(intermediate_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2, head_dim=16,
                                 norm_topk_prob=False), dict(renormalize=False)),
}


def hf_block(arch: str):
    cfg = transformers.AutoConfig.for_model(arch.split("-")[0], **COMMON, **ARCHS[arch][0])
    torch.manual_seed(0)
    model = hf.apply_mpi(transformers.AutoModelForCausalLM.from_config(cfg).eval())
    block = model.model.layers[1].mlp
    router = block.gate
    with torch.no_grad():
        for p in model.parameters():  # from_config leaves some weights at 0 or 1; make every one count
            p.normal_(std=0.2)
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.normal_(std=0.05)  # about the sigmoid scores' spread: changes some choices
    return model, block


def builtin_like(block, arch: str) -> MoE:
    experts, router = block.experts, block.gate
    E, two_f, D = experts.gate_up_proj.shape
    m = MoE(D, MoEConfig(num_experts=E, top_k=ARCHS[arch][0]["num_experts_per_tok"], hidden=two_f // 2,
                         router=RouterConfig(kind="mpi"), **ARCHS[arch][1])).eval()
    with torch.no_grad():
        m.router.weight.copy_(router.parametrizations.weight.original)  # R
        m.w_gate.copy_(experts.gate_up_proj[:, : two_f // 2])
        m.w_up.copy_(experts.gate_up_proj[:, two_f // 2:])
        m.w_down.copy_(experts.down_proj)
        if m.config.uses_expert_bias:
            m.expert_bias.copy_(router.e_score_correction_bias)
        if m.shared is not None:
            m.shared.w_gate.copy_(block.shared_experts.gate_proj.weight)
            m.shared.w_up.copy_(block.shared_experts.up_proj.weight)
            m.shared.w_down.copy_(block.shared_experts.down_proj.weight)
    return m


@pytest.mark.parametrize("arch", list(ARCHS))
def test_builtin_and_hf_blocks_agree_on_mpi_rows(arch):
    _, block = hf_block(arch)
    mine = builtin_like(block, arch)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = block(x)
        theirs = theirs[0] if isinstance(theirs, tuple) else theirs
        ours, stats = mine(x)
        # the same choices: HF's router returns its top-k indices; ours are in the stats' counts
        _, _, idx = block.gate(x.reshape(-1, 32)) if arch == "deepseek_v3" else (None, None, None)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    if idx is not None:
        assert torch.equal(torch.bincount(idx.flatten(), minlength=8), stats.tokens_per_expert_E)


def test_the_bias_matters_in_both():
    """Zeroing the bias in both changes both outputs the same way: the agreement is not an accident of a small bias."""
    _, block = hf_block("deepseek_v3")
    mine = builtin_like(block, "deepseek_v3")
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = block(x)
        block.gate.e_score_correction_bias.zero_()
        mine.expert_bias.zero_()
        after, ours = block(x), mine(x).out
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(ours, after, atol=1e-5, rtol=1e-4)
