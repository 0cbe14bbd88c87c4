"""Generative networks, installed as ``pyro_vlae.models``.  ``MODELS`` maps a model name to its class."""

from pyro.nn import PyroModule

from pyro_vlae.nets import ModelConfig, set_batch_norm

from .hvae import AutoregressiveHVAEModel, MarkovHVAEModel
from .likelihood import Likelihood
from .vae import VAEModel
from .vlae import VLAEModel

MODELS = {
    "vlae": VLAEModel,
    "hvae": MarkovHVAEModel,
    "hvae-ar": AutoregressiveHVAEModel,
    "vae": VAEModel,
}


def get_model(kind: str, config: ModelConfig, name: str = "model") -> PyroModule:
    """Build the generative network ``kind`` (one of ``MODELS``) for ``config``.

    Every model has the signature ``forward(x=None, *, batch_size=None, kl_scale=1.0)``, names its latent sites
    ``z1`` (bottom) ... ``zL`` and its observation ``x``, and returns the mean image.

    :param kind: ``"vlae"``, ``"hvae"``, ``"hvae-ar"`` or ``"vae"``.
    :param config: the architecture, e.g. ``pv.get_preset("mnist-cpu").model``.
    :param name: Pyro name prefix of the parameters.
    :returns: the model, in training mode, on the CPU.
    :raises ValueError: for an unknown ``kind``, naming the valid ones.

    >>> import pyro_vlae as pv
    >>> sorted(pv.MODELS)
    ['hvae', 'hvae-ar', 'vae', 'vlae']
    >>> config = pv.get_preset("tiny").model  # 16x16 images, three layers of 2-d codes
    >>> model = pv.get_model("vlae", config)
    >>> model.latent_sites
    ['z1', 'z2', 'z3']
    >>> tuple(model(batch_size=4).shape)  # the mean images of four draws from the prior
    (4, 1, 16, 16)
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(MODELS)}")
    return set_batch_norm(MODELS[kind](config, name=name), config.bn_eps, config.bn_momentum)


__all__ = [
    "MODELS",
    "AutoregressiveHVAEModel",
    "Likelihood",
    "MarkovHVAEModel",
    "VAEModel",
    "VLAEModel",
    "get_model",
]
