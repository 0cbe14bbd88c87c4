"""Training: the SVI loop in small named steps, and what it needs.

* :mod:`~pyro_vlae.training.runs`: :class:`RunConfig`, :func:`build` (model, guide, optimiser, SVI),
  :func:`build_networks` (model and guide alone), :func:`load_run` (which uses only those);
* :mod:`~pyro_vlae.training.batches`: the seeded batch order of every step and reading a batch;
* :mod:`~pyro_vlae.training.loop`: :func:`fit` and its steps (batch, fade-in, SVI step, log record, checkpoint);
* :mod:`~pyro_vlae.training.step`: the SVI step with no host read (:func:`make_step`), eager or in a CUDA graph;
* :mod:`~pyro_vlae.training.optim`: :class:`FusedAdam`, Pyro's optimiser interface over one fused torch Adam;
* :mod:`~pyro_vlae.training.annealing`: KL-scale schedules and the VLAE's ladder fade-in;
* :mod:`~pyro_vlae.training.checkpoint`: atomic writes, checkpoints (``weights_only``), RNG state, the run lock;
* :mod:`~pyro_vlae.training.distributed`: data-parallel training under torchrun;
* :mod:`~pyro_vlae.training.progress`: per-step records (ELBO, KL per layer, images per second).

It builds on :mod:`pyro_vlae.models`, :mod:`pyro_vlae.guides` and :mod:`pyro_vlae.presets`; data comes in as a
:class:`pyro_vlae.data.DataBundle`.
"""

from .loop import TrainingDiverged, TrainResult, evaluate_elbo, fit, train_step
from .optim import FusedAdam
from .runs import RunConfig, build, build_networks, load_run, resolve_device, save_run_checkpoint
from .step import GraphSafeStep, GraphStep, make_step

__all__ = [
    "FusedAdam",
    "GraphSafeStep",
    "GraphStep",
    "RunConfig",
    "TrainResult",
    "TrainingDiverged",
    "build",
    "build_networks",
    "evaluate_elbo",
    "fit",
    "load_run",
    "make_step",
    "resolve_device",
    "save_run_checkpoint",
    "train_step",
]
