"""Bottom-up inference network for the stacked HVAEs (Appendix B.1: "the same architecture as the generator")."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from pyro_vlae.nets import (
    ConvEncoder,
    GaussianHead,
    ModelConfig,
    batch_size_of,
    check_kl_scale,
    children,
    gaussian_conditional,
)


class MarkovHVAEGuide(PyroModule):
    r"""Markov HVAE guide, :math:`q(z \mid x) = q(z_1 \mid x) \prod_{\ell \ge 2} q(z_\ell \mid z_{\ell-1})`.

    :math:`q(z_1 \mid x)` mirrors :math:`f_0` with stride-2 convolutions; :math:`q(z_\ell \mid z_{\ell-1})` mirrors
    :math:`f_\ell`: a two-layer dense net with a linear mean and a sigmoid standard deviation.  It serves both the
    Markov and the autoregressive HVAE (the guide family is free; Propositions 1 and 2 hold for any :math:`q`).

    For vector data ``(D,)``, :math:`q(z_1 \mid x)` is a dense net (``fc_layers``) and a Gaussian head.  With
    ``conditionals="affine"`` every :math:`q(z_\ell \mid z_{\ell-1})` is
    :math:`N(W z_{\ell-1} + b, \mathrm{diag}(s_\ell)^2)`, and so is :math:`q(z_1 \mid x)` for vectors: the exact
    posteriors of a linear-Gaussian Markov model with diagonal posteriors.

    :param config: the architecture; must be the one the model was built with.
    :param name: Pyro name prefix of the parameters.
    """

    def __init__(self, config: ModelConfig, name: str = "guide"):
        super().__init__(name)
        self.config = config
        c = config
        if c.is_vector:
            first = gaussian_conditional(c.image_shape[0], c.latent_dims[0], c)
        else:
            conv = ConvEncoder(c.image_shape, c.channels, c.batch_norm, "lrelu")
            first = nn.Sequential(conv, GaussianHead(conv.out_dim, c.latent_dims[0]))
        rest = [gaussian_conditional(c.latent_dims[l - 1], c.latent_dims[l], c) for l in range(1, c.num_layers)]
        self.conditionals = nn.ModuleList([first] + rest)

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        r"""Sample :math:`z_1 \sim q(z_1 \mid x)`, then each :math:`z_\ell \sim q(z_\ell \mid z_{\ell-1})`.  Returns
        the sampled codes."""
        if x is None:
            shape = ", ".join(map(str, ("N", *self.config.image_shape)))
            raise ValueError(f"{type(self).__name__} needs data: call guide(x) with a batch of shape ({shape})")
        kl_scale = check_kl_scale(kl_scale)
        n = batch_size_of(x, batch_size, self.config.image_shape, type(self).__name__)
        zs, h = [], x
        with pyro.plate("data", n), poutine.scale(scale=kl_scale):
            for l, net in enumerate(children(self, "conditionals")[0], start=1):
                loc, scale = net(h)
                h = pyro.sample(f"z{l}", dist.Normal(loc, scale).to_event(1))
                zs.append(h)
        return zs
