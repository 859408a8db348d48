"""ppl-vae: write, train and trust latent-variable models and their ELBO, on Pyro.

ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x), with gap KL(q(z | x) || p(z | x)).
"""

from ppl_vae.elbo import (
    IWAE_ELBO,
    CheckReport,
    DReGIWAE_ELBO,
    EstimatorComparison,
    GradientCheck,
    IWAEEstimate,
    JointTable,
    Ledger,
    PosteriorTable,
    SiteTerm,
    STLTrace_ELBO,
    check_pair,
    elbo_ledger,
    enumerate_joint,
    exact_log_evidence,
    iwae_log_evidence,
)
from ppl_vae.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointWriteError,
    ConfigMismatchError,
    DataError,
    DatasetNotFoundError,
    EstimatorError,
    ModelGuideMismatchError,
    NotEnumerableError,
    PairExecutionError,
    PplVaeError,
    TrainingDivergedError,
    TrainingInterrupted,
    UserFileError,
    WriteError,
)
from ppl_vae.runs import Evaluation, evaluate
from ppl_vae.training import History, TrainConfig, fit
from ppl_vae.vae import vae_iwae

__all__ = [
    "IWAE_ELBO",
    "ArgumentError",
    "CheckReport",
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigMismatchError",
    "DReGIWAE_ELBO",
    "DataError",
    "DatasetNotFoundError",
    "EstimatorComparison",
    "EstimatorError",
    "Evaluation",
    "GradientCheck",
    "History",
    "IWAEEstimate",
    "JointTable",
    "Ledger",
    "ModelGuideMismatchError",
    "NotEnumerableError",
    "PairExecutionError",
    "PosteriorTable",
    "PplVaeError",
    "STLTrace_ELBO",
    "SiteTerm",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "UserFileError",
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
