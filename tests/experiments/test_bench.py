"""`mpirouter bench`: the repeat summary, a tiny run on CPU, the CUDA refusal, the HF baseline block; warm-ups,
out-of-memory skips and `--device cuda:N` with monkeypatched functions."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch

from mpirouter.cli import main
from mpirouter.core.moe import MoE, MoEConfig
from mpirouter.core.routers import RouterConfig
from mpirouter.experiments import bench, timing
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
    # torch >= 2.9 runs fp32 grouped_mm on CUDA, through its fallback: say that, not that it cannot
    fp32 = grouped_mm_skip_reason(SHAPES["tiny"], cuda, torch.float32)
    assert "only through its fallback" in fp32 and "float32" in fp32 and "refuses" in fp32 and "only in bf16" not in fp32
    for cap, runs in [((8, 0), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        bf16 = grouped_mm_skip_reason(SHAPES["tiny"], cuda, torch.bfloat16)
        assert (bf16 is None) == runs and (runs or "9.x/10.x" in bf16)
        assert auto_dispatch(SHAPES["tiny"], cuda, torch.bfloat16) == ("sorted/grouped_mm" if runs else "sorted/loop")
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


def test_bench_on_cuda_1_makes_it_the_current_device_first(cuda_set_device_stops):
    with pytest.raises(cuda_set_device_stops.stop):
        run_bench(["debug"], device="cuda:1", printer=lambda *a: None)
    assert cuda_set_device_stops == [torch.device("cuda", 1)]


def counting_variants(monkeypatch, calls: Counter, fail: dict | None = None):
    """build_variants whose variants count their calls; `fail[name]`: a function of the call number that may raise."""
    real = bench.build_variants

    def build(*args, **kwargs):
        variants, skipped, notes = real(*args, **kwargs)

        def counted(name, fn):
            def run(x):
                calls[name] += 1
                if fail and name in fail:
                    fail[name](calls[name])
                return fn(x)
            return run
        return {n: v._replace(fn=counted(n, v.fn)) for n, v in variants.items()}, skipped, notes

    monkeypatch.setattr(bench, "build_variants", build)


def test_every_variant_is_warmed_up_more_than_once_before_it_is_timed(monkeypatch):
    calls = Counter()
    counting_variants(monkeypatch, calls)
    r = bench.bench_moe_layer(SHAPES["debug"], reps=1, repeat=1, ceiling_n=64, hf=False)
    assert set(r["summary"]) >= {"sorted/loop", "naive", "dense"}
    for name in [*r["summary"], "ceiling"]:
        assert timing.WARMUP_MIN <= r["warmup_runs"][name] <= timing.WARMUP_MAX
        assert calls[name] == r["warmup_runs"][name] + 1  # its warm-up runs, then the one timed rep


def test_the_warm_up_stops_once_two_runs_agree(monkeypatch):
    times = iter([9.0, 3.0, 1.0, 0.95, 0.1, 0.1])

    class Timer:  # the StepTimer the warm-up reads: these seconds, one per run
        def __init__(self, device):
            pass

        def read(self):
            return [next(times)]

    monkeypatch.setattr(timing, "StepTimer", Timer)
    assert timing.warm_up(lambda timer: None, torch.device("cpu")) == 4  # 1.0 then 0.95: within 10%
    times = iter([1.0, 2.0] * 5)
    assert timing.warm_up(lambda timer: None, torch.device("cpu")) == timing.WARMUP_MAX  # never settles


OOM_ERRORS = [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")]


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["OutOfMemoryError", "cuBLAS"])
@pytest.mark.parametrize("when", ["warm-up", "timed"])
def test_a_variant_that_runs_out_of_memory_is_skipped_not_fatal(monkeypatch, capsys, error, when):
    calls = Counter()
    timing = {"on": False}
    real_interleaved = bench.time_interleaved
    monkeypatch.setattr(bench, "time_interleaved", lambda *a, **k: timing.update(on=True) or real_interleaved(*a, **k))

    def naive_fails(n):
        if when == "warm-up" or timing["on"]:
            raise error

    counting_variants(monkeypatch, calls, {"naive": naive_fails})
    r = bench.bench_moe_layer(SHAPES["debug"], reps=2, repeat=2, ceiling_n=64, hf=False)
    assert r["skipped"]["naive"].startswith("out of memory: ") and "naive" not in r["summary"]
    assert {"sorted/loop", "dense"} <= set(r["summary"]) and all(len(v) == 2 for v in r["repeats_ms"].values())
    bench.print_layer_table("debug", r, print)
    assert "naive: skipped (out of memory: " in capsys.readouterr().out


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["OutOfMemoryError", "cuBLAS"])
def test_a_baseline_out_of_memory_skips_the_shapes_table(monkeypatch, capsys, error):
    def fails(n):
        raise error

    counting_variants(monkeypatch, Counter(), {"sorted/loop": fails, "ceiling": fails})
    r = bench.bench_moe_layer(SHAPES["debug"], reps=1, repeat=1, ceiling_n=64, hf=False)
    assert r["summary"] == {} and r["ceiling"] is None and r["skipped"]["sorted/loop"].startswith("out of memory: ")
    bench.print_layer_table("debug", r, print)
    out = capsys.readouterr().out
    assert "sorted/loop: skipped (out of memory" in out and "no ceiling" in out and "t/loop" not in out
    json.dumps(r)


def test_a_baseline_that_fails_otherwise_still_raises(monkeypatch):
    def fails(n):
        raise NotImplementedError("no kernel for this")

    counting_variants(monkeypatch, Counter(), {"sorted/loop": fails})
    with pytest.raises(NotImplementedError, match="no kernel"):
        bench.bench_moe_layer(SHAPES["debug"], reps=1, repeat=1, ceiling_n=64, hf=False)


def test_only_the_ceiling_out_of_memory_leaves_the_table_without_percentages(monkeypatch, capsys):
    def fails(n):
        raise OOM_ERRORS[1]

    counting_variants(monkeypatch, Counter(), {"ceiling": fails})
    r = bench.bench_moe_layer(SHAPES["debug"], reps=1, repeat=1, ceiling_n=64, hf=False)
    assert r["ceiling"] is None and r["pct_of_ceiling"] == {} and "sorted/loop" in r["summary"]
    bench.print_layer_table("debug", r, print)
    assert "no ceiling (ceiling skipped)" in capsys.readouterr().out


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["OutOfMemoryError", "cuBLAS"])
def test_the_router_share_halves_its_batch_on_any_out_of_memory_and_skips_at_one(monkeypatch, error):
    batches = []

    def share(preset, reps, repeat, device, amp, batch_size):
        batches.append(batch_size)
        if batch_size > limit:
            raise error
        return {"preset": preset, "batch_size": batch_size}

    monkeypatch.setattr(bench, "bench_router_share", share)
    cuda = torch.device("cuda")
    limit = 4
    r = bench.bench_router_share_fitting("debug", 1, 1, cuda, None)
    assert batches == [16, 8, 4] and r["batch_size"] == 4 and r["batch_halved_from"] == 16
    batches.clear()
    limit = 0
    r = bench.bench_router_share_fitting("debug", 1, 1, cuda, None)
    assert batches == [16, 8, 4, 2, 1] and r["skipped"].startswith("out of memory: ") and "batch size 1" in r["skipped"]
    with pytest.raises(type(error)):  # on CPU running out of memory is not a GPU's limit: it raises
        bench.bench_router_share_fitting("debug", 1, 1, torch.device("cpu"), None)


def test_run_bench_prints_a_skipped_router_share(monkeypatch, capsys):
    skipped = {"preset": "debug", "skipped": "out of memory: CUBLAS_STATUS_ALLOC_FAILED (batch size 1)"}
    monkeypatch.setattr(bench, "bench_router_share_fitting", lambda *a, **k: skipped)
    res = run_bench([], reps=1, repeat=1, router_preset="debug", device="cpu")
    assert "Training step of preset 'debug': skipped (out of memory" in capsys.readouterr().out
    assert res["router"]["skipped"].startswith("out of memory")
