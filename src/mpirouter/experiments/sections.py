"""Which runs a report may compare with each other: sections of one config, one run per variant and seed.

A section holds runs that differ only in what a grid varies: the router variant (a row) and the seed (a
pair), within one preset, optimizer, lr and `--vary` cell. Runs that differ in anything else (steps, batch,
corpus, model, schedule, eval estimator, ...) measure something else, so they get sections of their own, and
the section titles name the fields that differ. Two finished runs of one variant and seed in a section are
refused: picking one silently would make the report depend on folder order.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from ..common.config import flatten
from ..trainer.config import with_defaults

IGNORED = {"out_dir", "progress", "device", "compile", "tensorboard", "model.vocab_size",  # as compare.check_config
           "log_every", "ckpt_every", "ckpt_keep",  # bookkeeping: no effect on the numbers
           "batch_size",  # per process; compared as the global batch instead
           "seed", "model.moe.router.kind", "model.moe.router.scale_prime", "model.moe.router.target",
           "model.moe.router.erc.enabled", "model.moe.router.simbal.enabled",
           "preset", "optim.name", "optim.lr"}  # the grid's own axes: rows, pairs and section keys
"""Config fields that may differ between the runs of one section."""
FIRST = ("steps", "global_batch", "data.path", "data.tokenizer")
"""Differing fields named first in a section title (and sorted by first), the rest follow by name."""
SHOWN = 4
"""Differing fields named in a section title before the rest is counted."""


def signature(config: dict, start: dict, vary: list[str]) -> tuple[tuple[str, str], ...]:
    """The config fields that must agree between runs compared in one section (`vary`: the `--vary` keys,
    already section keys), as sorted (field, JSON value) pairs. Old configs get the fields they predate at
    their behaviour-keeping defaults, so a field added later does not split a section."""
    flat = {k: v for k, v in flatten(with_defaults(config)).items()
            if k not in IGNORED and k not in vary and not k.startswith("dist.")}
    # a run may be spread over processes (as `train --resume` allows); the global batch is what it trained on
    flat["global_batch"] = config.get("batch_size", 0) * start.get("world_size", 1)
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in flat.items()))


@dataclass
class Group:
    """The runs of one (preset, optimizer, cell, config): a section per lr, and a sweep across lrs."""

    preset: str
    optimizer: str
    cell: tuple
    signature: tuple
    by_lr: dict = field(default_factory=dict)
    differs: tuple[tuple[str, str], ...] = ()
    """The fields (and this group's JSON values) that tell it apart from the other groups of its preset, optimizer
    and cell; empty when there is no other."""


def group_runs(runs: list, vary: list[str]) -> list[Group]:
    """Group `runs` (RunRecords) by preset, optimizer, `--vary` cell and config signature; each group by lr."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        sig = signature(r.config, next(iter(r.events("start")), {}), vary)
        key = (r.config.get("preset", "?"), r.config["optim"]["name"], r.cell(vary), sig)
        groups.setdefault(key, Group(*key)).by_lr.setdefault(r.config["optim"].get("lr"), []).append(r)
    families: dict[tuple, list[Group]] = {}
    for g in groups.values():
        families.setdefault((g.preset, g.optimizer, g.cell), []).append(g)
    for family in families.values():
        if len(family) > 1:
            sigs = [dict(g.signature) for g in family]
            keys = sorted({k for s in sigs for k in s if len({s.get(k) for s in sigs}) > 1},
                          key=lambda k: (FIRST.index(k) if k in FIRST else len(FIRST), k))
            for g, s in zip(family, sigs):
                g.differs = tuple((k, s.get(k, "null")) for k in keys)
    return list(groups.values())


def differs_order(g: Group) -> tuple:
    """Sort key of the groups of one family: by their differing values, numbers by size."""
    def value(text: str) -> tuple:
        v = json.loads(text)
        return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, text)
    return tuple(value(v) for _, v in g.differs)


def differs_text(differs: tuple[tuple[str, str], ...]) -> str:
    """The differing fields for a section title, e.g. "steps=40, data.path=kjv" (strings unquoted)."""
    shown = [f"{k}={_plain(v)}" for k, v in differs[:SHOWN]]
    if len(differs) > SHOWN:
        shown.append(f"and {len(differs) - SHOWN} more differing fields")
    return ", ".join(shown)


def differs_stem(differs: tuple[tuple[str, str], ...]) -> str:
    """A file-name part that keeps the plots of groups of one family apart, e.g. "steps_40"."""
    text = re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join(f"{k.split('.')[-1]}_{_plain(v)}" for k, v in differs))
    return text if len(text) <= 48 else "config_" + hashlib.sha1(repr(differs).encode()).hexdigest()[:8]


def _plain(text: str) -> str:
    v = json.loads(text)
    return v if isinstance(v, str) else text


def check_no_duplicates(section: list, label) -> None:
    """ValueError naming both folders when two finished runs of `section` have one variant and seed
    (`label(run)`: how the message names the variant)."""
    seen: dict[tuple, object] = {}
    clashes = []
    for r in section:
        if r.final is None:
            continue  # an unfinished run is listed apart and never in a table
        key = (r.variant, r.config["seed"])
        if key in seen:
            clashes.append((seen[key], r))
        else:
            seen[key] = r
    if clashes:
        a, b = clashes[0]
        more = f" ({len(clashes) - 1} more such pair(s))" if len(clashes) > 1 else ""
        raise ValueError(f"{a.run_dir} and {b.run_dir} are both {label(b)} seed {b.config['seed']} with the same config; a "
                         f"report pairs one run per seed: move one of them out of the folder{more}")
