r"""The Gibbs chains of Proposition 1 (Eq. 6) and Proposition 2 (Eq. 16).

At the global optimum of the ELBO, ``q(z|x) = p(z|x)`` and ``p(x) = p_data(x)``, so the chain

.. math::

    z_K^{(t)} \sim q(z_K \mid x^{(t)}), \qquad x^{(t+1)} \sim p(x \mid z_K^{(t)})

leaves ``p_data`` invariant and, when ergodic, converges to it.  With ``K = {z_1}`` this is Eq. 6: a Markov HVAE can
sample the data distribution with its bottom layer alone, so the layers above add no representational power
(Section 3.1, Fig. 2).  With ``K`` every latent it is Eq. 16 (Proposition 2, the autoregressive HVAE).

Both halves are Pyro handlers on the unmodified model/guide pair: ``poutine.trace(guide)`` gives ``q(z_K|x)`` and
``poutine.condition(model, data=z_K)`` gives ``p(x|z_K)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.nn import PyroModule


@dataclass
class GibbsResult:
    """Output of :func:`gibbs_chain`.

    :param samples: ``(T + 1, N, *event)``: ``x^{(0)}`` (the start) then every ``x^{(t+1)} ~ p(x | z_K^{(t)})``.
    :param means: ``(T, N, *event)``: the mean of ``p(x | z_K^{(t)})`` (the model's return value), or ``None``.
    :param codes: ``{site: (T, N, d)}``: the kept codes ``z_K^{(t)} ~ q(z_K | x^{(t)})``.
    :param keep: the kept sites.
    """

    samples: torch.Tensor
    means: torch.Tensor | None
    codes: dict
    keep: tuple


def _device(model, x0: torch.Tensor) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return x0.device


def check_keep(model, keep) -> tuple:
    """Validate the kept sites of a chain; returns them ordered bottom to top.

    ``poutine.condition`` draws the unkept latents from the model's own conditionals, so the conditioned model samples
    ``p(x | z_K)`` exactly when no unkept latent upstream of a kept one can reach ``x`` by another path.  That holds for
    any ``K`` in the VLAE and VAE (factorised prior) and the Markov HVAE, and in the autoregressive HVAE when ``z1`` is
    kept or ``K`` is a top block ``{z_l, ..., z_L}``; other sets there are refused.

    :param model: a model with ``latent_sites``.
    :param keep: a site name or an iterable of site names.
    :raises ValueError: for an empty ``keep``, unknown sites, or a set that does not give ``p(x | z_K)``.
    """
    sites = list(model.latent_sites)
    keep = (keep,) if isinstance(keep, str) else tuple(keep)
    if not keep:
        raise ValueError(f"keep must name at least one latent site; valid sites are {sites}")
    unknown = [k for k in keep if k not in sites]
    if unknown:
        raise ValueError(f"cannot keep {unknown}: the model has no such latent site; valid sites are {sites}")
    keep = tuple(s for s in sites if s in keep)
    if getattr(model, "autoregressive", False) and sites[0] not in keep and keep != tuple(sites[-len(keep) :]):
        raise ValueError(
            f"keep={list(keep)} in an autoregressive HVAE: the conditioned model would draw the unkept layers above "
            f"from the prior, not from p(. | {', '.join(keep)}), so x would not follow p(x | {', '.join(keep)}). "
            f"Keep {sites[0]!r}, or a top block such as {sites[-len(keep) :]}"
        )
    return keep


def _value_range(model, clamp):
    if clamp is False or clamp is None:
        return None
    if clamp is not True:
        return tuple(clamp)
    lik = getattr(model, "likelihood", None)
    if lik is None or getattr(lik, "kind", None) == "bernoulli":
        return None
    return getattr(lik, "value_range", None)


FEEDS = ("sample", "mean")


@torch.no_grad()
def gibbs_chain(
    model: PyroModule,
    guide: PyroModule,
    x0: torch.Tensor,
    num_steps: int,
    keep: str | Iterable[str] = ("z1",),
    return_means: bool = True,
    clamp: bool | tuple[float, float] = True,
    seed: int | None = None,
    feed: str = "sample",
) -> GibbsResult:
    """Run ``N`` chains of Eq. 6 (``keep=("z1",)``) or Eq. 16 (``keep`` every latent) side by side.

    Each step traces the guide on ``x^{(t)}`` and keeps the sites in ``keep``, then runs the model conditioned on
    them and takes the ``x`` site's sample (a draw from the likelihood, not its mean: that is the chain).  Both nets
    run in eval mode (batch norm uses its running statistics) and their modes are restored afterwards.

    Samples from a Laplace or Gaussian likelihood can leave the data's value range; they are clamped to it before
    being fed back, because the guide was only trained on images inside it.  Bernoulli samples are already binary.

    :param model: a model whose ``forward(batch_size=N)`` samples ``z`` then ``x`` and returns the mean of ``x``.
    :param guide: the matching guide, ``guide(x)`` samples ``z ~ q(z | x)``.
    :param x0: ``(N, *event)`` starting points, one chain each (moved to the model's device).
    :param num_steps: ``T >= 1`` transitions.
    :param keep: the latent sites carried from ``q`` to ``p`` (validated by :func:`check_keep`).
    :param return_means: also keep the mean image of every ``p(x | z_K^{(t)})`` (for display).
    :param clamp: ``True``: clamp to ``model.likelihood.value_range`` unless Bernoulli; ``False``: never; or a
        ``(lo, hi)`` pair.
    :param seed: when given, the chains use their own torch random stream seeded with it (the global one is kept).
    :param feed: ``"sample"`` (the chain of Eq. 6 / 16) or ``"mean"``, a diagnostic variant that feeds the mean of
        ``p(x | z^{(t)})`` back instead of a draw: it separates the likelihood's noise from the guide's error when a
        chain drifts (``benchmarks/claims/gibbs_probe.py``).  It is not the chain of Proposition 1 and does not target
        ``p_data``: on a linear-Gaussian model it contracts to a smaller variance.
    :returns: a :class:`GibbsResult` with the chains' states, mean images and kept codes.

    Four chains of Eq. 6 on the shipped VLAE, started from its own mean images:

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> x0 = pv.ancestral_means(model, 4, seed=0)
    >>> chain = pv.gibbs_chain(model, guide, x0, num_steps=10, seed=0)
    >>> chain.keep, tuple(chain.samples.shape)  # x^(0) and ten transitions of four chains
    (('z1',), (11, 4, 1, 28, 28))
    >>> tuple(chain.codes["z1"].shape)
    (10, 4, 2)
    """
    if feed not in FEEDS:
        raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    keep = check_keep(model, keep)
    bounds = _value_range(model, clamp)
    x = torch.as_tensor(x0).to(_device(model, torch.as_tensor(x0)))
    n = x.shape[0]
    forked = [x.device] if x.device.type == "cuda" else []
    modes = [getattr(m, "training", None) for m in (model, guide)]
    for m in (model, guide):
        if hasattr(m, "eval"):
            m.eval()
    samples, means, codes = [x], [], {s: [] for s in keep}
    try:
        with torch.random.fork_rng(devices=forked, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for _ in range(int(num_steps)):
                gtr = poutine.trace(guide).get_trace(x)
                kept = {s: gtr.nodes[s]["value"] for s in keep}
                mtr = poutine.trace(poutine.condition(model, data=kept)).get_trace(batch_size=n)
                x = mtr.nodes["x"]["value"] if feed == "sample" else mtr.nodes["_RETURN"]["value"]
                if bounds is not None:
                    x = x.clamp(*bounds)
                samples.append(x)
                if return_means:
                    means.append(mtr.nodes["_RETURN"]["value"])
                for s in keep:
                    codes[s].append(kept[s])
    finally:
        for m, mode in zip((model, guide), modes):
            if mode is not None:
                m.train(mode)
    return GibbsResult(
        samples=torch.stack(samples),
        means=torch.stack(means) if return_means else None,
        codes={s: torch.stack(v) for s, v in codes.items()},
        keep=keep,
    )


@torch.no_grad()
def _ancestral(model, num_samples: int, seed, draws: bool) -> torch.Tensor:
    dev = _device(model, torch.zeros(()))
    was = getattr(model, "training", None)
    model.eval()
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if draws:
                return poutine.trace(model).get_trace(batch_size=num_samples).nodes["x"]["value"]
            return model(batch_size=num_samples)
    finally:
        if was is not None:
            model.train(was)


def ancestral_means(model: PyroModule, num_samples: int, seed: int | None = None) -> torch.Tensor:
    """Mean images of ``num_samples`` ancestral draws ``z ~ p(z)`` from the full model (the right panel of Fig. 2).

    Runs in eval mode and restores the model's mode afterwards.

    :param model: a pyro_vlae model.
    :param num_samples: how many draws.
    :param seed: when given, the draws use their own random stream seeded with it (the global one is kept).
    :returns: ``(num_samples, C, H, W)`` mean images.

    >>> import pyro_vlae as pv
    >>> model, guide = pv.load_pretrained("vlae-mnist")
    >>> images = pv.ancestral_means(model, 8, seed=0)
    >>> tuple(images.shape), bool(images.min() >= 0 and images.max() <= 1)
    ((8, 1, 28, 28), True)
    """
    return _ancestral(model, num_samples, seed, draws=False)


def chain_starts(model, x: torch.Tensor, num_chains: int, seed: int = 0) -> torch.Tensor:
    """``num_chains`` images spread evenly over ``x`` as chain starts (different classes when ``x`` is shuffled).

    For a Bernoulli likelihood they are binarised with a seeded draw, since the guide was trained on binary images.
    """
    if x.shape[0] < 1 or num_chains < 1:
        raise ValueError(f"need at least one image and one chain, got {x.shape[0]} images and {num_chains} chains")
    idx = torch.linspace(0, x.shape[0] - 1, min(num_chains, x.shape[0])).round().long()
    starts = x[idx.to(x.device)]
    if getattr(getattr(model, "likelihood", None), "kind", None) == "bernoulli":
        starts = torch.bernoulli(starts, generator=torch.Generator(device=starts.device).manual_seed(seed))
    return starts


def ancestral_draws(model, num_samples: int, seed=None) -> torch.Tensor:
    """Draws ``x ~ p(x | z)`` of ``num_samples`` ancestral samples of the full model (binary images for a Bernoulli
    likelihood), the same kind of image a chain of Eq. 6 feeds back.  The caller's random stream is untouched."""
    return _ancestral(model, num_samples, seed, draws=True)


@torch.no_grad()
def chain_snapshots(model, guide, x0, steps, keep=("z1",), seed=None, on_step=None, chunk: int = 50) -> dict:
    """Run the chains of :func:`gibbs_chain` from ``x0`` to the largest of ``steps`` and keep only the states there.

    The whole path is never held (1000 steps of 1000 chains would not fit); ``on_step(t, x, mean)`` is called after
    every step ``t = 1, 2, ...`` with the state ``x^{(t)}`` and the mean of ``p(x | z_K^{(t-1)})`` (to classify every
    state, say).  One seeded random stream serves the whole run, so the result is that of one long chain.

    :returns: ``{t: {"states": x^{(t)}, "means": mean of p(x | z_K^{(t-1)})}}`` for each ``t`` in ``steps``.
    """
    steps = sorted({int(t) for t in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"steps must be positive integers, got {steps}")
    x = torch.as_tensor(x0).to(_device(model, torch.as_tensor(x0)))
    out, t = {}, 0
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        while t < steps[-1]:
            n = min(chunk, next(s for s in steps if s > t) - t)
            res = gibbs_chain(model, guide, x, n, keep=keep)
            for i in range(1, n + 1):
                if on_step is not None:
                    on_step(t + i, res.samples[i], res.means[i - 1])
            t, x = t + n, res.samples[-1]
            if t in steps:
                out[t] = {"states": x, "means": res.means[-1]}
    return out
