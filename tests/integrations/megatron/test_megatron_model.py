"""MPI routers in a tiny Megatron-Core GPTModel, one CPU process: folding into a stock model (state dict and
distributed checkpoint) with identical logits, and a few training steps with Megatron's DDP and finalize_model_grads."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron", reason="the megatron extra is not installed (pip install 'mpirouter[megatron]')")

import mcore_shims  # noqa: E402
from mcore_shims import fresh_router_metrics, megatron_on_cpu  # noqa: E402,F401  (autouse fixtures)

mcore_shims.stub_triton_kernels()

from megatron.core import dist_checkpointing  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mpirouter.integrations.megatron import MPIConfig, folded_state_dict, folded_weights, mpi_layer_spec  # noqa: E402

V, S, E = 64, 16, 4
MASK = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)[None, None]  # without one, GPTModel makes it on "cuda"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(**overrides) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_moe_experts=E, moe_router_topk=2, ffn_hidden_size=16,
                moe_ffn_hidden_size=16, gated_linear_unit=True, use_cpu_initialization=True, moe_token_dispatcher_type="alltoall",
                add_bias_linear=False, moe_router_dtype="fp32", params_dtype=torch.float32)
    return TransformerConfig(**{**base, **overrides})


def gpt(mpi: MPIConfig | None, seed: int, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=E, moe_grouped_gemm=False)
    return GPTModel(config=config(**overrides), transformer_layer_spec=mpi_layer_spec(spec, mpi) if mpi else spec,
                    vocab_size=V, max_sequence_length=S)


def logits(model: GPTModel, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids, torch.arange(S)[None].expand(ids.shape[0], -1), attention_mask=MASK)


@pytest.mark.parametrize("kind,target", [("mpi", "gate"), ("mpi", "gate_up"), ("power", "up"), ("retract", "gate")])
def test_a_stock_model_loading_the_folded_state_dict_has_identical_logits(kind, target):
    model = gpt(MPIConfig(kind=kind, target=target), seed=0)
    ids = torch.randint(0, V, (2, S))
    ref = logits(model, ids)
    stock = gpt(None, seed=1)
    stock.load_state_dict(folded_state_dict(model))
    assert torch.equal(logits(stock, ids), ref)
    assert torch.equal(logits(model, ids), ref)  # R is back in the MPI model


def test_the_same_through_a_distributed_checkpoint(tmp_path):
    model = gpt(MPIConfig(), seed=0)
    ids = torch.randint(0, V, (2, S))
    ref = logits(model, ids)
    with folded_weights(model):
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    stock = gpt(None, seed=2)
    stock.load_state_dict(dist_checkpointing.load(stock.sharded_state_dict(), str(tmp_path)))
    assert torch.equal(logits(stock, ids), ref)


def test_folding_a_model_without_mpi_routers_is_refused():
    with pytest.raises(ValueError, match="no MPITopKRouter"):
        folded_state_dict(gpt(None, seed=0))


def test_a_tiny_gpt_trains_with_megatron_ddp_and_finalize_model_grads():
    """Megatron's DDP wrapper (gradient buffers), `finalize_model_grads` (which updates the expert bias) and a torch
    AdamW on the buffers' `main_grad`: Megatron's own optimizer does not run on CPU (FP32Optimizer puts its loss scale
    on 'cuda', optimizer/optimizer.py:1249). The data is a learnable pattern (next token = token + 1)."""
    model = gpt(MPIConfig(), seed=0, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_bias_update_rate=1e-2, moe_aux_loss_coeff=0.0)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    params = [p for p in ddp.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    pos = torch.arange(S)[None].expand(8, -1)
    gen = torch.Generator().manual_seed(0)
    losses, biases = [], []
    ddp.train()
    for _ in range(30):
        ids = (torch.randint(0, V, (8, 1), generator=gen) + torch.arange(S + 1)) % V
        ddp.zero_grad_buffer()
        loss = ddp(ids[:, :-1], pos, attention_mask=MASK, labels=ids[:, 1:]).mean()
        loss.backward()
        finalize_model_grads([ddp])
        for p in params:
            p.grad = p.main_grad
        opt.step()
        losses.append(loss.item())
        biases.append(model.decoder.layers[0].mlp.router.expert_bias.clone())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert not torch.equal(biases[0], biases[-1])  # the expert bias is updated (finalize_model_grads)


def test_router_metrics_are_recorded_per_layer_and_reported_like_megatron_moe_metrics():
    """MaxVio of each layer's routing map, accumulated on the device over micro-batches; alignments on request; the
    report averages over micro-batches (loss_scale) and layers, names them as Megatron names its MoE metrics, clears."""
    from mpirouter.core.routing import max_violation
    from mpirouter.core.routers import alignment
    from mpirouter.integrations.megatron import record_alignment, report_router_metrics
    from mpirouter.integrations.megatron.tracking import ALIGN_TRACKER, MAXVIO_TRACKER

    model = gpt(MPIConfig(), seed=0)
    maps = {}
    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(lambda m, i, o: maps.setdefault(m.layer_number, []).append(o[1]))
    model.train()
    for _ in range(2):  # two micro-batches
        ids = torch.randint(0, V, (2, S))
        model(ids, torch.arange(S)[None].expand(2, -1), attention_mask=MASK)
    expected = [sum(max_violation(m.sum(0).float()) for m in maps[n]) for n in (1, 2)]
    torch.testing.assert_close(MAXVIO_TRACKER.metrics["mpi_maxvio"].values, torch.stack(expected))
    record_alignment(model)
    router = model.decoder.layers[1].mlp.router
    gate = torch.stack([e.linear_fc1.weight[:16] for e in router._experts.local_experts])
    torch.testing.assert_close(ALIGN_TRACKER.metrics["mpi_alignment"].values[1], alignment(router.rows(), gate).mean())
    line = report_router_metrics(0.5, iteration=1, num_layers=2, alignment=True)
    assert "mpi_maxvio" in line and "mpi_alignment" in line and "mpi_alignment_raw" in line
    assert f" mpi_maxvio: {float(sum(expected)) / 2 * 0.5:.2f} |" in line, line  # mean over layers of 0.5 x the sums
    assert not MAXVIO_TRACKER.metrics["mpi_maxvio"].values.any() and not ALIGN_TRACKER.metrics["mpi_alignment"].values.any()
    with torch.no_grad():  # evaluation, or the no-grad first pass of an activation recompute: not counted
        model(ids, torch.arange(S)[None].expand(2, -1), attention_mask=MASK)
    assert not MAXVIO_TRACKER.metrics["mpi_maxvio"].values.any()


def test_the_router_gradient_into_fc1_survives_gradient_accumulation_fusion():
    """With gradient_accumulation_fusion (Megatron-LM's default on GPU) the expert GEMM adds its weight gradient to
    main_grad itself, marks the weight `grad_added_to_main_grad` and hands autograd a placeholder; DDP's hook then
    adds param.grad to main_grad only if the weight is `zero_out_wgrad`. Imitated here: the fc1 weights are marked as
    the fused kernel marks them, and only the router's path reaches param.grad. It must arrive in main_grad."""
    model = gpt(MPIConfig(target="gate_up"), seed=0)
    ddp = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    router = model.decoder.layers[0].mlp.router
    fc1 = [e.linear_fc1.weight for e in router._experts.local_experts]
    assert all(w.zero_out_wgrad for w in fc1)
    x = torch.randn(6, 32)
    expected = torch.autograd.grad(router.gating(x).square().sum(), fc1)
    ddp.zero_grad_buffer()
    for w in fc1:
        w.grad_added_to_main_grad = True  # what the fused expert GEMM sets after adding its own gradient
    router.gating(x).square().sum().backward()
    for w, g in zip(fc1, expected):
        torch.testing.assert_close(w.main_grad, g)
