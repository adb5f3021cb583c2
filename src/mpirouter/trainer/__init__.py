"""Layer 3, the built-in trainer (depends on `core`, `optim`, `common`).

- `config`: `TrainConfig` (nesting the model, data, optimizer and schedule configs) and `resolve_config`.
- `data`: corpora, tokenizers, batches as a pure function of (seed, step).
- `schedule`: warmup + cosine / WSD / constant learning rate.
- `step`: one optimizer step without host-device syncs; `device`: devices, precision, step timing.
- `loop`: `train()`, the whole job (resume, signals, evals, checkpoints); `evaluation`: validation metrics.
- `checkpoint`, `rundir`, `metrics`, `export`: what a run writes, how it is protected, and the exported model.
"""

from .checkpoint import load_model
from .config import TrainConfig, resolve_config
from .data import DataConfig, prepare_data
from .evaluation import evaluate
from .export import export_checkpoint
from .loop import NonFiniteLossError, TrainingInterrupted, TrainResult, build_model, train
from .schedule import ScheduleConfig, lr_multiplier
from .step import StepOutput, train_step

__all__ = [
    "DataConfig",
    "NonFiniteLossError",
    "ScheduleConfig",
    "StepOutput",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "build_model",
    "evaluate",
    "export_checkpoint",
    "load_model",
    "lr_multiplier",
    "prepare_data",
    "resolve_config",
    "train",
    "train_step",
]
