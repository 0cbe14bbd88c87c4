"""Gibbs chains of Propositions 1 and 2: exact stationary moments on a linear-Gaussian model, then the real models."""

import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import A, LinearGaussianModel, S
from pyro import poutine
from pyro.nn import PyroModule

from pyro_vlae.experiments.gibbs import ancestral_means, chain_snapshots, check_keep, gibbs_chain
from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.presets import get_preset


class LinearGaussianGuide(PyroModule):
    """``q(z1|x) = N(A x / (A^2 + S^2), S^2 / (A^2 + S^2))``: the exact posterior when ``scale_factor == 1``."""

    def __init__(self, scale_factor=1.0):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        prec = A**2 + S**2
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=kl_scale):
            pyro.sample("z1", dist.Normal(A * x / prec, self.scale_factor * S / math.sqrt(prec)).to_event(1))


def test_toy_guide_is_the_exact_posterior():
    """Check the closed form against Bayes' rule on a grid, so the chain test below rests on a verified posterior."""
    x = torch.tensor([[1.3]])
    z = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    logw = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(A * z, S).log_prob(x.double().squeeze())
    w = torch.softmax(logw, 0)
    mean, var = (w * z).sum(), (w * z**2).sum() - (w * z).sum() ** 2
    q = poutine.trace(LinearGaussianGuide()).get_trace(x).nodes["z1"]["fn"].base_dist
    assert q.loc.item() == pytest.approx(mean.item(), abs=1e-6)
    assert q.scale.item() ** 2 == pytest.approx(var.item(), abs=1e-6)


def _stationary(guide, num_chains=5000, num_steps=50):
    x0 = torch.full((num_chains, 1), 10.0)  # far in the tail of p(x) = N(0, 5)
    out = gibbs_chain(LinearGaussianModel(), guide, x0, num_steps, seed=1)
    assert out.samples.shape == (num_steps + 1, num_chains, 1)
    assert torch.equal(out.samples[0], x0)
    return out


def test_chain_recovers_the_data_distribution():
    """The chain x -> z ~ p(z|x) -> x' ~ p(x|z) is the AR(1) x' = rho x + noise with rho = A^2 / (A^2 + S^2) = 0.8 and
    stationary law N(0, A^2 + S^2); from x0 = 10, 50 steps leave 10 * 0.8^50 < 2e-4 of the start."""
    n = 5000
    out = _stationary(LinearGaussianGuide(), n)
    last, prev = out.samples[-1, :, 0].double(), out.samples[-2, :, 0].double()
    var = A**2 + S**2
    assert abs(last.mean().item()) < 4 * math.sqrt(var / n)
    assert abs(last.var().item() - var) < 4 * var * math.sqrt(2 / (n - 1))
    rho = torch.corrcoef(torch.stack([prev, last]))[0, 1].item()
    assert rho == pytest.approx(A**2 / (A**2 + S**2), abs=4 * (1 - 0.8**2) / math.sqrt(n))
    # The means are E[x | z] = A z for the kept codes.
    assert torch.allclose(out.means, A * out.codes["z1"])


def test_chain_with_a_wrong_posterior_has_another_stationary_variance():
    """Negative control: q(z|x) with 0.3 times the posterior scale.  Then x' = rho x + A * 0.3 * sd * e + S e', whose
    stationary variance is (0.09 A^2 S^2 / (A^2 + S^2) + S^2) / (1 - rho^2) = 1.072 / 0.36 = 2.98, not 5."""
    n = 5000
    out = _stationary(LinearGaussianGuide(scale_factor=0.3), n)
    rho = A**2 / (A**2 + S**2)
    wrong = (0.09 * A**2 * S**2 / (A**2 + S**2) + S**2) / (1 - rho**2)
    v = out.samples[-1, :, 0].double().var().item()
    se = wrong * math.sqrt(2 / (n - 1))
    assert abs(v - wrong) < 4 * se
    assert abs(v - (A**2 + S**2)) > 10 * se


# ------------------------------------------------------------------------------------------------ real models
def tiny(**kw):
    return dataclasses.replace(get_preset("tiny").model, **kw)


def pair(kind, cfg=None):
    cfg = cfg or tiny()
    return get_model(kind, cfg), get_guide(kind, cfg)


KINDS = ["vlae", "hvae", "hvae-ar", "vae"]


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_shapes_range_and_modes(kind):
    model, guide = pair(kind)
    model.train(), guide.train()
    x0 = torch.rand(5, 1, 16, 16)
    out = gibbs_chain(model, guide, x0, 4)
    assert out.samples.shape == (5, 5, 1, 16, 16) and out.means.shape == (4, 5, 1, 16, 16)
    assert out.keep == ("z1",) and out.codes["z1"].shape == (4, 5, model.config.latent_dims[0] if kind != "vae" else 6)
    assert out.samples.min() >= 0 and out.samples.max() <= 1  # Laplace samples clamped to the value range
    assert model.training and guide.training  # modes restored
    assert gibbs_chain(model, guide, x0, 2, return_means=False).means is None


def test_laplace_samples_are_not_the_means_and_clamp_can_be_turned_off():
    model, guide = pair("hvae")
    out = gibbs_chain(model, guide, torch.rand(4, 1, 16, 16), 3, clamp=False, seed=0)
    noise = out.samples[1:] - out.means
    assert noise.abs().mean() > 0.05  # a draw from Laplace(mean, 1/8), mean |noise| = 1/8
    assert (out.samples[1:] < 0).any() or (out.samples[1:] > 1).any()


def test_bernoulli_samples_are_binary():
    model, guide = pair("hvae", tiny(likelihood="bernoulli"))
    out = gibbs_chain(model, guide, torch.rand(6, 1, 16, 16).round(), 3)
    assert set(out.samples[1:].unique().tolist()) <= {0.0, 1.0}
    assert ((out.means > 0) & (out.means < 1)).all()


