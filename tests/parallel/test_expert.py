"""Expert parallelism and the global balance loss on 2 CPU ranks (gloo) against a 1-process float64 reference.

One torchrun launch (dist_expert.py) runs every case; the tests below read its results. Tolerances:
the expert path is float64 end to end (agrees to ~1e-16); the router math runs in float32 by design
(φ, logits, softmax and the balance/z losses, `routers.Router.rows`), so what flows through it (the
loss, R's gradient, and G's under MPI/power routers) agrees to float32 rounding, ~1e-7 measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("dist_expert.py")
FLOAT32_PATH = 1e-5
"""Relative tolerance of what passes through the float32 router math (worst measured: 8e-7)."""
FLOAT64_PATH = 1e-12
"""Relative tolerance of the float64 expert path (worst measured: 2e-16)."""
WRONG = 1e-2
"""A result that must be wrong is off by at least this (measured: 0.07 to 0.9)."""

_launch: dict[str, dict] = {}


@pytest.fixture
def results(torchrun, tmp_path_factory) -> dict:
    """The launch's results, computed once for the module (the torchrun fixture is per test)."""
    if not _launch:
        out = tmp_path_factory.mktemp("expert")
        torchrun(SCRIPT, 2, out, timeout=180)
        _launch.update(json.loads((out / "results.json").read_text()))
    return _launch


def tolerance(key: str) -> float:
    """float32 where the router math is on the path: the loss, R, G (φ reads it), the rows, alignment, and the
    whole model's dense weights (its cross-entropy is float32 too)."""
    return FLOAT32_PATH if any(s in key for s in ("loss", "router.weight", "w_gate", "rows", "alignment", "dense")) else FLOAT64_PATH


CASES = ["ep2 linear", "ep2 mpi", "ep2 power", "ep2 retract", "ep2 mpi-inplace", "dp2 mpi", "ep2 linear all to rank 0",
         "rows per step", "rank without tokens", "whole model"]


@pytest.mark.parametrize("case", CASES)
def test_parallel_layer_matches_one_process(results, case):
    """Outputs, loss (mean over ranks), gradients of x, R and the experts after reduce_expert_grads, the gathered
    rows, a forward with given rows, alignment, and the weights after an SGD step + post_step."""
    errors = {k.partition("/")[2]: v for k, v in results["errors"].items() if k.partition("/")[0] == case}
    assert {f"grad {p}" for p in ("router.weight", "w_gate", "w_up", "w_down")} <= set(errors), sorted(errors)
    bad = {k: v for k, v in errors.items() if not v <= tolerance(k)}
    assert not bad, f"{case}: relative errors above tolerance: {bad}"


def test_full_tensor_rows_would_give_wrong_gate_gradients(results):
    """φ from `full_tensor()` of the stacks: same rows, but G's gradient loses the other rank's tokens."""
    e = results["errors"]
    assert e["full_tensor pitfall/rows (wrong path)"] <= FLOAT64_PATH
    assert e["full_tensor pitfall/grad w_gate (wrong path)"] > WRONG
    assert e["ep2 mpi/grad w_gate"] <= FLOAT32_PATH


def test_global_balance_loss_is_the_one_process_batch_loss_and_per_rank_batch_scope_is_not(results):
    e = results["errors"]
    for what in ("loss", "grad router.weight", "grad w_gate"):
        assert e[f"balance global/{what}"] <= FLOAT32_PATH, what
        assert e[f"balance batch/{what}"] > WRONG, what


def test_empty_splits_and_a_rank_without_tokens(results):
    facts = results["facts"]
    assert facts["all to rank 0 counts"] == [10, 10, 0, 0]  # rank 1's experts receive nothing
    assert facts["empty rank stats are zero"]


def test_whole_model_shards_only_its_moe_layers(results):
    names = [f"blocks.{i}.ffn.{p}" for i in (1, 2) for p in ("router.weight", "w_down", "w_gate", "w_up")]
    assert results["facts"]["whole model expert parameters"] == names


def test_expert_count_not_divisible_by_ep_is_refused(results):
    facts = results["facts"]
    assert facts["indivisible message"] == "num_experts=3 is not divisible by the expert-parallel degree ep=2"
    assert facts["indivisible left unsharded"]
