"""The `mpirouter` command line: train, sample, export, inspect, bench, demo, compare.

    mpirouter train --preset tiny --router mpi --steps 500 --out runs/tiny-mpi
    mpirouter sample runs/tiny-mpi --prompt "ROMEO." --tokens 200
    mpirouter export runs/tiny-mpi --out runs/tiny-mpi-export
    mpirouter inspect runs/tiny-mpi
    mpirouter bench
    mpirouter demo
    mpirouter compare --routers linear,mpi --seeds 0,1,2 --out runs/compare

Flags map onto the config dataclasses in `train.py`; any field is reachable with
`--set section.field=value` (e.g. `--set model.moe.top_k=4 --set schedule.kind=wsd`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# glibc returns big (>=32 MB) buffers to the OS on every free and page-faults them back on the
# next step; MoE dispatch buffers hit this every step (20-60% slower, shared/PERF_NOTES.md).
# The setting only takes effect at process start, hence the re-exec in `main`.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def _maybe_reexec(argv: list[str]) -> None:
    if sys.platform != "linux" or os.environ.get("MPIROUTER_NO_REEXEC") or "GLIBC_TUNABLES" in os.environ:
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES, MPIROUTER_NO_REEXEC="1")
    os.execve(sys.executable, [sys.executable, "-m", "mpirouter.cli", *argv], env)


def _train_config(args) -> "TrainConfig":
    from .config import apply_overrides, from_dict
    from .data import DataConfig
    from .model import preset_config
    from .routers import RouterConfig
    from .train import OptimConfig, TrainConfig

    if args.config:
        cfg = from_dict(TrainConfig, json.loads(Path(args.config).read_text()))
    else:
        router = RouterConfig(kind=args.router, scale_prime=args.scale, target=args.target)
        model = preset_config(args.preset, moe=dict(router=router))
        cfg = TrainConfig(
            model=model,
            preset=args.preset,
            data=DataConfig(path=args.data, tokenizer=args.tokenizer),
            optim=OptimConfig(name=args.optimizer, lr=args.lr),
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            compile=args.compile,
            out_dir=args.out or f"runs/{args.preset}-{args.router}-s{args.seed}",
        )
    return apply_overrides(cfg, args.set or [])


def cmd_train(args) -> int:
    from .train import train

    if args.resume:
        out = args.out or (args.resume if isinstance(args.resume, str) else None)
        if not out:
            raise SystemExit("--resume needs --out RUN_DIR (the run to continue)")
        from .config import from_dict
        from .checkpoint import load_checkpoint
        from .train import TrainConfig

        saved, _, _ = load_checkpoint(out, with_state=False)
        cfg = from_dict(TrainConfig, saved)
        result = train(cfg, resume=True)
    else:
        cfg = _train_config(args)
        result = train(cfg, stop_at=args.stop_at)
    ev = result.final_eval or {}
    print(f"run: {result.run_dir}  step {result.step}  median step {1000 * result.step_time_median_s:.0f} ms  "
          f"{result.tokens_per_s:,.0f} tok/s")
    if ev:
        print(f"val loss {ev['val_loss']:.4f}  ppl {ev['val_ppl']:.2f}  MaxVio {ev['maxvio']:.3f}  "
              f"alignment φ {ev['align']:.3f} (raw R {ev['align_raw']:.3f})")
    return 0


def cmd_sample(args) -> int:
    import torch

    from .train import load_model, run_tokenizer

    model, cfg = load_model(args.checkpoint, args.device)
    tok = run_tokenizer(args.checkpoint, cfg)
    ids = tok.encode(args.prompt) or [0]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    idx = torch.tensor([ids], device=args.device)
    out = model.generate(idx, args.tokens, temperature=args.temperature, top_k=args.top_k, generator=gen)
    print(tok.decode(out[0].tolist()))
    return 0


def cmd_export(args) -> int:
    from .export import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, verify=not args.no_verify)
    print(f"exported to {path} (routers folded into plain linear routers)")
    return 0


def cmd_inspect(args) -> int:
    from .inspection import inspect_checkpoint

    print(inspect_checkpoint(args.checkpoint, batches=args.batches, per_expert=not args.layers_only))
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    results = run_bench([s.strip() for s in args.shapes.split(",")], reps=args.reps, router_preset=args.router_preset or None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, routers=args.routers.split(","), seed=args.seed, preset=args.preset)
    return 0


def cmd_compare(args) -> int:
    from .compare import cli_main

    return cli_main(args)


def build_parser() -> argparse.ArgumentParser:
    from .model import PRESETS
    from .optim import OPTIMIZERS
    from .routers import POWER_TARGETS, ROUTER_KINDS

    p = argparse.ArgumentParser(prog="mpirouter", description="MoE routers that follow their experts (MPI).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an MoE LM", description=cmd_train.__doc__)
    t.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size")
    t.add_argument("--router", default="mpi", choices=ROUTER_KINDS, help="router variant")
    t.add_argument("--scale", type=float, default=1.0, help="MPI scale C' (C = C'/sqrt(E))")
    t.add_argument("--target", default="gate", choices=POWER_TARGETS, help="expert matrix driving the power step")
    t.add_argument("--data", default=None, help="text file, directory or .jsonl (default: embedded Shakespeare)")
    t.add_argument("--tokenizer", default="byte", help="byte | bpe | path/to/tokenizer.json")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="adamw | muon | adamh | muonh (Hyperball)")
    t.add_argument("--lr", type=float, default=None, help="peak lr (default: the optimizer's, mpirouter.optim.DEFAULT_LR)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--out", default=None, help="run folder (default runs/PRESET-ROUTER-sSEED)")
    t.add_argument("--config", default=None, help="a TrainConfig JSON (e.g. a run's config.json) instead of the flags")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field, e.g. model.moe.top_k=4")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step; resume later")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("checkpoint", help="run folder or checkpoint folder")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("export", help="fold MPI routers into a plain checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--no-verify", action="store_true", help="skip the folded-vs-original logits check")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="per-layer/per-expert alignment, load and norms of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--batches", type=int, default=8, help="validation batches used to measure expert load")
    i.add_argument("--layers-only", action="store_true", help="one row per layer, no per-expert rows")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="MoE layer and router speed, side by side")
    b.add_argument("--shapes", default="tiny,small,fine")
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--router-preset", default="tiny", help="model preset for the router-share measurement ('' to skip)")
    b.add_argument("--json", default=None, help="also write the numbers to this file")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="train linear and mpi routers side by side and compare")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=600)
    d.add_argument("--routers", default="linear,mpi")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--preset", default="tiny", choices=list(PRESETS))
    d.set_defaults(func=cmd_demo)

    from .compare import add_arguments as compare_arguments

    c = sub.add_parser("compare", help="matched grid: routers x seeds (x optimizers x C'), report.md + plots")
    compare_arguments(c)
    c.set_defaults(func=cmd_compare)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # only the console script re-execs; in-process callers (tests) keep their process
        argv = sys.argv[1:]
        _maybe_reexec(argv)
    args = build_parser().parse_args(argv)
    from .train import NonFiniteLossError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"mpirouter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"mpirouter {args.command}: training stopped: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
