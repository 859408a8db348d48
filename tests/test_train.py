"""The SVI loop on scikit-learn's digits: fit agrees with a plain Pyro SVI loop, the ELBO
improves, records are kept, resumes are exact."""

import csv
import dataclasses
import functools
import hashlib
import json
import math
import shutil

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from ppl_vae.checkpoint import load_checkpoint, restore
from ppl_vae.data import datasets as data
from ppl_vae.elbo import ELBOS
from ppl_vae.errors import CheckpointError, ConfigMismatchError, TrainingDivergedError
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.training import HISTORY_COLUMNS, TrainConfig, fit
from ppl_vae.vae import make_networks

NO_CHECKS = {"check_data": False}  # the data are checked once, in the fixture


@pytest.fixture(scope="module")
def digits() -> data.Dataset:
    ds = data.load("digits", binarize="static")
    for split in (ds.train, ds.validation):
        vae_model.check_data(split.images, likelihood="bernoulli")
    return ds


def _vae(ds: data.Dataset, *, seed: int = 0, z_dim: int = 4, hidden=(32,), wrap=None):
    """Fresh networks from ``seed`` and the model/guide bound to them."""
    pyro.set_rng_seed(seed)
    encoder, decoder = make_networks(ds.image_shape, z_dim, hidden)
    if wrap is not None:
        decoder = wrap(decoder)
    model = functools.partial(vae_model.model, decoder=decoder, likelihood="bernoulli")
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    return model, guide, {"encoder": encoder, "decoder": decoder}


def _config(**overrides) -> TrainConfig:
    settings = {"batch_size": 64, "lr": 1e-2, "progress": False, "device": "cpu", "threads": 1}
    return TrainConfig(**{**settings, **overrides})


def _weights(modules) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": p.detach().clone()
        for name, module in modules.items()
        for key, p in module.named_parameters()
    }


class _OwnValidation:
    """The validation ELBO's terms computed here from the networks, with torch.distributions:
    per image the closed-form KL(N(mu, sigma^2) || N(0, I)) and M = 512 draws of
    log p(x | z), z ~ q(z | x), from this file's own generator."""

    M = 512

    def __init__(self, modules, images):
        encoder, decoder = modules["encoder"], modules["decoder"]
        with torch.no_grad():
            mu, log_var = encoder(images)
            mu, sd = mu.double(), (0.5 * log_var.double()).exp()
            q = torch.distributions.Normal(mu, sd)
            self.kl = torch.distributions.kl_divergence(
                q, torch.distributions.Normal(0.0, 1.0)
            ).sum(-1)  # (N,)
            eps = torch.randn(
                self.M, *mu.shape, generator=torch.Generator().manual_seed(99), dtype=mu.dtype
            )
            logits = decoder((mu + sd * eps).float()).double()
            recon = torch.distributions.Bernoulli(logits=logits).log_prob(images.double())
            self.draws = recon.sum(-1)  # (M, N): one-particle reconstruction terms
        self.n = images.shape[0]
        self.recon = self.draws.mean(0)  # (N,)
        self.var = self.draws.var(0)  # (N,) one-particle variance per image

    def z(self, reported, kl_weight=1.0):
        """z-score of a reported one-particle mean of recon - kl_weight x KL over the images.
        reported - own = (1/N) sum_i [r_i(eps_i) - mean_m r_i(eps_im)]: mean 0 and variance
        (1/N^2) sum_i Var_i (1 + 1/M); the KL is closed-form in both."""
        own = float((self.recon - kl_weight * self.kl).mean())
        se = math.sqrt(float(self.var.sum()) * (1 + 1 / self.M)) / self.n
        return (reported - own) / se

    def se_z(self, reported_se):
        """z-score of the reported s.e. of the one-particle ELBO, as a sample variance s^2:
        over these images E[s^2] = S^2_mu + (1/N) sum_i Var_i, with S^2_mu the sample
        variance of the per-image means; s^2 - E[s^2] ~ (1/(N-1)) sum_i u_i with
        u_i = d_i^2 + 2 (mu_i - mu_bar) d_i - Var_i, d_i the particle noise, so
        Var(s^2) ~ (1/(N-1)^2) sum_i Var(u_i), each estimated from the M draws."""
        elbo = self.recon - self.kl
        centred = elbo - elbo.mean()
        expected = float((centred**2).sum()) / (self.n - 1) + float(self.var.mean())
        d = self.draws - self.recon
        u = d**2 + 2 * centred * d
        sd = math.sqrt(float(u.var(0).sum())) / (self.n - 1)
        return ((reported_se * math.sqrt(self.n)) ** 2 - expected) / sd


