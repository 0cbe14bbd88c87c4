"""Variational Ladder Autoencoder generative network (Zhao, Song & Ermon 2017, Section 4.1, Eq. 8-11)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from pyro_vlae.nets import (
    MLP,
    DeconvDecoder,
    ModelConfig,
    NoiseInjection,
    batch_size_of,
    check_kl_scale,
    children,
    dense,
)

from .likelihood import Likelihood


class VLAEModel(PyroModule):
    r"""Generative VLAE: a flat prior :math:`p(z_1, \dots, z_L) = N(0, I)` and a ladder-shaped decoder (Eq. 8-11).

    .. math::

        \tilde z_L = f_L(z_L), \qquad
        \tilde z_\ell = u_\ell([\tilde z_{\ell+1}; v_\ell(z_\ell)]), \qquad
        x \sim r(x; f_0(\tilde z_1))

    :math:`z_L` travels through the deepest network and :math:`z_1` through the shallowest.  :math:`f_L` and
    :math:`u_\ell` for :math:`\ell \ge 2` are ``fc_layers`` dense blocks plus a linear map; as in the reference code,
    :math:`u_1` is folded into the first dense layer of :math:`f_0` (a dense map to a feature map followed by
    transposed convolutions).

    Sites: ``z1 .. zL`` (each under ``poutine.scale(kl_scale)``) and ``x``, inside ``pyro.plate("data")``.

    :param config: the architecture.
    :param name: Pyro name prefix of the parameters (give two instances different names to use both in one model).
    """

    def __init__(self, config: ModelConfig, name: str = "model"):
        super().__init__(name)
        self.config = config
        c, L, H = config, config.num_layers, config.hidden
        bn = c.batch_norm
        self.top = MLP(c.latent_dims[-1], H, c.fc_layers, H, bn, "relu")
        # v_l; with reference_activations, v_1 and the hidden transposed convolutions use leaky ReLU (the reference).
        v_act = ["lrelu" if c.reference_activations and l == 0 else "relu" for l in range(L - 1)]
        self.ladder = nn.ModuleList([dense(c.latent_dims[l], H, bn, v_act[l]) for l in range(L - 1)])
        self.inject = nn.ModuleList([NoiseInjection(H, c.noise_injection) for _ in range(L - 1)])
        # u_l for l = 2 .. L-1 (index l-1); u_1 is folded into the decoder below.
        self.combine = nn.ModuleList(
            [MLP(self.inject[l].out_dim, H, c.fc_layers, H, bn, "relu") for l in range(1, L - 1)]
        )
        dec_in = self.inject[0].out_dim if L > 1 else H
        conv_act = "lrelu" if c.reference_activations else "relu"
        self.decoder = DeconvDecoder(dec_in, c.image_shape, c.channels, bn, "relu", conv_act=conv_act)
        self.likelihood = Likelihood(c.likelihood, c.image_shape, c.obs_scale, c.value_range)
        # Gain on each ladder input v_l(z_l), l = 1 .. L-1.  It is 1 except while a progressive schedule fades the
        # lower layers in (pyro_vlae.training.annealing.ladder_gains).  It changes the model, so it is saved with the
        # weights; pyro_vlae.training.runs.load_weights fills it from the step for checkpoints written before it was.
        self.register_buffer("ladder_gain", torch.ones(max(L - 1, 0)))

    @property
    def latent_sites(self):
        return [f"z{l}" for l in range(1, self.config.num_layers + 1)]

    def decode(self, zs):
        r"""Deterministic decoder: latent codes ``[z1, ..., zL]`` to raw outputs :math:`f_0(\tilde z_1)`."""
        L = self.config.num_layers
        # Each access to a child module re-registers its parameters with Pyro (PyroModule.__getattr__); look every
        # child up once per call.
        inject, ladder, combine, top, decoder = children(self, "inject", "ladder", "combine", "top", "decoder")
        gain = self.ladder_gain
        path = top(zs[L - 1])
        for l in range(L - 1, 0, -1):  # l is the 1-based layer index of the code entering now
            joined = inject[l - 1](path, gain[l - 1] * ladder[l - 1](zs[l - 1]))
            path = joined if l == 1 else combine[l - 2](joined)
        return decoder(path)

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        """Sample ``z`` from the prior and ``x`` from ``r``; observe ``x`` when given.  Returns the mean image."""
        c = self.config
        kl_scale = check_kl_scale(kl_scale)
        n = batch_size_of(x, batch_size, c.image_shape, "VLAEModel")
        ref = self.ladder_gain  # a buffer: gives the device and dtype without touching a child module
        (likelihood,) = children(self, "likelihood")
        zs = [None] * c.num_layers
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                for l in range(c.num_layers, 0, -1):
                    zero = ref.new_zeros(n, c.latent_dims[l - 1])
                    zs[l - 1] = pyro.sample(f"z{l}", dist.Normal(zero, torch.ones_like(zero)).to_event(1))
            raw = self.decode(zs)
            pyro.sample("x", likelihood(raw), obs=x)
        return likelihood.mean(raw)
