"""Flat single-layer VAE baseline, with an optional beta on the KL (beta-VAE)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule

from pyro_vlae.nets import MLP, DeconvDecoder, ModelConfig, batch_size_of, check_kl_scale, children

from .likelihood import Likelihood


class VAEModel(PyroModule):
    r"""Flat VAE: :math:`z_1 \sim N(0, I)` of size ``sum(latent_dims)``, :math:`x \sim r(x; f_0(\mathrm{MLP}(z_1)))`.

    The single site is ``z1`` and sits under ``poutine.scale(kl_scale * beta)``, so ``beta`` weights the KL term
    exactly as in beta-VAE.  Same widths as the VLAE preset, so the comparison is at matched capacity.
    """

    def __init__(self, config: ModelConfig, name: str = "model"):
        super().__init__(name)
        self.config = config
        c, H = config, config.hidden
        self.latent_dim = sum(c.latent_dims)
        self.top = MLP(self.latent_dim, H, c.fc_layers, H, c.batch_norm, "relu")
        self.decoder = DeconvDecoder(H, c.image_shape, c.channels, c.batch_norm, "relu")
        self.likelihood = Likelihood(c.likelihood, c.image_shape, c.obs_scale, c.value_range)

    @property
    def latent_sites(self):
        return ["z1"]

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        """Sample ``z1`` from the prior and ``x`` from ``r``; observes ``x`` when given.  Returns the mean image."""
        c = self.config
        kl_scale = check_kl_scale(kl_scale) * c.beta
        n = batch_size_of(x, batch_size, c.image_shape, "VAEModel")
        decoder, likelihood, top = children(self, "decoder", "likelihood", "top")  # one Pyro registration each
        zero = decoder.fc[0].weight.new_zeros(n, self.latent_dim)
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                z = pyro.sample("z1", dist.Normal(zero, torch.ones_like(zero)).to_event(1))
            raw = decoder(top(z))
            pyro.sample("x", likelihood(raw), obs=x)
        return likelihood.mean(raw)
