"""The `mpirouter` command line: train, sample, export, inspect, bench, demo, compare, trajectory, ladder.

    mpirouter train --preset tiny --router mpi --steps 500 --out runs/tiny-mpi
    mpirouter sample runs/tiny-mpi --prompt "ROMEO." --tokens 200
    mpirouter export runs/tiny-mpi --out runs/tiny-mpi-export
    mpirouter inspect runs/tiny-mpi
    mpirouter bench
    mpirouter demo
    mpirouter compare --routers linear,mpi --seeds 0,1,2 --out runs/compare
    mpirouter ladder --out results/ladder --rungs debug,cpu-440k,tiny,cpu-1.7m --routers linear,mpi --cells bias,aux

Flags map onto the config dataclasses (`trainer/config.py` and the configs it nests); any field is reachable with
`--set section.field=value` (e.g. `--set model.moe.top_k=4 --set schedule.kind=wsd`). Bad input
gets one line on stderr and exit code 2; a training stopped by a non-finite loss exits 3; one
stopped by SIGINT/SIGTERM (after writing a checkpoint) exits 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

# glibc returns big (>=32 MB) buffers to the OS on every free and page-faults them back on the
# next step; MoE dispatch buffers hit this every step (20-60% slower, docs/performance.md).
# The setting only takes effect at process start, hence the re-exec in `main`.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def _rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", "0"))


def _maybe_reexec(argv: list[str]) -> None:
    if sys.platform != "linux" or os.environ.get("MPIROUTER_NO_REEXEC") or "GLIBC_TUNABLES" in os.environ:
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, MPIROUTER_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable, "-m", "mpirouter.cli", *argv], env)


FLAG_FIELDS = {"router": "model.moe.router.kind", "scale": "model.moe.router.scale_prime", "target": "model.moe.router.target",
               "data": "data.path", "tokenizer": "data.tokenizer", "steps": "steps", "batch_size": "batch_size",
               "optimizer": "optim.name", "lr": "optim.lr", "seed": "seed", "device": "device", "compile": "compile",
               "out": "out_dir"}
"""`train` flags and the TrainConfig field each sets (`--preset` picks the whole model section)."""


def explicit_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the options that `argv` gives explicitly (abbreviations are disabled, so exact)."""
    given = set()
    for action in parser._actions:
        if any(tok == opt or tok.startswith(opt + "=") for opt in action.option_strings for tok in argv):
            given.add(action.dest)
    return given


def train_config(args, explicit: set[str]) -> "TrainConfig":
    """The TrainConfig a `train` command line asks for: the parsed flags handed to `trainer.resolve` (its
    docstring states the precedence of defaults, --config or the resumed checkpoint, --set and flags)."""
    from .trainer.resolve import ConfigSources, resolve_train_config

    for dest in ("config", "out", "data", "tokenizer"):
        if getattr(args, dest) == "":
            raise ValueError(f"--{dest} must not be empty")
    if args.resume:
        if not args.out:
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        for flag in ("config", "force"):
            if flag in explicit:
                raise ValueError(f"--{flag} cannot be combined with --resume (the checkpoint holds the run's config)")
    given = {path: getattr(args, dest) for dest, path in FLAG_FIELDS.items() if dest in explicit}
    defaults = {path: getattr(args, dest) for dest, path in FLAG_FIELDS.items() if dest not in explicit and dest != "out"}
    sources = ConfigSources(flags=given, defaults=defaults, preset=args.preset if "preset" in explicit else None,
                            config_file=args.config, resume=args.out if args.resume else None, overrides=tuple(args.set or []))
    cfg, notes = resolve_train_config(sources, check_lock=_rank() == 0)
    for note in notes if _rank() == 0 else []:
        print(f"note: {note}")
    return cfg


