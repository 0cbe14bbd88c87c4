"""Variational Ladder Autoencoder inference network (Section 4.1, Eq. 12-13)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from pyro_vlae.nets import MLP, ConvEncoder, GaussianHead, ModelConfig, batch_size_of, check_kl_scale, children


class VLAEGuide(PyroModule):
    r"""Ladder inference network :math:`q(z \mid x)` (Eq. 12-13).

    .. math::

        h_0 = x, \qquad h_\ell = g_\ell(h_{\ell-1}), \qquad z_\ell \sim N(\mu_\ell(h_\ell), \sigma_\ell(h_\ell))

    :math:`g_1` is the convolutional stack (flattened), :math:`g_\ell` for :math:`\ell \ge 2` are ``fc_layers`` dense
    blocks plus a linear map.  Heads are a linear mean and a ``sigmoid + 0.001`` scale.  This is
    ``config.inference == "trunk"``.

    ``config.inference == "branches"`` is the reference code's network (``vladder.py``): with :math:`C` a
    convolutional stack, :math:`D` ``fc_layers`` dense blocks and :math:`\mathrm{Head}` the Gaussian head above,

    .. math::

        z_1 \sim \mathrm{Head}_1(C_1(x)), \qquad t_1 = A\, C_0(x) + a, \qquad
        t_\ell = W_\ell D_\ell(t_{\ell-1}) + w_\ell \ (2 \le \ell < L), \qquad
        z_\ell \sim \mathrm{Head}_\ell(B_\ell(t_{\ell-1})) \ (\ell \ge 2)

    where :math:`C_1` (the reference's ``ladder0``) and :math:`C_0` (``inference0``) are separate stacks and each
    :math:`B_\ell` is a :math:`D` of its own (``ladder1``, ``ladder2``, ...).

    Every :math:`q(z_\ell \mid x)` reads :math:`x` only, so the layers are independent given :math:`x`.  The posteriors
    are computed bottom-up and sampled top-down, :math:`z_L, \dots, z_1`, in the model's order: Pyro's
    ``TraceMeanField_ELBO`` checks that the two orders agree before it uses analytic KLs.

    :param config: the architecture; must be the one the model was built with.
    :param name: Pyro name prefix of the parameters.
    """

    def __init__(self, config: ModelConfig, name: str = "guide"):
        super().__init__(name)
        self.config = config
        c, H, L, bn = config, config.hidden, config.num_layers, config.batch_norm
        conv = ConvEncoder(c.image_shape, c.channels, bn, "lrelu")
        if c.inference == "branches":
            self.branches = nn.ModuleList([conv] + [MLP(H, H, c.fc_layers, None, bn) for _ in range(1, L)])
            trunk = ConvEncoder(c.image_shape, c.channels, bn, "lrelu")
            first = nn.Sequential(trunk, nn.Linear(trunk.out_dim, H))
            self.trunk = nn.ModuleList(
                ([first] if L > 1 else []) + [MLP(H, H, c.fc_layers, H, bn) for _ in range(2, L)]
            )
            dims = [conv.out_dim] + [self.branches[l].out_dim for l in range(1, L)]
        else:  # the shared trunk; its attribute names are those of checkpoints written before "branches" existed
            steps = [conv] + [MLP(conv.out_dim if l == 1 else H, H, c.fc_layers, H, bn) for l in range(1, L)]
            self.steps = nn.ModuleList(steps)
            dims = [conv.out_dim] + [H] * (L - 1)
        self.heads = nn.ModuleList([GaussianHead(d, z) for d, z in zip(dims, c.latent_dims)])

    def posterior(self, x):
        r"""Return ``[(loc_1, scale_1), ..., (loc_L, scale_L)]`` of :math:`q(z_\ell \mid x)` without sampling."""
        (heads,) = children(self, "heads")  # PyroModule re-registers a child's parameters on each access: look up once
        if self.config.inference == "branches":
            branches, trunk = children(self, "branches", "trunk")
            out, t = [heads[0](branches[0](x))], x
            for l in range(1, self.config.num_layers):
                t = trunk[l - 1](t)
                out.append(heads[l](branches[l](t)))
            return out
        out, h = [], x
        for step, head in zip(children(self, "steps")[0], heads):
            h = step(h)
            out.append(head(h))
        return out

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        r"""Sample every :math:`z_\ell \sim q(z_\ell \mid x)`.  ``x`` is required; returns the posterior means."""
        if x is None:
            raise ValueError("VLAEGuide needs data: call guide(x) with a batch of images (N, C, H, W)")
        kl_scale = check_kl_scale(kl_scale)
        n = batch_size_of(x, batch_size, self.config.image_shape, "VLAEGuide")
        params = self.posterior(x)
        with pyro.plate("data", n), poutine.scale(scale=kl_scale):
            for l in range(len(params), 0, -1):  # z_L first, as the model samples them
                loc, scale = params[l - 1]
                pyro.sample(f"z{l}", dist.Normal(loc, scale).to_event(1))
        return [loc for loc, _ in params]
