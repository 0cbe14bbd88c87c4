r"""Closed forms for affine-Gaussian Markov HVAEs, the ground truth of ``benchmarks/claims/gibbs_toy.py``.

Every conditional of the model and the guide is an affine-Gaussian *link* ``child = A parent + b + diag(s) eps``.
With the data law Gaussian too, everything Proposition 1 talks about has a closed form:

* the data law ``N(mu_x, Sigma_x)`` and its negative entropy ``-H = -1/2 log det(2 pi e Sigma_x)``;
* the ELBO (Eq. 5) as an exact expectation over ``p_data(x) q(z|x)``, a Gaussian over ``(x, z_1, ..., z_L)``;
* the Gibbs chain of Eq. 6, ``x' = W (G x + g + t eps) + w + s eps'``, an AR(1) process ``x' = M x + m + noise``
  whose stationary covariance solves the discrete Lyapunov equation ``P = M P M^T + Q``;
* the marginal of the model's ancestral samples;
* Gaussian KL divergences between any two of these laws.

Everything is float64 numpy; :func:`model_links` and :func:`set_links` move links in and out of the library's
``MarkovHVAEModel`` / ``MarkovHVAEGuide`` built with ``conditionals="affine"`` on vector data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import solve_discrete_lyapunov

from pyro_vlae.nets import MIN_SCALE


@dataclass
class Link:
    """``child = A parent + b + diag(s) eps``, ``eps ~ N(0, I)``."""

    A: np.ndarray
    b: np.ndarray
    s: np.ndarray

    def cov(self) -> np.ndarray:
        return np.diag(self.s**2)


# ------------------------------------------------------------------------------------------------------ Gaussians
def gaussian_kl(m1, S1, m2, S2) -> float:
    """``KL(N(m1, S1) || N(m2, S2))``."""
    d = len(m1)
    L2 = np.linalg.cholesky(S2)
    solve = lambda B: np.linalg.solve(L2.T, np.linalg.solve(L2, B))  # noqa: E731
    diff = m2 - m1
    _, logdet1 = np.linalg.slogdet(S1)
    logdet2 = 2 * np.log(np.diag(L2)).sum()
    return float(0.5 * (np.trace(solve(S1)) + diff @ solve(diff) - d + logdet2 - logdet1))


def neg_entropy(S) -> float:
    """``-H(N(., S)) = -1/2 log det(2 pi e S)``."""
    _, logdet = np.linalg.slogdet(2 * math.pi * math.e * S)
    return float(-0.5 * logdet)


def chain_marginal(links, mean0, cov0):
    """Mean and covariance of the end of ``root -> links[0] -> links[1] -> ...`` with ``root ~ N(mean0, cov0)``."""
    m, C = np.asarray(mean0, float), np.asarray(cov0, float)
    for k in links:
        m, C = k.A @ m + k.b, k.A @ C @ k.A.T + k.cov()
    return m, C


def chain_joint(links, mean0, cov0):
    """Joint mean and covariance of ``(root, child_1, child_2, ...)`` along a chain of links, plus index slices."""
    m, C = np.asarray(mean0, float), np.asarray(cov0, float)
    slices = [slice(0, len(m))]
    for k in links:
        # child = A v[prev] + b + noise: its covariance with every earlier block goes through v[prev].
        start = len(m)
        E = np.zeros((k.A.shape[0], start))
        E[:, slices[-1]] = k.A
        cross = E @ C
        m = np.concatenate([m, E @ m + k.b])
        C = np.block([[C, cross.T], [cross, cross @ E.T + k.cov()]])
        slices.append(slice(start, start + k.A.shape[0]))
    return m, C, slices


def expected_log_normal(m, C, child: slice, parent: slice | None, link: Link) -> float:
    """``E[log N(v[child]; A v[parent] + b, diag(s)^2)]`` for ``v ~ N(m, C)`` (no parent: ``A`` unused)."""
    E = np.zeros((link.b.shape[0], len(m)))
    E[:, child] = np.eye(link.b.shape[0])
    if parent is not None:
        E[:, parent] -= link.A
    r_mean = E @ m - link.b
    r_var = np.einsum("ij,jk,ik->i", E, C, E)
    return float(np.sum(-0.5 * np.log(2 * math.pi * link.s**2) - 0.5 * (r_mean**2 + r_var) / link.s**2))


# ----------------------------------------------------------------------------------------- model, guide, chains
def data_law(model_links, top_dim):
    """Law of ``x`` under the Markov model ``z_L ~ N(0, I) -> ... -> x`` (``model_links`` top to bottom)."""
    return chain_marginal(model_links, np.zeros(top_dim), np.eye(top_dim))


def exact_guide(model_links, top_dim):
    """The exact posterior links ``p(z_1|x)``, ``p(z_2|z_1)``, ... of a Markov model (bottom-up, like the guide).

    In a Markov model ``p(z_l | z_{l-1}, ..., x) = p(z_l | z_{l-1})``, so each link is a Gaussian conditioning of the
    joint.  Returns the links and the largest off-diagonal posterior covariance (0 when the posteriors are diagonal).
    """
    m, C, sl = chain_joint(model_links, np.zeros(top_dim), np.eye(top_dim))
    order = list(reversed(sl))  # x, z1, ..., zL
    links, off = [], 0.0
    for cond, target in zip(order[:-1], order[1:]):
        G = np.linalg.solve(C[cond, cond], C[cond, target]).T
        S = C[target, target] - G @ C[cond, target]
        off = max(off, float(np.abs(S - np.diag(np.diag(S))).max()))
        links.append(Link(G, m[target] - G @ m[cond], np.sqrt(np.diag(S))))
    return links, off


def elbo(data_mean, data_cov, model_links, guide_links) -> float:
    """The ELBO of Eq. 5, ``E_{p_data(x) q(z|x)}[log p(x, z) - log q(z|x)]``, exactly.

    :param model_links: ``p(z_{L-1}|z_L), ..., p(x|z_1)`` (top to bottom), with ``p(z_L) = N(0, I)``.
    :param guide_links: ``q(z_1|x), q(z_2|z_1), ..., q(z_L|z_{L-1})`` (bottom to top).
    """
    m, C, sl = chain_joint(guide_links, data_mean, data_cov)  # blocks: x, z1, ..., zL
    L = len(guide_links)
    top = sl[L]
    d = top.stop - top.start
    value = expected_log_normal(m, C, top, None, Link(None, np.zeros(d), np.ones(d)))
    for i, link in enumerate(model_links):  # p(z_{L-1-i} | z_{L-i}); the last one is p(x | z_1)
        child, parent = sl[L - 1 - i], sl[L - i]
        value += expected_log_normal(m, C, child, parent, link)
    return value + sum(0.5 * float(np.sum(np.log(2 * math.pi * math.e * k.s**2))) for k in guide_links)


def chain_law(encoder: Link, decoder: Link, feed: str = "sample"):
    """Stationary law of Eq. 6, ``z_1 ~ q(z_1|x)``, ``x' ~ p(x|z_1)`` (or ``x'`` the mean of ``p(x|z_1)`` for
    ``feed="mean"``): the AR(1) process ``x' = M x + m + n``, ``n ~ N(0, Q)``.

    Returns ``(mean, cov, M)``; the law exists when the spectral radius of ``M`` is below 1 (else ``ValueError``).
    """
    M = decoder.A @ encoder.A
    m = decoder.A @ encoder.b + decoder.b
    Q = decoder.A @ encoder.cov() @ decoder.A.T
    if feed == "sample":
        Q = Q + decoder.cov()
    radius = float(np.abs(np.linalg.eigvals(M)).max())
    if radius >= 1:
        raise ValueError(f"the chain has no stationary law: spectral radius of M is {radius:.4f} >= 1")
    mean = np.linalg.solve(np.eye(len(m)) - M, m)
    return mean, solve_discrete_lyapunov(M, Q), M


def chain_after(encoder: Link, decoder: Link, mean0, cov0, steps: int, feed: str = "sample"):
    """Law of the chain after ``steps`` transitions from ``x^{(0)} ~ N(mean0, cov0)`` (for finite simulations)."""
    M = decoder.A @ encoder.A
    m = decoder.A @ encoder.b + decoder.b
    Q = decoder.A @ encoder.cov() @ decoder.A.T + (decoder.cov() if feed == "sample" else 0)
    mean, cov = np.asarray(mean0, float), np.asarray(cov0, float)
    for _ in range(steps):
        mean, cov = M @ mean + m, M @ cov @ M.T + Q
    return mean, cov


# ------------------------------------------------------------------------------------ the library's modules
def _affine(net) -> Link:
    A = net.loc.weight.detach().double().cpu().numpy()
    b = net.loc.bias.detach().double().cpu().numpy()
    s = (torch.nn.functional.softplus(net.raw_scale.detach().double()) + MIN_SCALE).cpu().numpy()
    return Link(A, b, s)


def _check_affine(model):
    c = model.config
    if not (
        c.is_vector and c.conditionals == "affine" and c.likelihood == "gaussian-learned" and c.value_range is None
    ):
        raise ValueError(
            "closed forms need a vector config with conditionals='affine', likelihood='gaussian-learned' and "
            f"value_range=None, got {c}"
        )


def model_links(model) -> list:
    """``p(z_{L-1}|z_L), ..., p(z_1|z_2), p(x|z_1)`` of an affine vector ``MarkovHVAEModel`` (top to bottom)."""
    _check_affine(model)
    links = [_affine(net) for net in reversed(model.conditionals)]
    lin = model.decoder.net[0]
    s = torch.nn.functional.softplus(model.likelihood.raw_scale.detach().double()) + 1e-3
    links.append(Link(lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy(), s.numpy()))
    return links


def guide_links(guide) -> list:
    """``q(z_1|x), q(z_2|z_1), ...`` of an affine vector ``MarkovHVAEGuide`` (bottom to top)."""
    return [_affine(net) for net in guide.conditionals]


def _inverse_softplus(y, floor):
    return torch.as_tensor(np.log(np.expm1(np.asarray(y, float) - floor)))


@torch.no_grad()
def _set_affine(net, link: Link):
    net.loc.weight.copy_(torch.as_tensor(link.A))
    net.loc.bias.copy_(torch.as_tensor(link.b))
    net.raw_scale.copy_(_inverse_softplus(link.s, MIN_SCALE))


@torch.no_grad()
def set_links(model, guide, m_links, g_links) -> None:
    """Load links into an affine vector model/guide pair (inverse of :func:`model_links` and :func:`guide_links`)."""
    _check_affine(model)
    for net, link in zip(reversed(model.conditionals), m_links[:-1]):
        _set_affine(net, link)
    lin, last = model.decoder.net[0], m_links[-1]
    lin.weight.copy_(torch.as_tensor(last.A))
    lin.bias.copy_(torch.as_tensor(last.b))
    model.likelihood.raw_scale.copy_(_inverse_softplus(last.s, 1e-3))
    for net, link in zip(guide.conditionals, g_links):
        _set_affine(net, link)


# ------------------------------------------------------------------------------------------------ the toy data
def toy_truth(dim: int = 16, latent: int = 8, seed: int = 0) -> list:
    r"""A 3-layer linear-Gaussian Markov model with diagonal exact posteriors (top to bottom links).

    ``z_3 ~ N(0, I)``, ``z_2 = a_2 z_3 + s_2 eps``, ``z_1 = a_1 z_2 + s_1 eps`` (diagonal transitions), and
    ``x = U diag(a_0) z_1 + b_0 + s_0 eps`` with ``U`` a ``dim x latent`` matrix of orthonormal columns and isotropic
    noise ``s_0``.  Then ``U^T x`` splits into independent coordinates, and every posterior is diagonal.  The
    loadings ``a_0`` give signal-to-noise ratios from 1 to 9 along ``U``, so the chain of Eq. 6 has per-direction
    autocorrelations ``snr / (1 + snr)`` from 0.5 to 0.9, and 0 on the ``dim - latent`` noise directions.
    """
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
    a2, s2 = np.linspace(0.6, 1.4, latent), np.full(latent, 0.6)
    a1, s1 = np.linspace(1.2, 0.5, latent), np.full(latent, 0.5)
    v1 = a1**2 * (a2**2 + s2**2) + s1**2  # Var(z_1)
    s0 = 0.5
    a0 = np.sqrt(np.linspace(1.0, 9.0, latent) * s0**2 / v1)
    zeros = np.zeros(latent)
    return [
        Link(np.diag(a2), zeros, s2),
        Link(np.diag(a1), zeros, s1),
        Link(U * a0, 0.5 * rng.standard_normal(dim), np.full(dim, s0)),
    ]


def sample_chain_model(links, top_dim: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of ``x`` from the links (float32), by ancestral sampling with ``generator``."""
    h = torch.randn(n, top_dim, generator=generator, dtype=torch.float64)
    for k in links:
        noise = torch.randn(n, len(k.b), generator=generator, dtype=torch.float64)
        h = h @ torch.as_tensor(k.A).T + torch.as_tensor(k.b) + noise * torch.as_tensor(k.s)
    return h.float()


def empirical_kl(samples: torch.Tensor, mean, cov) -> float:
    """``KL(N(sample mean, sample cov) || N(mean, cov))``; for ``n`` draws of the target law itself its expectation
    is about ``(d (d + 3) / 2) / (2 n)``, the sampling floor."""
    x = samples.double().cpu().numpy()
    return gaussian_kl(x.mean(0), np.cov(x, rowvar=False), mean, cov)


def kl_floor(dim: int, n: int) -> float:
    """Approximate expected :func:`empirical_kl` of ``n`` draws of the target law in ``dim`` dimensions."""
    return dim * (dim + 3) / 4 / n
