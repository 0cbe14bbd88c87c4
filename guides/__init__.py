"""Inference networks, installed as ``pyro_vlae.guides``.  ``GUIDES`` maps a model name to its guide class."""

from pyro.nn import PyroModule

from pyro_vlae.nets import ModelConfig, set_batch_norm

from .hvae import MarkovHVAEGuide
from .vae import VAEGuide
from .vlae import VLAEGuide

GUIDES = {
    "vlae": VLAEGuide,
    "hvae": MarkovHVAEGuide,
    "hvae-ar": MarkovHVAEGuide,
    "vae": VAEGuide,
}


def get_guide(kind: str, config: ModelConfig, name: str = "guide") -> PyroModule:
    """Build the inference network matching model ``kind`` (one of ``GUIDES``) for ``config``.

    The guide takes the model's arguments and samples the model's latent sites ``z1`` ... ``zL`` from ``q(z | x)``, so
    the pair trains with any Pyro ELBO.

    :param kind: the model's kind: ``"vlae"``, ``"hvae"``, ``"hvae-ar"`` or ``"vae"``.
    :param config: the architecture; the same one the model was built with.
    :param name: Pyro name prefix of the parameters (keep it different from the model's).
    :returns: the guide, in training mode, on the CPU.
    :raises ValueError: for an unknown ``kind``, naming the valid ones.

    >>> import pyro, torch
    >>> import pyro_vlae as pv
    >>> config = pv.get_preset("tiny").model
    >>> model, guide = pv.get_model("vlae", config), pv.get_guide("vlae", config)
    >>> x, _ = pv.load_data("synthetic", batch_size=16).tensors("train")  # 16x16 bar images, generated
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    >>> loss = svi.step(x[:16])  # one gradient step on the negative ELBO (Eq. 14)
    >>> [tuple(loc.shape) for loc in guide(x[:16])]  # the posterior means of z1, z2, z3
    [(16, 2), (16, 2), (16, 2)]
    """
    if kind not in GUIDES:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(GUIDES)}")
    return set_batch_norm(GUIDES[kind](config, name=name), config.bn_eps, config.bn_momentum)


__all__ = ["GUIDES", "MarkovHVAEGuide", "VAEGuide", "VLAEGuide", "get_guide"]
