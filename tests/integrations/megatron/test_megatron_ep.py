"""Expert parallelism 2 (two gloo processes, alltoall dispatcher) equals one process over the same global batch:
the MoE output and the gradients of R and of every expert's fc1 and fc2 (worker dist_ep.py); and a tiny GPTModel
trained by two ranks stays in step (worker dist_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron", reason="the megatron extra is not installed (pip install 'mpirouter[megatron]')")

WORKER = Path(__file__).parent / "dist_ep.py"


def relative_errors(a: dict, b: dict) -> dict[str, float]:
    return {k: ((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a}


@pytest.fixture(scope="module")
def runs(torchrun, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ep")
    out = {}
    for name, nproc, extra in (("one", 1, ()), ("ep2", 2, ()), ("pitfall", 2, ("pitfall",))):
        torchrun(WORKER, nproc, folder / f"{name}.pt", *extra, timeout=240)
        out[name] = torch.load(folder / f"{name}.pt")
    return out


def test_ep2_equals_one_process(runs):
    errors = relative_errors(runs["one"], runs["ep2"])
    assert errors["out"] < 1e-6 and errors["linear_fc2"] < 1e-6, errors
    assert errors["grad_R"] < 1e-5 and errors["linear_fc1"] < 1e-5, errors  # float32 sums in another order


def test_keeping_only_the_local_gradient_of_the_gathered_rows_is_caught(runs):
    """Forward is the same; the router path's gradient of the other rank's tokens is missing from R and fc1."""
    errors = relative_errors(runs["one"], runs["pitfall"])
    assert errors["out"] < 1e-6
    assert errors["grad_R"] > 1e-2 and errors["linear_fc1"] > 1e-3, errors


@pytest.fixture(scope="module")
def trained(torchrun, tmp_path_factory):
    folder = tmp_path_factory.mktemp("train")
    for nproc in (1, 2):
        torchrun(Path(__file__).parent / "dist_train.py", nproc, folder / f"train{nproc}.pt", timeout=240)
    return {n: torch.load(folder / f"train{n}.pt") for n in (1, 2)}


def test_dp2_ep2_reduces_the_gradients_of_one_process_over_the_global_batch(trained):
    """dist_train.py's first step through Megatron's DDP and finalize_model_grads: R's and every expert's fc1/fc2
    reduced gradients (main_grad) with 2 ranks equal 1 rank's over the same 8 sequences (Megatron's scaling of dense
    and expert gradients included)."""
    errors = relative_errors({k: v for k, v in trained[1].items() if k.startswith("grad_")},
                             {k: v for k, v in trained[2].items() if k.startswith("grad_")})
    assert max(errors.values()) < 1e-5, errors


def test_two_ranks_train_a_gpt_and_stay_in_step(trained):
    """The logged loss falls and is the same on both ranks, and so are the expert biases (updated from the all-reduced
    counts) and every replicated weight."""
    losses, biases, replicated = trained[2]["losses"], trained[2]["biases"], trained[2]["replicated"]
    assert torch.isfinite(losses).all() and losses[0, -5:].mean() < losses[0, 0] - 1.0, losses[0]
    assert torch.equal(losses[0], losses[1])
    assert torch.equal(biases[0], biases[1]) and not torch.equal(biases[0, 0], biases[0, -1])
    assert torch.equal(replicated[0], replicated[1])
