"""mpirouter.hf's router hook counts each expert's tokens on the device: no bincount (a host read of its
input's min and max on CUDA, in every MoE layer of every forward), the same counts."""

from __future__ import annotations

import pytest
import torch
from sync_proxy import SyncProxy

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from mpirouter import hf  # noqa: E402
from mpirouter.integrations.hf import state  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY = {
    "qwen3_moe": dict(intermediate_size=32, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=16),
    "mixtral": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
@pytest.mark.parametrize("arch", list(TINY))
def test_the_router_hook_counts_tokens_on_the_device(monkeypatch, arch):
    mode = SyncProxy(active=False)  # watching only the counting, below
    expected: dict[int, torch.Tensor] = {}
    real_record = state._Layer.record

    def watched(self, module, args, output):
        mode.active = True
        try:
            real_record(self, module, args, output)
        finally:
            mode.active = False
        # the reference count, outside the watched region: the choices the hook just kept
        counts = torch.bincount(self.idx_TK.reshape(-1), minlength=self.num_experts).float()
        expected[self.index] = expected.get(self.index, torch.zeros_like(counts)) + counts

    monkeypatch.setattr(state._Layer, "record", watched)  # before apply_mpi, which registers the bound method
    torch.manual_seed(0)
    model = hf.apply_mpi(AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **COMMON, **TINY[arch]))).train()
    g = torch.Generator().manual_seed(1)
    with mode:
        for _ in range(2):
            x = torch.randint(3, 64, (2, 12), generator=g)
            model(input_ids=x, labels=x)
    layers = hf._state(model).layers
    assert mode.found == [], f"host reads in the router hook: {mode.found}"
    assert sorted(expected) == sorted(layer.index for layer in layers) and layers
    for layer in layers:
        load_E = layer.stats["train"]["load_E"]
        assert load_E.shape == (layer.num_experts,) and load_E.dtype == torch.float32
        assert torch.equal(load_E, expected[layer.index])
        assert load_E.sum() == 2 * 2 * 12 * layer.top_k  # two batches of 2 x 12 tokens, every slot counted once
        assert layer.stats["train"]["batches"] == 2
