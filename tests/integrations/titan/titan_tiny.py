"""A torchtitan config registry with one tiny qwen3-MoE training config, for tests on CPU.

    torchrun --standalone --nproc_per_node=1 tests/integrations/titan/cpu_train.py \
        --module titan_tiny --config tiny_qwen3_moe \
        --hf_assets_path ASSETS/hf_assets --dataloader.dataset_path ASSETS/dataset --dump_folder OUT

(ASSETS from assets.py's `make_assets`.) torchrun puts this folder on sys.path, so torchtitan's
`--module titan_tiny` imports this file. Every value set here is a default the torchtitan CLI can
override (`--training.steps 8`, `--parallelism.expert_parallel_degree 2`, `--checkpoint.enable`, ...).
"""

from __future__ import annotations


from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.components.optimizer import LRSchedulersContainer, default_adamw, register_moe_load_balancing_hook
from torchtitan.config import DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.qwen3 import Qwen3StateDictAdapter, parallelize_qwen3
from torchtitan.models.qwen3.model import Qwen3Model
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

import tiny  # noqa: I001 (this folder's module, on sys.path under torchrun)

# Must cover the tokenizer that assets.py trains (it checks).
VOCAB_SIZE = 256

def tiny_qwen3_moe_model() -> Qwen3Model.Config:
    """tiny.py's Qwen3-MoE at width 64 with the tokenizer's vocabulary."""
    return tiny.tiny_qwen3_moe(num_experts=8, top_k=2, n_layers=2, vocab=VOCAB_SIZE, dim=64, head_dim=16,
                               moe_hidden_dim=64, max_seq_len=256)


def tiny_qwen3_moe() -> Trainer.Config:
    """4 steps of the tiny model on a local dataset; paths come from the CLI (see the module docstring)."""
    # The ModelSpec fields of qwen3's model_registry, so parallelisation, the load-balancing bias
    # hook and the HF state-dict adapter are torchtitan's own.
    model_spec = ModelSpec(
        name="qwen3",
        flavor="tiny_moe",
        model=tiny_qwen3_moe_model(),
        parallelize_fn=parallelize_qwen3,
        pipelining_fn=pipeline_llm,
        post_optimizer_build_fn=register_moe_load_balancing_hook,
        state_dict_adapter=Qwen3StateDictAdapter,
    )
    return Trainer.Config(
        model_spec=model_spec,
        loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=VOCAB_SIZE)),
        # both paths are placeholders: the test passes --hf_assets_path and --dataloader.dataset_path
        hf_assets_path="./hf_assets",
        # "c4_test" is torchtitan's loader for a local folder of JSON lines with a "text" field
        dataloader=HuggingFaceTextDataLoader.Config(dataset="c4_test", dataset_path="./dataset"),
        metrics=MetricsProcessor.Config(log_freq=1, disable_color_printing=True),
        optimizer=default_adamw(lr=3e-3),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=1, decay_ratio=0.8, decay_type="linear",
                                                  min_lr_factor=0.0),
        # float32 FSDP compute: bf16 matmuls are slow on CPU, and fp32 keeps layouts comparable
        training=TrainingConfig(local_batch_size=2, seq_len=64, steps=4, mixed_precision_param="float32",
                                disable_cuda_graphs=True),
        # partial_dtensor: DTensors only for model-parallel axes (the classic FSDP2 + EP path); the
        # default spmd_types backend is not what this harness exercises on CPU.
        parallelism=ParallelismConfig(spmd_backend="partial_dtensor"),
        checkpoint=CheckpointManager.Config(enable=False, interval=2, last_save_model_only=False),
        activation_checkpoint=None,
        # a fixed seed: the same layout gives the same losses on every run
        debug=DebugConfig(seed=0),
    )
