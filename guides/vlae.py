"""Variational Ladder Autoencoder inference network (Section 4.1, Eq. 12-13)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from pyro_vlae.nets import MLP, ConvEncoder, GaussianHead, ModelConfig, batch_size_of, check_kl_scale


class VLAEGuide(PyroModule):
    r"""Ladder inference network ``q(z|x)``.

    .. math::

        h_0 = x, \qquad h_\ell = g_\ell(h_{\ell-1}), \qquad z_\ell \sim N(\mu_\ell(h_\ell), \sigma_\ell(h_\ell))

    ``g_1`` is the convolutional stack (flattened, as the reference's ``ladder0``), ``g_\ell`` for ``\ell \ge 2`` are
    ``fc_layers`` dense blocks plus a linear map.  Heads are a linear mean and a ``sigmoid + 0.001`` scale.

    :param config: the architecture; must be the one the model was built with.
    :param name: Pyro name prefix of the parameters.
    """

    def __init__(self, config: ModelConfig, name: str = "guide"):
        super().__init__(name)
        self.config = config
        c, H = config, config.hidden
        conv = ConvEncoder(c.image_shape, c.channels, c.batch_norm, "lrelu")
        steps = [conv] + [
            MLP(conv.out_dim if l == 1 else H, H, c.fc_layers, H, c.batch_norm) for l in range(1, c.num_layers)
        ]
        self.steps = nn.ModuleList(steps)
        dims = [conv.out_dim] + [H] * (c.num_layers - 1)
        self.heads = nn.ModuleList([GaussianHead(d, z) for d, z in zip(dims, c.latent_dims)])

    def posterior(self, x):
        """Return ``[(loc_1, scale_1), ..., (loc_L, scale_L)]`` of ``q(z_l | x)`` without sampling."""
        out, h = [], x
        for step, head in zip(self.steps, self.heads):
            h = step(h)
            out.append(head(h))
        return out

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        """Sample every ``z_l ~ q(z_l | x)``.  ``x`` is required; returns the list of posterior means."""
        if x is None:
            raise ValueError("VLAEGuide needs data: call guide(x) with a batch of images (N, C, H, W)")
        kl_scale = check_kl_scale(kl_scale)
        n = batch_size_of(x, batch_size, self.config.image_shape, "VLAEGuide")
        params = self.posterior(x)
        with pyro.plate("data", n), poutine.scale(scale=kl_scale):
            for l, (loc, scale) in enumerate(params, start=1):
                pyro.sample(f"z{l}", dist.Normal(loc, scale).to_event(1))
        return [loc for loc, _ in params]
