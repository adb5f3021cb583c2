"""Local assets for the torchtitan CPU harness: a tiny tokenizer and a tiny text dataset, no downloads.

    python tests/integrations/titan_harness/assets.py /tmp/titan_assets

`make_assets(folder)` writes
- `folder/hf_assets/`: tokenizer.json (BPE trained here with the `tokenizers` library) and
  tokenizer_config.json naming the bos/eos tokens, which is what torchtitan's
  `HuggingFaceTokenizer` reads (components/tokenizer.py) to find the ids it adds around every document;
- `folder/dataset/data.json`: JSON lines `{"text": ...}`, the layout of torchtitan's own `c4_test`
  asset, so the built-in `c4_test` loader (`load_dataset(path, split="train")` in
  hf_datasets/text_datasets.py) reads it when given `--dataloader.dataset_path folder/dataset`.
The text is synthetic but deterministic and has structure (a small grammar), so the loss can fall.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

# The model's vocab_size (titan_tiny.VOCAB_SIZE); the tokenizer must not exceed it.
VOCAB_SIZE = 256
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

_SUBJECTS = ["the router", "an expert", "the model", "a token", "the gate", "each layer", "the batch", "a rank"]
_VERBS = ["sends", "routes", "scores", "mixes", "splits", "gathers", "balances", "updates"]
_OBJECTS = ["the tokens", "its weights", "the experts", "a gradient", "the logits", "every shard", "the loss"]
_TAILS = ["quickly", "on every step", "across ranks", "in order", "with care", "once more", "again"]


def synthetic_lines(n: int = 400, seed: int = 0) -> list[str]:
    """`n` documents of 2-5 sentences from a fixed grammar; the same for a given seed."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
            for _ in range(rng.randint(2, 5))
        ]
        lines.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return lines


def make_tokenizer(folder: Path, texts: list[str], vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a BPE tokenizer on `texts` and save it as torchtitan's HuggingFaceTokenizer expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, "<|unk|>"],
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} ids, more than the model's {vocab_size}")
    tok.save(str(folder / "tokenizer.json"))
    # The tokenizer itself adds no bos/eos (no post-processor); torchtitan adds them from these names.
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "add_bos_token": False, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_dataset(folder: Path, texts: list[str]) -> Path:
    """Write `texts` as JSON lines with a "text" field, one document each."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.json", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return folder


def make_assets(folder: str | Path) -> tuple[Path, Path]:
    """Build both assets under `folder`; returns (hf_assets_path, dataset_path)."""
    folder = Path(folder)
    texts = synthetic_lines()
    return make_tokenizer(folder / "hf_assets", texts), make_dataset(folder / "dataset", texts)


if __name__ == "__main__":
    print(*make_assets(sys.argv[1] if len(sys.argv) > 1 else "titan_assets"))