def cmd_train(args) -> int:
    """mpirouter train --preset tiny --router mpi --steps 500 --out runs/tiny-mpi

    Train an MoE language model into a run folder (config.json, metrics.jsonl, checkpoints/).
    Refuses a folder that already holds a run: continue it with --resume, or pass --force to move it
    aside. --config FILE starts from a saved config; flags given on the command line win over it.
    --resume continues the run in --out from its newest readable checkpoint; it may change --steps
    (extends or shortens the run; the schedule is recomputed), --stop-at, --device, --compile and
    run-time --set fields (logging, evals, checkpoints); anything else is refused. Ctrl-C or SIGTERM
    finishes the step, writes a checkpoint and says how to resume.
    """
    from .trainer.loop import train

    cfg = train_config(args, args.explicit)
    args.run_dir = cfg.out_dir  # for the how-to-continue line of an interrupted job
    result = train(cfg, resume=args.resume, stop_at=args.stop_at, force=args.force)
    if _rank() != 0:  # rank 0 reports for a torchrun job
        return 0
    ev = result.final_eval or {}
    steps = f"step {result.step}"
    if result.step_time_median_s == result.step_time_median_s:  # not nan: steps ran (or were recorded)
        steps += f"  median step {1000 * result.step_time_median_s:.0f} ms  {result.tokens_per_s:,.0f} tok/s"
    print(f"run: {result.run_dir}  {steps}")
    if ev:
        print(f"val loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}  MaxVio {ev['maxvio']:.3f}  "
              f"alignment φ {ev['align']:.3f} (raw R {ev['align_raw']:.3f})")
    return 0


def cmd_sample(args) -> int:
    """mpirouter sample runs/tiny-mpi --prompt "ROMEO." --tokens 200

    Generate text from a checkpoint (a run folder, a checkpoint folder or an export). Prints the
    prompt and its continuation; with an empty prompt, only the continuation of a newline.
    """
    import torch

    from .trainer.checkpoint import load_model, run_tokenizer
    from .trainer.device import resolve_device

    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    device = resolve_device(args.device)
    model, cfg = load_model(args.checkpoint, device)
    tok = run_tokenizer(args.checkpoint, cfg)
    prompt_ids = tok.encode(args.prompt)
    context = prompt_ids or tok.encode("\n")
    if not context:
        raise ValueError("the tokenizer encodes neither the prompt nor a newline; give a non-empty --prompt")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([context], device=device)
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    print(tok.decode(out[0].tolist() if prompt_ids else out[0, len(context):].tolist()))
    return 0


def cmd_export(args) -> int:
    """mpirouter export runs/tiny-mpi --out runs/tiny-mpi-export

    Fold the routers into plain linear routers (φ computed once) and write an ordinary checkpoint.
    Never replaces anything but an earlier export, and that only with --force.
    """
    from .trainer.export import export_checkpoint

    try:
        path = export_checkpoint(args.checkpoint, args.out, verify=not args.no_verify, force=args.force)
    except RuntimeError as e:  # the folded model's logits differ: nothing was written
        raise ValueError(str(e)) from None
    print(f"exported to {path} (routers folded into plain linear routers)")
    return 0


def cmd_inspect(args) -> int:
    """mpirouter inspect runs/tiny-mpi

    Per layer and expert: alignment of φ and of R, load share, norms, σ1 and σ2/σ1 of the gate matrix, gain.
    """
    from .experiments.inspection import inspect_checkpoint

    if args.batches < 0:
        raise ValueError(f"--batches must be >= 0, got {args.batches}")
    print(inspect_checkpoint(args.checkpoint, batches=args.batches, per_expert=not args.layers_only))
    return 0