def _plain_svi_optimizer(config: TrainConfig):
    """pyro.optim's Adam (one torch Adam per parameter, torch's defaults) with the schedule
    of ``config``, as a plain SVI loop would set it up; stepped once per epoch."""
    adam = {"optimizer": torch.optim.Adam, "optim_args": {"lr": config.lr}}
    if config.lr_schedule == "cosine":
        return pyro.optim.CosineAnnealingLR(
            {**adam, "T_max": config.epochs, "eta_min": config.lr_min}
        )
    if config.lr_schedule == "exponential":
        return pyro.optim.ExponentialLR({**adam, "gamma": config.lr_gamma})
    return pyro.optim.Adam({"lr": config.lr})


def _plain_svi_loop(digits, config: TrainConfig, batches, steps_per_epoch):
    """Train the networks of ``_vae(seed=1)`` with pyro.infer.SVI on ``batches`` in order,
    the global RNG seeded as fit seeds it; the weights, lr and train objective per epoch."""
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, seed=1)
    pyro.set_rng_seed(config.seed)
    optim = _plain_svi_optimizer(config)
    svi = SVI(model, guide, optim, TraceMeanField_ELBO(max_plate_nesting=1))
    lrs, objectives = [], []
    steps = iter(batches)
    for _ in range(config.epochs):
        total = sum(svi.step(next(steps), beta=1.0, **NO_CHECKS) for _ in range(steps_per_epoch))
        objectives.append(-total / (steps_per_epoch * config.batch_size))
        torch_optim = next(iter(optim.optim_objs.values()))  # one per parameter, all alike
        if config.lr_schedule is None:
            lrs.append(torch_optim.param_groups[0]["lr"])
        else:
            lrs.append(torch_optim.get_last_lr()[0])
            optim.step()
    return _weights(modules), lrs, objectives


# float32 spacing at [0.5, 1): the most one rounding can move a parameter with |theta| < 1.
F32_ULP_BELOW_1 = 2.0**-24


@pytest.mark.parametrize(
    ("schedule", "epochs", "steps_per_epoch"),
    [(None, 1, 20), ("exponential", 2, 10), ("cosine", 2, 10)],
)
def test_fit_matches_a_plain_svi_loop(digits, schedule, epochs, steps_per_epoch):
    """fit's one fused Adam over the param store = a plain pyro.infer.SVI loop with
    pyro.optim.Adam (one torch Adam per parameter), on the same minibatches (recorded as fit
    hands them to the model) from the same seed, with the same schedule.

    The two evaluate theta - lr * m_hat / (sqrt(v_hat) + eps) in another order, so each step
    can round a parameter differently by at most one float32 spacing of |theta| (the update's
    own rounding, a few spacings of |update| <~ lr = 1e-2, about 2^-30 each, is negligible
    beside it), and every |theta| < 1 here (checked): after T = 20 steps the weights agree to
    T * 2^-24 = 1.2e-6, as long as later gradients do not amplify the rounding (seen: 1.2e-7,
    two spacings). The same bound fails for a learning rate 0.1% off (seen: 1e-2)."""
    images = digits.train.images[: 32 * steps_per_epoch]
    steps = epochs * steps_per_epoch
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, seed=1)
    initial = _weights(modules)
    batches = []

    def recording_model(x, **kwargs):
        if torch.is_grad_enabled():  # training steps; the parameter set-up runs without grad
            batches.append(x)
        return model(x, **kwargs)

    config = _config(epochs=epochs, batch_size=32, lr_schedule=schedule, lr_gamma=0.5, seed=3)
    history = fit(
        recording_model, guide, images, config=config, modules=modules, step_kwargs=NO_CHECKS
    )
    fitted = _weights(modules)
    assert history[-1]["step"] == steps and len(batches) == steps
    assert all(float(w.abs().max()) < 1 for w in fitted.values())  # the bound's premise

    weights, lrs, objectives = _plain_svi_loop(digits, config, batches, steps_per_epoch)
    assert history.column("lr") == pytest.approx(lrs, rel=1e-12)
    if schedule is not None:
        assert history[-1]["lr"] < history[0]["lr"]
    assert history.column("train_objective") == pytest.approx(objectives, rel=1e-6)
    tolerance = steps * F32_ULP_BELOW_1
    for name, value in fitted.items():
        assert not torch.equal(value, initial[name])
        torch.testing.assert_close(value, weights[name], atol=tolerance, rtol=0)

    # The check of the check: another learning rate breaks the bound.
    other, _, _ = _plain_svi_loop(
        digits, dataclasses.replace(config, lr=config.lr * 1.001), batches, steps_per_epoch
    )
    assert max(float((fitted[k] - other[k]).abs().max()) for k in fitted) > 10 * tolerance


