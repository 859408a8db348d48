"""Every test starts from an empty param store, with Pyro's validation on and a fixed seed."""

import pyro
import pytest


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
