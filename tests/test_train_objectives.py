"""Training on the importance-weighted objectives (TrainConfig.objective = "iwae:K" /
"dreg:K") and early stopping (TrainConfig.patience), on scikit-learn's digits."""

import dataclasses

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, RenyiELBO
from test_train import NO_CHECKS, _config, _vae, _weights

from ppl_vae.checkpoint import load_checkpoint
from ppl_vae.data import datasets as data
from ppl_vae.training import TrainConfig, fit

K = 5
EPOCHS = 20  # of the overfitting run
F64_ULP_BELOW_1 = 2.0**-53  # float64 spacing at [0.5, 1)


def _recorded_fit(digits, config, steps):
    """fit on the first ``steps`` batches of 32 digits; the weights before and after, the
    batches as fit handed them to the model, and the history."""
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, seed=1)
    for module in modules.values():
        module.double()  # float64: the two implementations' sums round apart by ~1e-16
    initial = _weights(modules)
    batches = []

    def recording_model(x, **kwargs):
        if torch.is_grad_enabled():  # training steps; the parameter set-up runs without grad
            batches.append(x)
        return model(x, **kwargs)

    images = digits.train.images[: 32 * steps].double()
    history = fit(
        recording_model, guide, images, config=config, modules=modules, step_kwargs=NO_CHECKS
    )
    return initial, _weights(modules), batches, history


def _pyro_renyi_loop(digits, config, batches, lr):
    """The same networks trained by a plain pyro.infer.SVI loop on Pyro's own K-sample bound,
    RenyiELBO(alpha=0) vectorised: with no subsampling it is the IWAE bound
    (ppl_vae.elbo.importance_weighted.IWAE_ELBO's docstring: measured equal)."""
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, seed=1)
    for module in modules.values():
        module.double()
    pyro.set_rng_seed(config.seed)
    elbo = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    losses = [svi.step(x, beta=1.0, **NO_CHECKS) for x in batches]
    return _weights(modules), losses


def test_iwae_objective_trains_as_pyro_renyi_elbo_alpha_zero(digits):
    """fit(objective="iwae:5") = SVI with Pyro's RenyiELBO(alpha=0, K=5) on the same batches
    from the same seed, in float64: the same draws and the same bound, so the weights differ
    by rounding only. Each step can round theta apart by one float64 spacing (2^-53 for
    |theta| < 1), and the two compute the bound's sums in another order, so each gradient
    differs by some 1e-16 relative; Adam divides by sqrt(v_hat), which for a component near
    zero magnifies that relative error (seen: 2e-15 absolute after 12 steps). The tolerance,
    1e-12 = 10^4 such roundings, is rounding-sized: the ELBO from the same seed moves the
    weights 1e-3 or more away (checked below). The train objective (mean of -loss per
    image) is the bound RenyiELBO reports."""
    steps = 12
    config = _config(epochs=1, batch_size=32, seed=3, objective=f"iwae:{K}")
    initial, fitted, batches, history = _recorded_fit(digits, config, steps)
    assert len(batches) == steps and history[-1]["step"] == steps
    assert all(float(w.abs().max()) < 1 for w in fitted.values())  # the tolerance's premise

    weights, losses = _pyro_renyi_loop(digits, config, batches, config.lr)
    assert history[0]["train_objective"] == pytest.approx(-sum(losses) / (32 * steps), rel=1e-6)
    tolerance = 1e-12
    for name, value in fitted.items():
        assert not torch.equal(value, initial[name])
        torch.testing.assert_close(value, weights[name], atol=tolerance, rtol=0)

    # The check of the check: the ELBO (K = 1) from the same seed trains other weights.
    _, elbo_fitted, _, _ = _recorded_fit(digits, dataclasses.replace(config, objective="elbo"), 12)
    assert max(float((elbo_fitted[k] - fitted[k]).abs().max()) for k in fitted) > 1e-3


