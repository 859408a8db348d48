"""The ELBO layer: a model/guide pair -> numbers (the bound per site, log p(x), the exact
posterior, check_pair, beta scaling, ELBO classes). Knows nothing of VAEs, training or run folders.
"""

from ppl_vae.elbo.beta import (
    Constant,
    Cyclical,
    FreeBits,
    LinearWarmup,
    Schedule,
    kl_scale,
    parse_schedule,
)
from ppl_vae.elbo.check import SweepPoint, check_pair, particle_sweep
from ppl_vae.elbo.check_report import CheckReport
from ppl_vae.elbo.evidence import IWAEEstimate, exact_log_evidence, iwae_log_evidence
from ppl_vae.elbo.fastmath import (
    BernoulliLogits,
    bernoulli_log_prob,
    linear_bernoulli_log_prob,
    softplus,
)
from ppl_vae.elbo.gradcheck import (
    ESTIMATORS,
    EstimatorComparison,
    GradientCheck,
    check_gradients,
    compare_estimators,
    format_comparisons,
    parse_estimators,
)
from ppl_vae.elbo.importance_weighted import IWAE_ELBO, DReGIWAE_ELBO
from ppl_vae.elbo.ledger import (
    MARGINAL_TERM,
    REPEATS,
    Ledger,
    SiteTerm,
    bound_ledger,
    elbo_ledger,
    sampled_site_terms,
)
from ppl_vae.elbo.objectives import STLTrace_ELBO
from ppl_vae.elbo.pair import (
    PARTICLE_PLATE,
    BoundPair,
    PairStructure,
    SiteInfo,
    bind_pair,
    frames_subsample_factor,
    inspect_pair,
    subsample_factor,
    sum_except,
    vectorized_traces,
)
from ppl_vae.elbo.posterior import JointTable, PosteriorTable, enumerate_joint
from ppl_vae.elbo.psis import (
    KHAT_GOOD,
    KHAT_UNRELIABLE,
    MIN_TAIL,
    effective_sample_size,
    ess_from_log_sums,
    log_mean_exp_stderr,
    pareto_khat,
    pareto_khat_from_largest,
    pareto_tail_size,
    stderr_from_ess,
)
from ppl_vae.elbo.pyro_elbos import (
    ELBOS,
    PatchedJitTrace_ELBO,
    PatchedJitTraceMeanField_ELBO,
    elbo_by_name,
)

__all__ = [
    "ELBOS",
    "ESTIMATORS",
    "IWAE_ELBO",
    "KHAT_GOOD",
    "KHAT_UNRELIABLE",
    "MARGINAL_TERM",
    "MIN_TAIL",
    "PARTICLE_PLATE",
    "REPEATS",
    "BernoulliLogits",
    "BoundPair",
    "CheckReport",
    "Constant",
    "Cyclical",
    "DReGIWAE_ELBO",
    "EstimatorComparison",
    "FreeBits",
    "GradientCheck",
    "IWAEEstimate",
    "JointTable",
    "Ledger",
    "LinearWarmup",
    "PairStructure",
    "PatchedJitTraceMeanField_ELBO",
    "PatchedJitTrace_ELBO",
    "PosteriorTable",
    "STLTrace_ELBO",
    "Schedule",
    "SiteInfo",
    "SiteTerm",
    "SweepPoint",
    "bernoulli_log_prob",
    "bind_pair",
    "bound_ledger",
    "check_gradients",
    "check_pair",
    "compare_estimators",
    "effective_sample_size",
    "elbo_by_name",
    "elbo_ledger",
    "enumerate_joint",
    "ess_from_log_sums",
    "exact_log_evidence",
    "format_comparisons",
    "frames_subsample_factor",
    "inspect_pair",
    "iwae_log_evidence",
    "kl_scale",
    "linear_bernoulli_log_prob",
    "log_mean_exp_stderr",
    "pareto_khat",
    "pareto_khat_from_largest",
    "pareto_tail_size",
    "parse_estimators",
    "parse_schedule",
    "particle_sweep",
    "sampled_site_terms",
    "softplus",
    "stderr_from_ess",
    "subsample_factor",
    "sum_except",
    "vectorized_traces",
]
