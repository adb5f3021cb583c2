"""`mpirouter bench --precision bf16`: the float32 ceiling beside the bf16 one, and a training step in fp32 beside bf16."""

from __future__ import annotations

import pytest
import torch

from mpirouter.cli import main
from mpirouter.core import precision
from mpirouter.core.precision import native_bf16_matmul
from mpirouter.experiments import bench, bench_precision
from mpirouter.experiments.bench import SHAPES, run_bench

NATIVE = native_bf16_matmul("cpu")


def test_a_bf16_run_times_both_ceilings_and_the_step_in_both_precisions(capsys):
    res = run_bench(["debug"], reps=1, repeat=2, router_preset="", device="cpu", precision="bf16", ceiling_n=64, hf=False,
                    step_presets=["debug"], torch_bf16_kernels=True)
    layer = res["shapes"]["debug"]
    assert layer["dtype"] == "bf16" and len(layer["ceiling_fp32"]["gflops_repeats"]) == 2
    assert layer["ceiling"]["name"] == "bf16 mm 64^3" + ("" if NATIVE else " (emulated in float32)")
    step = res["step_precision"]["debug"]
    expected = ["fp32", "bf16"] + ([] if NATIVE else ["bf16-torch-kernels"])
    assert list(step["repeats_ms"]) == expected and all(len(ms) == 2 for ms in step["repeats_ms"].values())
    for name in expected[1:]:
        assert step["ratio_to_fp32"][name] == pytest.approx([a / b for a, b in zip(step["repeats_ms"][name], step["repeats_ms"]["fp32"])])
    out = capsys.readouterr().out
    assert "(fp32 mm 64^3: " in out and "Training step of preset 'debug' in fp32 and bf16" in out
    assert ("no bf16 matmul kernels" in out) is not NATIVE and "--step-presets debug --torch-bf16-kernels" in out
    res = run_bench(["debug"], reps=1, repeat=1, router_preset="", device="cpu", precision="bf16", ceiling_n=64, hf=False,
                    step_presets=[])
    assert "step_precision" not in res and "--step-presets '' " in capsys.readouterr().out  # a command that reruns


def test_the_torch_kernels_variant_turns_the_emulation_off(monkeypatch):
    """The variants' steps run with the emulation the trainer picks, and torch's own kernels when asked for."""
    seen = []
    monkeypatch.setattr(bench_precision, "train_step", lambda *a, **k: seen.append((a[4], list(precision._forced))))
    monkeypatch.setattr(bench_precision, "native_bf16_matmul", lambda device: False)
    bench_precision.bench_step_precision("debug", reps=1, repeat=1, torch_kernels=True)
    assert {(amp, tuple(forced)) for amp, forced in seen} == {(None, ()), (torch.bfloat16, ()), (torch.bfloat16, (False,))}


def test_fp32_runs_have_no_precision_table_and_refuse_step_presets(capsys):
    res = run_bench(["debug"], reps=1, repeat=1, router_preset="", device="cpu", precision="fp32", ceiling_n=64, hf=False)
    assert "step_precision" not in res and "ceiling_fp32" not in res["shapes"]["debug"]
    for flags in (dict(step_presets=["debug"]), dict(torch_bf16_kernels=True), dict(step_optimizer="muon")):
        with pytest.raises(ValueError, match="pass --precision bf16"):
            run_bench(["debug"], router_preset="", device="cpu", precision="fp32", **flags)
    assert main(["bench", "--dist", "--torch-bf16-kernels"]) == 2 and "not --dist" in capsys.readouterr().err
    assert main(["bench", "--precision", "bf16", "--step-presets", "huge", "--shapes", "debug"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step preset 'huge' is not one of" in err[0]


def test_the_layer_rows_run_under_the_emulation_where_the_cpu_has_no_kernels(monkeypatch):
    """bench times the bf16 path training takes: each timed run enters core.precision's emulation (forced here)."""
    entered = []
    real = bench.bf16_matmuls
    monkeypatch.setattr(bench, "bf16_matmuls", lambda device, amp, *a: entered.append(amp) or real(device, amp, True))
    r = bench.bench_moe_layer(SHAPES["debug"], reps=1, repeat=1, amp=torch.bfloat16, ceiling_n=64, hf=False)
    assert "sorted/loop" in r["summary"] and r["ceiling_fp32"] is not None
    assert torch.bfloat16 in entered and None in entered  # the float32 ceiling runs without autocast


@pytest.mark.parametrize("optimizer,native,expected", [
    ("adamw", True, ["fp32", "bf16"]), ("adamw", False, ["fp32", "bf16", "bf16-torch-kernels"]),
    ("muon", False, ["fp32", "bf16", "bf16-torch-kernels", "fp32-torch-kernels"])], ids=["native", "emulated", "emulated-muon"])
def test_the_torch_kernel_rows_exist_only_where_there_is_an_emulation_to_compare_with(monkeypatch, optimizer, native, expected):
    monkeypatch.setattr(bench_precision, "native_bf16_matmul", lambda device: native)
    variants = bench_precision.step_variants(torch.device("cpu"), True, optimizer)
    assert list(variants) == expected
    assert variants.get("fp32-torch-kernels", (None, False)) == (None, False)  # a float32 step, Muon's iteration unemulated
