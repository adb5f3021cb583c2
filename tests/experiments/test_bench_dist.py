"""`mpirouter bench --dist`: its variants, one worker in this process, and its refusals."""

import pytest

from mpirouter.cli import main
from mpirouter.experiments.bench_dist import SINGLE, variants, worker


def test_variants_compare_one_process_with_each_strategy():
    assert [v[0] for v in variants(2, "cpu")] == [SINGLE, "ddp x 2", "fsdp x 2"]
    assert [v[0] for v in variants(1, "cuda")] == [SINGLE, "fsdp x 1"]


def test_the_one_process_worker_times_the_trainers_step():
    r = worker("debug", batch_size=2, steps=1, warmup=1, device_name="cpu", strategy=None)
    assert r["step_ms"] > 0 and r["sync_share"] == 0.0 and r["world_size"] == 1
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["step_ms"] / 1000))


@pytest.mark.parametrize("argv,match", [
    (["--batch-size", "3"], "must be divisible by --nproc 2"),
    (["--preset", "huge"], "is not one of"),
    (["--steps", "0"], "--steps must be >= 1"),
], ids=["uneven-batch", "unknown-preset", "no-steps"])
def test_bad_input_is_one_line_and_exit_2(argv, match, capsys):
    assert main(["bench", "--dist", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
