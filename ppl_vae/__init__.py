"""ppl-vae: write, train and trust latent-variable models and their ELBO, on Pyro.

ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x), with gap KL(q(z | x) || p(z | x)).
"""

from ppl_vae.elbo.check import CheckReport, check_pair
from ppl_vae.elbo.evidence import IWAEEstimate, exact_log_evidence, iwae_log_evidence
from ppl_vae.elbo.gradcheck import EstimatorComparison, GradientCheck
from ppl_vae.elbo.ledger import Ledger, SiteTerm, elbo_ledger
from ppl_vae.elbo.objectives import IWAE_ELBO, DReGIWAE_ELBO, STLTrace_ELBO
from ppl_vae.elbo.posterior import JointTable, PosteriorTable, enumerate_joint
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
from ppl_vae.runs.evaluate import Evaluation, evaluate
from ppl_vae.training.loop import History, TrainConfig, fit
from ppl_vae.vae.iwae import vae_iwae

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
