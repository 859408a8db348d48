"""The Gaussian VAE: its networks and configuration, the trace-free IWAE, latent diagnostics."""

from ppl_vae.vae.config import VAE, VAEConfig, build_vae, resolve_binarize
from ppl_vae.vae.diagnostics import (
    ACTIVE_THRESHOLD,
    DEFAULT_KS,
    MIN_ACTIVE,
    MIN_RATE,
    ElboSurgery,
    IwaeCurve,
    RateDistortion,
    active_units,
    collapse_warning,
    elbo_surgery,
    iwae_curve,
    kl_per_dimension,
    posterior_moments,
    rate_distortion,
)
from ppl_vae.vae.iwae import vae_iwae, vae_log_weights
from ppl_vae.vae.networks import (
    ACTIVATIONS,
    LEARN_SIGMA,
    ConvDecoder,
    ConvEncoder,
    Decoder,
    Encoder,
    make_networks,
)

__all__ = [
    "ACTIVATIONS",
    "ACTIVE_THRESHOLD",
    "DEFAULT_KS",
    "LEARN_SIGMA",
    "MIN_ACTIVE",
    "MIN_RATE",
    "VAE",
    "ConvDecoder",
    "ConvEncoder",
    "Decoder",
    "ElboSurgery",
    "Encoder",
    "IwaeCurve",
    "RateDistortion",
    "VAEConfig",
    "active_units",
    "build_vae",
    "collapse_warning",
    "elbo_surgery",
    "iwae_curve",
    "kl_per_dimension",
    "make_networks",
    "posterior_moments",
    "rate_distortion",
    "resolve_binarize",
    "vae_iwae",
    "vae_log_weights",
]
