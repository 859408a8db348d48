"""Training a pair with SVI: the configuration and history (config), the run's configuration
as recorded, config.json and its digest in checkpoints (configuration), the device (device),
the step (engine: differentiable_loss + one fused Adam; compiled: the step captured as a
graph), the data order (order), validation,
the divergence guard (guard), signals, what a checkpoint holds of the loop (state), the run's
files (files: config.json and checkpoints; history: history.csv/json), the progress bar
(progress), fit's argument checks (arguments), the loop (loop) and :func:`fit` (fit); on
several processes, the ranks' collectives and sharding (distributed) and their loop
(distributed_loop).

The run maximises L_beta(x) = E_q[log p(x | z)] - beta * KL(q(z | x) || p(z)) and reports
ELBO = reconstruction - KL (beta = 1) on validation images after every epoch. The names
below are the subpackage's API; the loop's parts are imported from their modules.
"""

from ppl_vae.training.config import (
    ENGINES,
    HISTORY_COLUMNS,
    LR_SCHEDULES,
    PRECISIONS,
    RUNTIME_SETTINGS,
    History,
    TrainConfig,
)
from ppl_vae.training.device import resolve_device
from ppl_vae.training.distributed import BACKENDS, Distributed, launched_by_torchrun
from ppl_vae.training.engine import make_elbo
from ppl_vae.training.fit import fit
from ppl_vae.training.run_config import (
    CONFIG_FILE,
    config_differences,
    config_digest,
    run_configuration,
)

__all__ = [
    "BACKENDS",
    "CONFIG_FILE",
    "ENGINES",
    "HISTORY_COLUMNS",
    "LR_SCHEDULES",
    "PRECISIONS",
    "RUNTIME_SETTINGS",
    "Distributed",
    "History",
    "TrainConfig",
    "config_differences",
    "config_digest",
    "fit",
    "launched_by_torchrun",
    "make_elbo",
    "resolve_device",
    "run_configuration",
]
