r"""Observation distributions :math:`r(x; f_0(\tilde z_1))` (Eq. 10) shared by every model."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vlae.nets import full, squash


class Likelihood(nn.Module):
    """Turns raw decoder outputs into a distribution with event shape ``image_shape``: ``(C, H, W)`` or ``(D,)``.

    * ``gaussian``: ``N(mean, obs_scale^2)`` with fixed variance (the paper).
    * ``laplace``: ``Laplace(mean, b)`` with ``b = obs_scale = 1 / loss_ratio``.  Its log density is
      ``-loss_ratio * |x - mean| - log(2 b)`` per pixel, i.e. the reference code's L1 loss up to a constant.
    * ``bernoulli``: ``Bernoulli(logits=raw)`` for binarized data in {0, 1}.
    * ``gaussian-learned``: ``N(mean, s_c^2)`` with one learned standard deviation per channel (per dimension for
      vector data).

    The mean is ``squash(raw, value_range)``, or ``raw`` itself when ``value_range`` is ``None`` (real-valued data).
    Raw outputs in bfloat16 (``--precision bf16``) are cast to float32 first.
    """

    def __init__(self, kind, image_shape, obs_scale, value_range):
        super().__init__()
        self.kind = kind
        self.obs_scale = float(obs_scale)
        self.value_range = None if value_range is None else tuple(value_range)
        self.event_dim = len(image_shape)
        # The fixed scale as a device tensor: a Python float would be turned into a new tensor (a host-to-device copy
        # on CUDA) by every call.  Not persistent: state dicts hold what they always held.
        self.register_buffer("fixed_scale", torch.tensor(self.obs_scale), persistent=False)
        if kind == "gaussian-learned":
            init = torch.log(torch.expm1(torch.tensor(self.obs_scale)))
            self.raw_scale = nn.Parameter(init.expand(image_shape[0], *(1,) * (self.event_dim - 1)).clone())

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """The image the likelihood is centred on (probabilities for Bernoulli)."""
        raw = full(raw)
        if self.kind == "bernoulli":
            return torch.sigmoid(raw)
        if self.value_range is None:
            return raw
        return squash(raw, self.value_range)

    def _apply(self, fn, recurse=True):
        # .double(), .half() and friends round obs_scale from its float, not from the float32 buffer.
        super()._apply(fn, recurse)
        self.fixed_scale = torch.tensor(self.obs_scale, dtype=self.fixed_scale.dtype, device=self.fixed_scale.device)
        return self

    def _fixed_scale(self, raw: torch.Tensor) -> torch.Tensor:
        """``obs_scale`` as a tensor of ``raw``'s dtype (the buffer, unless ``raw`` has another dtype)."""
        if self.fixed_scale.dtype == raw.dtype:
            return self.fixed_scale
        return torch.tensor(self.obs_scale, dtype=raw.dtype, device=raw.device)

    def forward(self, raw: torch.Tensor) -> dist.Distribution:
        raw = full(raw)  # the log-likelihood in float32 also when the networks ran in bfloat16
        if self.kind == "bernoulli":
            d = dist.Bernoulli(logits=raw)
        elif self.kind == "laplace":
            d = dist.Laplace(self.mean(raw), self._fixed_scale(raw))
        elif self.kind == "gaussian":
            d = dist.Normal(self.mean(raw), self._fixed_scale(raw))
        else:
            scale = torch.nn.functional.softplus(self.raw_scale) + 1e-3
            d = dist.Normal(self.mean(raw), scale.expand_as(raw))
        return d.to_event(self.event_dim)
