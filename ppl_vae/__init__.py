"""ppl-vae: write, train and trust latent-variable models and their ELBO, on Pyro.

ELBO = E_q[log p(x | z)] - KL(q(z | x) || p(z)) <= log p(x), with gap KL(q(z | x) || p(z | x)).
"""

from ppl_vae.check import CheckReport, check_pair
from ppl_vae.errors import (
    CheckpointError,
    DataError,
    DatasetNotFoundError,
    ModelGuideMismatchError,
    NotEnumerableError,
    PplVaeError,
)
from ppl_vae.evidence import IWAEEstimate, exact_log_evidence, iwae_log_evidence
from ppl_vae.ledger import Ledger, SiteTerm, elbo_ledger
from ppl_vae.posterior import JointTable, enumerate_joint

__all__ = [
    "CheckReport",
    "CheckpointError",
    "DataError",
    "DatasetNotFoundError",
    "IWAEEstimate",
    "JointTable",
    "Ledger",
    "ModelGuideMismatchError",
    "NotEnumerableError",
    "PplVaeError",
    "SiteTerm",
    "check_pair",
    "elbo_ledger",
    "enumerate_joint",
    "exact_log_evidence",
    "iwae_log_evidence",
]

__version__ = "0.1.0"
