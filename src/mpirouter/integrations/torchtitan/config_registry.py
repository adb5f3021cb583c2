"""Ready torchtitan configs with MPI routers, for `--module mpirouter.integrations.torchtitan --config <name>`.

    torchrun --nproc_per_node=8 -m torchtitan.train --module mpirouter.integrations.torchtitan \\
        --config qwen3_moe_1b_mpi --hf_assets_path ./assets/hf/Qwen3-30B-A3B

Each function starts from torchtitan's own config of that model, so everything but the router
(data, optimizer, schedule, parallelism, checkpointing) is torchtitan's default for it and every
torchtitan CLI flag still applies. docs/torchtitan.md lists the options.
"""

from __future__ import annotations

from torchtitan.config import derive
from torchtitan.models import qwen3
from torchtitan.models.common import CosSinRoPE, Embedding, Linear
from torchtitan.models.deepseek_v3 import config_registry as deepseek_v3_registry
from torchtitan.models.qwen3 import config_registry as qwen3_registry
from torchtitan.models.qwen3.model import Qwen3Model
from torchtitan.trainer import Trainer

from .convert import to_mpi
from .metrics import RouterMetricsProcessor


def with_mpi(config: Trainer.Config, *, kind: str = "mpi", target: str = "gate", scale_prime: float = 1.0,
             alignment_every: int = 100) -> Trainer.Config:
    """`config` with MPI routers in every MoE layer and router metrics in the logs (modified in place, returned)."""
    config.model_spec.model = to_mpi(config.model_spec.model, kind=kind, target=target, scale_prime=scale_prime)
    config.model_spec.flavor = f"{config.model_spec.flavor}-{kind}"
    config.metrics = derive(config.metrics, RouterMetricsProcessor.Config, alignment_every=alignment_every)
    return config


def qwen3_moe_debug_mpi() -> Trainer.Config:
    """torchtitan's `qwen3_moe_debug` (8 layers, 64 experts, top-8, softmax + route_norm) with MPI routers."""
    return with_mpi(qwen3_registry.qwen3_moe_debug(), alignment_every=5)


def deepseek_v3_debug_mpi() -> Trainer.Config:
    """torchtitan's `deepseek_v3_debugmodel` (sigmoid scores, expert bias, shared experts) with MPI routers."""
    return with_mpi(deepseek_v3_registry.deepseek_v3_debugmodel(), alignment_every=5)


def qwen3_moe_1b_model() -> Qwen3Model.Config:
    """A 1B-class Qwen3-MoE: 12 layers, width 1024, 64 experts of width 384, top-8 (1.28B parameters, 0.49B active).

    Built with torchtitan's own Qwen3-MoE layer builder and initialisation; the vocabulary is
    Qwen3's (151,936), so the Qwen3 tokenizer of torchtitan's 30B-A3B config works unchanged.
    """
    dim, head_dim, n_layers, vocab_size = 1024, 128, 12, 151936
    # torchtitan 0.3.0 has no public builder between its debug and 30B-A3B flavours; this private
    # one is what both use (pinned version; tests/integrations/titan/test_titan_model.py builds this model)
    layers = qwen3._build_qwen3_moe_layers(
        n_layers=n_layers, dim=dim, n_heads=16, n_kv_heads=4, head_dim=head_dim, moe_hidden_dim=384,
        num_experts=64, top_k=8, attn_backend="flex", moe_comm_backend="standard",
        rope=CosSinRoPE.Config(dim=head_dim, max_seq_len=4096, theta=1000000.0))
    return Qwen3Model.Config(
        vocab_size=vocab_size, dim=dim, norm=qwen3._qwen3_norm(dim), layers=layers,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=qwen3._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=qwen3._LINEAR_INIT))


def qwen3_moe_1b_mpi() -> Trainer.Config:
    """`qwen3_moe_1b_model` with MPI routers on torchtitan's 30B-A3B recipe (data, optimizer, FSDP, full AC)."""
    config = qwen3_registry.qwen3_30b_a3b()
    config.model_spec.model = qwen3_moe_1b_model()
    config.model_spec.flavor = "1B-A0.5B"
    return with_mpi(config)


def qwen3_moe_1b_linear() -> Trainer.Config:
    """The baseline of a comparison: the same model and recipe with the linear router (R itself, as stock
    torchtitan computes it), through `MPIGate(kind="linear")` so that it logs the same router metrics."""
    config = qwen3_registry.qwen3_30b_a3b()
    config.model_spec.model = qwen3_moe_1b_model()
    config.model_spec.flavor = "1B-A0.5B"
    return with_mpi(config, kind="linear")
