"""Stacked hierarchical VAEs: the Markov HVAE (Eq. 4, Appendix B.1) and the autoregressive HVAE (Eq. 3)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from pyro_vlae.nets import (
    DeconvDecoder,
    ModelConfig,
    batch_size_of,
    check_kl_scale,
    children,
    dense_decoder,
    gaussian_conditional,
)

from .likelihood import Likelihood


class MarkovHVAEModel(PyroModule):
    r"""Markov HVAE, :math:`p(x, z) = p(x \mid z_1) \prod_{\ell=1}^{L-1} p(z_\ell \mid z_{\ell+1})\, p(z_L)` (Eq. 4).

    Following Appendix B.1,

    .. math::

        z_L \sim N(0, I), \qquad
        z_\ell \sim N\big(W_1 f_\ell(z_{\ell+1}),\ \mathrm{sigm}(W_2 f_\ell(z_{\ell+1}))^2\big), \qquad
        x \sim r(x; f_0(z_1))

    with :math:`f_\ell` a two-layer dense net (``fc_layers``) and :math:`f_0` a dense map plus transposed
    convolutions.  For vector data ``(D,)`` the decoder :math:`f_0` is dense only; with ``conditionals="affine"``
    every :math:`p(z_\ell \mid z_{\ell+1})` is :math:`N(W z_{\ell+1} + b, \mathrm{diag}(s_\ell)^2)` and, for vectors,
    :math:`f_0` is affine too, so a ``gaussian-learned`` likelihood gives exactly the linear-Gaussian Markov models.
    Every conditional is a plain ``Normal(loc, scale)``, so ``poutine.reparam`` with ``LocScaleReparam(0)`` exposes
    each layer's noise :math:`\epsilon_\ell` as a site ``z{l}_decentered`` (used for the Fig. 3 interventions).

    :param config: the architecture (same widths and latent sizes as the matching VLAE preset).
    :param name: Pyro name prefix of the parameters.
    """

    #: Whether :math:`p(z_\ell \mid \cdot)` sees every layer above (Eq. 3) or only the next one (Eq. 4).
    autoregressive = False

    def __init__(self, config: ModelConfig, name: str = "model"):
        super().__init__(name)
        self.config = config
        c, L = config, config.num_layers
        nets = []
        for l in range(1, L):  # conditional for z_l, l = 1 .. L-1
            in_dim = sum(c.latent_dims[l:]) if self.autoregressive else c.latent_dims[l]
            nets.append(gaussian_conditional(in_dim, c.latent_dims[l - 1], c))
        self.conditionals = nn.ModuleList(nets)
        if c.is_vector:
            self.decoder = dense_decoder(c.latent_dims[0], c)
        else:
            self.decoder = DeconvDecoder(c.latent_dims[0], c.image_shape, c.channels, c.batch_norm, "relu")
        self.likelihood = Likelihood(c.likelihood, c.image_shape, c.obs_scale, c.value_range)

    @property
    def latent_sites(self):
        return [f"z{l}" for l in range(1, self.config.num_layers + 1)]

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        r"""Ancestral sampling :math:`z_L \to \dots \to z_1 \to x`; observes ``x`` when given.  Returns the mean of
        ``x``."""
        c = self.config
        kl_scale = check_kl_scale(kl_scale)
        n = batch_size_of(x, batch_size, c.image_shape, type(self).__name__)
        # Each access to a child module re-registers its parameters with Pyro: look each one up once.
        decoder, conditionals, likelihood = children(self, "decoder", "conditionals", "likelihood")
        ref = next(decoder.parameters())
        zs = [None] * c.num_layers
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                zero = ref.new_zeros(n, c.latent_dims[-1])
                zs[-1] = pyro.sample(f"z{c.num_layers}", dist.Normal(zero, torch.ones_like(zero)).to_event(1))
                for l in range(c.num_layers - 1, 0, -1):
                    parent = torch.cat(zs[l:], dim=-1) if self.autoregressive else zs[l]
                    loc, scale = conditionals[l - 1](parent)
                    zs[l - 1] = pyro.sample(f"z{l}", dist.Normal(loc, scale).to_event(1))
            raw = decoder(zs[0])
            pyro.sample("x", likelihood(raw), obs=x)
        return likelihood.mean(raw)


class AutoregressiveHVAEModel(MarkovHVAEModel):
    r"""Autoregressive HVAE (Eq. 3): :math:`p(z_\ell \mid z_{>\ell})` sees every layer above through concatenation.

    This is the model Proposition 2 is about; its Gibbs chain keeps all of ``z``.
    """

    autoregressive = True
