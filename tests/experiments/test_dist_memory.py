"""The computed memory table of docs/distributed.md, against counts by hand."""

import pytest

from mpirouter.experiments.dist_memory import BYTES_PER_PARAM, ParamCounts, param_counts, state_bytes_per_rank, table


def test_parameter_counts_of_a_preset_by_hand():
    c = param_counts("debug", vocab_size=256)  # dim 64, 2 layers, E=4, F=64
    D, L, E, F, V = 64, 2, 4, 64, 256
    assert c.expert == L * (3 * E * F * D + E * D)
    assert c.dense == 2 * V * D + L * (4 * D * D + 2 * D) + D  # embeddings, head, attention, norms, final norm
    assert c.block == 4 * D * D + 2 * D + 3 * E * F * D + E * D


@pytest.mark.parametrize("strategy,ep,held", [
    ("ddp", 1, 100 + 800), ("fsdp", 1, (100 + 800) / 8), ("ddp", 4, 100 + 800 / 4), ("fsdp", 8, 100 / 8 + 800 / 8),
], ids=lambda v: str(v))
def test_what_a_rank_holds(strategy, ep, held):
    assert state_bytes_per_rank(ParamCounts(100, 800, 50), 8, strategy, ep) == pytest.approx(BYTES_PER_PARAM * held)


def test_ep_must_divide_the_world():
    with pytest.raises(ValueError, match="must divide"):
        state_bytes_per_rank(ParamCounts(1, 1, 1), 8, "ddp", 3)


def test_the_table_says_it_is_computed():
    assert "COMPUTED" in table("debug", 256, 2) and "| fsdp | 2 |" in table("debug", 256, 2)