def _bench_dist(args) -> dict:
    import argparse as _argparse

    from .core.model import PRESETS
    from .experiments.bench_dist import run_bench_dist
    from .trainer.device import resolve_device

    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not one of {', '.join(PRESETS)}")
    for name in ("nproc", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size % args.nproc:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by --nproc {args.nproc}")
    device = resolve_device(args.device).type
    ns = _argparse.Namespace(preset=args.preset, batch_size=args.batch_size, steps=args.steps, warmup=3, device=device,
                             nproc=args.nproc, repeat=args.repeat, timeout=900)
    return run_bench_dist(ns)


def cmd_bench(args) -> int:
    """mpirouter bench --shapes tiny,small,fine --reps 5 --repeat 3

    MoE layer forward+backward of each implementation side by side (this package's dispatch paths,
    Hugging Face transformers' Qwen3-MoE block, a naive loop, a dense layer), timed interleaved and
    repeated, as a share of a matmul ceiling timed alongside; and the MPI rows' share of a training
    step. With --device cuda (the default where CUDA is available): bf16 autocast, CUDA-event
    timing, shape `large` added and the router share taken at the `large` preset. Under bf16: a
    float32 ceiling in the same rotation, and a training step in fp32 beside bf16 (--step-presets).
    """
    from .experiments.bench import run_bench

    from .core.model import PRESETS

    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    if args.repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {args.repeat}")
    if args.router_preset and args.router_preset not in PRESETS:
        raise ValueError(f"--router-preset {args.router_preset!r} is not one of {', '.join(PRESETS)} ('' to skip)")
    if args.json is not None:  # checked before minutes of benchmarking, not after
        path = Path(args.json)
        if path.exists():
            raise FileExistsError(f"--json {path} already exists; choose another file")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"--json {path}: folder {path.parent} does not exist")
    if args.dist:
        if args.step_presets is not None or args.torch_bf16_kernels or args.step_optimizer != "adamw" or args.designs:
            raise ValueError("--step-presets, --torch-bf16-kernels, --step-optimizer and --designs belong to the one-process bench, not --dist")
        results = _bench_dist(args)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()] if args.shapes is not None else None
    step_presets = [p.strip() for p in args.step_presets.split(",") if p.strip()] if args.step_presets is not None else None
    from .experiments.bench_routers import DESIGNS

    designs = list(DESIGNS) if args.designs.strip() == "all" else [d.strip() for d in args.designs.split(",") if d.strip()]
    results = run_bench(shapes, reps=args.reps, repeat=args.repeat, router_preset=args.router_preset, device=args.device,
                        precision=args.precision, step_presets=step_presets, torch_bf16_kernels=args.torch_bf16_kernels,
                        step_optimizer=args.step_optimizer, designs=designs, designs_preset=args.designs_preset)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_demo(args) -> int:
    """mpirouter demo

    The main job: train linear and mpi routers side by side (same seed: same initial weights and
    batches) on the embedded corpus and compare them (summary.md, summary.json, curves.png).
    """
    from .experiments.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, routers=args.routers.split(","), seed=args.seed, preset=args.preset,
             data_path=args.data, tokenizer=args.tokenizer)
    return 0


def cmd_compare(args) -> int:
    """mpirouter compare --routers linear,mpi --seeds 0,1,2 --out runs/compare

    A matched grid of trainings (routers × seeds × optimizers × C' × lr) and a report comparing them.
    """
    from .experiments.compare import cli_main

    return cli_main(args)


def cmd_trajectory(args) -> int:
    """mpirouter trajectory results/alignment-source --out results/alignment-source

    Per kept checkpoint: alignment of R and of φ, and how far R and each expert's top singular direction moved.
    """
    from .experiments.trajectory import cli_main

    return cli_main(args)


def cmd_ladder(args) -> int:
    """mpirouter ladder --out results/ladder --rungs debug,cpu-440k,tiny,cpu-1.7m --routers linear,mpi --cells bias,aux

    The scale ladder's report: each router against linear on every rung (<out>/<rung>/confirm), and the trend over size.
    """
    from .experiments.ladder import cli_main

    return cli_main(args)


