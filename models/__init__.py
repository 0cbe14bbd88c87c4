"""Generative networks, installed as ``pyro_vlae.models``.  ``MODELS`` maps a model name to its class."""

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
    return MODELS[kind](config, name=name)


__all__ = [
    "MODELS",
    "AutoregressiveHVAEModel",
    "Likelihood",
    "MarkovHVAEModel",
    "VAEModel",
    "VLAEModel",
    "get_model",
]
