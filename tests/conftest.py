"""Shared fixtures: every test starts from a seeded RNG, an empty param store and Pyro validation on."""

import os

import pyro
import pytest
import torch

# One intra-op thread unless asked otherwise: tests are tiny, and two processes each spinning two threads on a
# two-core machine slow each other down many times over.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(autouse=True)
def _pyro_state():
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()
