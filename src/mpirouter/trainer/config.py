"""`TrainConfig`, the whole training run's configuration, and the values resolved from it at run time.

    cfg = TrainConfig(model=preset_config("tiny"), steps=600, out_dir="runs/tiny-mpi")

The model, data, optimizer and schedule each have their own config (`core.model.ModelConfig`,
`trainer.data.DataConfig`, `optim.OptimConfig`, `trainer.schedule.ScheduleConfig`); this one
nests them and adds how the run is stepped, evaluated, logged and saved.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..common.config import check_number, flatten, from_dict, show_value, to_dict
from ..core.model import ModelConfig, preset_config
from ..optim import OptimConfig, resolve_lrs
from ..parallel.config import DistConfig
from .data import DataConfig
from .schedule import ScheduleConfig

Precision = Literal["auto", "fp32", "bf16"]


def parse_device(device: str) -> torch.device | None:
    """The torch.device named by `device` (None for "auto"); ValueError for a malformed name."""
    if device == "auto":
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


@dataclass
class TrainConfig:
    """A whole training run."""

    model: ModelConfig = field(default_factory=lambda: preset_config("tiny"))
    """Architecture (vocab_size is taken from the tokenizer)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Data and expert parallelism when launched by torchrun (ignored in one process)."""
    preset: str = "tiny"
    """Name of the model preset the model config came from (recorded only)."""
    steps: int = 500
    """Optimizer steps in total."""
    batch_size: int = 16
    """Sequences per micro-batch on each process: a torchrun job of N processes steps on N * batch_size * grad_accum sequences."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int | None = None
    """Training sequence length (default: model.max_seq_len)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    seed: int = 0
    """Seeds the initial weights and the data order."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1, ..."""
    precision: Precision = "auto"
    """auto: bf16 autocast on GPU, float32 on CPU (`device.autocast_dtype` says why). bf16 on a CPU without bf16
    kernels emulates its matmuls in float32 (`core.precision`)."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    deterministic: bool = False
    """Deterministic kernels for the run (`torch.use_deterministic_algorithms(True)`, CUBLAS_WORKSPACE_CONFIG,
    cudnn.deterministic: `device.deterministic_algorithms`); the previous settings are restored when train() returns.
    Without it a CUDA run is not reproducible bit for bit: the backward of index_select and embedding, and flash
    attention's backward, add with atomics in whatever order the threads arrive, so two runs (or a run and its
    resume) differ in the last bits and drift apart. Costs speed; on CPU the kernels are deterministic already.
    An op with no deterministic CUDA kernel then stops the run with torch's error naming it."""
    eval_every: int = 100
    """Validate every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int | None = None
    """Cap on validation batches for periodic evals (None: whole set); the final eval always uses the whole set."""
    eval_batch_size: int = 32
    """Sequences per validation batch."""
    log_every: int = 10
    """Write a training record every this many steps."""
    ckpt_every: int | None = None
    """Checkpoint every this many steps; None: at every eval (every max(1, steps // 10) steps when
    eval_every is 0); 0: only at the end. SIGINT/SIGTERM always finish the step and checkpoint."""
    ckpt_keep: int = 2
    """How many checkpoints to keep (the newest)."""
    out_dir: str = "runs/default"
    """Run folder: config, metrics.jsonl, checkpoints."""
    tensorboard: bool = False
    """Also write TensorBoard events (if tensorboard is installed)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every", "ckpt_keep"):
            check_number(name, getattr(self, name), integer=True, ge=1)
        check_number("eval_every", self.eval_every, integer=True, ge=0)
        for name in ("eval_batches", "seq_len"):
            check_number(name, getattr(self, name), integer=True, ge=1, optional=True)
        check_number("ckpt_every", self.ckpt_every, integer=True, ge=0, optional=True)
        check_number("seed", self.seed, integer=True, ge=0, le=2**63 - 1)
        check_number("grad_clip", self.grad_clip, ge=0)
        if self.seq_len is not None and self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} must be in [1, model.max_seq_len={self.model.max_seq_len}]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"deterministic must be a boolean (true or false), got {show_value(self.deterministic)}")
        if not self.out_dir:
            raise ValueError("out_dir must not be empty")
        parse_device(self.device)

    @property
    def ckpt_interval(self) -> int:
        """Steps between periodic checkpoints (0: only at the end)."""
        if self.ckpt_every is not None:
            return self.ckpt_every
        return self.eval_every or max(1, self.steps // 10)

    @property
    def context(self) -> int:
        return self.seq_len or self.model.max_seq_len


def resolve_config(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """A new TrainConfig with the values decided at run time filled in: the tokenizer's vocabulary
    size and the optimizer's default learning rates. `cfg` itself is not changed."""
    lr, adam_lr = resolve_lrs(cfg.optim)
    optim = dataclasses.replace(cfg.optim, lr=lr, adam_lr=cfg.optim.adam_lr if cfg.optim.name == "adamw" else adam_lr)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size), optim=optim)


RESUMABLE_FIELDS = ("steps", "out_dir", "device", "compile", "deterministic", "progress", "log_every", "eval_every",
                    "eval_batch_size", "ckpt_every", "ckpt_keep", "tensorboard", "dist")
"""TrainConfig fields a resumed run may change: the length of the run and how it is run, logged and
saved (also how it is spread over processes). Everything else defines the model, data order,
optimizer or the periodic evals' estimator (eval_batches) and must match the checkpoint; the
per-process batch_size may change with the number of processes if the global batch stays."""


def with_defaults(saved: dict) -> dict:
    """A saved config.json with the fields it predates filled in with their defaults (which keep the behaviour
    of the code that wrote it: new fields default to off), so runs from older versions still resume."""
    try:
        return to_dict(from_dict(TrainConfig, saved))
    except (TypeError, ValueError):  # not a config this version can read: compared as it is
        return saved


def check_resume_config(saved: dict, cfg: TrainConfig, saved_world: int = 1, world: int = 1) -> None:
    """ValueError naming every field that differs from the checkpoint's config and may not change on resume.

    `saved_world`/`world`: processes of the checkpointed job and of this one; the global batch
    (processes x batch_size) must match, the per-process batch_size may differ.
    """
    old, new = flatten(with_defaults(saved)), flatten(to_dict(cfg))
    if saved_world != world:
        old_global, new_global = old.get("batch_size", 0) * saved_world, cfg.batch_size * world
        if old_global % world:
            fits = [n for n in range(1, old_global + 1) if old_global % n == 0]
            raise ValueError(f"cannot resume on {world} processes: the checkpoint's global batch of {old_global} sequences "
                             f"({saved_world} process(es) x batch_size {old.get('batch_size')}) is not divisible by {world}; "
                             f"resume with a number of processes that divides {old_global} ({', '.join(map(str, fits[:8]))}"
                             f"{', ...' if len(fits) > 8 else ''})")
        if old_global != new_global:
            raise ValueError(f"cannot change the global batch on resume: the checkpoint's {saved_world} process(es) x "
                             f"batch_size {old.get('batch_size')} = {old_global} sequences, this job's {world} x "
                             f"{cfg.batch_size} = {new_global}; set batch_size={old_global // world}")
        old.pop("batch_size", None), new.pop("batch_size", None)
    diff = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
            if k.split(".")[0] not in RESUMABLE_FIELDS and old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"cannot change on resume: {', '.join(diff)}; a resumed run may change only "
                         f"{', '.join(RESUMABLE_FIELDS)} (start a new run to change the rest)")
