"""Tiny torchtitan MoE model configs for the torchtitan-integration tests (CPU, no downloads).

FlexAttention has no CPU backward, so the tiny models use torchtitan's SDPA inner attention.
"""

from __future__ import annotations

from torchtitan.models import deepseek_v3, qwen3
from torchtitan.models.common import ComplexRoPE, CosSinRoPE, Embedding, Linear
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.models.common.nn_modules import RMSNorm
from torchtitan.models.deepseek_v3.model import DeepSeekV3Model
from torchtitan.models.qwen3.model import Qwen3Model

VOCAB = 96


def sdpa(config):
    """`config` with every FlexAttention replaced by SDPA (in place, returned)."""
    for _, _, parent, attr in list(config.traverse(FlexAttention.Config)):
        if isinstance(attr, int):
            parent[attr] = ScaledDotProductAttention.Config()
        else:
            setattr(parent, attr, ScaledDotProductAttention.Config())
    return config


def tiny_qwen3_moe(num_experts: int = 8, top_k: int = 2, n_layers: int = 2, *, vocab: int = VOCAB, dim: int = 32,
                   head_dim: int = 8, moe_hidden_dim: int = 24, max_seq_len: int = 64) -> Qwen3Model.Config:
    """Qwen3-MoE as torchtitan builds it (its layer builder and initialisation; softmax scores, route_norm), shrunk."""
    layers = qwen3._build_qwen3_moe_layers(
        n_layers=n_layers, dim=dim, n_heads=4, n_kv_heads=2, head_dim=head_dim, moe_hidden_dim=moe_hidden_dim,
        num_experts=num_experts, top_k=top_k, attn_backend="flex", moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=max_seq_len, theta=1e6))
    return sdpa(Qwen3Model.Config(
        vocab_size=vocab, dim=dim, norm=qwen3._qwen3_norm(dim), layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=qwen3._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=qwen3._LINEAR_INIT)))


def tiny_deepseek_v3() -> DeepSeekV3Model.Config:
    """DeepSeek-V3 as torchtitan builds it (MLA, a dense first layer, shared experts), width 32."""
    dim, rope_dim = 32, 8
    layers = deepseek_v3._build_dsv3_layers(
        n_layers=2, n_dense_layers=1, dim=dim, n_heads=2, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=rope_dim, v_head_dim=8, mscale=0.70, dense_hidden_dim=48, moe_hidden_dim=24, num_experts=8,
        num_shared_experts=1, router_top_k=2, router_score_func="sigmoid", attn_backend="flex",
        moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(dim=rope_dim, max_seq_len=64, theta=10000.0))
    return sdpa(DeepSeekV3Model.Config(
        vocab_size=VOCAB, dim=dim, layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=dim, param_init=deepseek_v3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=deepseek_v3._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=VOCAB, param_init=deepseek_v3._output_linear_init(dim)),
        mtp_layers=[]))


MODELS = {"qwen3": tiny_qwen3_moe, "deepseek_v3": tiny_deepseek_v3}
