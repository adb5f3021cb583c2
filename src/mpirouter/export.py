"""Fold trained routers into plain linear routers and write an ordinary checkpoint.

    mpirouter export runs/tiny-mpi --out runs/tiny-mpi-export

After folding, each router is `linear` with weight φ = C·normalize(R Gᵀ G) computed once, so
inference costs exactly what the vanilla router costs; logits are unchanged to float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checkpoint as ckpt
from .config import to_dict
from .train import TOKENIZER_FILE, load_model


@torch.no_grad()
def export_checkpoint(src: str | Path, out: str | Path, verify: bool = True, atol: float = 1e-4) -> Path:
    """Write `out/` with model.safetensors + config.json (+ tokenizer.json) holding folded routers.

    With verify=True the folded model's logits on a fixed probe batch must match the original's
    within `atol`, else nothing is written.
    """
    model, cfg = load_model(src)
    probe = torch.randint(0, cfg.model.vocab_size, (2, min(32, cfg.model.max_seq_len)), generator=torch.Generator().manual_seed(0))
    before = model(probe).logits
    model.fold_routers()
    cfg.model = model.config
    if verify:
        diff = (model(probe).logits - before).abs().max().item()
        if diff > atol:
            raise RuntimeError(f"folded model's logits differ by {diff:.3g} > {atol}; not exporting")
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(ckpt.model_tensors(model), str(tmp / ckpt.WEIGHTS), metadata={"format": "pt", "folded_routers": "true"})
    (tmp / ckpt.CONFIG).write_text(json.dumps(to_dict(cfg), indent=2))
    src_dir = ckpt.resolve_checkpoint(src)
    for folder in (Path(src), src_dir, src_dir.parent.parent):
        if (folder / TOKENIZER_FILE).is_file():
            shutil.copyfile(folder / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
            break
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out
