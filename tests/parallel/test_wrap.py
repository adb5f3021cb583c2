"""`parallelize`: step-0 gradients under DDP, FSDP2 and FSDP2 + EP=2 (2 ranks) against one process over the global batch."""

from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("dist_wrap.py")


@pytest.fixture(scope="module")
def grads(torchrun, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("wrap")
    torchrun(SCRIPT, 2, out)
    return torch.load(out / "grads.pt", weights_only=False)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp-ep2", "ddp+features", "fsdp+features", "fsdp-ep2+features"])
def test_gradients_match_one_process_over_the_global_batch(grads, strategy):
    """Relative error of every parameter's gradient (the global aux loss included): ~1e-6 expected, 1e-5 allowed.
    "+features" (sigmoid scores, aux loss + expert bias, a shared expert) also compares each layer's expert bias
    after the post-step update, which must use the load of the global batch: exactly equal."""
    one = grads["one+features" if strategy.endswith("+features") else "one"]
    assert set(grads[strategy]) == set(one)
    errors = {n: ((grads[strategy][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in one.items()}
    assert max(errors.values()) < 1e-5, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    biases = [n for n in one if n.startswith("bias")]
    assert len(biases) == (2 if strategy.endswith("+features") else 0)
    assert all(torch.equal(grads[strategy][n], one[n]) for n in biases)
    assert all(one[n].abs().sum() > 0 for n in biases)


def test_ddp_and_fsdp_gradients_are_bitwise_equal(grads):
    assert all(torch.equal(grads["ddp"][n], grads["fsdp"][n]) for n in grads["one"])
