"""Run `torchtitan.train` on CPU with gloo: the test harness's launcher (test-only shims, no product code).

    torchrun --standalone --nproc_per_node=2 tests/integrations/titan/cpu_train.py \
        --module titan_tiny --config tiny_qwen3_moe --parallelism.data_parallel_shard_degree 2 \
        --hf_assets_path ASSETS/hf_assets --dataloader.dataset_path ASSETS/dataset --dump_folder OUT

torchtitan 0.3.0's trainer assumes an accelerator. The shims in cpu_shims.py work around that; they run before torchtitan's trainer is imported. Everything after the flags is torchtitan's own CLI.
"""

from __future__ import annotations

import torch
from cpu_shims import patch_device_module, patch_fsdp_sum_reduction, patch_set_timeout


def main() -> None:
    patch_device_module()
    patch_set_timeout()
    patch_fsdp_sum_reduction()
    # one intra-op thread per rank: ranks share the machine's few cores
    torch.set_num_threads(1)
    from torchtitan import train

    train.main()


if __name__ == "__main__":
    main()
