"""The training job: `train(cfg)` runs or resumes a run in its folder, with evals, checkpoints and exact resume.

    mpirouter train --preset tiny --router mpi --steps 500 --out runs/tiny-mpi

`train(cfg)` is the whole job; the CLI only builds a `TrainConfig`. Batches are a pure
function of (seed, step) (see `data.get_batch`), so a resumed run sees exactly the batches it
would have seen, and two runs with the same seed but different routers see the same data.
The step itself (`step.train_step`) never waits for the device; the loop reads from it only at
log, eval and checkpoint steps (marked "sync point").

Under torchrun the same function is the job of every rank (`parallel`): each rank reads its share
of every global batch, rank 0 logs, writes the metrics and holds the run folder's lock, and all
ranks write each checkpoint together (`sharded_checkpoint`). Whatever only rank 0 can decide (the
run folder, which checkpoint to resume) is decided there and shared, so a refusal stops every rank.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import statistics
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from ..common import provenance
from ..common.config import check_number, to_dict
from ..common.files import atomic_write_text
from ..core.model import MoELM
from ..core.precision import describe_bf16
from ..optim import build_optimizer
from ..parallel.env import DistContext, agree, any_rank, init_distributed, rank_device
from ..parallel.wrap import parallelize
from . import checkpoint as ckpt
from . import rundir
from . import sharded_checkpoint
from .checkpoint import TOKENIZER_FILE
from .config import TrainConfig, check_resume_config, resolve_config
from .data import TokenData, get_batch, prepare_data
from .device import StepTimer, autocast_dtype, deterministic_algorithms, resolve_device, use_device
from .evaluation import evaluate, router_cost_ms
from .metrics import MetricsWriter, read_metrics
from .schedule import lr_multiplier
from .step import NonFiniteWatch, train_step


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


# ----------------------------------------------------------------------------- the loop


def _train_state(optimizer, step: int, sharded: bool = False) -> dict:
    return {
        "step": step,
        **({} if sharded else {"optimizer": optimizer.state_dict()}),  # sharded: in dcp/, by parameter name
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device) -> MoELM:
    """The model of `cfg` with `vocab_size` tokens, initialized from cfg.seed (cfg is not changed)."""
    torch.manual_seed(cfg.seed)
    return MoELM(dataclasses.replace(cfg.model, vocab_size=vocab_size)).to(device)


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM: the run finished its step, wrote a checkpoint and stopped."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path, run_dir: Path):
        self.signal_name, self.step, self.checkpoint, self.run_dir = signal_name, step, checkpoint, run_dir
        super().__init__(f"{signal_name} received: stopped after step {step}, checkpoint written to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + signal.Signals[self.signal_name].value


class _StopOnSignal:
    """While training: the first SIGINT/SIGTERM asks the loop to stop after the current step; a second aborts at once.

    In a torchrun job (`job=True`) a repeated signal does not abort: torchrun forwards the signal
    it gets, and a scheduler may signal the workers as well, so one request can arrive twice; the
    ranks must stop together at an agreed step (torchrun itself kills them 30 s after forwarding).
    Only rank 0 (`speak`) says that it received one.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, job: bool = False, speak: bool = True):
        self.job, self.speak = job, speak

    def __enter__(self) -> "_StopOnSignal":
        self.requested: str | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            if self.job:
                return
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.speak:
            again = "" if self.job else " (send it again to abort now)"
            when = "the next log step" if self.job else "this step"
            print(f"\n{self.requested} received: finishing {when} and writing a checkpoint{again}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


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

    cfg.deterministic: deterministic kernels for the whole call, the previous settings restored after it.
    In one process a cuda:N device becomes the current CUDA device (and stays so), as under torchrun.
    """
    with deterministic_algorithms(cfg.deterministic):  # first: before CUDA does any matmul in this call
        return _train(cfg, data, resume, stop_at, force, say)


def _train(cfg: TrainConfig, data: TokenData | None, resume: bool, stop_at: int | None, force: bool, say) -> TrainResult:
    """`train` inside its determinism setting."""
    if stop_at is not None:
        check_number("stop_at", stop_at, integer=True, ge=1)
    run_dir = Path(os.path.abspath(cfg.out_dir))  # "." still names the same folder once a run there is moved aside
    device = rank_device(resolve_device(cfg.device))  # bad input is refused before a run is moved aside or locked
    ctx = init_distributed(cfg.dist, device)
    if ctx is None:  # CUDA events, syncs and memory statistics act on the current device: make it this one
        use_device(device)
    if ctx is not None and not ctx.is_main:
        say = _silent
    data = data or prepare_data(cfg.data, cfg.context)
    lock, refused = None, None
    if ctx is None or ctx.is_main:  # one lock for the whole job
        try:
            lock = rundir.lock_existing_run(run_dir) if resume else rundir.claim_new_run(run_dir, force, say)
        except Exception as e:
            if ctx is None:
                raise
            refused = e
    refused = agree(ctx, refused)
    if refused is not None:
        if not ctx.is_main:
            refused.shown_by_rank0 = True
        raise refused
    try:
        with _StopOnSignal(job=ctx is not None, speak=ctx is None or ctx.is_main) as stop:
            result = _run(cfg, data, device, ctx, resume, stop_at, run_dir, stop, say)
        requested = stop.requested if ctx is None else agree(ctx, _requested_anywhere(ctx, stop))
        if requested:  # it arrived during the last step or the final eval: the run is complete and saved
            raise TrainingInterrupted(requested, result.step, ckpt.resolve_checkpoint(run_dir), run_dir)
        return result
    except (NonFiniteLossError, TrainingInterrupted) as e:
        if ctx is not None and not ctx.is_main:  # verdicts the ranks agreed on: rank 0 reports them
            e.shown_by_rank0 = True
        raise
    finally:
        if lock is not None:
            lock.release()
            if not resume:
                rundir.forget_unused(run_dir, lock.created)  # a run refused before writing anything leaves nothing


def _silent(*args, **kwargs) -> None:
    """`say` on ranks other than 0: one rank speaks for the job."""


def _requested_anywhere(ctx: DistContext, stop: "_StopOnSignal") -> str | None:
    """The signal any rank received (its name as rank 0 sees it), agreed by all ranks: they stop at the same step."""
    if not any_rank(ctx, stop.requested is not None):
        return None
    return stop.requested or "SIGTERM"


def _run(cfg: TrainConfig, data: TokenData, device: torch.device, ctx: DistContext | None, resume: bool,
         stop_at: int | None, run_dir: Path, stop: _StopOnSignal, say) -> TrainResult:
    main = ctx is None or ctx.is_main
    world = 1 if ctx is None else ctx.world_size
    wanted = cfg
    while True:  # once for a new run; for a resume, until a checkpoint loads whole and finite
        notes: list[str] = []  # said once the checkpoint is known to load
        saved = state = tensors = None
        if resume:
            saved, tensors, state = _resume_point(ctx, run_dir, stop_at, say)
        cfg = resolve_config(wanted, data.tokenizer.vocab_size)
        start_step, sharded = 0, False
        if state is not None:
            check_resume_config(saved, cfg, state.get("world_size", 1), world)
            start_step = state["step"]
            if cfg.steps < start_step or (cfg.steps == start_step and cfg.steps != saved["steps"]):
                raise ValueError(f"--steps {cfg.steps} must be above the checkpoint's step {start_step} (the run needs at least "
                                 f"one more step to end with its final evaluation)")
            if cfg.steps != saved["steps"]:
                old_lr = lr_multiplier(start_step, saved["steps"], cfg.schedule) * cfg.optim.lr
                new_lr = lr_multiplier(start_step, cfg.steps, cfg.schedule) * cfg.optim.lr
                change = f"stays {new_lr:.3g}" if old_lr == new_lr else f"moves from {old_lr:.3g} to {new_lr:.3g}"
                notes.append(f"{'extending' if cfg.steps > saved['steps'] else 'shortening'} the run from {saved['steps']} to "
                             f"{cfg.steps} steps: the {cfg.schedule.kind} schedule is recomputed for {cfg.steps} steps; the lr at "
                             f"step {start_step} {change}")
            elif start_step == cfg.steps:
                history = read_metrics(run_dir)
                final = next(({k: v for k, v in r.items() if k not in ("event", "step", "tokens")} for r in reversed(history)
                              if r.get("event") == "eval" and r.get("step") == start_step), None)
                timing = next((r for r in reversed(history) if r.get("event") == "timing"), {})
                say(f"{run_dir} already finished its {cfg.steps} steps; nothing to do (pass --steps N to extend it)")
                med = timing.get("step_time_median_s", float("nan"))
                return TrainResult(run_dir, start_step, final, history, med, timing.get("tokens_per_s", 0.0))
            sharded = ckpt.is_sharded(state["path"])
            if not sharded and ctx is not None:
                if cfg.dist.strategy != "ddp" or cfg.dist.ep > 1:
                    raise ValueError(f"{state['path']} was written by one process; resume it under torchrun with "
                                     f"dist.strategy=ddp and dist.ep=1 (its optimizer state is not keyed by parameter name)")
                _, tensors, _ = ckpt.load_checkpoint(state["path"], with_state=False)
        model = build_model(cfg, cfg.model.vocab_size, device)
        amp = autocast_dtype(cfg.precision, device)
        par = parallelize(model, ctx, param_dtype=amp if device.type == "cuda" else None) if ctx is not None else None
        optimizer = build_optimizer(model, cfg.optim)  # before loading: AdamH/MuonH take their radii from the initial weights
        problem = _restore(model, optimizer, tensors, state, sharded, ctx, device)
        if problem is None:
            break
        # a checkpoint that passed the file checks but does not load (bytes flipped inside a shard, NaN weights):
        # every rank knows; rank 0 sets it aside and the next pass takes the previous one
        error = None
        if main:
            try:
                moved = ckpt.set_aside([state["path"]])[0]
                say(f"warning: checkpoint {state['path']} could not be loaded ({problem}); set it aside as {moved}, "
                    f"trying the previous checkpoint")
            except (OSError, ValueError) as e:
                error = (errno.EIO, f"checkpoint {state['path']} could not be loaded ({problem}), nor set aside ({e})")
        error = agree(ctx, error)  # nobody looks for the next checkpoint before it is set aside
        if error is not None:
            raise OSError(*error)
    bf16_note = describe_bf16(device, amp)
    for note in notes + ([bf16_note] if bf16_note else []):
        say(note)
    if state is not None:
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    # metrics first: a resume that cannot read them must not have rewritten the config already
    metrics = (MetricsWriter(run_dir, tensorboard=cfg.tensorboard, truncate_after_step=start_step if resume else None,
                             fresh=not resume) if main else None)
    config_dict = to_dict(cfg)
    env = provenance.environment(str(device))
    dist_info = {} if ctx is None else {"world_size": world, "dist_strategy": cfg.dist.strategy, "dist_ep": cfg.dist.ep,
                                        "dist_backend": ctx.backend}
    if main:
        atomic_write_text(run_dir / "config.json", json.dumps(config_dict, indent=2))
        if getattr(data.tokenizer, "path", None):  # keep a trained/loaded tokenizer with the run for `sample`
            shutil.copyfile(data.tokenizer.path, run_dir / TOKENIZER_FILE)
        if not resume:
            counts = model.num_params()  # sharded parameters (DTensors) report their whole shapes
            metrics.write({"event": "start", "step": 0, "params_total": counts["total"], "params_active": counts["active"],
                           "corpus": data.corpus.name, "corpus_sha256": data.corpus.sha256, "tokenizer": data.tokenizer.name,
                           "train_tokens": int(data.train_ids.numel()), "val_tokens": int(data.val_ids.numel()),
                           **env, "device": str(device), **dist_info})
        else:
            metrics.write({"event": "resume", "step": start_step, **env, "device": str(device), **dist_info})
    fwd_model = par.forward if par is not None else model
    fwd_model = torch.compile(fwd_model) if cfg.compile else fwd_model
    end_step = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    step_times: list[float] = []
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.context * world
    shard = (0, 1) if ctx is None else (ctx.rank, world)
    final_eval = None
    bar = _progress(cfg, start_step) if main else None

    def save(done: int) -> Path:
        try:
            if ctx is not None:
                return sharded_checkpoint.save_sharded(run_dir, done, ctx, model, optimizer, config_dict,
                                                       _train_state(optimizer, done, sharded=True), keep=cfg.ckpt_keep)
            return ckpt.save_checkpoint(run_dir, done, model, config_dict, _train_state(optimizer, done), keep=cfg.ckpt_keep)
        except ckpt.NonFiniteWeightsError:
            raise NonFiniteLossError(f"weights became non-finite at step {done} (after the optimizer update); stopping "
                                     f"without a checkpoint. {_last_good(run_dir)}") from None

    model.train()
    timer = StepTimer(device)
    watch = NonFiniteWatch(device)
    values: dict[str, float] = {}  # the last logged step's scalars (for the progress bar)

    def check_finite() -> None:
        problem = watch.check()  # sync point: only where the loop reads from the device anyway
        if ctx is not None:  # every rank stops at the same step (a rank-local NaN makes the global gradient NaN anyway)
            problem = problem if not any_rank(ctx, problem is not None) else (problem or "another rank saw a non-finite value")
        if problem is not None:
            raise NonFiniteLossError(f"{problem}; stopping. {_last_good(run_dir)}")

    try:
        for step in range(start_step, end_step):
            lr = cfg.optim.lr * lr_multiplier(step, cfg.steps, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            timer.start()
            batches = []
            for micro in range(cfg.grad_accum):
                x, y = get_batch(data.train_ids, cfg.batch_size, cfg.context, cfg.seed, step * cfg.grad_accum + micro, shard)
                if device.type == "cuda":  # from pinned memory the copy is queued like a kernel, the host runs on
                    x, y = x.pin_memory(), y.pin_memory()
                batches.append((x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
            out = train_step(model, fwd_model, optimizer, batches, amp, cfg.grad_clip, par)
            watch.update(step, out)
            timer.stop()
            done = step + 1
            if bar is not None:
                bar.update(1)
            logging = done % cfg.log_every == 0 or done == cfg.steps
            evaluating = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
            saving = (cfg.ckpt_interval and done % cfg.ckpt_interval == 0) or done == end_step
            if ctx is None:
                stopping = stop.requested is not None
            else:  # ranks agree on a signal only where they communicate anyway, so they stop at the same step
                stopping = bool(logging or evaluating or saving) and _requested_anywhere(ctx, stop) is not None
            saving = saving or stopping
            if logging or evaluating or saving:
                check_finite()  # before anything is logged, evaluated or saved
            if logging:
                values = out.read(ctx)  # sync point: one host read per logging interval
                times = timer.read()
                step_times.extend(times)
                dt = times[-1]
                if main:
                    metrics.write({"event": "train", "step": done, "loss": values["loss"], "lm_loss": values["lm_loss"],
                                   "aux_loss": values["aux_loss"], "maxvio_batch": values["max_vio"], "lr": lr,
                                   "grad_norm": values["grad_norm"], "step_time_s": dt, "tokens_per_s": tokens_per_step / dt,
                                   "tokens": done * tokens_per_step})
                if bar is not None:
                    bar.set_postfix(loss=f"{values['lm_loss']:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if evaluating:
                last = done == cfg.steps
                # every rank evaluates the same batches: FSDP2 and expert parallelism need all of them in each forward
                final_eval = evaluate(model, data.val_ids, cfg, device, None if last else cfg.eval_batches,
                                      prefix_batches=cfg.eval_batches if last else None,
                                      whole=par.whole if par is not None else None)
                if main:
                    metrics.write({"event": "eval", "step": done, "tokens": done * tokens_per_step, **final_eval})
                if bar is not None:
                    bar.set_postfix(loss=f"{values['lm_loss']:.3f}" if values else "?", val=f"{final_eval['val_loss']:.3f}")
            if ctx is None:
                stopping = stop.requested is not None  # re-read: a signal may have come during the eval
            if saving or stopping:  # (the check above covered this step)
                save(done)
            if stopping and done < end_step:
                raise TrainingInterrupted(stop.requested or "SIGTERM", done, ckpt.resolve_checkpoint(run_dir), run_dir)
        step_times.extend(timer.read())
        med = statistics.median(step_times) if step_times else float("nan")
        if end_step == cfg.steps and step_times:
            # a one-process measurement (sharded weights here), over the tokens of one micro-batch
            router_ms = router_cost_ms(model, cfg.batch_size * cfg.context, amp=amp) if ctx is None else None
            if main:
                metrics.write({"event": "timing", "step": end_step, "step_time_median_s": med,
                               "tokens_per_s": tokens_per_step / med, "router_ms": router_ms, "step_ms": 1000 * med})
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    history = metrics.read() if metrics is not None else []
    return TrainResult(run_dir, end_step, final_eval, history, med, tokens_per_step / med if step_times else 0.0)


def _find_checkpoint(run_dir: Path, stop_at: int | None, say, weights: bool) -> tuple[dict, dict | None, dict]:
    """(config, weights or None, train state) of the newest readable checkpoint; `state["path"]` is its folder.

    weights=False: the files are checked (a sharded checkpoint's shards against its metadata, a
    safetensors header) but the weights are read later, by each rank into its own model.
    """
    for leftover in ckpt.remove_stale_temporaries(run_dir):
        say(f"removed {leftover}, left by an interrupted save")
    unreadable: list[Path] = []
    saved, tensors, state = ckpt.load_checkpoint(run_dir, fallback=True, say=say, skipped=unreadable, weights=weights)
    if stop_at is not None and stop_at <= state["step"]:
        raise ValueError(f"--stop-at {stop_at} is not after the checkpoint's step {state['step']}; nothing to do")
    for moved in ckpt.set_aside(unreadable):
        say(f"set the unreadable checkpoint aside as {moved}")
    return saved, tensors, state


def _resume_point(ctx: DistContext | None, run_dir: Path, stop_at: int | None, say) -> tuple[dict, dict | None, dict]:
    """(config, weights or None, train state) of the checkpoint to resume: rank 0 picks it (falling back past
    unreadable ones) and every rank gets its choice; each rank reads the sharded weights itself."""
    found = None
    if ctx is None or ctx.is_main:
        try:
            found = _find_checkpoint(run_dir, stop_at, say, weights=False)
        except Exception as e:
            if ctx is None:
                raise
            found = e
    if ctx is not None:  # the others get the config and state
        found = agree(ctx, found if isinstance(found, Exception) or not ctx.is_main else (found[0], None, found[2]))
    if isinstance(found, Exception):
        raise found
    return found


def _restore(model: MoELM, optimizer, tensors: dict | None, state: dict | None, sharded: bool, ctx: DistContext | None,
             device: torch.device) -> str | None:
    """Load a checkpoint's weights and optimizer state into the fresh `model` and `optimizer`.

    Returns None when it loaded and every weight and optimizer value is finite, else what went wrong
    (on every rank: the ranks' reports are gathered, so all of them fall back together). A sharded
    checkpoint's files are first checked against their sha256, each rank its share, and only then loaded:
    the load is collective, so every rank must go into it or none.
    """
    def attempt(work) -> str | None:
        problem = failure = None
        try:
            problem = work()
        # DCP (its CheckpointException is a BaseException) and pickle raise many types for a damaged shard;
        # a MemoryError is caught too, so that the other ranks hear of it rather than wait
        except (Exception, CheckpointException) as e:
            if ctx is None and not ckpt.is_damage(e):
                raise
            if ckpt.is_damage(e):
                problem = ckpt.load_error_text(e)
            else:
                failure = ckpt.load_error_text(e)
        if ctx is None:
            return problem
        reports = [None] * ctx.world_size
        dist.all_gather_object(reports, (problem, failure))
        for r, (_, failed) in enumerate(reports):
            if failed:  # this machine, not the checkpoint: every rank stops with the same line, nothing is set aside
                raise OSError(errno.EIO, f"rank {r} could not load the checkpoint {state['path']}: {failed}")
        return next((f"rank {r}: {p}" for r, (p, _) in enumerate(reports) if p), None)

    def load() -> str | None:
        if tensors is not None and not sharded:
            ckpt.load_model_tensors(model, {k: v.to(device) for k, v in tensors.items()})
        if state is None:
            return None
        if sharded:
            sharded_checkpoint.load_sharded(state["path"], model, optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        local = [sharded_checkpoint.local_tensor(t) for t in [*model.parameters(), *ckpt.nested_tensors(optimizer.state_dict())]]
        return None if ckpt.all_finite(t.detach() for t in local) else "its weights or optimizer state are not all finite"

    if state is not None and sharded:
        part = (0, 1) if ctx is None else (ctx.rank, ctx.world_size)
        problem = attempt(lambda: ckpt.verify_checksums(state["path"], part))
        if problem is not None:
            return problem
    return attempt(load)


def _progress(cfg: TrainConfig, start: int):
    if not cfg.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=cfg.steps, initial=start, desc=f"{cfg.model.moe.router.kind}", dynamic_ncols=True, leave=True)