BF16_UNIT = 2.0**-8  # bfloat16 keeps 8 significant bits: relative rounding error <= 2^-8


def test_bfloat16_gradient_is_float32_gradient_to_bfloat16_rounding(digits):
    """Under torch.autocast the networks' products take bfloat16 operands (relative error
    <= 2^-8 each) and accumulate in float32, and the networks hand float32 back to the
    likelihood and the KL: the loss then agrees to 2^-8 relative and the whole gradient
    vector to 4 x 2^-8 (errors of the four layers' products add up through the chain rule;
    seen on Fashion-MNIST batches: loss 1e-6, gradient 0.0040)."""
    model, guide, modules = _vae(digits, hidden=(64,))
    params = [p for m in modules.values() for p in m.parameters()]
    x = digits.train.images[:128]
    results = {}
    for autocast in (False, True):
        pyro.set_rng_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = TraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
                model, guide, x, check_data=False
            )
        grads = torch.autograd.grad(loss, params)
        results[autocast] = loss.detach(), torch.cat([g.flatten() for g in grads])
    (loss32, grad32), (loss16, grad16) = results[False], results[True]
    assert grad16.dtype == torch.float32
    assert abs(float(loss16 - loss32)) <= BF16_UNIT * abs(float(loss32))
    relative = float((grad16 - grad32).norm() / grad32.norm())
    assert 0 < relative <= 4 * BF16_UNIT  # > 0: the products did run in bfloat16


def test_fit_in_bfloat16_autocasts_training_steps_only(digits):
    """precision="bfloat16": the decoder's layers compute in bfloat16 in training steps and in
    float32 for validation; the first step's loss is float32's to bfloat16 rounding."""
    dtypes = {"step": set(), "no-grad": set()}  # no-grad: parameter set-up and validation
    rows = {}
    for precision in ("float32", "bfloat16"):
        pyro.clear_param_store()
        model, guide, modules = _vae(digits, seed=2)

        def record(module, inputs, output, precision=precision):
            key = "step" if torch.is_grad_enabled() else "no-grad"
            dtypes[key].add((precision, output.dtype))

        hook = modules["decoder"].body[0].register_forward_hook(record)  # first hidden layer
        history = fit(
            model,
            guide,
            digits.train.images[:64],
            validation=digits.validation.images[:64],
            config=_config(epochs=1, precision=precision, seed=6),
            modules=modules,
            step_kwargs=NO_CHECKS,
        )
        hook.remove()
        rows[precision] = history[0]
    assert dtypes["step"] == {("float32", torch.float32), ("bfloat16", torch.bfloat16)}
    assert dtypes["no-grad"] == {("float32", torch.float32), ("bfloat16", torch.float32)}
    want, got = rows["float32"]["train_objective"], rows["bfloat16"]["train_objective"]
    assert abs(got - want) <= BF16_UNIT * abs(want)  # one step of 64 images
    # (The validation ELBOs after that step are not compared: how far one Adam step moves a
    # parameter does not shrink with its gradient's error, so no bound follows from 2^-8.)
    assert math.isfinite(rows["bfloat16"]["val_elbo"])
    with pytest.raises(ValueError, match="precision"):
        _config(precision="bfloat16", elbo="jit-meanfield")
    with pytest.raises(ValueError, match="precision"):
        _config(precision="float16")


