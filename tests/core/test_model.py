"""The MoE language model: shapes, parameter counts, config validation, folding, generation."""

import re

import pytest
import torch

from mpirouter.core.model import PRESETS, ModelConfig, MoELM, apply_rope, preset_config, rope_tables
from mpirouter.core.moe import MoE


def small_model(**kw) -> MoELM:
    torch.manual_seed(0)
    return MoELM(preset_config("debug", **kw))


def test_forward_shapes_and_losses():
    model = small_model()
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx, idx)
    assert out.logits.shape == (2, 16, 256)
    assert len(out.moe_stats) == model.config.n_layers
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.z_loss)
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # near-uniform at init
    assert model(idx).loss is None


def test_active_parameters_count_only_top_k_experts():
    model = small_model()
    c = model.config
    counts = model.num_params()
    expert_per_layer = 3 * c.moe.num_experts * c.moe.hidden * c.dim
    inactive = c.n_layers * expert_per_layer * (c.moe.num_experts - c.moe.top_k) // c.moe.num_experts
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["active"] == counts["total"] - inactive
    assert counts["active_non_embedding"] == counts["active"] - 2 * c.vocab_size * c.dim


@pytest.mark.parametrize("name, millions", [("cpu-440k", 0.44), ("cpu-1.7m", 1.7)])
def test_ladder_presets_are_named_for_their_active_non_embedding_size(name, millions):
    cfg = preset_config(name)
    attention, experts = 4 * cfg.dim**2, 3 * cfg.moe.top_k * cfg.dim * cfg.moe.hidden
    router_and_norms = cfg.moe.num_experts * cfg.dim + 2 * cfg.dim
    n = MoELM(cfg).num_params()["active_non_embedding"]
    assert n == cfg.n_layers * (attention + experts + router_and_norms) + cfg.dim  # + the final norm
    assert abs(n / 1e6 - millions) / millions < 0.05


def test_dense_first_layers_and_tied_embeddings():
    model = small_model(n_dense_layers=1, tie_embeddings=True)
    assert not isinstance(model.blocks[0].ffn, MoE) and isinstance(model.blocks[1].ffn, MoE)
    assert model.head.weight is model.tok_emb.weight
    assert len(model(torch.randint(0, 256, (1, 8))).moe_stats) == 1
    assert model.num_params()["total"] == sum(p.numel() for p in model.parameters())  # tied counted once
    assert model.num_params()["active_non_embedding"] == model.num_params()["active"] - model.config.vocab_size * model.config.dim


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(dim=64, n_heads=3), "n_heads=3 must divide dim=64"), (dict(dim=64, n_heads=64), "must be even for RoPE"),
     (dict(n_layers=2, n_dense_layers=3), r"n_dense_layers must be in \[0, n_layers=2\], got 3"),
     (dict(n_dense_layers=-1), r"n_dense_layers must be in \[0, n_layers=4\], got -1"),
     (dict(moe=dict(num_experts=4, top_k=5)), r"moe: top_k must be in \[1, num_experts=4\]"),
     (dict(n_heads=0), "n_heads must be >= 1, got 0"), (dict(vocab_size=0), "vocab_size must be >= 1, got 0"),
     (dict(max_seq_len=0), "max_seq_len must be >= 1, got 0"), (dict(dense_hidden=0), r"dense_hidden must be >= 1 \(or null\), got 0"),
     (dict(rope_theta=0.0), "rope_theta must be > 0 and finite, got 0.0"), (dict(rope_theta=float("inf")), "rope_theta must be > 0 and finite, got inf"),
     (dict(norm_eps=float("nan")), "norm_eps must be > 0 and finite, got nan"), (dict(norm_eps=0.0), "norm_eps must be > 0 and finite, got 0.0"),
     (dict(dim=64.0), "dim must be an integer, got float 64.0"), (dict(moe=5), "moe must be a MoEConfig or a dict of its fields, got int 5"),
     (dict(moe=dict(topk=1)), "moe: unknown MoEConfig field")],
    ids=["heads-not-dividing-width", "odd-head-width", "too-many-dense", "negative-dense", "topk-gt-experts", "no-heads", "no-vocab",
         "no-context", "zero-dense-hidden", "zero-rope-theta", "inf-rope-theta", "nan-norm-eps", "zero-norm-eps", "float-width",
         "moe-not-a-config", "moe-dict-unknown-key"],
)
def test_bad_model_configs_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="choose one of debug, tiny"):
        preset_config("huge")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_valid_configs(name):
    cfg = preset_config(name)
    assert cfg.dim % cfg.n_heads == 0 and cfg.moe.top_k <= cfg.moe.num_experts