def test_dreg_objective_changes_the_encoder_gradient_only(digits):
    """One step of fit(objective="dreg:5") against Pyro's RenyiELBO(alpha=0, K=5): DReG's
    decoder gradient is the IWAE one draw for draw, so after Adam's first step the decoder
    weights agree to one float64 spacing; its encoder gradient is another estimator (the
    doubly reparameterised one), so the encoder weights move otherwise."""
    config = _config(epochs=1, batch_size=32, seed=3, objective=f"dreg:{K}")
    _, fitted, batches, history = _recorded_fit(digits, config, 1)
    assert len(batches) == 2 and torch.equal(*batches)  # the model, then its detached replay
    weights, losses = _pyro_renyi_loop(digits, config, batches[:1], config.lr)
    assert history[0]["train_objective"] == pytest.approx(-losses[0] / 32, rel=1e-6)
    for name in fitted:
        if name.startswith("decoder."):
            torch.testing.assert_close(fitted[name], weights[name], atol=F64_ULP_BELOW_1, rtol=0)
    encoder_gap = max(
        float((fitted[k] - weights[k]).abs().max()) for k in fitted if k.startswith("encoder.")
    )
    assert encoder_gap > 0.5 * config.lr  # Adam's first step moves each weight by ~lr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"objective": "iwae"}, r"unknown objective 'iwae'.*iwae:K"),
        ({"objective": "iwae:0"}, "unknown objective"),
        ({"objective": "renyi:5"}, "unknown objective"),
        ({"objective": "iwae:5", "beta": 0.5}, r"beta=0.5.*no KL term"),
        ({"objective": "dreg:5", "beta": "warmup:100"}, "beta='warmup:100'"),
        ({"objective": "iwae:5", "num_particles": 3}, "num_particles=3"),
        ({"objective": "iwae:5", "free_bits": 1.0}, "free_bits=1"),
        ({"objective": "iwae:5", "elbo": "trace"}, "elbo='trace'"),
        ({"patience": 0}, "patience must be a positive integer"),
    ],
)
def test_objective_and_patience_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    return data.load("digits", binarize="static")


@pytest.fixture(scope="module")
def overfit_history(digits):
    """Twenty epochs on 32 digits at a high rate, validated on the others: the validation
    ELBO levels off and falls back (the run overfits; seen: best at epoch 11, then three
    worse), which early stopping is for."""
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, hidden=(64,), z_dim=8)
    return fit(
        model,
        guide,
        digits.train.images[:32],
        validation=digits.validation.images,
        config=_overfit_config(),
        modules=modules,
        step_kwargs=NO_CHECKS,
    )


def _overfit_config(**settings):
    return _config(epochs=EPOCHS, batch_size=16, lr=3e-2, seed=0, **settings)


def _first_stop(val_elbo, patience):
    """The epoch (1-based) after which `patience` epochs have passed without a better
    validation ELBO, written out here from the numbers; None if the run never gets there."""
    best_epoch, best = None, float("-inf")
    for epoch, value in enumerate(val_elbo, start=1):
        if value > best:
            best_epoch, best = epoch, value
        if epoch - best_epoch >= patience:
            return epoch
    return None


def test_patience_stops_where_the_history_says(digits, overfit_history, tmp_path):
    """With patience P the run stops after the first epoch that is P epochs past the best
    validation ELBO so far, found here from the full run's own history (same seed, so the
    same numbers up to there); resuming the stopped run trains nothing more."""
    full = overfit_history
    patience = 3
    stop = _first_stop(full.column("val_elbo"), patience)
    assert stop is not None and stop < EPOCHS, full.column("val_elbo")  # the premise

    pyro.clear_param_store()
    model, guide, modules = _vae(digits, hidden=(64,), z_dim=8)
    config = _overfit_config(patience=patience)
    settings = {"validation": digits.validation.images, "step_kwargs": NO_CHECKS}
    images = digits.train.images[:32]
    run = {**settings, "config": config, "modules": modules, "out_dir": tmp_path}
    history = fit(model, guide, images, **run)
    assert len(history) == stop and history.stopped_early == stop
    assert history.column("val_elbo") == full.column("val_elbo")[:stop]
    assert history.best_epoch == stop - patience
    best = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert best.counters["epoch"] == history.best_epoch

    resumed = fit(model, guide, images, **run, resume=tmp_path / "checkpoints" / "last.ckpt")
    assert len(resumed) == stop and resumed.stopped_early == stop

    # A patience the run never exhausts: every epoch, no early stop recorded.
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, hidden=(64,), z_dim=8)
    config = dataclasses.replace(config, patience=EPOCHS)
    long = fit(model, guide, images, **settings, config=config, modules=modules)
    assert len(long) == EPOCHS and long.stopped_early is None
    assert long.column("val_elbo") == full.column("val_elbo")


def test_patience_needs_validation(digits):
    model, guide, _ = _vae(digits)
    with pytest.raises(ValueError, match="patience=3 stops on the validation ELBO"):
        fit(model, guide, digits.train.images[:64], config=_config(patience=3))
