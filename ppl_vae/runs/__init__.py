"""Run folders and what is made from them: train/resume/load, evaluate, sweep, report pages,
plots and the demo.
"""

from ppl_vae.runs.demo import binary_toy_demo, vae_demo
from ppl_vae.runs.evaluate import FLOAT_BUDGET, Evaluation, evaluate
from ppl_vae.runs.folder import (
    TrainedRun,
    evaluate_run,
    load_run,
    resume_run,
    run_config,
    sample_run,
    train_run,
)
from ppl_vae.runs.plots import (
    gaussian_kl_figure,
    image_grid,
    interpolations_figure,
    iwae_figure,
    latent_space_figure,
    particles_figure,
    rate_distortion_figure,
    reconstructions_figure,
    save,
    toy_gap_figure,
    training_curves_figure,
)
from ppl_vae.runs.report import REPORT_DIR, interpolate, write_report
from ppl_vae.runs.sweep import (
    DEFAULT_BETAS,
    SWEEP_COLUMNS,
    SweepRow,
    format_table,
    parse_betas,
    read_sweep,
    run_folder_name,
    run_sweep,
    sweep_figure,
    write_sweep,
)
from ppl_vae.runs.toy import toy_elbo_curve

__all__ = [
    "DEFAULT_BETAS",
    "FLOAT_BUDGET",
    "REPORT_DIR",
    "SWEEP_COLUMNS",
    "Evaluation",
    "SweepRow",
    "TrainedRun",
    "binary_toy_demo",
    "evaluate",
    "evaluate_run",
    "format_table",
    "gaussian_kl_figure",
    "image_grid",
    "interpolate",
    "interpolations_figure",
    "iwae_figure",
    "latent_space_figure",
    "load_run",
    "parse_betas",
    "particles_figure",
    "rate_distortion_figure",
    "read_sweep",
    "reconstructions_figure",
    "resume_run",
    "run_config",
    "run_folder_name",
    "run_sweep",
    "sample_run",
    "save",
    "sweep_figure",
    "toy_elbo_curve",
    "toy_gap_figure",
    "train_run",
    "training_curves_figure",
    "vae_demo",
    "write_report",
    "write_sweep",
]
