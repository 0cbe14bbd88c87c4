r"""Evaluation metrics of a trained model/guide pair: importance-sampled likelihood, KLs, active units, linear probes.

Every function here is model-agnostic: it only relies on the house conventions (latent sites and an observed site
inside one ``pyro.plate("data")``, keyword arguments ``kl_scale`` and ``batch_size``), so a two-line toy model works
as well as a VLAE.  ``x`` may be images ``(N, C, H, W)`` or vectors ``(N, D)``.

* :func:`importance_log_likelihood`: the IWAE bound (Burda et al. 2016)

  .. math::

      \log p(x) \ge \mathcal L_K(x) = \log \frac1K \sum_{k=1}^K w_k, \qquad
      w_k = \frac{p(x, z^{(k)})}{q(z^{(k)} | x)}, \qquad z^{(k)} \sim q(z | x),

  together with the ELBO :math:`\frac1K \sum_k \log w_k` from the same draws (so :math:`\mathcal L_K \ge` ELBO
  holds draw by draw, by Jensen's inequality), the reconstruction term and the per-layer KL.
* :func:`posterior_means`: :math:`E_{q(z|x)}[z_\ell]` per layer; :func:`posterior_moments` adds the posterior
  variance and the Monte Carlo variance of the mean.
* :func:`active_units`: a dim is active when x explains more than 1 % of its variance over the aggregate posterior,
  :math:`\mathrm{Var}_x(E[z_u|x]) / \mathrm{Var}(z_u) > 0.01` (:func:`explained_share`; scale-free); Burda et al.'s
  :math:`\mathrm{Var}_x(E_{q(z|x)}[z_u]) > 0.01`, which suits unit-scale codes only, is kept beside it.
* :func:`linear_probe`: multinomial logistic regression from codes to class labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, Normal, kl_divergence

from ..experiments.interventions import eval_mode
from .assignment import ACTIVE_SHARE, ACTIVE_VARIANCE

__all__ = [
    "ACTIVE_SHARE",
    "ImportanceEstimate",
    "active_units",
    "bits_per_dim",
    "explained_share",
    "importance_log_likelihood",
    "linear_probe",
    "posterior_means",
    "posterior_moments",
]


@dataclass
class ImportanceEstimate:
    """Per-datapoint results of :func:`importance_log_likelihood`, each a CPU float64 tensor of shape ``(N,)``.

    :ivar log_px: the IWAE bound :math:`\\mathcal L_K`, in nats.
    :ivar elbo: the ELBO averaged over the same ``K`` draws.
    :ivar recon: :math:`E_q[\\log p(x | z)]` averaged over the ``K`` draws.
    :ivar kl: site name -> KL of that layer (see :func:`importance_log_likelihood`).
    :ivar kl_method: site name -> ``"analytic"`` or ``"monte-carlo"``.
    :ivar num_samples: ``K``.
    """

    log_px: torch.Tensor
    elbo: torch.Tensor
    recon: torch.Tensor
    kl: dict = field(default_factory=dict)
    kl_method: dict = field(default_factory=dict)
    num_samples: int = 1


def _is_standard_normal(fn) -> bool:
    """Whether ``fn`` is ``Normal(0, 1).to_event(1)``, i.e. a prior that depends on no other latent."""
    if not (isinstance(fn, Independent) and isinstance(fn.base_dist, Normal) and fn.reinterpreted_batch_ndims == 1):
        return False
    return bool((fn.base_dist.loc == 0).all()) and bool((fn.base_dist.scale == 1).all())


def _site_log_prob(site, rows: int, name: str) -> torch.Tensor:
    """Unscaled log-density of one site, checked to be one number per row (the ``data`` plate's convention)."""
    lp = site["unscaled_log_prob"]  # log p without poutine.scale (kl_scale, beta): log p(x) must not depend on them
    if lp.shape != (rows,):
        raise ValueError(
            f"site {name!r} has log_prob of shape {tuple(lp.shape)}, expected ({rows},): every site must sit in "
            "pyro.plate('data') with its per-datapoint dimensions declared by .to_event()"
        )
    return lp


@torch.no_grad()
def importance_log_likelihood(
    model: Callable[..., object],
    guide: Callable[..., object],
    x: torch.Tensor,
    num_samples: int = 50,
    *,
    chunk_size: int | None = None,
    max_rows: int = 1024,
) -> ImportanceEstimate:
    r"""Importance-sampled :math:`\log p(x)` per datapoint (the IWAE bound with ``num_samples`` draws from the guide).

    The ``K`` draws are taken in chunks of ``k`` particles: ``x`` is repeated to ``(k N, ...)``, the guide is traced
    on it and the model replayed on the guide's draws, so ``log w = log p(x, z) - log q(z|x)`` comes out with shape
    ``(k, N)``; a running ``logsumexp`` over chunks keeps memory at ``k N`` rows whatever ``K`` is.  The guide may
    be sequential (the HVAE's ``q(z_l | z_{l-1})``): tracing draws each layer given the one below.  Densities are
    unscaled, so ``kl_scale`` and the VAE's ``beta`` do not enter.  Modules are put in eval mode while it runs.

    The KL of layer ``l`` is :math:`E_q[\log q(z_\ell|\cdot) - \log p(z_\ell|\cdot)]`.  Where the model's
    conditional is a fixed :math:`N(0, I)` (every VLAE/VAE layer, the HVAE's top layer) the inner expectation over
    :math:`z_\ell` is done in closed form given the guide's parents (``"analytic"``); otherwise (the HVAE's lower
    layers, whose prior depends on the layer above) it is the ``K``-draw average (``"monte-carlo"``).

    :param model: generative model ``model(x, batch_size=..., kl_scale=...)``.
    :param guide: guide with the same signature and the same latent site names.
    :param x: data ``(N, ...)``, on the modules' device.
    :param num_samples: ``K >= 1``.
    :param chunk_size: particles per chunk; default ``max(1, max_rows // N)``.
    :param max_rows: row budget for the default chunk size.
    :return: an :class:`ImportanceEstimate`.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> x = pv.ancestral_means(model, 8, seed=0)
    >>> est = pv.importance_log_likelihood(model, guide, x, num_samples=10)
    >>> tuple(est.log_px.shape), sorted(est.kl)
    ((8,), ['z1', 'z2', 'z3'])
    >>> bool((est.log_px >= est.elbo).all())  # the IWAE bound is never below the ELBO of the same draws
    True
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    n = x.shape[0]
    chunk = int(chunk_size) if chunk_size else max(1, max_rows // max(n, 1))
    lse = torch.full((n,), -math.inf, dtype=torch.float64)
    sum_logw = torch.zeros(n, dtype=torch.float64)
    sum_recon = torch.zeros(n, dtype=torch.float64)
    kl_sum, kl_method = {}, {}
    done = 0
    with eval_mode(model, guide):
        while done < num_samples:
            k = min(chunk, num_samples - done)
            xk = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
            gtr = poutine.trace(guide).get_trace(xk, batch_size=k * n, kl_scale=1.0)
            mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(xk, batch_size=k * n, kl_scale=1.0)
            gtr.compute_log_prob()
            mtr.compute_log_prob()
            log_p = torch.zeros(k * n, dtype=torch.float64, device=x.device)
            log_q = torch.zeros_like(log_p)
            recon = torch.zeros_like(log_p)
            for name, site in mtr.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                lp = _site_log_prob(site, k * n, name).double()
                log_p = log_p + lp
                if site["is_observed"]:
                    recon = recon + lp
                    continue
                if name not in gtr.nodes:
                    raise ValueError(f"latent site {name!r} of the model is not drawn by the guide")
                gsite = gtr.nodes[name]
                if _is_standard_normal(site["fn"]) and isinstance(gsite["fn"], Independent):
                    kl = kl_divergence(gsite["fn"], site["fn"]).double()
                    kl_method[name] = "analytic"
                else:
                    kl = _site_log_prob(gsite, k * n, name).double() - lp
                    kl_method[name] = "monte-carlo"
                kl_sum[name] = kl_sum.get(name, 0.0) + kl.reshape(k, n).sum(0).cpu()
            for name, site in gtr.nodes.items():
                if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                    log_q = log_q + _site_log_prob(site, k * n, name).double()
            log_w = (log_p - log_q).reshape(k, n).cpu()
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
            sum_logw += log_w.sum(0)
            sum_recon += recon.reshape(k, n).sum(0).cpu()
            done += k
    return ImportanceEstimate(
        log_px=lse - math.log(num_samples),
        elbo=sum_logw / num_samples,
        recon=sum_recon / num_samples,
        kl={name: v / num_samples for name, v in kl_sum.items()},
        kl_method=kl_method,
        num_samples=num_samples,
    )


def bits_per_dim(nats: float, num_dims: int) -> float:
    r"""Convert a log-likelihood in nats to bits per dimension, :math:`-\log p(x) / (D \ln 2)`.

    For continuous likelihoods (Gaussian, Laplace) ``log p(x)`` is a log *density*: bits/dim can then be negative
    and is not comparable with discrete (dequantised) bits/dim figures from the literature.

    >>> import math
    >>> import pyro_vlae as pv
    >>> pv.bits_per_dim(-784 * math.log(2), 784)  # log p(x) = -784 ln 2 nats over 784 pixels: one bit each
    1.0
    """
    return -float(nats) / (num_dims * math.log(2.0))


@torch.no_grad()
def posterior_moments(guide, x: torch.Tensor, num_samples: int = 1, sites=None) -> dict:
    r"""Per-layer posterior mean and variance, and the Monte Carlo variance of the mean, as CPU tensors ``(N, d)``.

    The guide is traced ``num_samples`` times (vectorised); at each latent site the distribution's mean :math:`m_s`
    and variance :math:`v_s` (given the guide's draws of the other layers) are read. With :math:`S` draws:
    ``mean`` :math:`= \bar m = \frac1S \sum_s m_s`, ``variance`` :math:`= \frac1S \sum_s v_s +
    \frac1S \sum_s (m_s - \bar m)^2` (the law of total variance: :math:`\mathrm{Var}(z_\ell | x)`) and
    ``mc_variance`` :math:`= \frac{1}{S(S-1)} \sum_s (m_s - \bar m)^2`, the variance of the estimate :math:`\bar m`
    (0 for one draw). For a guide whose layers depend on ``x`` only (VLAE, VAE) one draw is exact and
    ``mc_variance`` is 0; for a sequential guide (HVAE: :math:`q(z_\ell | z_{\ell-1})`) the mean is the
    Rao-Blackwellised Monte Carlo estimate of the marginal mean, with lower layers sampled.

    :param guide: the guide.
    :param x: data ``(N, ...)``.
    :param num_samples: draws ``S`` of the lower layers.
    :param sites: latent site names to return (default: every unobserved sample site of the guide).
    :return: ``{site: {"mean", "variance", "mc_variance"}}``; ``variance`` is NaN where the site's distribution has
        none.
    """
    n = x.shape[0]
    xs = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(num_samples * n, *x.shape[1:])
    with eval_mode(guide):
        tr = poutine.trace(guide).get_trace(xs, batch_size=num_samples * n, kl_scale=1.0)
    names = sites or [
        k for k, s in tr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]
    out = {}
    for name in names:
        fn = tr.nodes[name]["fn"]
        m = fn.mean.reshape(num_samples, n, *fn.mean.shape[1:])
        try:
            v = fn.variance.reshape(m.shape).mean(0)
        except NotImplementedError:
            v = torch.full_like(m[0], float("nan"))
        spread = m.var(0, unbiased=False) if num_samples > 1 else torch.zeros_like(m[0])
        mc = spread / (num_samples - 1) if num_samples > 1 else torch.zeros_like(m[0])
        out[name] = {"mean": m.mean(0).cpu(), "variance": (v + spread).cpu(), "mc_variance": mc.cpu()}
    return out


def posterior_means(guide, x: torch.Tensor, num_samples: int = 1, sites=None) -> dict:
    r"""Per-layer posterior means :math:`E_{q(z|x)}[z_\ell]`, as CPU tensors ``(N, d_\ell)``: the ``mean`` of
    :func:`posterior_moments` (one draw is exact for guides whose layers depend on ``x`` only; for a sequential guide,
    the Monte Carlo average over ``num_samples`` draws of the lower layers)."""
    return {s: m["mean"] for s, m in posterior_moments(guide, x, num_samples, sites).items()}


def explained_share(mean, variance, mc_variance=None) -> torch.Tensor:
    r"""Per dim, the share of the code's variance over the aggregate posterior that ``x`` explains:

    .. math:: \frac{\mathrm{Var}_x(E[z_u|x])}{\mathrm{Var}_x(E[z_u|x]) + E_x[\mathrm{Var}(z_u|x)]},

    with :math:`\mathrm{Var}_x(E[z_u|x])` estimated as the variance of ``mean`` across items (``N - 1``) less the mean
    of ``mc_variance`` (the Monte Carlo noise of the estimated means, which would otherwise count as signal), clipped
    at 0. Scale-free: the same for a code multiplied by any constant; 0 for a dim without any variance.

    :param mean: posterior means ``(N, d)``.
    :param variance: posterior variances ``(N, d)``.
    :param mc_variance: variances of the estimated means ``(N, d)``; ``None`` for exact means.
    :return: float64 tensor ``(d,)``.
    """
    mean, variance = torch.as_tensor(mean).double(), torch.as_tensor(variance).double()
    if mean.dim() != 2 or mean.shape[0] < 2 or variance.shape != mean.shape:
        raise ValueError(f"mean and variance must both be (N, d) with N >= 2; got {tuple(mean.shape)}, "
                         f"{tuple(variance.shape)}")  # fmt: skip
    signal = mean.var(0, unbiased=True)
    if mc_variance is not None:
        signal = signal - torch.as_tensor(mc_variance).double().mean(0)
    signal = signal.clamp_min(0.0)
    total = signal + variance.mean(0)
    return torch.where(total == 0, torch.zeros_like(total), signal / torch.where(total == 0, 1.0, total))  # NaN stays


def active_units(
    means, threshold: float = ACTIVE_VARIANCE, *, variance=None, mc_variance=None, share: float = ACTIVE_SHARE
) -> dict:
    r"""Active units of a layer.

    With ``variance``: dim ``u`` is active when x explains more than ``share`` of its variance
    (:func:`explained_share`), a criterion that holds for codes of any scale (a Markov HVAE's lower layers have
    learned scales) and discounts the Monte Carlo noise of estimated means. For a code whose aggregate posterior has
    unit variance it is Burda et al.'s threshold. Without: Burda et al.'s (2016) criterion
    :math:`A_u = \mathrm{Cov}_x\big(E_{q(z|x)}[z_u]\big) > 0.01`, which only suits unit-scale codes.

    :param means: posterior means ``(N, d)`` over a set of datapoints.
    :param threshold: Burda et al.'s threshold on the variance of the means across datapoints.
    :param variance: posterior variances ``(N, d)`` (:func:`posterior_moments`).
    :param mc_variance: Monte Carlo variances of the means ``(N, d)``.
    :param share: the threshold on the explained share.
    :return: ``{"active", "dims", "variance", "criterion"}``: the count by the criterion in use, the dims, the
        variance of the means per dim and ``"explained_share"`` or ``"mean_variance"``; with ``variance`` also
        ``"explained_share"`` (per dim) and ``"active_mean_variance"`` (Burda et al.'s count). ``active`` is ``None``
        where a share cannot be computed (a distribution without a variance).
    """
    means = torch.as_tensor(means).double()
    if means.dim() != 2 or means.shape[0] < 2:
        raise ValueError(f"means must have shape (N, d) with N >= 2, got {tuple(means.shape)}")
    var = means.var(dim=0, unbiased=True)
    old = int((var > threshold).sum())
    out = {"active": old, "dims": int(means.shape[1]), "variance": var.tolist(), "criterion": "mean_variance"}
    if variance is None:
        return out
    shares = explained_share(means, variance, mc_variance)
    ok = bool(torch.isfinite(shares).all())
    out.update(active=int((shares > share).sum()) if ok else None, criterion="explained_share")
    return {**out, "explained_share": [v if math.isfinite(v) else None for v in shares.tolist()],
            "active_mean_variance": old}  # fmt: skip


def linear_probe(
    train_codes: torch.Tensor,
    train_labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float = 1e-4,
    max_iter: int = 100,
) -> dict:
    r"""Linear-probe accuracy: multinomial logistic regression ``softmax(W c + b)`` from codes ``c`` to labels.

    Codes are standardised with the training mean and standard deviation; the weights start at zero and minimise the
    mean cross-entropy plus :math:`\frac{l_2}{2}\|W\|^2` by full-batch L-BFGS in float64 for ``max_iter`` iterations,
    so the result is deterministic.  Accuracy is measured on ``test_codes``.

    :param train_codes: ``(N_train, d)`` codes (e.g. posterior means of a layer) of the training split.
    :param train_labels: ``(N_train,)`` integer labels.
    :param test_codes: ``(N_test, d)`` codes of the test split.
    :param test_labels: ``(N_test,)`` integer labels.
    :param num_classes: number of classes.
    :param l2: ridge penalty on ``W``.
    :param max_iter: L-BFGS iterations.
    :return: ``{"train_accuracy", "test_accuracy", "majority_baseline"}`` (the last: the test accuracy of always
        predicting the most frequent training class).
    """
    xtr, xte = torch.as_tensor(train_codes).double().cpu(), torch.as_tensor(test_codes).double().cpu()
    ytr, yte = torch.as_tensor(train_labels).long().cpu(), torch.as_tensor(test_labels).long().cpu()
    if xtr.dim() != 2 or xte.dim() != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"codes must be (N, d) with the same d, got {tuple(xtr.shape)} and {tuple(xte.shape)}")
    if ytr.shape != (xtr.shape[0],) or yte.shape != (xte.shape[0],) or xtr.shape[0] < 2 or xte.shape[0] < 1:
        raise ValueError("need one label per code, at least two training codes and one test code")
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 0.5 * l2 * (w**2).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny problem: thread start-up dominates, and a busy machine makes it 40x slower
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        train_acc = ((xtr @ w + b).argmax(1) == ytr).double().mean().item()
        test_acc = ((xte @ w + b).argmax(1) == yte).double().mean().item()
    majority = int(torch.bincount(ytr, minlength=num_classes).argmax())
    return {
        "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "majority_baseline": (yte == majority).double().mean().item(),
    }