def test_free_bits_below_lambda_train_like_beta_zero_less_lambda(digits):
    """With lambda above every KL, free bits remove the KL's gradient (as beta = 0 does) and
    add -lambda per image: the same parameters, step for step, and a training objective
    lambda lower; validation still reports the ELBO (beta = 1, no free bits)."""
    lam = 1e4  # nats per image: far above the KL of a 4-d latent code
    runs = {}
    for name, overrides in (("free-bits", {"free_bits": lam}), ("beta-0", {"beta": 0.0})):
        pyro.clear_param_store()
        model, guide, modules = _vae(digits, seed=3)
        history = fit(
            model,
            guide,
            digits.train.images[:192],
            validation=digits.validation.images[:64],
            config=_config(epochs=2, seed=8, **overrides),
            modules=modules,
            step_kwargs=NO_CHECKS,
        )
        runs[name] = history, _weights(modules)
    (fb, fb_w), (b0, b0_w) = runs["free-bits"], runs["beta-0"]
    for key, value in b0_w.items():
        torch.testing.assert_close(fb_w[key], value, rtol=0, atol=1e-6)
    for row_fb, row_b0 in zip(fb, b0, strict=True):
        # float64 sums of float32 per-step losses of ~1e4 per image: 1e-3 absolute.
        assert row_fb["train_objective"] == pytest.approx(row_b0["train_objective"] - lam, abs=1e-3)
        assert row_fb["val_elbo"] == pytest.approx(row_b0["val_elbo"], abs=1e-4)
    with pytest.raises(ValueError, match="free_bits"):
        _config(free_bits=-1.0)
    with pytest.raises(ValueError, match="Jit ELBO"):
        _config(free_bits=0.5, elbo="jit-meanfield")


def test_validation_elbo_improves(digits):
    model, guide, modules = _vae(digits, z_dim=8, hidden=(64,))
    config = _config(epochs=5, lr=3e-3, seed=0)
    history = fit(
        model,
        guide,
        digits.train.images,
        validation=digits.validation.images,
        config=config,
        modules=modules,
        step_kwargs=NO_CHECKS,
    )
    first, last = history[0], history[-1]
    # Measured (seeds 0, 1, 2): the validation ELBO per image goes from about -31.1..-31.8
    # after epoch 1 to -26.3..-26.7 after epoch 5, a gain of 4.5..5.4 nats. The standard
    # error of each epoch's mean over the 144 validation images is about 0.3 nats, and that
    # of the paired difference (the same z draws every epoch) about 0.25 nats: the 2-nat
    # margin is some 8 standard errors below the smallest gain seen.
    assert last["val_elbo"] - first["val_elbo"] > 2.0
    assert history.best_epoch == 5 and last["best"]
    assert last["train_objective"] > first["train_objective"]
    # The last row was validated with the final weights: check it against this file's own
    # computation. The KL is closed-form (float32 rounding of ~20 nats: 1e-4); the sampled
    # numbers and the s.e. as z-scores, |z| < 4 failing by chance with p < 7e-5 each.
    own = _OwnValidation(modules, digits.validation.images)
    assert last["val_kl"] == pytest.approx(float(own.kl.mean()), abs=1e-4)
    assert abs(own.z(last["val_reconstruction"], kl_weight=0.0)) < 4
    assert abs(own.z(last["val_elbo"])) < 4
    assert abs(own.z(last["val_objective"])) < 4  # beta = 1
    assert abs(own.se_z(last["val_elbo_se"])) < 4
    assert all(row["val_kl"] > 0 for row in history)


