"""Inference networks, installed as ``pyro_vlae.guides``.  ``GUIDES`` maps a model name to its guide class."""

from pyro_vlae.nets import set_batch_norm

from .hvae import MarkovHVAEGuide
from .vae import VAEGuide
from .vlae import VLAEGuide

GUIDES = {
    "vlae": VLAEGuide,
    "hvae": MarkovHVAEGuide,
    "hvae-ar": MarkovHVAEGuide,
    "vae": VAEGuide,
}


def get_guide(kind, config, name="guide"):
    """Build the inference network matching model ``kind`` (one of ``GUIDES``) for ``config``."""
    if kind not in GUIDES:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(GUIDES)}")
    return set_batch_norm(GUIDES[kind](config, name=name), config.bn_eps, config.bn_momentum)


__all__ = ["GUIDES", "MarkovHVAEGuide", "VAEGuide", "VLAEGuide", "get_guide"]
