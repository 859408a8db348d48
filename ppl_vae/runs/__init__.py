"""Run folders and what is made from them: train/resume/load, evaluate, sweep, report pages,
plots and the demo.
"""

from ppl_vae.runs.demo import binary_toy_demo, vae_demo
from ppl_vae.runs.evaluate import FLOAT_BUDGET, LogEvidence, evaluate, vae_log_evidence
from ppl_vae.runs.evaluation import Evaluation
from ppl_vae.runs.folder import (
    TrainedRun,
    evaluate_run,
    load_run,
    resume_run,
    run_config,
    sample_run,
    train_run,
)
from ppl_vae.runs.image_plots import (
    class_rows_figure,
    image_grid,
    interpolations_figure,
    reconstructions_figure,
    save,
)
from ppl_vae.runs.latent_plots import (
    gaussian_kl_figure,
    iwae_figure,
    latent_space_figure,
    rate_distortion_figure,
    toy_gap_figure,
)
from ppl_vae.runs.page import format_value, html_cell, html_figure, html_page, html_table, read_json
from ppl_vae.runs.report import REPORT_DIR, write_report
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
from ppl_vae.runs.sweep_report import write_sweep_report
from ppl_vae.runs.toy import toy_elbo_curve
from ppl_vae.runs.training_plots import particles_figure, training_curves_figure
from ppl_vae.vae import interpolate  # still importable from ppl_vae.runs, where it began

__all__ = [
    "DEFAULT_BETAS",
    "FLOAT_BUDGET",
    "REPORT_DIR",
    "SWEEP_COLUMNS",
    "Evaluation",
    "LogEvidence",
    "SweepRow",
    "TrainedRun",
    "binary_toy_demo",
    "class_rows_figure",
    "evaluate",
    "evaluate_run",
    "format_table",
    "format_value",
    "gaussian_kl_figure",
    "html_cell",
    "html_figure",
    "html_page",
    "html_table",
    "image_grid",
    "interpolate",
    "interpolations_figure",
    "iwae_figure",
    "latent_space_figure",
    "load_run",
    "parse_betas",
    "particles_figure",
    "rate_distortion_figure",
    "read_json",
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
    "vae_log_evidence",
    "write_report",
    "write_sweep",
    "write_sweep_report",
]