def test_history_and_checkpoints_written(digits, tmp_path):
    model, guide, modules = _vae(digits)
    config = _config(epochs=3, seed=5, lr_schedule="exponential", beta=0.5)
    history = fit(
        model,
        guide,
        digits.train.images[:256],
        validation=digits.validation.images,
        config=config,
        modules=modules,
        out_dir=tmp_path,
        step_kwargs=NO_CHECKS,
        run_config={"vae": {"z_dim": 4, "hidden": (32,)}},
    )
    assert len(history) == 3 and history.column("epoch") == [1, 2, 3]
    assert history.column("step") == [4, 8, 12]
    assert all(row["beta"] == 0.5 for row in history)
    # The last row (final weights) against this file's own computation: the validation ELBO
    # is at beta = 1, the objective at the training beta, 0.5 (|z| < 4 each, p < 7e-5).
    own = _OwnValidation(modules, digits.validation.images)
    last_row = history[-1]
    assert last_row["val_kl"] == pytest.approx(float(own.kl.mean()), abs=1e-4)
    assert abs(own.z(last_row["val_elbo"])) < 4
    assert abs(own.z(last_row["val_objective"], kl_weight=0.5)) < 4
    assert abs(own.se_z(last_row["val_elbo_se"])) < 4
    assert history.column("lr") == pytest.approx([1e-2, 0.95e-2, 0.95**2 * 1e-2])

    saved = json.loads((tmp_path / "history.json").read_text())
    assert saved == [{k: row[k] for k in HISTORY_COLUMNS} for row in history]
    with open(tmp_path / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and tuple(rows[0]) == HISTORY_COLUMNS
    assert [float(r["val_elbo"]) for r in rows] == history.column("val_elbo")

    last = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    assert last.counters["epoch"] == 3 and last.counters["step"] == 12
    assert best.counters["epoch"] == history.best_epoch
    # config.json is the configuration; each checkpoint holds the SHA-256 of its canonical
    # JSON (sorted keys, no whitespace) without the runtime settings.
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded == {"train": config.to_dict(), "vae": {"z_dim": 4, "hidden": [32]}}
    assert TrainConfig.from_dict(recorded["train"]) == config
    runtime = ("device", "progress", "threads", "checkpoint_every", "engine", "flush_subnormals")
    stable = {**recorded, "train": {k: v for k, v in recorded["train"].items() if k not in runtime}}
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert last.config_digest == best.config_digest == digest
    assert last.optimizer is not None and last.scheduler is not None
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []

    trained = _weights(modules)
    pyro.clear_param_store()
    _, _, fresh = _vae(digits, seed=123)
    restore(last, modules=fresh, rng=False)
    for name, value in _weights(fresh).items():
        assert torch.equal(value, trained[name])


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")
# The VAE has nothing to enumerate: TraceEnum_ELBO says so, and trains like Trace_ELBO.
@pytest.mark.filterwarnings("ignore:TraceEnum_ELBO found no sample sites:UserWarning")
@pytest.mark.parametrize("num_particles", [1, 4])
@pytest.mark.parametrize("elbo", ELBOS)
def test_each_elbo_runs(digits, elbo, num_particles):
    model, guide, modules = _vae(digits)
    config = _config(epochs=1, elbo=elbo, num_particles=num_particles, seed=2)
    history = fit(
        model,
        guide,
        digits.train.images[:200],
        validation=digits.validation.images[:50],
        config=config,
        modules=modules,
        step_kwargs=NO_CHECKS,
    )
    # Every ELBO trains on the last, short batch too (200 = 3 * 64 + 8).
    assert history[0]["step"] == 4
    assert all(math.isfinite(history[0][k]) for k in ("train_objective", "val_elbo", "val_kl"))


@pytest.mark.parametrize("name", ["meanfield", "trace"])
def test_jit_elbo_trains_like_its_plain_elbo(digits, name):
    """fit compiles off the main random stream, so the Jit ELBO replays the plain one draw for
    draw: 2 epochs of 4 steps (the last batch of 8 with its own trace) end at the same
    parameters, to float tolerance (the traced graph may order float sums differently)."""
    images = digits.train.images[:200]
    weights, histories = {}, {}
    for elbo in (name, f"jit-{name}"):
        pyro.clear_param_store()
        model, guide, modules = _vae(digits)
        config = _config(epochs=2, elbo=elbo, seed=5)
        histories[elbo] = fit(
            model, guide, images, config=config, modules=modules, step_kwargs=NO_CHECKS
        )
        assert histories[elbo][-1]["step"] == 8
        weights[elbo] = _weights(modules)
    for key, value in weights[name].items():
        torch.testing.assert_close(weights[f"jit-{name}"][key], value, rtol=1e-4, atol=1e-5)
    assert histories[f"jit-{name}"].column("train_objective") == pytest.approx(
        histories[name].column("train_objective"), rel=1e-5
    )


def test_schedule_dynamic_binarization_without_validation(digits):
    grey = data.load("digits").train.images[:128]
    model, guide, modules = _vae(digits)
    betas = []

    def warm_up(step: int) -> float:
        betas.append(step)
        return min(1.0, 0.25 * (step + 1))

    history = fit(
        model,
        guide,
        grey,
        config=_config(epochs=2, seed=4),
        modules=modules,
        dynamic_binarize=True,  # the Bernoulli likelihood sees 0/1 draws of the grey images
        beta_schedule=warm_up,
    )  # no step_kwargs: the model checks every batch is 0/1
    assert betas[:4] == [0, 1, 2, 3]
    assert history.column("beta") == [0.5, 1.0]
    assert history[0]["val_elbo"] is None and history.best_epoch is not None


def test_bad_arguments_refused(digits):
    model, guide, _ = _vae(digits)
    images = digits.train.images[:64]
    with pytest.raises(ValueError, match="beta schedule"):
        fit(model, guide, images, config=_config(elbo="jit-trace"), beta_schedule=lambda s: 1.0)
    with pytest.raises(ValueError, match=r"jit-meanfield.*'warmup:10'.*recompile"):
        _config(elbo="jit-meanfield", beta="warmup:10:1")
    assert _config(elbo="jit-meanfield", beta="0.5").beta == 0.5
    with pytest.raises(ValueError, match=r"TrainConfig.beta: bad beta schedule 'warmup:x'"):
        _config(beta="warmup:x")
    with pytest.raises(ValueError, match=r"TrainConfig.beta: bad beta -1"):
        _config(beta=-1)
    with pytest.raises(ValueError, match="run_config"):
        fit(model, guide, images, config=_config(), run_config={"train": {}})
    with pytest.raises(ValueError, match="plain JSON"):
        fit(model, guide, images, config=_config(), run_config={"vae": {"act": print}})
    with pytest.raises(ValueError, match="beta"):
        fit(model, guide, images, config=_config(), step_kwargs={"beta": 2.0})
    with pytest.raises(ValueError, match="elbo"):
        _config(elbo="tracemeanfield")
    with pytest.raises(ValueError, match="batch_size"):
        _config(batch_size=0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})


