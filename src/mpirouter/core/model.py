"""A small decoder-only MoE language model (nanoGPT-style), every FFN an MoE layer.

Shape legend: B batch, S sequence, D width, H heads, Dh head width, V vocabulary.

embeddings -> n_layers x [RMSNorm -> causal attention (RoPE, SDPA) -> +, RMSNorm -> MoE -> +]
-> RMSNorm -> head. The first `n_dense_layers` blocks can use a dense SwiGLU FFN instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common.config import check_number, from_dict, show_value
from .moe import MoE, MoEConfig, MoEStats


@dataclass
class ModelConfig:
    """The language model's architecture."""

    vocab_size: int = 256
    """Token vocabulary size (256 for the byte tokenizer)."""
    dim: int = 128
    """Residual stream width D."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide dim."""
    max_seq_len: int = 128
    """Longest sequence (RoPE table size)."""
    n_dense_layers: int = 0
    """The first k blocks use a dense SwiGLU FFN instead of MoE."""
    dense_hidden: int | None = None
    """Hidden size of dense FFNs (default: (top_k + n_shared) * expert hidden, the MoE's active size)."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layers (experts, top-k, router, balance losses)."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = from_dict(MoEConfig, self.moe, "moe")
        elif not isinstance(self.moe, MoEConfig):
            raise ValueError(f"moe must be a MoEConfig or a dict of its fields, got {show_value(self.moe)}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            check_number(name, getattr(self, name), integer=True, ge=1)
        if self.dim % self.n_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head width dim/n_heads={self.dim // self.n_heads} must be even for RoPE")
        check_number("n_dense_layers", self.n_dense_layers, integer=True, ge=0, le=self.n_layers, upper_name=f"n_layers={self.n_layers}")
        check_number("dense_hidden", self.dense_hidden, integer=True, ge=1, optional=True)
        check_number("rope_theta", self.rope_theta, gt=0)
        # > 0, not >= 0: with eps = 0 an all-zero hidden state normalizes to 0/0 = NaN
        check_number("norm_eps", self.norm_eps, gt=0)


# Named model sizes. `tiny` trains in a few minutes on 2 CPU cores; `medium`/`large` are for a GPU.
# The `cpu-*` presets are rungs of the CPU scale ladder (results/ladder/PLAN.md), named for their
# active non-embedding parameters (`MoELM.num_params()["active_non_embedding"]`): 0.44 M and 1.66 M,
# beside `debug` (0.082 M) and `tiny` (1.05 M); byte vocabulary, 8 experts top-2 like `tiny`.
PRESETS: dict[str, dict] = {
    "debug": dict(dim=64, n_layers=2, n_heads=2, max_seq_len=64, moe=dict(num_experts=4, top_k=2, hidden=64)),
    "tiny": dict(dim=128, n_layers=4, n_heads=4, max_seq_len=128, moe=dict(num_experts=8, top_k=2, hidden=256)),
    "small": dict(dim=256, n_layers=6, n_heads=8, max_seq_len=256, moe=dict(num_experts=16, top_k=2, hidden=512)),
    "medium": dict(dim=512, n_layers=8, n_heads=8, max_seq_len=512, moe=dict(num_experts=32, top_k=4, hidden=512)),
    "large": dict(dim=1024, n_layers=16, n_heads=16, max_seq_len=1024, moe=dict(num_experts=64, top_k=8, hidden=512)),
    "cpu-440k": dict(dim=96, n_layers=3, n_heads=3, max_seq_len=128, moe=dict(num_experts=8, top_k=2, hidden=192)),
    "cpu-1.7m": dict(dim=144, n_layers=5, n_heads=4, max_seq_len=128, moe=dict(num_experts=8, top_k=2, hidden=288)),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """A ModelConfig from a named preset; `overrides` replace top-level fields (moe as a dict merges)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
    moe = {**base.pop("moe"), **overrides.pop("moe", {})}
    return ModelConfig(**{**base, **overrides, "moe": moe})


