"""`MPIMoE`'s routed-token count (logged steps) runs on the device: no bincount (on CUDA a host read of its
input's min and max per MoE layer), the same counts."""

from __future__ import annotations

import pytest
import torch
from sync_proxy import SyncProxy

pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed (pip install 'mpirouter[titan]')")

from tiny import MODELS, VOCAB  # noqa: E402

from mpirouter.integrations.torchtitan import MPIMoE, to_mpi  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

@pytest.mark.parametrize("family", MODELS)
def test_routed_tokens_are_counted_on_the_device(monkeypatch, family):
    mode = SyncProxy(active=False)  # watching only the counting, below
    expected: dict[int, torch.Tensor] = {}
    real_count = MPIMoE._count_routed_tokens

    def watched(self, router, inputs, outputs):
        mode.active = True
        try:
            real_count(self, router, inputs, outputs)
        finally:
            mode.active = False
        counts = torch.bincount(outputs[1].reshape(-1), minlength=self.routed_tokens_E.numel()).float()
        expected[id(self)] = expected.get(id(self), torch.zeros_like(counts)) + counts

    monkeypatch.setattr(MPIMoE, "_count_routed_tokens", watched)  # before the build, which registers the bound method
    torch.manual_seed(0)
    model = to_mpi(MODELS[family]()).build()
    model.init_states(buffer_device=torch.device("cpu"))
    model.train()
    g = torch.Generator().manual_seed(1)
    with mode:
        for _ in range(2):
            model(torch.randint(0, VOCAB, (2, 12), generator=g))
    layers = [m for m in model.modules() if isinstance(m, MPIMoE)]
    assert mode.found == [], f"host reads in the routed-token count: {mode.found}"
    assert layers and sorted(expected) == sorted(id(m) for m in layers)
    for moe in layers:
        assert moe.routed_tokens_E.dtype == torch.float32
        assert torch.equal(moe.routed_tokens_E, expected[id(moe)])
        assert moe.routed_tokens_E.sum() == 2 * 2 * 12 * moe.router.top_k  # every routed slot counted once