class _PoisonedDecoder(nn.Module):
    """A decoder whose output turns NaN after ``after`` calls in training mode."""

    def __init__(self, decoder: nn.Module, after: int) -> None:
        super().__init__()
        self.inner = decoder
        self.z_dim, self.x_dim = decoder.z_dim, decoder.x_dim
        self.after = after
        self.calls = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.inner(z)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def test_divergence_stops_with_the_step_and_keeps_last_good_checkpoint(digits, tmp_path):
    # Calls in training mode: 1 to register the parameters, then one per step; so with
    # after=6 the decoder's output is NaN from step 6 on (epoch 2 of 4-step epochs).
    poison = functools.partial(_PoisonedDecoder, after=6)
    model, guide, modules = _vae(digits, wrap=poison)
    with pytest.raises(TrainingDivergedError, match="step 6 \\(epoch 2\\)") as info:
        fit(
            model,
            guide,
            digits.train.images[:256],
            validation=digits.validation.images,
            config=_config(epochs=3, seed=6),
            modules=modules,
            out_dir=tmp_path,
            step_kwargs=NO_CHECKS,
        )
    error = info.value
    assert isinstance(error, FloatingPointError)
    assert error.step == 6 and error.epoch == 2
    assert error.checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert str(error.checkpoint) in str(error)

    checkpoint = load_checkpoint(error.checkpoint)
    assert checkpoint.counters["epoch"] == 1
    assert len(json.loads((tmp_path / "history.json").read_text())) == 1
    pyro.clear_param_store()
    _, _, fresh = _vae(digits, seed=9, wrap=poison)
    restore(checkpoint, modules=fresh, rng=False)
    assert all(torch.isfinite(w).all() for w in _weights(fresh).values())


def _keep_every_checkpoint(monkeypatch, folder) -> list:
    """Copy each checkpoint fit writes into ``folder`` (numbered in order); the list of copies."""
    import ppl_vae.training.files as files_module

    saved = []
    real_save = files_module.save_checkpoint

    def keep(path, **kwargs):
        out = real_save(path, **kwargs)
        copy = folder / f"{len(saved):02d}-{path.name}"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(path.read_bytes())
        saved.append(copy)
        return out

    monkeypatch.setattr(files_module, "save_checkpoint", keep)
    return saved


def test_resume_from_every_step_boundary_is_bitwise_exact(digits, tmp_path, monkeypatch):
    """A checkpoint at every step (checkpoint_every=1) and at each epoch's end: resuming from
    any one of them, in a fresh param store with other initial weights, ends with the
    uninterrupted run's parameters, optimizer state and history."""
    images = digits.train.images[:160]  # 3 steps of 64 per epoch, the last one short
    config = _config(epochs=2, seed=8, checkpoint_every=1, lr_schedule="cosine")
    saved = _keep_every_checkpoint(monkeypatch, tmp_path / "kept")
    model, guide, modules = _vae(digits)
    grey = data.load("digits").train.images[:160]
    kwargs = {"config": config, "dynamic_binarize": True, "beta_schedule": lambda s: 0.5}
    reference = fit(
        model, guide, grey, modules=modules, out_dir=tmp_path / "ref", validation=images, **kwargs
    )
    monkeypatch.undo()
    expected = _weights(modules)
    # A Python schedule function overrides config.beta and cannot be recorded.
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["train"]["beta"] is None
    final = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.ckpt")
    lasts = [p for p in saved if p.name.endswith("last.ckpt")]
    assert [load_checkpoint(p).counters["step"] for p in lasts] == [1, 2, 3, 4, 5, 6]
    for path in lasts[:-1]:
        pyro.clear_param_store()
        model, guide, modules = _vae(digits, seed=77)
        history = fit(
            model,
            guide,
            grey,
            modules=modules,
            out_dir=tmp_path / path.stem,
            validation=images,
            resume=path,
            **kwargs,
        )
        for name, value in _weights(modules).items():
            assert torch.equal(value, expected[name]), (path.name, name)
        resumed = load_checkpoint(tmp_path / path.stem / "checkpoints" / "last.ckpt")
        for index, state in final.optimizer["state"].items():
            for key, value in state.items():
                assert torch.equal(resumed.optimizer["state"][index][key], value)
        strip = [{k: v for k, v in r.items() if "seconds" not in k} for r in history]
        assert strip == [{k: v for k, v in r.items() if "seconds" not in k} for r in reference]


