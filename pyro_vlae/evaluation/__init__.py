"""Evaluation of trained models: likelihood, sample quality, the hierarchy's diagnostics and disentanglement.

* :mod:`~pyro_vlae.evaluation.likelihood`: the importance-sampled ``log p(x)`` (IWAE bound), bits/dim, posterior
  means, active units and linear probes;
* :mod:`~pyro_vlae.evaluation.classifier`: the cached digit classifier, its features, the Fréchet distance and the
  class-change rate;
* :mod:`~pyro_vlae.evaluation.disentangle` (with :mod:`~pyro_vlae.evaluation.estimators` and
  :mod:`~pyro_vlae.evaluation.predictors`): MIG, SAP and DCI against ground-truth factors, as disentanglement_lib
  defines them; :mod:`~pyro_vlae.evaluation.assignment`: the per-layer shares and factor -> layer assignments over
  active dims;
* :mod:`~pyro_vlae.evaluation.diagnostics`: per-layer interventions and Gibbs chains, summarised with ArviZ, with the
  collapse check of :mod:`~pyro_vlae.evaluation.collapse`;
* :mod:`~pyro_vlae.evaluation.report`: ``report.md`` from ``eval.json``;
* :mod:`~pyro_vlae.evaluation.pipeline`: :func:`evaluate_run`, all of the above on a run folder (the body of
  ``python -m pyro_vlae.evaluate``).

It builds on :mod:`pyro_vlae.experiments` and :mod:`pyro_vlae.training`.
"""

from .classifier import class_change_rate, extract_features, frechet_distance, get_classifier
from .diagnostics import gibbs_diagnostics, layer_diagnostics, run_diagnostics
from .disentangle import dci, evaluate_all, mig, sap
from .likelihood import active_units, bits_per_dim, importance_log_likelihood, linear_probe, posterior_means
from .pipeline import evaluate_run
from .report import write_report

__all__ = [
    "active_units",
    "bits_per_dim",
    "class_change_rate",
    "dci",
    "evaluate_all",
    "evaluate_run",
    "extract_features",
    "frechet_distance",
    "get_classifier",
    "gibbs_diagnostics",
    "importance_log_likelihood",
    "layer_diagnostics",
    "linear_probe",
    "mig",
    "posterior_means",
    "run_diagnostics",
    "sap",
    "write_report",
]
