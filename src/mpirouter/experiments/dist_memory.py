"""Computed (not measured) memory per GPU of the training state for data/expert-parallel layouts.

    python -m mpirouter.experiments.dist_memory --preset large --vocab 32768 --world 8

Counts the model's parameters exactly (built on the meta device) and charges each rank
16 bytes per parameter it holds: fp32 weight, fp32 gradient and AdamW's two fp32 moments. Which
parameters a rank holds (`parallel.wrap`):
- dense weights: all of them under DDP, 1/world of them under FSDP2 (every rank reads its own data);
- expert stacks and router rows: 1/ep of them under expert parallelism (left out of DDP/FSDP2),
  all of them otherwise, then sharded like the dense weights.
Not counted: activations (they depend on the micro-batch), FSDP2's gathered bf16 copy of the
block in flight (2 bytes x one block's parameters, x2 with prefetch), communication buffers,
the CUDA context. docs/distributed.md prints the table this writes.
"""

from __future__ import annotations

import argparse
import sys
from typing import NamedTuple, Sequence

import torch

from ..core.model import MoELM, preset_config
from ..parallel.expert import EXPERT_PARAMS, moe_layers

BYTES_PER_PARAM = 16
"""fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq."""


class ParamCounts(NamedTuple):
    dense: int
    """Every parameter outside the expert stacks and router rows."""
    expert: int
    """Expert stacks (gate, up, down) and router rows R of every MoE layer."""
    block: int
    """The largest transformer block (what FSDP2 gathers at once)."""


def param_counts(preset: str, vocab_size: int) -> ParamCounts:
    """Exact parameter counts of a preset, without allocating its weights."""
    with torch.device("meta"):
        model = MoELM(preset_config(preset, vocab_size=vocab_size))
    expert_names = {f"{name}.{p}" if name else p for name, _ in moe_layers(model)
                    for p in EXPERT_PARAMS}
    params = dict(model.named_parameters())
    expert = sum(p.numel() for n, p in params.items() if n in expert_names)
    dense = sum(p.numel() for p in params.values()) - expert
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks)
    return ParamCounts(dense, expert, block)


def state_bytes_per_rank(counts: ParamCounts, world: int, strategy: str, ep: int) -> float:
    """Bytes of weights, gradients and AdamW state one rank holds (see the module docstring)."""
    if world % ep:
        raise ValueError(f"ep={ep} must divide world={world}")
    dense = counts.dense / world if strategy == "fsdp" else counts.dense
    if ep > 1:
        expert = counts.expert / ep
    else:
        expert = counts.expert / world if strategy == "fsdp" else counts.expert
    return BYTES_PER_PARAM * (dense + expert)


def table(preset: str, vocab_size: int, world: int) -> str:
    counts = param_counts(preset, vocab_size)
    gib = 2**30
    rows = [f"Preset `{preset}`, vocabulary {vocab_size}: {counts.dense / 1e6:.1f} M dense + {counts.expert / 1e6:.1f} M "
            f"expert parameters; {world} GPUs. COMPUTED: weights + gradients + AdamW state, fp32, 16 bytes per parameter held.",
            "", "| strategy | ep | GiB per GPU |", "|---|---|---|"]
    layouts = [("ddp", 1), ("fsdp", 1)] + [(s, ep) for ep in (2, 4, 8) if ep <= world and world % ep == 0 for s in ("ddp", "fsdp")]
    for strategy, ep in layouts:
        rows.append(f"| {strategy} | {ep} | {state_bytes_per_rank(counts, world, strategy, ep) / gib:.2f} |")
    rows.append("")
    rows.append(f"Not included: activations, and FSDP2's gathered bf16 block ({2 * counts.block / gib:.2f} GiB per block in flight).")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m mpirouter.experiments.dist_memory --preset large --vocab 32768 --world 8"""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="large")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--world", type=int, default=8)
    a = p.parse_args(argv)
    print(table(a.preset, a.vocab, a.world))
    return 0


if __name__ == "__main__":
    sys.exit(main())
