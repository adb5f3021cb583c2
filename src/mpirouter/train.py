"""Training loop: AdamW, warmup + cosine/WSD, clipping, accumulation, eval, checkpoints, exact resume.

    mpirouter train --preset tiny --router mpi --steps 500 --out runs/tiny-mpi

`train(cfg)` is the whole job; the CLI only builds a `TrainConfig`. Batches are a pure
function of (seed, step) (see `data.get_batch`), so a resumed run sees exactly the batches it
would have seen, and two runs with the same seed but different routers see the same data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import checkpoint as ckpt
from . import provenance, rundir
from .config import check_number, flatten, from_dict, to_dict
from .data import ByteTokenizer, DataConfig, HFTokenizer, TokenData, Tokenizer, get_batch, iter_eval_batches, prepare_data
from .model import ModelConfig, MoELM, preset_config
from .moe import max_violation
from .metrics import MetricsWriter, read_metrics

Precision = Literal["auto", "fp32", "bf16"]
TOKENIZER_FILE = "tokenizer.json"
MAX_LR = 1e3
"""Largest accepted peak learning rate: far beyond any useful value, and well before Adam's step size
(lr / (1 - β1), times the bias correction) overflows float32, which torch reports with a traceback."""


def parse_device(device: str) -> torch.device | None:
    """The torch.device named by `device` (None for "auto"); ValueError for a malformed name."""
    if device == "auto":
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


@dataclass
class OptimConfig:
    """The optimizer: AdamW, Muon, AdamH or MuonH (issue 4; details in `mpirouter.optim`).

    Which parameter gets which update (and the router's treatment) is one rule for all four:
    `mpirouter.optim.groups`. Embeddings, output head and norm gains are always on AdamW.
    """

    name: Literal["adamw", "muon", "adamh", "muonh"] = "adamw"
    """adamw | muon (Muon on hidden matrices, per expert on stacks) | adamh / muonh (Hyperball around Adam / Muon)."""
    lr: float | None = None
    """Peak learning rate of the hidden matrices (adamw: of everything); None: mpirouter.optim.DEFAULT_LR[name].
    For adamh/muonh it is the relative step ‖ΔW‖/‖W‖. A run's config.json records the resolved value."""
    adam_lr: float | None = None
    """muon/adamh/muonh: peak lr of the AdamW-side groups (embeddings, head, norm gains; the router if router=adamw).
    None: DEFAULT_LR["adamw"]. Ignored by adamw."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas (AdamW, and Adam inside AdamH)."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices and embeddings (norm gains never decay; Hyperball-wrapped matrices
    have none, the fixed norm replaces it). Muon applies it as W ← (1 − lr·wd) W, like AdamW."""
    router_weight_decay: float | None = None
    """Weight decay of the router rows R when not Hyperball-wrapped (None: same as weight_decay)."""
    router: Literal["matrix", "rows", "adamw"] = "matrix"
    """Treatment of the router rows R (mpirouter.optim.groups): matrix = like the other hidden matrices
    (the paper's grouping), rows = each row its own 1×D matrix (per expert), adamw = always AdamW."""
    momentum: float = 0.95
    """Muon momentum μ."""
    nesterov: bool = True
    """Muon: Nesterov momentum."""
    ns_steps: int = 5
    """Muon: Newton-Schulz iterations (coefficients: Keller Jordan's 3.4445, -4.7750, 2.0315)."""
    muon_lr_scaling: Literal["match_rms_adamw", "original"] = "match_rms_adamw"
    """Muon's shape-aware lr factor: 0.2·sqrt(max(m, n)) (update RMS of AdamW; reuse AdamW's lr) or
    sqrt(max(1, m/n)) (Keller Jordan; lr ~0.02). Irrelevant under Hyperball (the update norm is fixed)."""
    hyperball_radius: Literal["sqrt_fan_out", "init"] = "sqrt_fan_out"
    """AdamH/MuonH: fixed Frobenius norm of each matrix: sqrt(fan_out) or its norm at initialization."""
    hyperball_radius_mult: float = 1.0
    """AdamH/MuonH: multiplier on that radius."""
    hyperball_update_scale: float = 1.0
    """AdamH/MuonH: update norm before the lr, as a multiple of the radius (1: lr = relative step)."""

    def __post_init__(self) -> None:
        from .optim import LR_SCALINGS, OPTIMIZERS, RADIUS_RULES, ROUTER_MODES

        if self.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.name!r}; available: {', '.join(OPTIMIZERS)}")
        for field_name, value, choices in (("router", self.router, ROUTER_MODES), ("muon_lr_scaling", self.muon_lr_scaling, LR_SCALINGS),
                                           ("hyperball_radius", self.hyperball_radius, RADIUS_RULES)):
            if value not in choices:
                raise ValueError(f"optim.{field_name}={value!r} is not one of {', '.join(choices)}")
        for field_name in ("lr", "adam_lr"):
            value = getattr(self, field_name)
            if value is not None:
                check_number(f"optim.{field_name}", value, gt=0, le=MAX_LR)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must be two numbers, got {list(self.betas)}")
        for i, beta in enumerate(self.betas):
            check_number(f"optim.betas[{i}]", beta, ge=0, lt=1)
        check_number("optim.eps", self.eps, ge=0)
        check_number("optim.weight_decay", self.weight_decay, ge=0)
        if self.router_weight_decay is not None:
            check_number("optim.router_weight_decay", self.router_weight_decay, ge=0)
        check_number("optim.momentum", self.momentum, ge=0, lt=1)
        check_number("optim.ns_steps", self.ns_steps, integer=True, ge=1)
        check_number("optim.hyperball_radius_mult", self.hyperball_radius_mult, gt=0)
        check_number("optim.hyperball_update_scale", self.hyperball_update_scale, gt=0)

    @property
    def peak_lr(self) -> float:
        """The matrices' peak learning rate: lr, or the optimizer's default when lr is None."""
        from .optim import resolve_lrs

        return resolve_lrs(self)[0]


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then cosine / WSD / constant."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    """cosine decay to min_lr_ratio; wsd = warmup-stable-decay (linear decay over the last decay_fraction)."""
    warmup_steps: int = 50
    """Linear warmup from 0 to the peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    decay_fraction: float = 0.2
    """WSD only: share of the steps spent decaying."""

    def __post_init__(self) -> None:
        check_number("schedule.warmup_steps", self.warmup_steps, integer=True, ge=0)
        check_number("schedule.min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_number("schedule.decay_fraction", self.decay_fraction, gt=0, le=1)


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
    preset: str = "tiny"
    """Name of the model preset the model config came from (recorded only)."""
    steps: int = 500
    """Optimizer steps in total."""
    batch_size: int = 16
    """Sequences per micro-batch."""
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
    """auto: bf16 autocast on GPU, float32 on CPU."""
    compile: bool = False
    """Wrap the model in torch.compile."""
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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped without touching the last good checkpoint."""


@dataclass
class TrainResult:
    """What a finished (or interrupted) run returns."""

    run_dir: Path
    step: int
    final_eval: dict | None
    history: list[dict]
    step_time_median_s: float
    tokens_per_s: float


# ----------------------------------------------------------------------------- pure pieces


def lr_multiplier(step: int, total_steps: int, sched: ScheduleConfig) -> float:
    """Learning-rate multiplier in [0, 1] for optimizer step `step` (0-based)."""
    if sched.warmup_steps > 0 and step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return 1.0
    lo = sched.min_lr_ratio
    if sched.kind == "cosine":
        span = max(1, total_steps - sched.warmup_steps)
        t = min(1.0, (step - sched.warmup_steps) / span)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * t))
    decay_steps = max(1, int(round(sched.decay_fraction * total_steps)))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - lo) * min(1.0, (step - decay_start + 1) / decay_steps)


def param_groups(model: MoELM, optim: OptimConfig) -> list[dict]:
    """The parameter groups of `optim.name` (the one rule for every optimizer: `mpirouter.optim.groups`).

    Asserts every trainable parameter lands in exactly one group. Groups: matrices (attention, dense
    FFNs, expert stacks), embeddings (token embedding, head), router (rows R), norms (gains, no decay).
    """
    from .optim import groups, resolve_lrs

    return groups.param_groups(model, optim, *resolve_lrs(optim))


def build_optimizer(model: MoELM, optim: OptimConfig):
    """AdamW (a torch.optim.AdamW), Muon, AdamH or MuonH over `model` (see `mpirouter.optim.build_optimizer`).

    Learning rates left None take the optimizer's defaults; `optim` is not changed. The result has
    `param_groups` whose "lr" the loop sets each step (per-group multipliers are applied inside `step`), `state_dict`, `load_state_dict`.
    """
    from .optim import build_optimizer as build

    return build(model, optim)


def resolve_device(device: str) -> torch.device:
    """auto -> cuda if available else cpu; a named device must exist on this machine."""
    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU for 'auto'/'bf16'; None (float32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def resolve_config(cfg: TrainConfig, vocab_size: int) -> TrainConfig:
    """A new TrainConfig with the values decided at run time filled in: the tokenizer's vocabulary
    size and the optimizer's default learning rates. `cfg` itself is not changed."""
    from .optim import resolve_lrs

    lr, adam_lr = resolve_lrs(cfg.optim)
    optim = dataclasses.replace(cfg.optim, lr=lr, adam_lr=cfg.optim.adam_lr if cfg.optim.name == "adamw" else adam_lr)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size), optim=optim)


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> MoELM:
    """The model of `cfg` with `vocab_size` tokens, initialized from cfg.seed (cfg is not changed)."""
    torch.manual_seed(cfg.seed)
    return MoELM(dataclasses.replace(cfg.model, vocab_size=vocab_size)).to(device)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: MoELM, val_ids: torch.Tensor, cfg: TrainConfig, device: torch.device, max_batches: int | None = None,
             prefix_batches: int | None = None) -> dict:
    """Validation loss/perplexity, MaxVio per layer over the batches seen, alignment per layer.

    max_batches caps the pass at the first batches of the split (`val_scope` "prefix"), else the
    whole split is read ("whole"). prefix_batches additionally reports `val_loss_prefix` and
    `maxvio_prefix` over the first that many batches of the same pass: the capped periodic evals'
    estimator, so a curve can use one estimator at every point (the two differ systematically).
    """
    was_training = model.training
    model.eval()
    amp = autocast_dtype(cfg.precision, device)
    total_loss, total_tokens, batches = 0.0, 0, 0
    loads = prefix = None
    for x, y in iter_eval_batches(val_ids, cfg.eval_batch_size, cfg.context, max_batches):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x, y)
        total_loss += out.lm_loss.item() * y.numel()
        total_tokens += y.numel()
        batches += 1
        counts = torch.stack([s.tokens_per_expert_E for s in out.moe_stats])
        loads = counts if loads is None else loads + counts
        if batches == prefix_batches:
            prefix = (total_loss / total_tokens, loads.clone())
    model.train(was_training)
    whole_batches = -(-((val_ids.numel() - 1) // cfg.context) // cfg.eval_batch_size)
    val_loss = total_loss / max(1, total_tokens)
    maxvio_L = [max_violation(l).item() for l in loads] if loads is not None else []
    result = {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_tokens": total_tokens,
        "val_batches": batches,
        "val_scope": "whole" if batches == whole_batches else "prefix",
        "maxvio_layers": maxvio_L,
        "maxvio": statistics.fmean(maxvio_L) if maxvio_L else 0.0,
        "maxvio_max": max(maxvio_L) if maxvio_L else 0.0,
    }
    if prefix_batches is not None:
        loss_p, loads_p = prefix if prefix is not None else (val_loss, loads)  # the split has no more batches
        result["val_loss_prefix"] = loss_p
        result["maxvio_prefix"] = statistics.fmean(max_violation(l).item() for l in loads_p) if loads_p is not None else 0.0
    result.update(alignment_summary(model))
    return result


@torch.no_grad()
def alignment_summary(model: MoELM) -> dict:
    """Mean |cos| of φ and of raw R with the experts' top singular directions, per layer and overall."""
    phi, raw = [], []
    for moe in model.moe_layers():
        a = moe.alignment()
        phi.append(a["phi"].mean().item())
        raw.append(a["raw"].mean().item())
    return {
        "align_layers": phi,
        "align": statistics.fmean(phi) if phi else 0.0,
        "align_raw_layers": raw,
        "align_raw": statistics.fmean(raw) if raw else 0.0,
    }


def router_cost_ms(model: MoELM, reps: int = 10) -> float:
    """Median ms of computing every layer's router rows φ forward + backward (the MPI overhead).

    Independent of the token count: it streams the expert gate weights and writes their gradient.
    """
    moes = model.moe_layers()
    params = [p for m in moes for p in (m.router.weight, m.w_gate, m.w_up)]
    times = []
    for i in range(reps + 2):
        sync(params[0].device)
        t0 = time.perf_counter()
        loss = sum(m.router.rows(m.w_gate, m.w_up).sum() for m in moes)
        if loss.requires_grad:
            torch.autograd.grad(loss, [p for p in params if p.requires_grad], allow_unused=True)
        sync(params[0].device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the loop


def _train_state(optimizer, step: int) -> dict:
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


RESUMABLE_FIELDS = ("steps", "out_dir", "device", "compile", "progress", "log_every", "eval_every", "eval_batch_size",
                    "ckpt_every", "ckpt_keep", "tensorboard")
"""TrainConfig fields a resumed run may change: the length of the run and how it is run, logged and
saved. Everything else defines the model, data order, optimizer or the periodic evals' estimator
(eval_batches) and must match the checkpoint."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the run finished its step, wrote a checkpoint and stopped."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path, run_dir: Path):
        self.signal_name, self.step, self.checkpoint, self.run_dir = signal_name, step, checkpoint, run_dir
        super().__init__(f"{signal_name} received: stopped after step {step}, checkpoint written to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value


class _StopOnSignal:
    """While training: the first SIGINT/SIGTERM asks the loop to stop after the current step; a second aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "_StopOnSignal":
        self.requested: str | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested} received: finishing this step and writing a checkpoint (send it again to abort now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    """ValueError naming every field that differs from the checkpoint's config and may not change on resume."""
    old, new = flatten(saved), flatten(to_dict(cfg))
    diff = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
            if k.split(".")[0] not in RESUMABLE_FIELDS and old.get(k) != new.get(k)]
    if diff:
        raise ValueError(f"cannot change on resume: {', '.join(diff)}; a resumed run may change only "
                         f"{', '.join(RESUMABLE_FIELDS)} (start a new run to change the rest)")


def _last_good(run_dir: Path) -> str:
    last = ckpt.last_finite_checkpoint(run_dir)
    return f"Last good checkpoint (weights verified finite): {last}" if last else "No checkpoint was written yet."


def train(cfg: TrainConfig, data: TokenData | None = None, resume: bool = False, stop_at: int | None = None,
          force: bool = False, say=print) -> TrainResult:
    """Run (or resume) a training job in `cfg.out_dir`; returns when `cfg.steps` (or `stop_at`) steps are done.

    A new run refuses a folder that already holds a run (force=True moves that run aside first).
    resume=True continues from the newest readable checkpoint in `cfg.out_dir` (the folder given, not
    the one recorded in the checkpoint); `cfg` must match the checkpoint's config except in
    RESUMABLE_FIELDS, and a different `steps` extends or shortens the run (the schedule is recomputed
    for the new total, which `say` reports). `stop_at` ends this call after that many steps (a
    checkpoint is written there), as if the job were preempted; so does SIGINT/SIGTERM
    (TrainingInterrupted). The folder is locked against a second job for the whole call.
    """
    if stop_at is not None:
        check_number("stop_at", stop_at, integer=True, ge=1)
    run_dir = Path(cfg.out_dir)
    device = resolve_device(cfg.device)  # bad input is refused before a run is moved aside or locked
    data = data or prepare_data(cfg.data, cfg.context)
    lock = rundir.lock_existing_run(run_dir) if resume else rundir.claim_new_run(run_dir, force, say)
    try:
        with _StopOnSignal() as stop:
            result = _run(cfg, data, device, resume, stop_at, run_dir, stop, say)
        if stop.requested:  # it arrived during the last step or the final eval: the run is complete and saved
            raise TrainingInterrupted(stop.requested, result.step, ckpt.resolve_checkpoint(run_dir), run_dir)
        return result
    finally:
        lock.release()
        if not resume:
            rundir.forget_unused(run_dir, lock.created)  # a run refused before writing anything leaves nothing


def _run(cfg: TrainConfig, data: TokenData, device: torch.device, resume: bool, stop_at: int | None, run_dir: Path,
         stop: _StopOnSignal, say) -> TrainResult:
    state = None
    if resume:
        for leftover in ckpt.remove_stale_temporaries(run_dir):
            say(f"removed {leftover}, left by an interrupted save")
        unreadable: list[Path] = []
        saved, tensors, state = ckpt.load_checkpoint(run_dir, fallback=True, say=say, skipped=unreadable)
        if stop_at is not None and stop_at <= state["step"]:
            raise ValueError(f"--stop-at {stop_at} is not after the checkpoint's step {state['step']}; nothing to do")
        for moved in ckpt.set_aside(unreadable):
            say(f"set the unreadable checkpoint aside as {moved}")
    cfg = resolve_config(cfg, data.tokenizer.vocab_size)
    start_step = 0
    if state is not None:
        check_resume_config(saved, cfg)
        start_step = state["step"]
        if cfg.steps < start_step or (cfg.steps == start_step and cfg.steps != saved["steps"]):
            raise ValueError(f"--steps {cfg.steps} must be above the checkpoint's step {start_step} (the run needs at least "
                             f"one more step to end with its final evaluation)")
        if cfg.steps != saved["steps"]:
            old_lr = lr_multiplier(start_step, saved["steps"], cfg.schedule) * cfg.optim.lr
            new_lr = lr_multiplier(start_step, cfg.steps, cfg.schedule) * cfg.optim.lr
            change = f"stays {new_lr:.3g}" if old_lr == new_lr else f"moves from {old_lr:.3g} to {new_lr:.3g}"
            say(f"{'extending' if cfg.steps > saved['steps'] else 'shortening'} the run from {saved['steps']} to {cfg.steps} steps: "
                f"the {cfg.schedule.kind} schedule is recomputed for {cfg.steps} steps; the lr at step {start_step} {change}")
        elif start_step == cfg.steps:
            history = read_metrics(run_dir)
            final = next(({k: v for k, v in r.items() if k not in ("event", "step", "tokens")} for r in reversed(history)
                          if r.get("event") == "eval" and r.get("step") == start_step), None)
            timing = next((r for r in reversed(history) if r.get("event") == "timing"), {})
            say(f"{run_dir} already finished its {cfg.steps} steps; nothing to do (pass --steps N to extend it)")
            med = timing.get("step_time_median_s", float("nan"))
            return TrainResult(run_dir, start_step, final, history, med, timing.get("tokens_per_s", 0.0))
    model = build_model(cfg, cfg.model.vocab_size, device)
    optimizer = build_optimizer(model, cfg.optim)
    if state is not None:
        ckpt.load_model_tensors(model, {k: v.to(device) for k, v in tensors.items()})
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    # metrics first: a resume that cannot read them must not have rewritten the config already
    metrics = MetricsWriter(run_dir, tensorboard=cfg.tensorboard, truncate_after_step=start_step if resume else None, fresh=not resume)
    config_dict = to_dict(cfg)
    ckpt.atomic_write_text(run_dir / "config.json", json.dumps(config_dict, indent=2))
    if getattr(data.tokenizer, "path", None):  # keep a trained/loaded tokenizer with the run for `sample`
        shutil.copyfile(data.tokenizer.path, run_dir / TOKENIZER_FILE)
    env = provenance.environment(str(device))
    if not resume:
        counts = model.num_params()
        metrics.write({"event": "start", "step": 0, "params_total": counts["total"], "params_active": counts["active"],
                       "corpus": data.corpus.name, "corpus_sha256": data.corpus.sha256, "tokenizer": data.tokenizer.name,
                       "train_tokens": int(data.train_ids.numel()), "val_tokens": int(data.val_ids.numel()),
                       **env, "device": str(device)})
    else:
        metrics.write({"event": "resume", "step": start_step, **env, "device": str(device)})
    fwd_model = torch.compile(model) if cfg.compile else model
    amp = autocast_dtype(cfg.precision, device)
    end_step = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    step_times: list[float] = []
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.context
    final_eval = None
    bar = _progress(cfg, start_step)

    def save(done: int) -> Path:
        try:
            return ckpt.save_checkpoint(run_dir, done, model, config_dict, _train_state(optimizer, done), keep=cfg.ckpt_keep)
        except ckpt.NonFiniteWeightsError:
            raise NonFiniteLossError(f"weights became non-finite at step {done} (after the optimizer update); stopping "
                                     f"without a checkpoint. {_last_good(run_dir)}") from None

    model.train()
    try:
        for step in range(start_step, end_step):
            lr = cfg.optim.lr * lr_multiplier(step, cfg.steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sync(device)
            t0 = time.perf_counter()
            loss_sum = lm_sum = aux_sum = 0.0
            vio = []
            for micro in range(cfg.grad_accum):
                x, y = get_batch(data.train_ids, cfg.batch_size, cfg.context, cfg.seed, step * cfg.grad_accum + micro)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                    out = fwd_model(x, y)
                loss = out.loss / cfg.grad_accum
                if not torch.isfinite(out.loss):
                    raise NonFiniteLossError(f"loss became {out.loss.item()} at step {step}; stopping. {_last_good(run_dir)}")
                loss.backward()
                loss_sum += out.loss.item()
                lm_sum += out.lm_loss.item()
                aux_sum += out.aux_loss.item()
                vio.append(statistics.fmean(s.max_vio.item() for s in out.moe_stats) if out.moe_stats else 0.0)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            if not torch.isfinite(grad_norm):
                raise NonFiniteLossError(f"gradient norm became {grad_norm.item()} at step {step}; stopping before the update. "
                                         f"{_last_good(run_dir)}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.post_step()
            sync(device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            done = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lm_sum / cfg.grad_accum:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                metrics.write({"event": "train", "step": done, "loss": loss_sum / cfg.grad_accum, "lm_loss": lm_sum / cfg.grad_accum,
                               "aux_loss": aux_sum / cfg.grad_accum, "maxvio_batch": statistics.fmean(vio), "lr": lr,
                               "grad_norm": grad_norm.item(), "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                               "tokens": done * tokens_per_step})
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                last = done == cfg.steps
                final_eval = evaluate(model, data.val_ids, cfg, device, None if last else cfg.eval_batches,
                                      prefix_batches=cfg.eval_batches if last else None)
                metrics.write({"event": "eval", "step": done, "tokens": done * tokens_per_step, **final_eval})
                if bar is not None:
                    bar.set_postfix(loss=f"{lm_sum / cfg.grad_accum:.3f}", val=f"{final_eval['val_loss']:.3f}")
            if (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or done == end_step or stop.requested:
                save(done)
            if stop.requested and done < end_step:
                raise TrainingInterrupted(stop.requested, done, ckpt.resolve_checkpoint(run_dir), run_dir)
        med = statistics.median(step_times) if step_times else float("nan")
        if end_step == cfg.steps and step_times:
            metrics.write({"event": "timing", "step": end_step, "step_time_median_s": med, "tokens_per_s": tokens_per_step / med,
                           "router_ms": router_cost_ms(model), "step_ms": 1000 * med})
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return TrainResult(run_dir, end_step, final_eval, metrics.read(), med, tokens_per_step / med if step_times else 0.0)


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start, desc=f"{cfg.model.moe.router.kind}", dynamic_ncols=True, leave=True)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MoELM, TrainConfig]:
    """A model and its TrainConfig from a checkpoint (a run folder or a checkpoint folder)."""
    saved, tensors, _ = ckpt.load_checkpoint(path, with_state=False)
    cfg = from_dict(TrainConfig, saved)
    model = MoELM(cfg.model)
    ckpt.load_model_tensors(model, tensors)
    return model.to(device).eval(), cfg


def saved_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer.json kept with a run, checkpoint or export (None: the run used bytes)."""
    ckpt_dir = ckpt.resolve_checkpoint(path)
    for folder in (Path(path), ckpt_dir, ckpt_dir.parent.parent):
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    return None


def run_tokenizer(path: str | Path, cfg: TrainConfig) -> Tokenizer:
    """The tokenizer a run was trained with: its saved tokenizer.json, else bytes."""
    saved = saved_tokenizer(path)
    if saved is not None:
        return HFTokenizer(saved)
    if cfg.data.tokenizer != "byte":
        raise FileNotFoundError(f"run at {path} used tokenizer {cfg.data.tokenizer!r} but has no {TOKENIZER_FILE}")
    return ByteTokenizer()