class ModelOutput(NamedTuple):
    logits: torch.Tensor
    """(B, S, V) next-token logits."""
    loss: torch.Tensor | None
    """lm_loss + aux_loss + z_loss (what to backpropagate); None without targets."""
    lm_loss: torch.Tensor | None
    """Mean next-token cross-entropy."""
    aux_loss: torch.Tensor
    """Sum over MoE layers of the (scaled) load-balancing losses and the routers' own losses (ERC, SimBal, ReMoE's L1)."""
    z_loss: torch.Tensor
    """Sum over MoE layers of the (scaled) router z-losses."""
    moe_stats: list[MoEStats]
    """One entry per MoE layer, in order."""


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (S, Dh/2) for rotary position embeddings (Su et al., 2021)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles_SH.cos(), angles_SH.sin()


def apply_rope(x_BHSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
    """Rotate (even, odd) channel pairs by position-dependent angles."""
    x1, x2 = x_BHSD[..., 0::2], x_BHSD[..., 1::2]
    cos, sin = cos_SH.to(x_BHSD.dtype), sin_SH.to(x_BHSD.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_SH: torch.Tensor, sin_SH: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.wqkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos_SH, sin_SH), apply_rope(k, cos_SH, sin_SH)
        y_BHSD = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y_BHSD.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    """SwiGLU feed-forward for the optional dense blocks."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, dense: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        hidden = cfg.dense_hidden or (cfg.moe.top_k + cfg.moe.n_shared) * cfg.moe.hidden
        self.ffn = DenseFFN(cfg.dim, hidden) if dense else MoE(cfg.dim, cfg.moe)

    def forward(self, x, cos, sin, rows_ED: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if isinstance(self.ffn, MoE):
            out, stats = self.ffn(self.ffn_norm(x), rows_ED)
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None


# ----------------------------------------------------------------------------- model


class MoELM(nn.Module):
    """Decoder-only MoE language model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, dense=i < cfg.n_dense_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.max_seq_len, cfg.dim // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self)

    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]

    def router_rows(self) -> list[torch.Tensor] | None:
        """φ of every MoE layer, in order, with their graphs; None when no router computes φ (linear,
        mpi-inplace: their rows are R itself, and sharing them across micro-batches saves nothing)."""
        layers = self.moe_layers()
        if not any(m.router.computes_rows for m in layers):
            return None
        return [m.router_rows() for m in layers]

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None,
                router_rows: list[torch.Tensor] | None = None) -> ModelOutput:
        """Logits, losses and per-layer MoE statistics. `router_rows`: φ per MoE layer, computed
        beforehand (`router_rows()`, shared across micro-batches by `RowsPerStep`); None: each layer computes its own."""
        _check_idx(idx_BS)
        B, S = idx_BS.shape
        if targets_BS is not None and targets_BS.shape != idx_BS.shape:
            raise ValueError(f"MoELM expects targets of the shape of idx {tuple(idx_BS.shape)}, got {tuple(targets_BS.shape)}")
        if router_rows is not None and len(router_rows) != len(self.moe_layers()):
            raise ValueError(f"router_rows must hold one tensor per MoE layer ({len(self.moe_layers())}), got {len(router_rows)}")
        if S > self.config.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.config.max_seq_len}")
        x = self.tok_emb(idx_BS)
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        stats: list[MoEStats] = []
        rows = iter(router_rows) if router_rows is not None else None
        for block in self.blocks:
            moe = isinstance(block.ffn, MoE)
            x, st = block(x, cos, sin, next(rows) if rows is not None and moe else None)
            if st is not None:
                stats.append(st)
        logits_BSV = self.head(self.norm(x))
        zero = logits_BSV.new_zeros((), dtype=torch.float32)
        # the routers' own losses (ERC, SimBal, ReMoE's L1) count as auxiliary losses beside the balance loss
        aux = sum((s.aux_loss if s.router_loss is None else s.aux_loss + s.router_loss for s in stats), zero)
        z = sum((s.z_loss for s in stats), zero)
        if targets_BS is None:
            return ModelOutput(logits_BSV, None, None, aux, z, stats)
        lm = F.cross_entropy(logits_BSV.float().view(B * S, -1), targets_BS.reshape(-1))
        return ModelOutput(logits_BSV, lm + aux + z, lm, aux, z, stats)

    @torch.no_grad()
    def post_step(self) -> None:
        """Run after every optimizer step: the `mpi-inplace` router projection."""
        for moe in self.moe_layers():
            moe.post_step()

    @torch.no_grad()
    def fold_routers(self) -> None:
        """Fold every router into a plain linear router (φ computed once): the export form.

        `self.config` becomes a new ModelConfig saying so; the one the model was built from is left as it was.
        """
        layers = self.moe_layers()
        for moe in layers:
            moe.fold_router()
        if layers:
            self.config = dataclasses.replace(self.config, moe=layers[0].config)

    def num_params(self) -> dict[str, int]:
        """Total and active (per token) parameter counts; shared tied weights counted once.

        active_non_embedding leaves out the token embedding and the output head (Kaplan et al.'s
        N, the size axis of the scale ladder)."""
        unique = {id(p): p for p in self.parameters()}
        total = sum(p.numel() for p in unique.values())
        inactive = 0
        for moe in self.moe_layers():
            E, K = moe.config.num_experts, moe.config.top_k
            expert = moe.w_gate.numel() + moe.w_up.numel() + moe.w_down.numel()
            inactive += expert * (E - K) // E
        embedding = sum(p.numel() for p in {id(p): p for p in (self.tok_emb.weight, self.head.weight)}.values())
        return {"total": total, "active": total - inactive, "active_non_embedding": total - inactive - embedding}

    @torch.no_grad()
    def generate(self, idx_BS: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations (no KV cache: these models are small). temperature 0 = greedy."""
        check_number("max_new_tokens", max_new_tokens, integer=True, ge=0)
        check_number("temperature", temperature, ge=0)
        check_number("top_k", top_k, integer=True, ge=1, optional=True)
        _check_idx(idx_BS)
        for _ in range(max_new_tokens):
            logits = self(idx_BS[:, -self.config.max_seq_len :]).logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                # shift first: with a tiny temperature the top logit maps to 0, not to inf (inf - inf = NaN)
                logits = (logits - logits.max(-1, keepdim=True).values) / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            idx_BS = torch.cat([idx_BS, nxt], dim=1)
        return idx_BS


def _check_idx(idx_BS: torch.Tensor) -> None:
    """ValueError unless the token ids are a (batch, seq) tensor; reads the shape only, never the values."""
    if idx_BS.dim() != 2:
        raise ValueError(f"MoELM expects idx of shape (batch, seq), got {tuple(idx_BS.shape)}")


def init_weights(model: MoELM) -> None:
    """All weight initialization, in one place.

    - token embedding: N(0, 1) — RMSNorm follows, so the scale only sets the residual's start;
      N(0, 0.02) when tied to the output head, which needs small logits at init.
    - attention wqkv, dense/expert gate & up, output head: N(0, 0.02) (GPT-2 / torchtitan).
    - residual outputs (attention wo, FFN/expert down): N(0, 0.02 / sqrt(2 * n_layers)), so the
      residual stream's variance does not grow with depth (GPT-2).
    - router rows R: N(0, 0.02) (torchtitan); MPI variants then use only their directions, and
      `mpi-inplace` projects them once at init.
    - RMSNorm gains: 1.
    """
    cfg = model.config
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    nn.init.normal_(model.tok_emb.weight, std=0.02 if cfg.tie_embeddings else 1.0)
    if not cfg.tie_embeddings:
        nn.init.normal_(model.head.weight, std=0.02)
    for block in model.blocks:
        nn.init.normal_(block.attn.wqkv.weight, std=0.02)
        nn.init.normal_(block.attn.wo.weight, std=out_std)
        if isinstance(block.ffn, MoE):
            block.ffn.reset_parameters(out_std=out_std)
        else:
            nn.init.normal_(block.ffn.w_gate.weight, std=0.02)
            nn.init.normal_(block.ffn.w_up.weight, std=0.02)
            nn.init.normal_(block.ffn.w_down.weight, std=out_std)
