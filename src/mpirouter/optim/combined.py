"""Several optimizers over disjoint parameters, stepped together and seen as one."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def scaled_lr(groups: list[dict]):
    """Temporarily set ``group["lr"] *= group["lr_scale"]`` (groups without the key: unchanged).

    The training loop writes one schedule value into every group's "lr"; a group whose peak
    learning rate differs (e.g. the AdamW-side groups of Muon) carries its ratio as "lr_scale".
    The loop's value is restored afterwards, so the scale is never compounded.
    """
    saved = [g["lr"] for g in groups]
    for g in groups:
        if "lr_scale" in g:
            g["lr"] = g["lr"] * g["lr_scale"]
    try:
        yield
    finally:
        for g, lr in zip(groups, saved):
            g["lr"] = lr


def kind(opt) -> str:
    """The optimizer's class, with what a wrapper wraps: "AdamW", "Hyperball(StackedMuon)"."""
    base = getattr(opt, "base", None)
    return f"{type(opt).__name__}({kind(base)})" if base is not None else type(opt).__name__


class CombinedOptimizer:
    """One optimizer-like object over several (e.g. AdamW for embeddings + Muon for matrices).

    ``param_groups`` is the concatenation of the children's groups (the same dict objects, so a
    loop that sets ``group["lr"]`` reaches every child); ``step`` steps every child, applying
    each group's "lr_scale"; the state dict holds the children's state dicts in order.
    """

    def __init__(self, optimizers: list):
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        seen: set[int] = set()
        for opt in optimizers:
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in seen:
                        raise ValueError("a parameter is handled by two optimizers")
                    seen.add(id(p))
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        out = {}
        for opt in self.optimizers:
            out.update(opt.state)
        return out

    @property
    def defaults(self) -> dict:
        return {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            with scaled_lr(opt.param_groups):
                opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers],
                "kinds": [kind(opt) for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict["optimizers"]
        kinds = state_dict.get("kinds", [kind(o) for o in self.optimizers])
        mine = [kind(o) for o in self.optimizers]
        if not any("(" in k for k in kinds):  # written before wrappers named what they wrap
            mine = [k.split("(")[0] for k in mine]
        if len(states) != len(self.optimizers) or kinds != mine:
            raise ValueError(f"optimizer state is for {kinds}, this optimizer is {mine}")
        for opt, st in zip(self.optimizers, states):
            opt.load_state_dict(st)

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {o!r}".replace("\n", "\n  ") for o in self.optimizers)
        return f"CombinedOptimizer(\n{inner}\n)"
