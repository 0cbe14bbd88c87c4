"""Generative networks, installed as ``pyro_vlae.models``.  ``MODELS`` maps a model name to its class."""

from pyro_vlae.nets import set_batch_norm

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


def get_model(kind, config, name="model"):
    """Build the generative network ``kind`` (one of ``MODELS``) for ``config``."""
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