def cmd_prepare_data(args) -> int:
    """mpirouter prepare-data --out data/shakespeare-bpe --tokenizer bpe

    Tokenize a corpus once into a folder that every training process memory-maps instead of reading
    and tokenizing the text itself (one copy in RAM per machine, not one per rank): train.bin and
    val.bin (token ids: uint16, or uint32 for vocabularies over 65,536), meta.json (counts,
    tokenizer, split, corpus sha256, each file's sha256) and, unless the tokenizer is bytes,
    tokenizer.json. Train with `mpirouter train --data DIR` and the tokenizer and split it was made
    with (the command printed at the end; a contradiction is refused). The split and ids equal those
    of training on the corpus itself. Never overwrites: --out must be new or empty. --verify DIR
    rechecks every file's sha256.
    """
    from .trainer.data import DataConfig, prepare_shards, prepared_flags
    from .trainer.shards import verify_shards

    if args.verify is not None:
        meta = verify_shards(args.verify)
        print(f"{args.verify}: ok ({meta.train_tokens:,} train / {meta.val_tokens:,} val {meta.dtype} tokens; "
              f"every file matches its sha256 in meta.json)")
        return 0
    for dest in ("out", "data", "tokenizer", "jsonl_field"):
        if getattr(args, dest) == "":
            raise ValueError(f"--{dest.replace('_', '-')} must not be empty")
    cfg = DataConfig(path=args.data, tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size,
                     val_fraction=args.val_fraction, jsonl_field=args.jsonl_field)
    try:
        meta = prepare_shards(cfg, args.out, say=lambda m: print(m, flush=True))  # stdout: stderr is for the one error line
    except ImportError as e:  # an optional package (tokenizers, datasets) is missing: say which, in one line
        raise ValueError(str(e)) from None
    src = meta.source
    print(f"prepared {args.out}: {meta.train_tokens:,} train / {meta.val_tokens:,} val tokens ({meta.dtype}), "
          f"tokenizer {src.tokenizer} ({src.vocab_size:,} tokens), corpus {src.corpus} sha256 {src.corpus_sha256[:16]}…")
    print("train on it: mpirouter train " + shlex.join(prepared_flags(args.out, meta)))
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, and command docstrings shown as written."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that in a torchrun job only rank 0 prints a usage error: every rank parses the same argv."""

    def error(self, message: str):
        if _rank() != 0:
            self.exit(2)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from .common.version import __version__
    from .core.model import PRESETS
    from .optim import OPTIMIZERS
    from .core.routers import POWER_TARGETS, ROUTER_KINDS

    p = _Parser(prog="mpirouter", description="MoE routers that follow their experts (MPI).", allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"mpirouter {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    add = lambda name, fn, help: sub.add_parser(name, help=help, description=fn.__doc__, formatter_class=_HelpFormatter,  # noqa: E731
                                                allow_abbrev=False)
    data_help = "text file, directory or .jsonl, or a packaged corpus: shakespeare (default), kjv (mpirouter[corpora])"
    tok_help = "byte | bpe | path/to/tokenizer.json"

    t = add("train", cmd_train, "train an MoE LM")
    t.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size")
    t.add_argument("--router", default="mpi", choices=ROUTER_KINDS, help="router variant")
    t.add_argument("--scale", type=float, default=1.0, help="MPI scale C' (C = C'/sqrt(E))")
    t.add_argument("--target", default="gate", choices=POWER_TARGETS, help="expert matrix driving the power step")
    t.add_argument("--data", default=None, help=data_help)
    t.add_argument("--tokenizer", default="byte", help=tok_help)
    t.add_argument("--steps", type=int, default=500, help="optimizer steps in total")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch")
    t.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="adamw | muon | adamh | muonh (Hyperball)")
    t.add_argument("--lr", type=float, default=None, help="peak lr (default: the optimizer's, mpirouter.optim.DEFAULT_LR)")
    t.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--out", default=None, help="run folder (default runs/PRESET-ROUTER-sSEED)")
    t.add_argument("--config", default=None, help="start from a TrainConfig JSON (e.g. a run's config.json); flags given win")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. model.moe.top_k=4")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--force", action="store_true", help="if --out holds a run, move it aside (never deleted) and start anew")
    t.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step; resume later")
    t.set_defaults(func=cmd_train)

    s = add("sample", cmd_sample, "generate text from a checkpoint")
    s.add_argument("checkpoint", help="run folder, checkpoint folder or export")
    s.add_argument("--prompt", default="\n", help="text to continue ('' = from a newline, printing only the continuation)")
    s.add_argument("--tokens", type=int, default=200, help="tokens to generate")
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    s.set_defaults(func=cmd_sample)

    e = add("export", cmd_export, "fold MPI routers into a plain checkpoint")
    e.add_argument("checkpoint", help="run folder or checkpoint folder")
    e.add_argument("--out", required=True, help="new folder for the export")
    e.add_argument("--force", action="store_true", help="replace --out if it is an earlier export (nothing else is ever replaced)")
    e.add_argument("--no-verify", action="store_true", help="skip the folded-vs-original logits check")
    e.set_defaults(func=cmd_export)

    i = add("inspect", cmd_inspect, "per-layer/per-expert alignment, load and norms of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--batches", type=int, default=8, help="validation batches used to measure expert load (0: skip)")
    i.add_argument("--layers-only", action="store_true", help="one row per layer, no per-expert rows")
    i.set_defaults(func=cmd_inspect)

    b = add("bench", cmd_bench, "MoE layer and router speed, side by side")
    b.add_argument("--device", default="auto", help="auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    b.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    b.add_argument("--shapes", default=None, help="comma-separated layer shapes; None: tiny,small,fine (and large on CUDA); '' skips the layer tables")
    b.add_argument("--reps", type=int, default=5, help="timed reps per repeat, interleaved across variants (their median is the repeat's figure)")
    b.add_argument("--repeat", type=int, default=3, help="whole measurements, round-robin over variants; median and min-max over them reported")
    b.add_argument("--router-preset", default=None, help="model preset for the router-share measurement; None: large on CUDA, tiny on CPU; '' skips it")
    b.add_argument("--step-presets", default=None, help="presets of the fp32-vs-bf16 training-step table (bf16 only); "
                   "None: tiny,small on CPU, small,medium on CUDA; '' skips it")
    b.add_argument("--torch-bf16-kernels", action="store_true", help="that table also times torch's own bf16 kernels where this "
                   "CPU has none of its own (the matmuls are emulated in float32 otherwise; slow: small presets only)")
    b.add_argument("--step-optimizer", default="adamw", help="optimizer of that table (optim.name)")
    b.add_argument("--designs", default="", help="router designs timed side by side (training step and router work): "
                   "comma-separated names such as linear,mpi,mpi+erc,cosine, or 'all' (experiments/bench_routers.py); '' skips it")
    b.add_argument("--designs-preset", default=None, help="model preset of the designs table; None: tiny on CPU, large on CUDA")
    b.add_argument("--json", default=None, help="also write the numbers to this file")
    b.add_argument("--dist", action="store_true", help="instead: the trainer's step, 1 process vs DDP/FSDP2 under torchrun "
                   "(experiments/bench_dist.py)")
    b.add_argument("--nproc", type=int, default=2, help="--dist: processes of the distributed variants")
    b.add_argument("--preset", default="tiny", help="--dist: model preset")
    b.add_argument("--batch-size", type=int, default=16, help="--dist: global batch, split over the processes")
    b.add_argument("--steps", type=int, default=10, help="--dist: timed steps per block")
    b.set_defaults(func=cmd_bench)

    d = add("demo", cmd_demo, "train linear and mpi routers side by side and compare")
    d.add_argument("--out", default="runs/demo", help="output folder (an earlier demo there is moved aside)")
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--routers", default="linear,mpi")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preset", default="tiny", choices=list(PRESETS))
    d.add_argument("--data", default=None, help=data_help)
    d.add_argument("--tokenizer", default="byte", help=tok_help)
    d.set_defaults(func=cmd_demo)

    from .experiments.compare import add_arguments as compare_arguments

    c = add("compare", cmd_compare, "matched grid: routers x seeds (x optimizers x C' x targets x lr x --vary), report.md + plots")
    compare_arguments(c)
    c.set_defaults(func=cmd_compare)

    from .experiments.trajectory import add_arguments as trajectory_arguments

    tr = add("trajectory", cmd_trajectory, "where alignment comes from: R and the experts' top directions over checkpoints")
    trajectory_arguments(tr)
    tr.set_defaults(func=cmd_trajectory)

    from .experiments.ladder import add_arguments as ladder_arguments

    la = add("ladder", cmd_ladder, "the scale ladder's report: Δ vs linear per model size and its trend (ladder.md)")
    ladder_arguments(la)
    la.set_defaults(func=cmd_ladder)

    from .trainer.data import DataConfig

    pd = add("prepare-data", cmd_prepare_data, "tokenize a corpus once into memory-mapped token files")
    where = pd.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", default=None, help="new (or empty) folder for train.bin, val.bin, meta.json, tokenizer.json")
    where.add_argument("--verify", default=None, metavar="DIR", help="recheck a prepared folder's files against meta.json instead")
    pd.add_argument("--data", default=None, help=data_help + "; .parquet/.arrow need mpirouter[datasets]")
    pd.add_argument("--tokenizer", default="byte", help=tok_help)
    pd.add_argument("--bpe-vocab-size", type=int, default=DataConfig.bpe_vocab_size, help="vocabulary size of a trained BPE")
    pd.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction, help="last share of the text held out for validation")
    pd.add_argument("--jsonl-field", default=DataConfig.jsonl_field, help="field (column) read from JSONL, Parquet and Arrow records")
    pd.set_defaults(func=cmd_prepare_data)
    p.subcommands = sub.choices
    return p


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # only the console script re-execs; in-process callers (tests) keep their process
        argv = sys.argv[1:]
        _maybe_reexec(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_flags(parser.subcommands[args.command], argv[argv.index(args.command) + 1:])
    from .parallel.env import is_lost_peer
    from .trainer.loop import NonFiniteLossError, TrainingInterrupted
    from .trainer.rundir import RunLockedError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"mpirouter {args.command}"
    try:
        if world > 1 and args.command not in ("train", "compare"):
            raise ValueError(f"{args.command} runs in one process; start it without torchrun (only train and compare "
                             f"run as a job of several processes)")
        return args.func(args)
    except TrainingInterrupted as e:
        _report(e, f"{where}: {e}; to continue: {_how_to_continue(args, world, e.run_dir)}")
        return e.exit_code
    except NonFiniteLossError as e:
        _report(e, f"{where}: training stopped: {_one_line(e)}")
        return 3
    except (ValueError, OSError, RunLockedError, ImportError) as e:  # ImportError: an optional package is missing
        _report(e, f"{where}: error: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        kept = "; the newest checkpoint, if any, is kept for --resume" if args.command in ("train", "demo", "compare") else ""
        print(f"{where}: interrupted{kept}", file=sys.stderr)
        return 130
    except MemoryError as e:
        print(f"{where}: error: out of memory ({_one_line(e)}); {_memory_advice(args.command)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch reports a failed allocation, and a collective whose peer died, as a RuntimeError
        if world > 1 and is_lost_peer(e):
            _report_lost_peer(e, f"{where}: error: ", _how_to_continue(args, world, getattr(args, "run_dir", None)))
            return 1
        if world > 1 and type(e).__module__.startswith("torch") and "Dist" in type(e).__name__:  # DistStoreError, ...
            _report(e, f"{where}: error: the job's processes could not work together ({type(e).__name__}: "
                       f"{_one_line(e)[:300]}); check that every node runs the same command, or raise dist.timeout_s")
            return 1
        if "allocate" not in str(e) and "out of memory" not in str(e):
            raise
        print(f"{where}: error: out of memory ({_one_line(e)[:200]}); {_memory_advice(args.command)}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()


def _memory_advice(command: str) -> str:
    """What to change when `command` ran out of memory."""
    if command == "prepare-data":
        return ("prepare-data holds the whole corpus and its token ids in memory: split the corpus into parts and "
                "prepare each, or use a machine with more memory")
    if command in ("sample", "inspect", "export"):
        return "the model does not fit: use a machine with more memory (or --device cuda)"
    return "use a smaller batch or model"


def _how_to_continue(args, world: int, run_dir) -> str:
    """The command that continues an interrupted `train` (from its newest checkpoint) or `compare`."""
    launch = "mpirouter" if world == 1 else \
        f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)} (and the same --nnodes/rendezvous) -m mpirouter"
    if args.command == "compare" or run_dir is None:
        return f"run the same {launch} {args.command} command again"
    return f"{launch} train --resume --out {shlex.quote(str(run_dir))}"


def _report_lost_peer(e: BaseException, head: str, again: str) -> None:
    """One line for a torchrun job that lost a process mid-collective, printed by the lowest surviving rank: which
    rank(s) stopped (asked of the job's store) and how to continue. torchrun's SIGTERM to the survivors waits
    until the line is out."""
    import signal

    from .parallel.env import missing_ranks

    old = signal.signal(signal.SIGTERM, signal.SIG_IGN) if _in_main_thread() else None
    try:
        found = missing_ranks()
        if found is not None and not found[1]:
            return  # a lower surviving rank speaks for the job
        gone = found[0] if found is not None else []
        who = (f"rank {gone[0]}" if len(gone) == 1 else f"ranks {', '.join(map(str, gone))}") if gone else "another process"
        print(f"{head}{who} of this torchrun job stopped (the connection to it was lost: it died or was killed); "
              f"the newest checkpoint is kept; to continue: {again}", file=sys.stderr, flush=True)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _in_main_thread() -> bool:
    """Signal handlers can only be changed there."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _report(e: BaseException, line: str) -> None:
    """Print an error line to stderr: once per job under torchrun (rank 0) when every rank raised it alike;
    otherwise from each rank that raised it, marked with its rank."""
    if getattr(e, "shown_by_rank0", False) or (_rank() != 0 and "runs in one process" in line):  # from argv alone
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .parallel.env import rank0_said_it

        if rank0_said_it(line):  # the same error on every rank (a bad setting, a missing file): printed once
            return
        if _rank() != 0:
            line = line.replace("mpirouter ", f"mpirouter [rank {_rank()}] ", 1)
    print(line, file=sys.stderr)


def _leave_process_group() -> None:
    """End a torchrun job's process group cleanly (torch warns at exit otherwise); nothing to do in one process."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
