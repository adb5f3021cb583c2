"""mpirouter.hf on tiny random transformers models of every supported architecture (no downloads)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn.utils import parametrize

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mpirouter import hf  # noqa: E402
from mpirouter.core.routers import alignment, mpi_rows  # noqa: E402

COMMON = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
TINY = {
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        num_experts=4, num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(intermediate_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=16),
    # first_k_dense_replace=1: layer 0 is a dense MLP that must be skipped; 8 experts in 2 groups, 1 group chosen.
    "deepseek_v3": dict(
        intermediate_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1,
    ),
    "gpt_oss": dict(
        intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
ARCHS = list(TINY)
SOFTMAX_ARCHS = [a for a in ARCHS if a != "deepseek_v3"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and do not stall when the CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **extra) -> torch.nn.Module:
    cfg = AutoConfig.for_model(arch, **COMMON, **TINY[arch], **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if arch == "gpt_oss":  # random init gives zero router bias; make it nonzero so it is tested
        with torch.no_grad():
            for layer in model.model.layers:
                layer.mlp.router.bias.normal_(std=0.1)
    return model.eval()


def ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def gate_EFD(arch: str, experts: torch.nn.Module) -> torch.Tensor:
    """The gate matrices read independently of mpirouter.hf, from the transformers 5 forward code."""
    w = experts.gate_up_proj
    if arch == "gpt_oss":  # (E, D, 2F): gate_up = x @ W; gate = gate_up[..., ::2]
        return w[..., ::2].transpose(1, 2)
    return w[:, : w.shape[1] // 2]  # (E, 2F, D): gate, up = (x @ Wᵀ).chunk(2, -1)


def moe_blocks(model):
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def router_of(block):
    return block.router if hasattr(block, "router") else block.gate


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_reaches_R_and_gate(arch):
    model = hf.apply_mpi(make(arch))
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("mlp.gate.weight") or n.endswith("mlp.router.weight") for n in names)
    model.train()
    out = model(input_ids=ids(), labels=ids())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for _, block in moe_blocks(model):
        r = router_of(block).parametrizations.weight.original
        assert r.dtype == torch.float32 and r.grad is not None and r.grad.abs().sum() > 0
        g = block.experts.gate_up_proj.grad
        gate_grad = g[..., ::2] if arch == "gpt_oss" else g[:, : g.shape[1] // 2]
        assert gate_grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_reaches_gate_only_through_power_step(arch):
    """The last MoE block's experts feed no later router, so any gradient of the aux loss reaching them
    comes through φ: nonzero on the gate half, exactly zero on the up half (this also pins the layout)."""
    for variant, expect in (("mpi", True), ("linear", False)):
        model = hf.apply_mpi(make(arch), variant=variant)
        out = model(input_ids=ids())
        out.aux_loss.backward()
        g = moe_blocks(model)[-1][1].experts.gate_up_proj.grad
        if not expect:
            assert g is None or g.abs().sum() == 0
            continue
        gate_grad, up_grad = (g[..., ::2], g[..., 1::2]) if arch == "gpt_oss" else g.chunk(2, dim=1)
        assert gate_grad.abs().sum() > 0
        assert up_grad.abs().sum() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_router_logits_equal_independent_formula(arch):
    model = hf.apply_mpi(make(arch), variant="mpi", scale=1.0)
    seen = {}
    hooks = [
        router_of(b).register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0].detach(), o[0].detach())))
        for i, b in moe_blocks(model)
    ]
    model(input_ids=ids())
    for h in hooks:
        h.remove()
    assert set(seen) == {i for i, _ in moe_blocks(model)}
    for i, block in moe_blocks(model):
        router = router_of(block)
        r_ED = router.parametrizations.weight.original.detach().double()
        g_EFD = gate_EFD(arch, block.experts).detach().double()
        num_experts = r_ED.shape[0]
        rhat_ED = torch.einsum("ef,efd->ed", torch.einsum("ed,efd->ef", r_ED, g_EFD), g_EFD)  # R_i G_iᵀ G_i
        phi_ED = rhat_ED / rhat_ED.norm(dim=-1, keepdim=True) / math.sqrt(num_experts)  # C = 1/sqrt(E)
        x_TD, logits_TE = seen[i]
        expected_TE = x_TD.reshape(-1, x_TD.shape[-1]).double() @ phi_ED.T
        if arch == "gpt_oss":
            expected_TE = expected_TE + router.bias.detach().double()
        torch.testing.assert_close(logits_TE.double(), expected_TE, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_patching_changes_only_the_router_weight(arch):
    ref = make(arch)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids()).logits
    # Rows that equal the stored weight ("mpi-inplace" before any update, "linear"): bit-identical outputs.
    for variant in ("mpi-inplace", "linear"):
        model = hf.apply_mpi(copy.deepcopy(ref), variant=variant)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids()).logits, ref_logits), variant
    # "mpi": every other tensor is untouched, and the outputs are those of the plain model with weight := φ.
    model = hf.apply_mpi(copy.deepcopy(ref), variant="mpi")
    sd, ref_sd = model.state_dict(), ref.state_dict()
    router_keys = {k for k in ref_sd if k.endswith("mlp.gate.weight") or k.endswith("mlp.router.weight")}
    assert router_keys and all(torch.equal(sd[k], v) for k, v in ref_sd.items() if k not in router_keys)
    plain = copy.deepcopy(ref)
    with torch.no_grad():
        for (_, b), (_, pb) in zip(moe_blocks(model), moe_blocks(plain)):
            router_of(pb).weight.copy_(router_of(b).weight)
        assert not torch.equal(model(input_ids=ids()).logits, ref_logits)
        assert torch.equal(model(input_ids=ids()).logits, plain(input_ids=ids()).logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_save_plain_reload_same_logits(arch, tmp_path):
    model = hf.apply_mpi(make(arch))
    keys_before = {k for k in make(arch).state_dict()}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()  # R and G have moved away from their initial values
    model.eval()
    with torch.no_grad():
        patched = model(input_ids=ids(seed=5)).logits
    hf.export(model)
    assert set(model.state_dict()) == keys_before
    assert all(not type(router_of(b)).__name__.startswith("Parametrized") for _, b in moe_blocks(model))
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        plain = reloaded(input_ids=ids(seed=5)).logits
    # Same weights and the same transformers code: expected bit-identical; tolerance 1e-6 (float32).
    assert (plain - patched).abs().max().item() <= 1e-6


def test_export_bf16_writes_model_dtype(tmp_path):
    model = hf.apply_mpi(make("mixtral", dtype=torch.bfloat16))
    router = model.model.layers[0].mlp.gate
    assert router.parametrizations.weight.original.dtype == torch.float32 and router.weight.dtype == torch.bfloat16
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    model.eval()
    with torch.no_grad():
        patched = model(input_ids=ids()).logits
    hf.export(model).save_pretrained(tmp_path)
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids()).logits, patched)


def test_deepcopy_of_patched_model_is_independent():
    model = hf.apply_mpi(make("mixtral"))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        before = model(input_ids=ids()).logits
        assert torch.equal(clone(input_ids=ids()).logits, before)
    hf.export(clone)  # must neither unpatch nor unhook the original
    assert hf._state(model) is not None and hf._state(model).layers[0].router is model.model.layers[0].mlp.gate
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids()).logits, before)
        assert torch.equal(clone(input_ids=ids()).logits, before)
    with pytest.raises(ValueError):
        hf.last_aux_loss(clone)


@pytest.mark.parametrize("arch", SOFTMAX_ARCHS)
def test_aux_loss_without_output_router_logits(arch):
    """With output_router_logits off, outputs carry the aux loss transformers computes when it is on,
    and the training loss includes router_aux_loss_coef times it (padding masked out in both)."""
    x, mask = ids(), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    on = hf.apply_mpi(make(arch, output_router_logits=True))
    off = hf.apply_mpi(make(arch))
    out_on = on(input_ids=x, attention_mask=mask, labels=x)
    out_off = off(input_ids=x, attention_mask=mask, labels=x)
    assert out_off.aux_loss is not None and out_off.aux_loss.requires_grad
    torch.testing.assert_close(out_off.aux_loss, out_on.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_off.loss, out_on.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hf.last_aux_loss(on), out_on.aux_loss.detach(), rtol=1e-5, atol=1e-6)


def test_aux_loss_deepseek_is_opt_in():
    x = ids()
    base = hf.apply_mpi(make("deepseek_v3"))
    with_aux = hf.apply_mpi(make("deepseek_v3"), aux_loss_coef=0.5)
    out0, out1 = base(input_ids=x, labels=x), with_aux(input_ids=x, labels=x)
    aux = hf.last_aux_loss(with_aux)
    assert aux is not None and aux > 0
    torch.testing.assert_close(out1.loss, out0.loss + 0.5 * aux, rtol=1e-5, atol=1e-6)


def test_variants_rows():
    ref = make("qwen3_moe")
    block = moe_blocks(ref)[0][1]
    w_ED = block.gate.weight.detach().clone()
    g_EFD = gate_EFD("qwen3_moe", block.experts).detach()
    c = 2.0 / math.sqrt(w_ED.shape[0])
    retr = hf.apply_mpi(copy.deepcopy(ref), variant="retract", scale=2.0)
    torch.testing.assert_close(moe_blocks(retr)[0][1].gate.weight, c * w_ED / w_ED.norm(dim=-1, keepdim=True))
    powr = hf.apply_mpi(copy.deepcopy(ref), variant="power")
    rhat_ED = torch.einsum("ef,efd->ed", torch.einsum("ed,efd->ef", w_ED, g_EFD), g_EFD)
    torch.testing.assert_close(moe_blocks(powr)[0][1].gate.weight, rhat_ED)
    auto = hf.apply_mpi(copy.deepcopy(ref), variant="mpi", scale="auto")
    norms = moe_blocks(auto)[0][1].gate.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, w_ED.norm(dim=-1).mean().item()))
    both = hf.apply_mpi(copy.deepcopy(ref), variant="mpi", target="gate_up")
    gate_only = hf.apply_mpi(copy.deepcopy(ref))
    assert not torch.allclose(moe_blocks(both)[0][1].gate.weight, moe_blocks(gate_only)[0][1].gate.weight)
    with pytest.raises(ValueError, match="variant must be one of"):
        hf.apply_mpi(copy.deepcopy(ref), variant="nope")
    with pytest.raises(RuntimeError, match="already applied"):
        hf.apply_mpi(auto)


def untouched(model: torch.nn.Module, state_before: dict[str, torch.Tensor], hooks_before: int) -> bool:
    """No router parametrized, no hook added, every tensor as it was, and apply_mpi still allowed."""
    state = model.state_dict()
    return (
        not any(parametrize.is_parametrized(m) for m in model.modules())
        and sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
        and state.keys() == state_before.keys() and all(torch.equal(state[k], v) for k, v in state_before.items())
        and hf.apply_mpi(model) is model
    )


def snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    return {k: v.clone() for k, v in model.state_dict().items()}, sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(aux_loss_coef=-1.0), r"aux_loss_coef must be >= 0 and finite \(or null\), got -1.0"),
        (dict(aux_loss_coef=math.nan), r"aux_loss_coef must be >= 0 and finite \(or null\), got nan"),
        (dict(aux_loss_coef=math.inf), r"aux_loss_coef must be >= 0 and finite \(or null\), got inf"),
        (dict(aux_loss_coef="0.1"), 'aux_loss_coef must be a number or null, got "0.1"'),
        (dict(scale=0.0), 'scale must be a finite number > 0 or "auto", got float 0.0'),
        (dict(scale=-1.0), 'scale must be a finite number > 0 or "auto", got float -1.0'),
        (dict(scale=math.nan), 'scale must be a finite number > 0 or "auto", got float nan'),
        (dict(scale=math.inf), 'scale must be a finite number > 0 or "auto", got float inf'),
        (dict(scale="bogus"), 'scale must be a finite number > 0 or "auto", got "bogus"'),
        (dict(scale=None), 'scale must be a finite number > 0 or "auto", got null'),
        (dict(scale=True), 'scale must be a finite number > 0 or "auto", got boolean true'),
        (dict(variant="nope"), 'variant must be one of linear, mpi, power, retract, mpi-inplace, got "nope"'),
        (dict(target="down"), 'target must be one of gate, up, gate_up, got "down"'),
    ],
    ids=["negative-aux-coef", "nan-aux-coef", "inf-aux-coef", "string-aux-coef", "zero-scale", "negative-scale", "nan-scale",
         "inf-scale", "string-scale", "none-scale", "bool-scale", "unknown-variant", "unknown-target"],
)
def test_apply_mpi_rejects_bad_arguments_before_touching_the_model(kwargs, message):
    model = make("mixtral")
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"^{message}$"):
        hf.apply_mpi(model, **kwargs)
    assert untouched(model, *before)


def test_apply_mpi_rejects_a_bad_default_aux_loss_coef_from_the_config():
    model = make("mixtral", router_aux_loss_coef=-0.5)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"aux_loss_coef \(default: model.config.router_aux_loss_coef\) must be >= 0"):
        hf.apply_mpi(model)
    model.config.router_aux_loss_coef = 0.0
    assert untouched(model, *before)
    assert hf.apply_mpi(make("mixtral", router_aux_loss_coef=-0.5), aux_loss_coef=0.1) is not None  # explicit wins


def test_apply_mpi_checks_every_block_before_patching_any():
    """A mismatch in the last block used to surface after the first blocks were already patched."""
    model = make("mixtral")
    moe_blocks(model)[-1][1].gate.weight = torch.nn.Parameter(torch.randn(4, 31))  # the gate's width is 32
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"router \(4, 31\) does not match gate"):
        hf.apply_mpi(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert sum(len(m._forward_hooks) for m in model.modules()) == before[1]


def test_apply_mpi_auto_scale_refuses_zero_router_rows():
    model = make("olmoe")
    with torch.no_grad():
        moe_blocks(model)[-1][1].gate.weight.zero_()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r'scale="auto" needs router rows of finite nonzero norm, got mean norm 0.0'):
        hf.apply_mpi(model, scale="auto")
    assert untouched(model, *before)
    hf.export(model)
    assert hf.apply_mpi(model, variant="linear", scale="auto") is model  # the scale is unused there


def test_inplace_update_sets_R_to_mpi_rows():
    model = hf.apply_mpi(make("olmoe"), variant="mpi-inplace", scale=1.0)
    block = moe_blocks(model)[0][1]
    r_old = block.gate.parametrizations.weight.original.detach().clone()
    hf.inplace_update(model)
    expected = mpi_rows(r_old, gate_EFD("olmoe", block.experts).detach(), scale=1 / math.sqrt(4))
    torch.testing.assert_close(block.gate.weight, expected)
    assert block.gate.weight.norm(dim=-1).sub(0.5).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_legacy_per_expert_module_list_layout(arch):
    """transformers 4.x kept experts as a ModuleList of MLPs (Mixtral: w1/w3, others gate_proj/up_proj)."""
    adapter = hf.ADAPTERS[arch]
    experts = moe_blocks(make(arch))[0][1].experts
    w_gate_EFD, w_up_EFD = hf.expert_matrices(adapter, experts)
    legacy = torch.nn.ModuleList()
    for e in range(w_gate_EFD.shape[0]):
        mlp = torch.nn.Module()
        setattr(mlp, adapter.legacy_gate, torch.nn.Linear(w_gate_EFD.shape[2], w_gate_EFD.shape[1], bias=False))
        setattr(mlp, adapter.legacy_up, torch.nn.Linear(w_gate_EFD.shape[2], w_gate_EFD.shape[1], bias=False))
        with torch.no_grad():
            getattr(mlp, adapter.legacy_gate).weight.copy_(w_gate_EFD[e])
            getattr(mlp, adapter.legacy_up).weight.copy_(w_up_EFD[e])
        legacy.append(mlp)
    g2, u2 = hf.expert_matrices(adapter, legacy)
    assert torch.equal(g2, w_gate_EFD) and torch.equal(u2, w_up_EFD)
    experts.is_transposed = True  # a layout the adapter does not describe must be refused, not misread
    with pytest.raises(ValueError, match="unknown layout"):
        hf.expert_matrices(adapter, experts)


def test_unsupported_model_raises_listing_supported():
    cfg = AutoConfig.for_model("llama", **COMMON, intermediate_size=32)
    llama = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="supported: mixtral, olmoe, qwen2_moe, qwen3_moe, deepseek_v3, gpt_oss"):
        hf.apply_mpi(llama)
    with pytest.raises(ValueError, match="does not support"):
        hf.apply_mpi(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="apply_mpi"):
        hf.export(llama)


def test_metrics_function_and_gradient_checkpointing():
    model = hf.apply_mpi(make("qwen3_moe"))
    model.train()
    loads = {0: [], 1: []}  # the choices each router made, recorded independently of mpirouter.hf
    hooks = [
        b.gate.register_forward_hook(
            lambda m, a, o, i=i: loads[i].append(torch.bincount(o[2].reshape(-1), minlength=4).float())
        )
        for i, b in moe_blocks(model)
    ]
    for seed in range(2):
        model(input_ids=ids(seed=seed), labels=ids(seed=seed)).loss.backward()
    for h in hooks:
        h.remove()
    m = hf.router_metrics(model)
    for key in ("maxvio", "maxvio_window", "aux", "align", "align_R"):
        assert f"router/{key}" in m and f"router/{key}/layer0" in m and f"router/{key}/layer1" in m
    for i, (a, b) in loads.items():
        maxvio = [((x.max() - x.mean()) / x.mean()).item() for x in (a, b, a + b)]
        assert math.isclose(m[f"router/maxvio/layer{i}"], (maxvio[0] + maxvio[1]) / 2, rel_tol=1e-6)
        assert math.isclose(m[f"router/maxvio_window/layer{i}"], maxvio[2], rel_tol=1e-6)
    assert 0 < m["router/align"] <= 1 and m["router/aux"] > 0
    block = moe_blocks(model)[0][1]
    expected = alignment(block.gate.weight, gate_EFD("qwen3_moe", block.experts)).mean().item()
    assert math.isclose(m["router/align/layer0"], expected, rel_tol=1e-5)
    assert "router/maxvio" not in hf.router_metrics(model, alignment_metrics=False)  # window was reset
    assert all(layer.logits_TE is None for layer in hf._state(model).layers)  # no graph kept past forward
    model.activation_checkpointing_enable()
    for seed in range(2):
        model(input_ids=ids(seed=seed), labels=ids(seed=seed)).loss.backward()  # recomputation must not count
    assert all(layer.stats["train"]["batches"] == 2 for layer in hf._state(model).layers)


def test_trainer_callback_logs_router_metrics(tmp_path):
    pytest.importorskip("accelerate")  # transformers' Trainer needs it
    from transformers import Trainer, TrainingArguments

    model = hf.apply_mpi(make("mixtral"), variant="mpi-inplace")
    data = [{"input_ids": ids(1, 12, seed=s)[0], "labels": ids(1, 12, seed=s)[0]} for s in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, learning_rate=1e-2,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    hf.add_router_callback(trainer)
    r_before = model.model.layers[0].mlp.gate.parametrizations.weight.original.detach().clone()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all("router/maxvio/layer0" in h and "router/align" in h for h in logged)
    r_after = model.model.layers[0].mlp.gate.parametrizations.weight.original.detach()
    # mpi-inplace: the callback retracted R onto the sphere of radius C = 1/sqrt(4) after the last step.
    assert not torch.equal(r_before, r_after)
    torch.testing.assert_close(r_after.norm(dim=-1), torch.full((4,), 0.5))