@pytest.mark.parametrize("kind", ["hvae", "hvae-ar"])
def test_hvae_x_depends_on_z1_only(kind):
    """Conditioning a stacked HVAE on z1 alone gives p(x|z1): the upper layers are drawn but do not change x's mean."""
    model, _ = pair(kind)
    model.eval()
    z1 = torch.randn(7, 2)
    means = [poutine.condition(model, data={"z1": z1})(batch_size=7) for _ in range(2)]
    assert torch.equal(means[0], means[1])


def test_vlae_x_depends_on_every_layer():
    """Contrast: in the VLAE, fixing z1 leaves x's mean depending on the layers above (drawn from their prior)."""
    model, _ = pair("vlae")
    model.eval()
    z1 = torch.randn(7, 2)
    means = [poutine.condition(model, data={"z1": z1})(batch_size=7) for _ in range(2)]
    assert not torch.allclose(means[0], means[1])


def test_proposition_2_keeps_every_layer():
    model, guide = pair("hvae-ar")
    out = gibbs_chain(model, guide, torch.rand(3, 1, 16, 16), 3, keep=model.latent_sites)
    assert out.keep == ("z1", "z2", "z3")
    assert all(out.codes[s].shape == (3, 3, 2) for s in out.keep)


def test_keep_validation():
    model, guide = pair("hvae-ar")
    x0 = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match=r"no such latent site; valid sites are \['z1', 'z2', 'z3'\]"):
        gibbs_chain(model, guide, x0, 1, keep=("z9",))
    with pytest.raises(ValueError, match="at least one"):
        gibbs_chain(model, guide, x0, 1, keep=())
    with pytest.raises(ValueError, match="autoregressive HVAE"):
        check_keep(model, ("z2",))
    with pytest.raises(ValueError, match="num_steps"):
        gibbs_chain(model, guide, x0, 0)
    assert check_keep(model, "z1") == ("z1",)
    assert check_keep(model, ("z3", "z2")) == ("z2", "z3")  # a top block, sorted bottom to top
    assert check_keep(get_model("hvae", tiny()), ("z2",)) == ("z2",)  # Markov: any layer


def test_seed_makes_the_chain_reproducible_and_leaves_the_global_stream_alone():
    model, guide = pair("vlae")
    x0 = torch.rand(4, 1, 16, 16)
    before = torch.get_rng_state()
    a = gibbs_chain(model, guide, x0, 3, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = gibbs_chain(model, guide, x0, 3, seed=7)
    c = gibbs_chain(model, guide, x0, 3, seed=8)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.codes["z1"], b.codes["z1"])
    assert not torch.equal(a.samples, c.samples)
    assert torch.equal(ancestral_means(model, 5, seed=1), ancestral_means(model, 5, seed=1))


def test_gibbs_figure_writes_one_row_per_chain_kind(tmp_path):
    from PIL import Image

    from pyro_vlae.figures import gibbs_figure
    from pyro_vlae.training.runs import RunConfig

    p = get_preset("tiny")
    heights = {}
    for kind in ("hvae", "hvae-ar"):
        model, guide = pair(kind)
        cfg = RunConfig(kind, "synthetic", "tiny", p.model, p.train)
        path = gibbs_figure(str(tmp_path / f"{kind}.png"), model, guide, cfg, torch.rand(5, 1, 16, 16), 4, steps=(1, 3))
        with Image.open(path) as im:
            heights[kind] = im.size[1]
    # one row (Eq. 6: starts, t = 1, t = 3, ancestral); the autoregressive HVAE adds the Eq. 16 row
    assert heights["hvae-ar"] > 1.6 * heights["hvae"]


def test_chain_snapshots_equal_one_long_chain():
    """Snapshots at t = 2 and 5 are the states of one seeded chain of 5 steps, and every step is reported once."""
    model, guide = pair("hvae")
    x0 = torch.rand(3, 1, 16, 16)
    seen = []
    snaps = chain_snapshots(model, guide, x0, (5, 2), seed=4, chunk=2, on_step=lambda t, x, m: seen.append(t))
    with torch.random.fork_rng():
        torch.manual_seed(4)
        full = gibbs_chain(model, guide, x0, 5)
    assert seen == [1, 2, 3, 4, 5] and sorted(snaps) == [2, 5]
    for t in (2, 5):
        assert torch.equal(snaps[t]["states"], full.samples[t]) and torch.equal(snaps[t]["means"], full.means[t - 1])


def test_mean_fed_chain_contracts_to_its_closed_form_variance():
    """``feed="mean"`` gives x' = A z with z ~ q(z|x): x' = rho x + A sd e, stationary variance
    A^2 sd^2 / (1 - rho^2) = 0.8 / 0.36 = 2.22, below p(x)'s 5: the diagnostic chain is not Proposition 1's."""
    n = 5000
    out = gibbs_chain(LinearGaussianModel(), LinearGaussianGuide(), torch.full((n, 1), 10.0), 50, seed=1, feed="mean")
    assert torch.equal(out.samples[1:], out.means), "each fed-back state is the mean image"
    rho, sd2 = A**2 / (A**2 + S**2), S**2 / (A**2 + S**2)
    target = A**2 * sd2 / (1 - rho**2)
    v = out.samples[-1, :, 0].double().var().item()
    assert abs(v - target) < 4 * target * math.sqrt(2 / (n - 1))
    with pytest.raises(ValueError, match="feed must be one of"):
        gibbs_chain(LinearGaussianModel(), LinearGaussianGuide(), torch.zeros(2, 1), 1, feed="mode")
