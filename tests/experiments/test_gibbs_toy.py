"""Proposition 1 on a linear-Gaussian toy: the closed forms of ``benchmarks/claims/gibbs_toy.py`` and the benchmark
itself; and the chain starts of ``benchmarks/claims/gibbs_mnist.py``."""

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vlae.experiments.gibbs import gibbs_chain
from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "claims")
sys.path.insert(0, BENCH)
import gibbs_mnist  # noqa: E402
import gibbs_toy as gt  # noqa: E402
import linear_gaussian_toy as lg  # noqa: E402

TOP = 8


@pytest.fixture
def truth():
    links = lg.toy_truth(16, TOP, seed=0)
    exact, off = lg.exact_guide(links, TOP)
    assert off < 1e-12, "the toy's exact posteriors are diagonal, so the guide family contains them"
    return links, exact, lg.data_law(links, TOP)


def library_pair(m_links, g_links):
    model, guide = get_model("hvae", gt.toy_config()), get_guide("hvae", gt.toy_config())
    lg.set_links(model, guide, m_links, g_links)
    for a, b in zip(lg.model_links(model) + lg.guide_links(guide), m_links + g_links):
        assert np.allclose(a.A, b.A, atol=1e-6) and np.allclose(a.s, b.s, atol=1e-6)
    return model.eval(), guide.eval()


