"""Training a pair with SVI: configuration, engine, validation, the divergence guard,
signals, resume state and the loop.
"""

from ppl_vae.training.loop import (
    ELBOS,
    ENGINES,
    HISTORY_COLUMNS,
    LR_SCHEDULES,
    PRECISIONS,
    RUNTIME_SETTINGS,
    History,
    TrainConfig,
    TrainingDivergedError,
    TrainingInterrupted,
    config_differences,
    fit,
    make_elbo,
    resolve_device,
)

__all__ = [
    "ELBOS",
    "ENGINES",
    "HISTORY_COLUMNS",
    "LR_SCHEDULES",
    "PRECISIONS",
    "RUNTIME_SETTINGS",
    "History",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "config_differences",
    "fit",
    "make_elbo",
    "resolve_device",
]
