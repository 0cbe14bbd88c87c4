"""The paper's experiments, written with Pyro's effect handlers on any model/guide pair of :mod:`pyro_vlae.models`.

* :mod:`~pyro_vlae.experiments.interventions`: fix layers (``poutine.condition``), resample one layer's noise,
  traverse a layer, and the per-layer variance share (Fig. 3, 5-7);
* :mod:`~pyro_vlae.experiments.gibbs`: the bottom-layer Gibbs chain of Prop. 1 (Eq. 6, Fig. 2).

Nothing here trains, reads files or knows about the command line.
"""

from .gibbs import GibbsResult, ancestral_means, chain_starts, gibbs_chain
from .interventions import (
    eval_mode,
    fix_layers,
    intervene_layer,
    kl_per_dim,
    latent_shapes,
    latent_sites,
    noise_model,
    top_kl_dims,
    traverse_layer,
    variance_share,
)

__all__ = [
    "GibbsResult",
    "ancestral_means",
    "chain_starts",
    "eval_mode",
    "fix_layers",
    "gibbs_chain",
    "intervene_layer",
    "kl_per_dim",
    "latent_shapes",
    "latent_sites",
    "noise_model",
    "top_kl_dims",
    "traverse_layer",
    "variance_share",
]