def test_resume_with_a_jit_elbo_is_bitwise_exact(digits, tmp_path, monkeypatch):
    """A resumed Jit run compiles again (off the main random stream) and then draws what the
    uninterrupted run drew: from a mid-epoch and an epoch-end checkpoint, the same weights."""
    images = digits.train.images[:160]  # 3 steps of 64 per epoch, the last one short
    config = _config(epochs=2, seed=8, checkpoint_every=1, elbo="jit-meanfield")
    saved = _keep_every_checkpoint(monkeypatch, tmp_path / "kept")
    model, guide, modules = _vae(digits)
    fit(
        model,
        guide,
        images,
        config=config,
        modules=modules,
        out_dir=tmp_path / "ref",
        step_kwargs=NO_CHECKS,
    )
    monkeypatch.undo()
    expected = _weights(modules)
    lasts = [p for p in saved if p.name.endswith("last.ckpt")]
    for path in (lasts[1], lasts[2]):  # after step 2 (mid-epoch) and step 3 (epoch end)
        pyro.clear_param_store()
        model, guide, modules = _vae(digits, seed=77)
        fit(
            model,
            guide,
            images,
            config=config,
            modules=modules,
            out_dir=tmp_path / path.stem,
            resume=path,
            step_kwargs=NO_CHECKS,
        )
        for name, value in _weights(modules).items():
            assert torch.equal(value, expected[name]), (path.name, name)


def test_a_run_saved_with_the_engine_setting_still_loads_and_resumes(digits, tmp_path, monkeypatch):
    """Configurations saved when TrainConfig had an ``engine`` setting hold engine="fast"
    (what every run does): such a config loads, and such a checkpoint resumes to the
    uninterrupted run's weights; any other engine is refused by name."""
    config = _config(epochs=2, seed=4)
    assert TrainConfig.from_dict({**config.to_dict(), "engine": "fast"}) == config
    with pytest.raises(ValueError, match="engine"):
        TrainConfig.from_dict({**config.to_dict(), "engine": "svi"})
    images = digits.train.images[:128]  # 2 steps per epoch
    model, guide, modules = _vae(digits)
    saved = _keep_every_checkpoint(monkeypatch, tmp_path / "kept")
    # As TrainConfig.to_dict wrote them then:
    monkeypatch.setattr(
        TrainConfig, "to_dict", lambda self: {**dataclasses.asdict(self), "engine": "fast"}
    )
    fit(
        model,
        guide,
        images,
        config=config,
        modules=modules,
        out_dir=tmp_path / "old",
        step_kwargs=NO_CHECKS,
    )
    monkeypatch.undo()
    expected = _weights(modules)
    first_epoch = load_checkpoint(next(p for p in saved if p.name.endswith("last.ckpt")))
    assert first_epoch.counters["step"] == 2
    pyro.clear_param_store()
    model, guide, modules = _vae(digits, seed=77)
    # Its digest is not this configuration's (the setting is gone): the run's config.json,
    # which holds that digest, shows that nothing else differs.
    assert json.loads((tmp_path / "old" / "config.json").read_text())["train"]["engine"] == "fast"
    fit(
        model,
        guide,
        images,
        config=config,
        modules=modules,
        out_dir=tmp_path / "old",
        resume=first_epoch,
        step_kwargs=NO_CHECKS,
    )
    for name, value in _weights(modules).items():
        assert torch.equal(value, expected[name]), name