def per_example_elbo(model, guide, x):
    gtr = poutine.trace(guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    sites = model.latent_sites
    logp = sum(mtr.nodes[s]["fn"].log_prob(mtr.nodes[s]["value"]) for s in ["x", *sites])
    return logp - sum(gtr.nodes[s]["fn"].log_prob(gtr.nodes[s]["value"]) for s in sites)


def test_at_the_true_parameters_every_elbo_draw_is_log_p_data(truth):
    """q(z|x) = p(z|x) makes log p(x, z) - log q(z|x) = log p(x) for every z (Prop. 1's optimum): checked draw by draw
    against the data's Gaussian density, so the ELBO is -H(p_data), which the closed form gives too."""
    links, exact, (mx, Sx) = truth
    model, guide = library_pair(links, exact)
    x = lg.sample_chain_model(links, TOP, 500, torch.Generator().manual_seed(0))
    log_p = dist.MultivariateNormal(torch.as_tensor(mx).float(), torch.as_tensor(Sx).float()).log_prob(x)
    assert torch.allclose(per_example_elbo(model, guide, x), log_p, atol=2e-3)
    assert lg.elbo(mx, Sx, links, exact) == pytest.approx(lg.neg_entropy(Sx), abs=1e-9)
    _, logdet = np.linalg.slogdet(Sx)
    assert lg.neg_entropy(Sx) == pytest.approx(-0.5 * (16 * math.log(2 * math.pi * math.e) + logdet), abs=1e-9)


def test_at_the_true_parameters_the_chain_leaves_p_data_invariant(truth):
    links, exact, (mx, Sx) = truth
    mean, cov, _ = lg.chain_law(exact[0], links[-1])
    assert np.allclose(mean, mx, atol=1e-10) and np.allclose(cov, Sx, atol=1e-10)
    assert lg.gaussian_kl(mean, cov, mx, Sx) == pytest.approx(0.0, abs=1e-10)


def perturbed(exact):
    """A non-optimal guide: every link's weights, offsets and scales moved by a few percent."""
    rng = np.random.default_rng(1)
    out = copy.deepcopy(exact)
    for k in out:
        k.A = k.A * (1 + 0.05 * rng.standard_normal(k.A.shape))
        k.b = k.b + 0.05 * rng.standard_normal(k.b.shape)
        k.s = k.s * 1.1
    return out


def test_closed_form_elbo_matches_monte_carlo_off_the_optimum(truth):
    links, exact, (mx, Sx) = truth
    bad = perturbed(exact)
    model, guide = library_pair(links, bad)
    per = per_example_elbo(model, guide, lg.sample_chain_model(links, TOP, 40000, torch.Generator().manual_seed(1)))
    se = per.double().std().item() / math.sqrt(len(per))
    expect = lg.elbo(mx, Sx, links, bad)
    assert abs(per.double().mean().item() - expect) < 4 * se
    assert lg.neg_entropy(Sx) - expect > 10 * se, "a wrong guide is measurably below -H"


@pytest.mark.parametrize("feed", ["sample", "mean"])
def test_closed_form_chain_law_matches_gibbs_chain_off_the_optimum(truth, feed):
    """The library's chain with a wrong guide, simulated, against the closed-form law after the same steps."""
    links, exact, (mx, Sx) = truth
    bad = perturbed(exact)
    model, guide = library_pair(links, bad)
    n, steps = 4000, 30
    x0 = lg.sample_chain_model(links, TOP, n, torch.Generator().manual_seed(2))
    out = gibbs_chain(model, guide, x0, steps, return_means=False, seed=3, feed=feed).samples[-1].double().numpy()
    m_t, c_t = lg.chain_after(bad[0], links[-1], mx, Sx, steps, feed)
    # Entry-wise: mean within 4 standard errors, covariance within 4 standard errors (Gaussian fourth moments).
    se_mean = np.sqrt(np.diag(c_t) / n)
    assert np.all(np.abs(out.mean(0) - m_t) < 4 * se_mean + 1e-6)
    se_cov = np.sqrt((np.outer(np.diag(c_t), np.diag(c_t)) + c_t**2) / n)
    assert np.all(np.abs(np.cov(out, rowvar=False) - c_t) < 4 * se_cov + 1e-5)
    mean, cov, _ = lg.chain_law(bad[0], links[-1], feed)
    if feed == "sample":
        assert lg.gaussian_kl(mean, cov, mx, Sx) > 0.02, "a wrong guide moves the chain's law past the target"
    else:  # the mean-fed chain lives on the decoder's 8-d range
        assert np.linalg.matrix_rank(cov, tol=1e-8) == TOP


def test_mean_fed_threshold_is_the_closed_form_of_the_derivation(truth):
    """K* from the Lyapunov closed forms equals the per-direction derivation 1/2 sum (r - 1 - log r),
    r = snr / (1 + 2 snr), with the toy's signal-to-noise ratios 1..9."""
    links, _, _ = truth
    r = np.linspace(1.0, 9.0, TOP) / (1 + 2 * np.linspace(1.0, 9.0, TOP))
    assert gt.mean_fed_kl_at_optimum(links) == pytest.approx(0.5 * np.sum(r - 1 - np.log(r)), rel=1e-9)


@pytest.mark.parametrize("feed, passes", [("mean", True), ("sample", False)], ids=["mean-fed", "sample-fed"])
def test_mean_fed_control_can_fail(truth, feed, passes):
    """The control's checks run on the library's simulated chain: the mean-fed chain passes them, and a chain that
    feeds samples instead (what a broken ``feed="mean"`` would do) fails both."""
    links, exact, (mx, Sx) = truth
    model, guide = library_pair(links, exact)
    x0 = lg.sample_chain_model(links, TOP, 4000, torch.Generator().manual_seed(5))
    rep = gt.chain_report("c", model, guide, (mx, Sx), x0, 30, feed, seed=6)
    checks = gt.mean_fed_checks(rep, gt.mean_fed_kl_at_optimum(links))
    assert [ok for _, ok in checks] == [passes, passes], (checks, rep["kl_range_sim"], rep["rank_sim"])


def test_empirical_kl_floor_is_the_sampling_bias(truth):
    links, _, (mx, Sx) = truth
    x = lg.sample_chain_model(links, TOP, 20000, torch.Generator().manual_seed(4))
    kl, floor = lg.empirical_kl(x, mx, Sx), lg.kl_floor(16, 20000)
    assert 0.5 * floor < kl < 2 * floor


def test_chain_without_stationary_law_is_refused(truth):
    links, exact, _ = truth
    wild = copy.deepcopy(exact[0])
    wild.A = wild.A * 3
    with pytest.raises(ValueError, match="no stationary law"):
        lg.chain_law(wild, links[-1])


@pytest.mark.slow
def test_benchmark_quick_meets_its_targets():
    """``python benchmarks/claims/gibbs_toy.py --quick``: trains the library pair and checks every target (about a
    minute)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, os.path.join(BENCH, "gibbs_toy.py"), "--quick"], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "MISSED" not in run.stdout and run.stdout.count("[ok]") == 10


def test_gibbs_mnist_starts_are_a_seeded_random_draw_disjoint_from_the_reference():
    """Not the first test images (MNIST's first 5,000 come from cleaner writers): a draw over the whole test set, the
    same for the same seed, and never among the reference images the chains are scored against."""
    starts, ref = gibbs_mnist.split_starts(10000, 500, seed=0)
    assert len(starts) == 500 and len(ref) == 9500
    assert torch.equal(torch.sort(torch.cat([starts, ref])).values, torch.arange(10000))  # disjoint, covering
    assert not torch.equal(starts, torch.arange(500))
    assert 0.35 < (starts >= 5000).double().mean().item() < 0.65  # both halves of the test set, about equally
    again, _ = gibbs_mnist.split_starts(10000, 500, seed=0)
    other, _ = gibbs_mnist.split_starts(10000, 500, seed=1)
    assert torch.equal(starts, again) and not torch.equal(starts, other)
