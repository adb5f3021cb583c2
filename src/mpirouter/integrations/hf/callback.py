"""The `transformers.Trainer` integration: `RouterMetricsCallback` and `add_router_callback`. The
only module of the package that imports transformers."""

from __future__ import annotations

from typing import Any

from .metrics import router_metrics
from .patching import inplace_update
from .state import _find_state

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("mpirouter.hf needs Hugging Face transformers >= 5: pip install 'transformers>=5'") from e


class RouterMetricsCallback(TrainerCallback):
    """`transformers.Trainer` callback: router metrics in every log, and the `mpi-inplace` update.

    Adds `router_metrics` to the training logs (and `eval_router/...` to evaluation logs), and runs
    `inplace_update` after every optimizer step. `add_router_callback(trainer)` installs it first in
    the callback list so that reporting integrations (TensorBoard, W&B, ...) also see the metrics.
    """

    def __init__(self, alignment: bool = True, prefix: str = "router"):
        self.alignment, self.prefix = alignment, prefix

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            inplace_update(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or model is None or _find_state(model) is None:
            return
        if any(k.startswith("eval_") for k in logs):
            metrics = router_metrics(model, "eval", self.alignment, prefix="eval_" + self.prefix)
        elif "loss" in logs:
            metrics = router_metrics(model, "train", self.alignment, prefix=self.prefix)
        else:
            return
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def add_router_callback(trainer: Any, alignment: bool = True) -> RouterMetricsCallback:
    """Install a `RouterMetricsCallback` at the front of `trainer`'s callbacks; returns it."""
    callback = RouterMetricsCallback(alignment=alignment)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
