"""ppl-vae: write, train and trust latent-variable models and their ELBO, on Pyro.

ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x), with gap KL(q(z | x) || p(z | x)).
"""

from ppl_vae.check import CheckReport, check_pair
from ppl_vae.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigMismatchError,
    DataError,
    DatasetNotFoundError,
    ModelGuideMismatchError,
    NotEnumerableError,
    PplVaeError,
    TrainingDivergedError,
    TrainingInterrupted,
    WriteError,
)
from ppl_vae.evaluate import Evaluation, evaluate
from ppl_vae.evidence import IWAEEstimate, exact_log_evidence, iwae_log_evidence, vae_iwae
from ppl_vae.ledger import Ledger, SiteTerm, elbo_ledger
from ppl_vae.posterior import JointTable, enumerate_joint
from ppl_vae.train import History, TrainConfig, fit

__all__ = [
    "CheckReport",
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigMismatchError",
    "DataError",
    "DatasetNotFoundError",
    "Evaluation",
    "History",
    "IWAEEstimate",
    "JointTable",
    "Ledger",
    "ModelGuideMismatchError",
    "NotEnumerableError",
    "PplVaeError",
    "SiteTerm",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "WriteError",
    "check_pair",
    "elbo_ledger",
    "enumerate_joint",
    "evaluate",
    "exact_log_evidence",
    "fit",
    "iwae_log_evidence",
    "vae_iwae",
]

__version__ = "0.1.0"
