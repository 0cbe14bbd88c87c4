"""Inference network of the flat VAE baseline."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule

from pyro_vlae.nets import MLP, ConvEncoder, GaussianHead, ModelConfig, batch_size_of, check_kl_scale, children


class VAEGuide(PyroModule):
    r"""Flat VAE guide :math:`q(z_1 \mid x)`: convolutions, ``fc_layers`` dense blocks, Gaussian head.  Scales its site
    by ``kl_scale * beta``."""

    def __init__(self, config: ModelConfig, name: str = "guide"):
        super().__init__(name)
        self.config = config
        c, H = config, config.hidden
        conv = ConvEncoder(c.image_shape, c.channels, c.batch_norm, "lrelu")
        self.encoder = MLP(conv.out_dim, H, c.fc_layers, None, c.batch_norm)
        self.conv = conv
        self.head = GaussianHead(H, sum(c.latent_dims))

    def posterior(self, x):
        """``[(loc, scale)]`` of ``q(z1|x)`` without sampling."""
        head, encoder, conv = children(self, "head", "encoder", "conv")
        return [head(encoder(conv(x)))]

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        if x is None:
            raise ValueError("VAEGuide needs data: call guide(x) with a batch of images (N, C, H, W)")
        kl_scale = check_kl_scale(kl_scale) * self.config.beta
        n = batch_size_of(x, batch_size, self.config.image_shape, "VAEGuide")
        ((loc, scale),) = self.posterior(x)
        with pyro.plate("data", n), poutine.scale(scale=kl_scale):
            pyro.sample("z1", dist.Normal(loc, scale).to_event(1))
        return [loc]
