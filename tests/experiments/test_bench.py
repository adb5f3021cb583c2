"""`mpirouter bench`: the repeat summary, a tiny run on CPU, the CUDA refusal, the HF baseline block."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mpirouter.cli import main
from mpirouter.core.moe import MoE, MoEConfig
from mpirouter.core.routers import RouterConfig
from mpirouter.experiments import bench
from mpirouter.experiments.bench import SHAPES, Spread, auto_dispatch, grouped_mm_skip_reason, pct_of_ceiling, run_bench, summarize

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def test_summarize_takes_ratios_repeat_by_repeat():
    # repeat 2 ran on a machine twice as slow for everyone: the times spread, the ratios do not
    times = {"sorted/loop": [10.0, 20.0, 11.0], "naive": [15.0, 30.0, 16.5], "dense": [5.0, 10.0, 6.6]}
    s = summarize(times)
    assert s["sorted/loop"].ms == Spread(11.0, 10.0, 20.0)
    assert s["sorted/loop"].ratio == Spread(1.0, 1.0, 1.0)
    assert s["naive"].ratio.median == pytest.approx(1.5) and s["naive"].ratio.min == pytest.approx(1.5)
    assert s["naive"].ratio.max == pytest.approx(1.5)
    assert s["dense"].ratio.median == pytest.approx(0.5) and s["dense"].ratio.max == pytest.approx(0.6)
    assert s["naive"].ms.pct == pytest.approx(50 * 15 / 16.5)
    assert summarize(times, baseline="naive")["sorted/loop"].ratio.median == pytest.approx(1 / 1.5)
    assert Spread.of([4.0]).pct == 0.0 and Spread.of([1.0, 2.0, 3.0, 100.0]).median == 2.5


def test_summarize_rejects_ragged_or_missing_baseline():
    with pytest.raises(ValueError, match="baseline"):
        summarize({"naive": [1.0]})
    with pytest.raises(ValueError, match="repeats"):
        summarize({"sorted/loop": [1.0, 2.0], "naive": [1.0]})
    with pytest.raises(ValueError):
        Spread.of([])


def test_pct_of_ceiling_uses_each_repeats_own_ceiling():
    # 1 GFLOP in 10 ms = 100 GFLOP/s: 50% of a 200 GFLOP/s ceiling, 25% of a 400 one
    p = pct_of_ceiling([10.0, 10.0], [200e9, 400e9], 1e9)
    assert (p.min, p.max) == pytest.approx((25.0, 50.0))


def test_grouped_mm_skip_reasons_without_a_gpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert grouped_mm_skip_reason(SHAPES["tiny"], cpu, torch.float32) is None
    assert "only in bf16" in grouped_mm_skip_reason(SHAPES["tiny"], cuda, torch.float32)
    assert "16 bytes" in grouped_mm_skip_reason(bench.BenchShape(6, 4, 2, 64, 32), cpu, torch.float32)
    assert auto_dispatch(SHAPES["tiny"], cpu, torch.float32) == auto_dispatch(SHAPES["tiny"], cuda, torch.float32) == "sorted/loop"
    monkeypatch.delattr(torch, "_grouped_mm")
    assert "has no torch._grouped_mm" in grouped_mm_skip_reason(SHAPES["tiny"], cpu, torch.float32)


def test_tiny_run_has_every_variant_and_well_formed_ratios(capsys):
    res = run_bench(["debug"], reps=1, repeat=2, router_preset="debug", device="cpu", ceiling_n=128)
    out = capsys.readouterr().out
    r = res["shapes"]["debug"]
    expected = {"sorted/loop", "naive", "dense"} | ({"sorted/grouped_mm"} if hasattr(torch, "_grouped_mm") else set())
    expected |= {"hf-qwen3"} if HAS_TRANSFORMERS else set()
    assert set(r["summary"]) == expected and "ceiling" not in r["summary"]
    for name, s in r["summary"].items():
        assert len(r["repeats_ms"][name]) == 2 and all(t > 0 for t in r["repeats_ms"][name])
        assert s["ratio"]["min"] <= s["ratio"]["median"] <= s["ratio"]["max"] and s["ratio"]["min"] > 0
        assert f"  {name}" in out
    assert r["summary"]["sorted/loop"]["ratio"] == {"median": 1.0, "min": 1.0, "max": 1.0}
    assert r["auto"] == "sorted/loop" and "sorted/loop = auto" in out
    if HAS_TRANSFORMERS:
        assert "experts_implementation=" in out and " ran " in out
    assert res["router"]["mpi_rows_share"] > 0 and len(res["router"]["repeats"]["step_ms_mpi"]) == 2
    assert "MPI rows" in out and "--repeat 2" in out.splitlines()[0] and "commit" in out.splitlines()[0]
    json.dumps(res)


def test_missing_transformers_and_failing_variants_are_skipped_with_a_line(monkeypatch, capsys):
    def no_transformers(moe):
        raise ImportError("No module named 'transformers'")

    def broken(self, x):
        raise NotImplementedError("no kernel for this")

    monkeypatch.setattr(bench, "hf_qwen3_block", no_transformers)
    monkeypatch.setattr(bench.NaiveMoE, "forward", broken)
    r = bench.bench_moe_layer(SHAPES["debug"], reps=1, repeat=1, ceiling_n=64)
    out = capsys.readouterr().out
    assert "hf-qwen3" in r["skipped"] and "naive" in r["skipped"] and "naive" not in r["ms"]
    bench.print_layer_table("debug", r, print)
    lines = capsys.readouterr().out.splitlines()
    assert sum("hf-qwen3: skipped (transformers" in line for line in lines) == 1
    assert any("naive: skipped (failed: no kernel for this)" in line for line in lines) and out == ""


def test_cuda_without_a_gpu_is_one_line_and_exit_2(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["bench", "--device", "cuda", "--shapes", "debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]
    assert main(["bench", "--repeat", "0"]) == 2 and "--repeat must be >= 1" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_hf_block_holds_our_weights_and_trains():
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=4, top_k=2, hidden=16, aux_loss_coef=0.0, router=RouterConfig(kind="linear")))
    block = bench.hf_qwen3_block(moe)
    x_BSD = torch.randn(2, 5, 32, requires_grad=True)
    out = bench._first(block(x_BSD))
    torch.testing.assert_close(out, moe(x_BSD).out, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    assert x_BSD.grad.shape == x_BSD.shape and all(p.grad is not None for p in block.parameters())
