"""torch.compile of the MoE layer and the model: graph breaks counted with torch._dynamo.explain.

Recorded (docs/performance.md): bf16 + grouped_mm (CUDA's dispatch on compute capability >= 9.0)
traces as one graph, 0 breaks, layer and whole model. The loop path needs the expert boundaries on
the host: one data-dependent read per MoE layer, which dynamo reports once per nested frame
(forward -> moe_forward_sorted -> expert_bounds), 4 breaks per layer; before this was measured it
read them once per matmul (9 breaks per layer).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo as dynamo

from mpirouter.core.model import MoELM, preset_config
from mpirouter.core.moe import MoE, MoEConfig
from mpirouter.core.routers import RouterConfig

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not in this torch")


def explain(fn, *args):
    dynamo.reset()
    try:
        return dynamo.explain(fn)(*args)
    finally:
        dynamo.reset()


def moe(dispatch: str, dtype: torch.dtype) -> MoE:
    torch.manual_seed(0)
    return MoE(64, MoEConfig(num_experts=8, top_k=2, hidden=64, dispatch=dispatch, router=RouterConfig(kind="mpi"))).to(dtype)


def test_grouped_mm_layer_has_no_graph_breaks():
    ex = explain(moe("grouped_mm", torch.bfloat16), torch.randn(2, 16, 64, dtype=torch.bfloat16))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(b.reason)[:120] for b in ex.break_reasons]


def test_loop_layer_breaks_only_at_the_expert_bounds():
    ex = explain(moe("loop", torch.float32), torch.randn(2, 16, 64))
    assert ex.graph_break_count <= 4
    assert all(b.user_stack and b.user_stack[-1].name == "expert_bounds" for b in ex.break_reasons)


def test_bf16_model_traces_as_one_graph():
    cfg = preset_config("debug")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch="grouped_mm", router=RouterConfig(kind="mpi")))
    model = MoELM(cfg)
    idx = torch.randint(cfg.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ex = explain(model, idx, idx)
    assert ex.graph_break_count == 0, [str(b.reason)[:120] for b in ex.break_reasons]
