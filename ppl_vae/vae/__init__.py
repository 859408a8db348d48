"""The Gaussian VAE: its networks and configuration, the trace-free IWAE, latent diagnostics."""
