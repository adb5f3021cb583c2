"""torchtitan's own trainer (`torchtitan.train`) on CPU/gloo with MPI routers, a tiny qwen3-MoE, in three layouts.

    .venv/bin/python -m pytest -q tests/integrations/titan/test_titan_trainer.py --durations=0

The launcher (cpu_train.py) and its CPU shims (cpu_shims.py) are test-only. Each run trains 4 steps on local
assets (tokenizer and text built here; nothing is downloaded).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed (pip install 'mpirouter[titan]')")

from assets import make_assets  # noqa: E402

HARNESS = Path(__file__).parent

STEPS = 4
# (nproc, extra torchtitan flags) per layout
LAYOUTS = {
    "1proc": (1, []),
    "fsdp2": (2, ["--parallelism.data_parallel_shard_degree", "2"]),
    "fsdp2-ep2": (2, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.expert_parallel_degree", "2"]),
}
# torchtitan's metrics line (components/metrics.py MetricsProcessor.log), one per rank and step
# the MPI routers and their metrics, switched on through torchtitan's --override.imports
MPI_FLAGS = ["--override.imports", "mpirouter.integrations.torchtitan.convert.mpi_moe",
             'mpirouter.integrations.torchtitan.metrics.router_metrics={"alignment_every": 2}']
ROUTER_LINE = re.compile(r"step:\s*(\d+)\s+router: maxvio mean (\S+) max (\S+)(?:\s+alignment phi (\S+) R (\S+))?")
STEP_LINE = re.compile(r"step:\s*(\d+)\s+loss:\s*(\S+)\s+grad_norm:\s*(\S+)")
MESH_LINE = re.compile(r"Building device mesh with parallelism: (.*)")
ACTIVE_DIMS = re.compile(r"Successfully created meshes with active dimensions: \[(.*)\]")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(hf_assets_path, dataset_path, env): the local tokenizer and dataset, and an offline HF env."""
    root = tmp_path_factory.mktemp("titan_assets")
    hf_assets, dataset = make_assets(root)
    # keep the datasets library's cache out of $HOME, and make any download attempt fail
    env = {"HF_DATASETS_CACHE": str(root / "hf_cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return hf_assets, dataset, env


def train(torchrun, assets, dump: Path, nproc: int, *flags: str) -> str:
    """Launch the harness; returns the combined output of every rank (fails the test on a non-zero exit)."""
    hf_assets, dataset, env = assets
    result = torchrun(
        HARNESS / "cpu_train.py", nproc,
        "--module", "titan_tiny", "--config", "tiny_qwen3_moe",
        "--hf_assets_path", hf_assets, "--dataloader.dataset_path", dataset, "--dump_folder", dump,
        "--training.steps", str(STEPS), *MPI_FLAGS, *flags,
        timeout=150, env=env,
    )
    return result.stdout


def losses_by_step(out: str, nproc: int) -> dict[int, float]:
    """The logged loss of each step, checked to be finite and the same on every rank."""
    by_step: dict[int, list[str]] = {}
    for step, loss, grad_norm in STEP_LINE.findall(out):
        assert math.isfinite(float(grad_norm)), f"step {step}: grad_norm {grad_norm}"
        by_step.setdefault(int(step), []).append(loss)
    for step, losses in by_step.items():
        assert len(losses) == nproc, f"step {step} logged by {len(losses)} ranks, not {nproc}"
        # the logged loss is the global average (all-reduced), so the ranks must agree exactly
        assert len(set(losses)) == 1, f"step {step}: ranks disagree: {losses}"
        assert math.isfinite(float(losses[0])), f"step {step}: loss {losses[0]}"
    return {step: float(losses[0]) for step, losses in sorted(by_step.items())}


def router_metrics(out: str, nproc: int) -> dict[int, tuple[float, ...]]:
    """Per step: (maxvio mean, maxvio max[, alignment of φ, alignment of R]), the same on every rank."""
    by_step: dict[int, set[tuple]] = {}
    for step, *values in ROUTER_LINE.findall(out):
        by_step.setdefault(int(step), set()).add(tuple(float(v) for v in values if v))
    assert all(len(v) == 1 for v in by_step.values()), f"ranks disagree on router metrics: {by_step}"
    return {step: next(iter(v)) for step, v in sorted(by_step.items())}


def mesh_degrees(out: str) -> dict[str, int]:
    """The parallel degrees torchtitan logged when it built the device mesh, e.g. {"dp_shard": 2, "ep": 2}."""
    match = MESH_LINE.search(out)
    assert match, "no device-mesh line in the output"
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", match.group(1))}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_titan_trains_tiny_moe(torchrun, assets, tmp_path, layout):
    nproc, flags = LAYOUTS[layout]
    out = train(torchrun, assets, tmp_path / "dump", nproc, *flags)

    losses = losses_by_step(out, nproc)
    assert list(losses) == list(range(1, STEPS + 1)), f"steps logged: {list(losses)}"
    # random init over a 256-token vocabulary starts near ln(256) = 5.55
    assert 4.5 < losses[1] < 6.5, losses
    assert out.count("Training completed") == nproc
    # MPI routers in every MoE layer, and their metrics at every step (alignment every 2 steps)
    assert out.count("MoE.Config -> MPIMoE.Config") == 2 * nproc
    metrics = router_metrics(out, nproc)
    assert list(metrics) == list(range(1, STEPS + 1))
    for step, values in metrics.items():
        assert len(values) == (4 if step % 2 == 0 else 2), (step, values)
        assert 0 <= values[0] <= values[1] and all(math.isfinite(v) for v in values)
        assert all(0 <= v <= 1 for v in values[2:])

    degrees = mesh_degrees(out)
    active = ACTIVE_DIMS.search(out)
    assert active, "no active-mesh-dimensions line in the output"
    active_dims = re.findall(r"'(\w+)'", active.group(1))
    if layout == "1proc":
        assert degrees["dp_shard"] == 1 and degrees["ep"] == 1 and active_dims == []
    else:
        assert degrees["dp_shard"] == 2 and "fsdp" in active_dims
        ep = 2 if layout == "fsdp2-ep2" else 1
        assert degrees["ep"] == ep and ("ep" in active_dims) == (ep > 1), (degrees, active_dims)


@pytest.mark.slow
def test_titan_checkpoint_resume_under_ep(torchrun, assets, tmp_path):
    """Checkpoints saved under FSDP+EP restore the run exactly: resuming at step 2 repeats steps 3-4."""
    nproc, flags = LAYOUTS["fsdp2-ep2"]
    ckpt_flags = [*flags, "--checkpoint.enable", "--checkpoint.interval", "2"]
    first = tmp_path / "first"
    losses = losses_by_step(train(torchrun, assets, first, nproc, *ckpt_flags), nproc)
    saved = sorted(p.name for p in (first / "checkpoint").iterdir())
    assert saved == ["step-2", "step-4"], saved

    # a new run whose checkpoint folder holds only step 2: torchtitan loads the latest one there
    resumed = tmp_path / "resumed"
    shutil.copytree(first / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    out = train(torchrun, assets, resumed, nproc, *ckpt_flags)
    assert re.search(r"Loading the checkpoint from \S*step-2\b", out), "the resumed run did not load step 2"
    assert losses_by_step(out, nproc) == {3: losses[3], 4: losses[4]}
