"""What a CUDA job runs that CPU defaults skip, taken on 2 CPU ranks (gloo) by one torchrun launch (dist_gpu_paths.py).

- The optimizer kernels CUDA picks (fused AdamW, foreach Adam) in every layout: expert parallelism under DDP
  puts DTensors and plain tensors in one param group, which those kernels refused ("got mixed torch.Tensor
  and DTensor") before `build.StepsByLayout` stepped each group by layout.
- FSDP2 with bf16 compute weights: φ was computed from bf16-rounded R and G (~2e-3 relative) before each
  MoE layer became a float32 unit of its own (`parallel.wrap.FLOAT32`).
"""

from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("dist_gpu_paths.py")
OPTIMIZERS = ("adamw", "muon", "adamh", "muonh", "muonh-router-adamw")
LAYOUTS = ("ddp ep1", "ddp ep2", "fsdp ep1", "fsdp ep2")
PHI_CASES = ("mpi ep1", "mpi ep2", "linear ep1", "linear ep2")
KERNEL_TOL = 1e-4
"""‖W_cuda_kernels − W_cpu_kernels‖ / ‖W_cpu_kernels − W_0‖ after 2 steps, worst parameter updated by Adam/AdamW
(measured ≤ 3.3e-6: rounding; a group part stepped with wrong hyperparameters would be off by O(1))."""


@pytest.fixture(scope="module")
def results(torchrun, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gpu_paths")
    torchrun(SCRIPT, 2, out, timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_the_switch_gives_cuda_kernels_on_cpu(results):
    """`fused_adamw_supported` true and torch's default for Adam foreach (not the for-loop), as on CUDA."""
    assert all(r["switch"] == (True, (False, True)) for r in results)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_every_optimizer_steps_with_cuda_kernels_in_every_layout(results, optim, layout):
    """2 steps with fused AdamW / foreach Adam, the optimizer state round-tripped through
    get/set_optimizer_state_dict after the first: the for-loop kernels' result, and the param groups
    (what a checkpoint holds, by position) those of one process in every layout."""
    for r in results:
        case = r["optimizers"][f"{optim} {layout}"]
        assert case["error"] is None, case["error"]
        assert ("AdamW", True, None) in case["kernels"]  # fused
        assert case["groups"] == case["default_groups"] == r["optimizers"][f"{optim} ddp ep1"]["groups"]
        assert case["state_groups"] == len(case["groups"])
        assert case["adam_params"] > 0 and case["max_diff"] < KERNEL_TOL, case["max_diff"]


@pytest.mark.parametrize("case", PHI_CASES)
def test_fsdp_bf16_computes_phi_from_float32_weights(results, case):
    """φ captured inside the FSDP2 forward (param_dtype bf16, bf16 autocast) is φ computed in float32 from the same
    weights outside it (measured: bitwise), also with the layer gathered by `Parallelized.whole`; from bf16-rounded
    weights it would be off by ~2e-3. With ep = 2, R and the experts were float32 DTensors already."""
    for r in results:
        res = r["phi"][case]
        assert res["error"] is None, res["error"]
        assert res["grads_finite"]
        assert res["forward_err"] <= 1e-7 and res["whole_err"] <= 1e-7, res
        assert res["bf16_err"] > 1e-4  # the check would see bf16 rounding


def test_fsdp_bf16_forward_without_autocast_is_refused_in_one_line(results):
    for r in results:
        message = r["phi"]["mpi ep1"]["without_autocast"]
        assert message is not None and "torch.autocast" in message and "\n" not in message


def test_moe_layer_units_reduce_gradients_as_ddp_does(results):
    """FSDP2 with each MoE layer a unit inside its block's (5 units: root, 2 blocks, 2 MoE layers; float32, so no
    rounding), over two micro-batches: DDP's gradients (gloo sums 2 ranks alike: bitwise, measured)."""
    for r in results:
        assert r["nested"]["units"] == 5
        assert r["nested"]["max_err"] <= 1e-6, r["nested"]