def _as_version_1(path, configuration) -> None:
    """Rewrite a checkpoint as format version 1 wrote it: a copy of the configuration in its
    body instead of the digest, signed like any checkpoint."""
    import safetensors.torch

    from ppl_vae.checkpoint import FORMAT

    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    body = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["ppl_vae"])
    del body["config_digest"]
    body.update(version=1, config=configuration)
    text = json.dumps(body)
    tensors = safetensors.torch.load(raw)
    meta = {"format": FORMAT, "ppl_vae": text}
    draft = safetensors.torch.save(tensors, meta)
    start = 8 + int.from_bytes(draft[:8], "little")
    meta["sha256"] = hashlib.sha256(text.encode() + draft[start:]).hexdigest()
    path.write_bytes(safetensors.torch.save(tensors, meta))


def test_resume_checks_the_configuration_by_its_digest(digits, tmp_path, monkeypatch):
    """From the first epoch's checkpoint of a 2-epoch run: another lr is refused, naming it;
    other runtime settings resume, and config.json records them under the same digest; a
    config.json edited by hand, or missing, cannot name the differences and says so; a
    version-1 checkpoint loads but is refused."""
    images = digits.train.images[:128]  # 2 steps per epoch
    config = _config(epochs=2, seed=3)
    sections = {"vae": {"z_dim": 4, "hidden": [32]}}
    run = tmp_path / "run"
    saved = _keep_every_checkpoint(monkeypatch, tmp_path / "kept")
    model, guide, modules = _vae(digits)
    settings = {"modules": modules, "out_dir": run, "run_config": sections}
    fit(model, guide, images, config=config, step_kwargs=NO_CHECKS, **settings)
    monkeypatch.undo()
    epoch_1 = next(p for p in saved if p.name.endswith("last.ckpt"))
    assert load_checkpoint(epoch_1).counters["step"] == 2
    recorded = (run / "config.json").read_bytes()

    def resume(new_config, checkpoint=epoch_1):
        pyro.clear_param_store()
        model, guide, modules = _vae(digits, seed=77)
        settings["modules"] = modules
        fit(model, guide, images, config=new_config, resume=checkpoint, **settings)

    with pytest.raises(ConfigMismatchError) as info:
        resume(dataclasses.replace(config, lr=0.05))
    assert info.value.differences == ["train.lr: saved 0.01, asked 0.05"]
    assert (run / "config.json").read_bytes() == recorded  # a refused resume writes nothing

    moved = dataclasses.replace(config, device="auto", progress=False, checkpoint_every=1)
    resume(moved)
    now = json.loads((run / "config.json").read_text())
    assert now == {"train": moved.to_dict(), **sections} and now["train"]["device"] == "auto"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt").config_digest == (
        load_checkpoint(epoch_1).config_digest
    )

    edited = {**now, "train": {**now["train"], "lr": 0.02}}  # by hand, after the checkpoint
    (run / "config.json").write_text(json.dumps(edited))
    with pytest.raises(ConfigMismatchError, match="changed since it was written or is missing"):
        resume(dataclasses.replace(config, lr=0.02))
    (run / "config.json").unlink()
    with pytest.raises(ConfigMismatchError, match="cannot be named") as info:
        resume(dataclasses.replace(config, lr=0.02))
    assert info.value.differences == []

    old = tmp_path / "v1.ckpt"
    shutil.copy(epoch_1, old)
    _as_version_1(old, {"train": config.to_dict(), **sections})
    loaded = load_checkpoint(old)
    assert loaded.version == 1 and loaded.config_digest is None
    restore(loaded, modules=_vae(digits, seed=5)[2], rng=False)  # still loads for evaluation
    with pytest.raises(CheckpointError, match=r"format version 1.*older ppl-vae") as info:
        resume(config, checkpoint=old)
    assert "\n" not in str(info.value)


def test_config_differences_and_checkpoint_every():
    from ppl_vae.training import config_differences

    saved = {"train": {"lr": 0.01, "seed": 1, "device": "cpu"}, "vae": {"hidden": [32]}}
    asked = {"train": {"lr": 0.01, "seed": 2, "device": "cuda"}, "vae": {"hidden": (32, 32)}}
    assert config_differences(saved, asked, ignore=("train.device",)) == [
        "train.seed: saved 1, asked 2",
        "vae.hidden: saved [32], asked [32, 32]",
    ]
    assert config_differences(saved, {"train": {"lr": 1e-2}}, partial=True) == []
    assert config_differences({"a": 1}, {"a": True}) == ["a: saved 1, asked true"]
    with pytest.raises(ValueError, match="checkpoint_every"):
        _config(checkpoint_every=0)
    assert _config(checkpoint_every=5).checkpoint_every == 5
