"""A 1-D linear-Gaussian model with the package's site conventions, shared by the Gibbs-chain tests.

``z1 ~ N(0, 1)``, ``x ~ N(A z1, S^2)``, so ``p(x) = N(0, A^2 + S^2) = N(0, 5)`` and the exact posterior is
``q(z1|x) = N(A x / (A^2 + S^2), S^2 / (A^2 + S^2))``.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

A, S = 2.0, 1.0


class LinearGaussianModel(PyroModule):
    """``z1 ~ N(0, 1)``, ``x ~ N(A z1, S^2)``."""

    latent_sites = ["z1"]

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                z = pyro.sample("z1", dist.Normal(torch.zeros(n, 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(A * z, S).to_event(1), obs=x)
        return A * z
