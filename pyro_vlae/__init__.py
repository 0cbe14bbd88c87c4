"""pyro_vlae: Variational Ladder Autoencoders and stacked hierarchical VAEs in Pyro.

Zhao, Song & Ermon (2017), *Learning Hierarchical Features from Generative Models*.  The public face::

    import pyro_vlae as pv

    bundle = pv.load_data("mnist")                       # data
    model = pv.get_model("vlae", pv.get_preset("mnist-cpu").model)
    model, guide, config, state = pv.load_run("runs/vlae_mnist_seed0_...")
    model, guide = pv.load_pretrained("vlae-mnist")      # the shipped default job, offline
    same_digit = pv.fix_layers(model, {"z3": code})       # poutine.condition on the named layers
    images = same_digit(batch_size=16)

The wings, each importing only those listed after it:

* :mod:`pyro_vlae.evaluation`: likelihood (IWAE), classifier, disentanglement, diagnostics, report;
* :mod:`pyro_vlae.training`: the SVI loop, optimiser, annealing, checkpoints, DDP;
* :mod:`pyro_vlae.experiments`: the paper's tools through handlers (Gibbs chain, interventions, traversals);
* :mod:`pyro_vlae.models` and :mod:`pyro_vlae.guides`: the model/guide pairs;
* :mod:`pyro_vlae.nets` and :mod:`pyro_vlae.presets`: plain torch blocks and the presets;
* :mod:`pyro_vlae.data`, beside them: datasets and loaders.

At the top: :mod:`pyro_vlae.run` and :mod:`pyro_vlae.evaluate` (the command lines) and :mod:`pyro_vlae.figures`.
"""

from .data import DATASETS, DataBundle, DatasetError, load_data
from .evaluation import (
    bits_per_dim,
    dci,
    evaluate_all,
    evaluate_run,
    frechet_distance,
    get_classifier,
    importance_log_likelihood,
    mig,
    sap,
)
from .experiments import (
    ancestral_means,
    fix_layers,
    gibbs_chain,
    intervene_layer,
    kl_per_dim,
    latent_shapes,
    latent_sites,
    traverse_layer,
    variance_share,
)
from .guides import GUIDES, get_guide
from .models import MODELS, get_model
from .nets import ModelConfig
from .presets import PRESETS, TrainConfig, get_preset
from .pretrained import load_pretrained
from .training import FusedAdam, RunConfig, build, fit, load_run, resolve_device

__version__ = "0.2.0"

__all__ = [
    "DATASETS",
    "GUIDES",
    "MODELS",
    "PRESETS",
    "DataBundle",
    "DatasetError",
    "FusedAdam",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "ancestral_means",
    "bits_per_dim",
    "build",
    "dci",
    "evaluate_all",
    "evaluate_run",
    "fit",
    "fix_layers",
    "frechet_distance",
    "get_classifier",
    "get_guide",
    "get_model",
    "get_preset",
    "gibbs_chain",
    "importance_log_likelihood",
    "intervene_layer",
    "kl_per_dim",
    "latent_shapes",
    "latent_sites",
    "load_data",
    "load_pretrained",
    "load_run",
    "mig",
    "resolve_device",
    "sap",
    "traverse_layer",
    "variance_share",
]
