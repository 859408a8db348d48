"""The Gaussian VAE: its networks and configuration, the trace-free IWAE and the IWAE bound
against K, latent diagnostics, rate and distortion."""

from ppl_vae.vae.config import VAE, VAEConfig, build_vae, resolve_binarize
from ppl_vae.vae.diagnostics import (
    ACTIVE_THRESHOLD,
    MIN_ACTIVE,
    MIN_RATE,
    ElboSurgery,
    active_units,
    collapse_warning,
    elbo_surgery,
    kl_per_dimension,
    posterior_moments,
)
from ppl_vae.vae.iwae import vae_iwae, vae_log_weights
from ppl_vae.vae.iwae_by_k import DEFAULT_KS, IwaeCurve, iwae_curve
from ppl_vae.vae.latents import interpolate
from ppl_vae.vae.networks import (
    ACTIVATIONS,
    ARCHITECTURES,
    LEARN_SIGMA,
    ConvDecoder,
    ConvEncoder,
    Decoder,
    Encoder,
    GatedLinear,
    make_networks,
)
from ppl_vae.vae.priors import (
    PRIORS,
    MixturePrior,
    VampPrior,
    make_prior,
    parse_prior,
    prior_name,
)
from ppl_vae.vae.rd_plane import RateDistortion, rate_distortion
from ppl_vae.vae.semi_supervised import (
    M2,
    M2Config,
    build_m2,
    default_alpha,
    m2_iwae,
    m2_log_weights,
    paper_alpha,
)
from ppl_vae.vae.ss_networks import (
    Classifier,
    LabelledDecoder,
    LabelledEncoder,
    make_ss_networks,
)

__all__ = [
    "ACTIVATIONS",
    "ACTIVE_THRESHOLD",
    "ARCHITECTURES",
    "DEFAULT_KS",
    "LEARN_SIGMA",
    "M2",
    "MIN_ACTIVE",
    "MIN_RATE",
    "PRIORS",
    "VAE",
    "Classifier",
    "ConvDecoder",
    "ConvEncoder",
    "Decoder",
    "ElboSurgery",
    "Encoder",
    "GatedLinear",
    "IwaeCurve",
    "LabelledDecoder",
    "LabelledEncoder",
    "M2Config",
    "MixturePrior",
    "RateDistortion",
    "VAEConfig",
    "VampPrior",
    "active_units",
    "build_m2",
    "build_vae",
    "collapse_warning",
    "default_alpha",
    "elbo_surgery",
    "interpolate",
    "iwae_curve",
    "kl_per_dimension",
    "m2_iwae",
    "m2_log_weights",
    "make_networks",
    "make_prior",
    "make_ss_networks",
    "paper_alpha",
    "parse_prior",
    "posterior_moments",
    "prior_name",
    "rate_distortion",
    "resolve_binarize",
    "vae_iwae",
    "vae_log_weights",
]
