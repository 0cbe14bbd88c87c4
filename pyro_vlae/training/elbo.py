r"""The loss of one SVI step as Pyro's ELBOs compute it, with no host read.

``Trace_ELBO`` reads every site's ``log_prob_sum`` on the host (``.item()``) to report its loss.  The functions here
take the model and guide traces of one particle (``pyro.infer.enum.get_importance_trace``) and return
``(loss, surrogate)`` as device tensors: ``surrogate`` is the tensor Pyro back-propagates, built by the same operations
in the same order, and ``loss`` the value Pyro reports.  :class:`~pyro_vlae.training.step.GraphSafeStep` picks one by
name from :data:`ELBO_LOSSES`.  Both support reparameterised guides only and refuse any other guide site, with Pyro's
validation on or off.
"""

from __future__ import annotations

from pyro.distributions.util import is_identically_zero, scale_and_mask
from torch.distributions import kl_divergence


def trace_elbo_loss(model_trace, guide_trace) -> tuple:
    """``(loss, surrogate)`` of ``Trace_ELBO._differentiable_loss_particle`` for reparameterised guides.

    ``surrogate`` is the tensor Pyro back-propagates, built by the same operations in the same order.  ``loss`` is
    Pyro's reported value, the sum of the sites' ``log_prob_sum`` in double precision in the same order (Pyro sums
    their ``.item()`` floats), but kept on the device.
    """
    elbo, surrogate = 0, 0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            elbo = elbo + site["log_prob_sum"].detach().double()
            surrogate = surrogate + site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            _refuse_score_function(name, site)
            _, _, entropy_term = site["score_parts"]
            elbo = elbo - site["log_prob_sum"].detach().double()
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
    return -elbo, -surrogate


def _refuse_score_function(name: str, site: dict) -> None:
    """A guide site that is not reparameterised needs a score-function term, which neither loss builds."""
    if not is_identically_zero(site["score_parts"].score_function):
        raise ValueError(
            f"guide site {name!r} is not reparameterised; the graph-safe step supports reparameterised guides only "
            "(train it with pyro.infer.SVI and Trace_ELBO, or make the site reparameterisable)"
        )


def meanfield_elbo_loss(model_trace, guide_trace) -> tuple:
    """``(loss, surrogate)`` of ``TraceMeanField_ELBO._differentiable_loss_particle``: closed-form KLs where torch has
    them, Pyro's log-ratio otherwise, in the same order.  A guide site that is not reparameterised is refused, with
    Pyro's validation on or off (its closed-form KL is right, but the model's terms would lose its score function)."""
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample":
            _refuse_score_function(name, guide_site)
    elbo = 0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            elbo = elbo + model_site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        try:
            kl = kl_divergence(guide_site["fn"], model_site["fn"])
            kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
            elbo = elbo - kl.sum()
        except NotImplementedError:
            elbo = elbo + model_site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
    return -elbo.detach().double(), -elbo


ELBO_LOSSES = {"trace": trace_elbo_loss, "meanfield": meanfield_elbo_loss}