def test_sequence_longer_than_context_is_an_error():
    model = small_model()
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.randint(0, 256, (1, model.config.max_seq_len + 1)))


@pytest.mark.parametrize(
    "call, message",
    [(lambda m: m(torch.zeros(16, dtype=torch.long)), "MoELM expects idx of shape (batch, seq), got (16,)"),
     (lambda m: m(torch.zeros(1, 2, 16, dtype=torch.long)), "MoELM expects idx of shape (batch, seq), got (1, 2, 16)"),
     (lambda m: m(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 15, dtype=torch.long)),
      "MoELM expects targets of the shape of idx (2, 16), got (2, 15)"),
     (lambda m: m(torch.zeros(2, 16, dtype=torch.long), torch.zeros(32, dtype=torch.long)),
      "MoELM expects targets of the shape of idx (2, 16), got (32,)"),
     (lambda m: m(torch.zeros(2, 16, dtype=torch.long), router_rows=[]), "router_rows must hold one tensor per MoE layer (2), got 0"),
     (lambda m: m.generate(torch.zeros(4, dtype=torch.long), 1), "MoELM expects idx of shape (batch, seq), got (4,)")],
    ids=["1d-idx", "3d-idx", "shorter-targets", "flat-targets", "too-few-router-rows", "generate-1d-prompt"],
)
def test_forward_names_the_expected_input_shapes(call, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        call(small_model())


def test_rope_preserves_norms_and_encodes_relative_position():
    cos, sin = rope_tables(10, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    dots = (rq[0, 0, 2:] * rk[0, 0, :-2]).sum(-1)  # same offset 2 at every position
    torch.testing.assert_close(dots, dots[:1].expand_as(dots), atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    model = small_model()
    idx = torch.randint(0, 256, (1, 12))
    a = model(idx).logits[:, :6]
    idx2 = idx.clone()
    idx2[:, 6:] = (idx2[:, 6:] + 1) % 256
    torch.testing.assert_close(model(idx2).logits[:, :6], a)


@pytest.mark.parametrize("kind", ["mpi", "power", "retract", "mpi-inplace", "linear"])
def test_fold_routers_keeps_model_logits(kind):
    model = small_model(moe=dict(router=dict(kind=kind)))
    built_from = model.config
    idx = torch.randint(0, 256, (2, 10))
    before = model(idx).logits
    model.fold_routers()
    assert all(m.router.kind == "linear" for m in model.moe_layers())
    assert model.config.moe.router.kind == "linear" and built_from.moe.router.kind == kind
    torch.testing.assert_close(model(idx).logits, before, atol=1e-5, rtol=1e-5)


def test_generate_is_seeded_and_greedy_is_deterministic():
    model = small_model()
    idx = torch.randint(0, 256, (1, 4))
    g = lambda: torch.Generator().manual_seed(0)
    a = model.generate(idx, 5, temperature=1.0, top_k=20, generator=g())
    assert a.shape == (1, 9) and torch.equal(a, model.generate(idx, 5, temperature=1.0, top_k=20, generator=g()))
    assert torch.equal(model.generate(idx, 5, temperature=0), model.generate(idx, 5, temperature=0))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(max_new_tokens=-1), "max_new_tokens must be >= 0, got -1"), (dict(temperature=-0.5), "temperature must be >= 0 and finite, got -0.5"),
     (dict(temperature=float("nan")), "temperature must be >= 0 and finite, got nan"), (dict(top_k=0), r"top_k must be >= 1 \(or null\), got 0")],
    ids=["negative-length", "negative-temperature", "nan-temperature", "top-k-zero"],
)
def test_generate_rejects_bad_arguments(kwargs, message):
    model = small_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), **{"max_new_tokens": 1, **kwargs})


def test_generate_zero_new_tokens_returns_the_prompt():
    idx = torch.randint(0, 256, (2, 3))
    assert torch.equal(small_model().generate(idx, 0), idx)
