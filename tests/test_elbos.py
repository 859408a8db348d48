"""The ELBO objects by name: the Jit ones replay exactly what the plain ones compute."""

import functools
import math

import pyro
import pytest
import torch

from ppl_vae.elbo import ELBOS, PatchedJitTraceMeanField_ELBO, elbo_by_name
from ppl_vae.guides import vae as vae_guide
from ppl_vae.models import vae as vae_model
from ppl_vae.vae import make_networks

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")


def _pair(seed: int = 0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    encoder, decoder = make_networks((8, 8), 3, (16,))
    model = functools.partial(vae_model.model, decoder=decoder, likelihood="bernoulli")
    guide = functools.partial(vae_guide.guide, encoder=encoder)
    return model, guide, [*encoder.parameters(), *decoder.parameters()]


def _loss_and_grads(elbo, model, guide, params, x, seed):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, x, check_data=False)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads


@pytest.mark.parametrize("name", ["meanfield", "trace"])
@pytest.mark.parametrize("num_particles", [1, 3])
def test_jit_elbo_replays_the_plain_elbo(name, num_particles):
    """After compiling (the first call, which draws extra numbers), every call of the Jit ELBO
    gives the plain ELBO's loss and gradients from the same seed, on each batch shape."""
    model, guide, params = _pair()
    x = torch.bernoulli(torch.rand(24, 64, generator=torch.Generator().manual_seed(1)))
    plain = elbo_by_name(name, num_particles=num_particles, max_plate_nesting=1)
    for rows in (16, 8):  # one Jit ELBO object per shape, as fit keeps them
        jit = elbo_by_name(f"jit-{name}", num_particles=num_particles, max_plate_nesting=1)
        jit.differentiable_loss(model, guide, x[:rows], check_data=False)  # compiles
        for seed in (10, 11, 12):
            loss, grads = _loss_and_grads(jit, model, guide, params, x[:rows], seed)
            want_loss, want_grads = _loss_and_grads(plain, model, guide, params, x[:rows], seed)
            # Mean-field replays bitwise (seen: 0 difference). Trace's traced graph adds the
            # per-site terms in another order: float32 rounding of sums of a few hundred terms,
            # relative ~1e-7 for the loss and up to ~1e-4 for gradient entries (seen: 8e-8, 2e-4
            # absolute on entries of order 1-10).
            torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
            for g, w in zip(grads, want_grads, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_jit_meanfield_compiles_once():
    """Pyro 1.9.2's JitTraceMeanField_ELBO traces at every call; ours keeps its first trace."""
    model, guide, _ = _pair()
    elbo = elbo_by_name("jit-meanfield")
    assert isinstance(elbo, PatchedJitTraceMeanField_ELBO)
    x = torch.bernoulli(torch.full((16, 64), 0.5))
    elbo.differentiable_loss(model, guide, x, check_data=False)
    compiled = elbo._differentiable_loss
    losses = [
        float(elbo.differentiable_loss(model, guide, x, check_data=False).detach())
        for _ in range(4)
    ]
    assert elbo._differentiable_loss is compiled and len(compiled.compiled) == 1
    assert all(math.isfinite(v) for v in losses)
    other_model, other_guide, _ = _pair(seed=1)
    with pytest.raises(ValueError, match="another model/guide pair"):
        elbo.differentiable_loss(other_model, other_guide, x, check_data=False)


def test_names():
    assert {type(elbo_by_name(n)).__name__ for n in ELBOS} == {
        "TraceMeanField_ELBO",
        "Trace_ELBO",
        "TraceEnum_ELBO",
        "PatchedJitTraceMeanField_ELBO",
        "PatchedJitTrace_ELBO",
    }
    with pytest.raises(ValueError, match="unknown elbo"):
        elbo_by_name("tracemeanfield")


@pytest.mark.parametrize("name", ["jit-meanfield", "jit-trace"])
def test_compiling_does_not_warn(name):
    """torch's deprecation notice for torch.jit.trace is the library's concern, not the user's."""
    import warnings

    model, guide, _ = _pair()
    x = torch.bernoulli(torch.full((4, 64), 0.5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elbo_by_name(name, max_plate_nesting=1).differentiable_loss(
            model, guide, x, check_data=False
        )
    assert not [w for w in caught if "jit" in str(w.message)], [str(w.message) for w in caught]
