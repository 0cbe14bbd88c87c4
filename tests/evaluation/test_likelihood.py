"""Exact checks of the evaluation metrics on models whose answers are known in closed form."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vlae.evaluation import likelihood as M
from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.presets import get_preset
from pyro_vlae.training.progress import layer_kls

# A linear-Gaussian model: p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I), so p(x) = N(b, W W^T + s^2 I) and the
# posterior is N(mu(x), S) with S = (I + W^T W / s^2)^{-1} and mu(x) = S W^T (x - b) / s^2.
W = torch.tensor([[1.0, -0.5], [0.5, 1.0], [-1.0, 0.3], [0.3, 0.8]], dtype=torch.float64)
B = torch.tensor([0.2, -0.1, 0.0, 0.5], dtype=torch.float64)
SIGMA = 0.5


class LinearGaussian:
    """Toy model and guides with the house conventions (sites ``z1`` and ``x`` in ``pyro.plate("data")``)."""

    def __init__(self, w=W, b=B, s=SIGMA):
        self.w, self.b, self.s = w, b, s
        self.post_cov = torch.linalg.inv(torch.eye(w.shape[1], dtype=w.dtype) + w.T @ w / s**2)

    def sample(self, n, generator=None):
        z = torch.randn(n, self.w.shape[1], dtype=self.w.dtype, generator=generator)
        eps = torch.randn(n, self.w.shape[0], dtype=self.w.dtype, generator=generator)
        return z @ self.w.T + self.b + self.s * eps

    def log_px(self, x):
        cov = self.w @ self.w.T + self.s**2 * torch.eye(self.w.shape[0], dtype=self.w.dtype)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)

    def post_mean(self, x):
        return (x - self.b) @ self.w @ self.post_cov / self.s**2

    def model(self, x=None, *, batch_size=None, kl_scale=1.0):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                zero = torch.zeros(n, self.w.shape[1], dtype=self.w.dtype)
                z = pyro.sample("z1", dist.Normal(zero, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.w.T + self.b, self.s).to_event(1), obs=x)

    def exact_guide(self, x=None, *, batch_size=None, kl_scale=1.0):
        tril = torch.linalg.cholesky(self.post_cov)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=kl_scale):
            pyro.sample("z1", dist.MultivariateNormal(self.post_mean(x), scale_tril=tril))

    def rough_guide(self, x=None, *, batch_size=None, kl_scale=1.0):
        """Deliberately imperfect: shifted mean, inflated diagonal scale, no correlation."""
        scale = 1.5 * self.post_cov.diagonal().sqrt()
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=kl_scale):
            pyro.sample("z1", dist.Normal(self.post_mean(x) + 0.3, scale).to_event(1))


@pytest.fixture
def toy():
    lg = LinearGaussian()
    return lg, lg.sample(20, torch.Generator().manual_seed(1))


def test_iwae_converges_to_the_true_log_likelihood(toy):
    lg, x = toy
    truth = lg.log_px(x)
    errors = {}
    for k in (1, 10, 1000):
        est = M.importance_log_likelihood(lg.model, lg.rough_guide, x, k, chunk_size=128)  # 1000 = 7 chunks + part
        errors[k] = (est.log_px - truth).abs().mean().item()
    assert errors[1000] < 0.1 * errors[1]
    assert errors[1000] < errors[10] < errors[1]
    assert errors[1000] < 0.08


@pytest.mark.parametrize("k,chunk", [(1, 1), (7, 3), (40, 16)], ids=["K1", "K7-chunk3", "K40-chunk16"])
def test_exact_posterior_makes_elbo_and_iwae_exact(toy, k, chunk):
    lg, x = toy
    truth = lg.log_px(x)
    est = M.importance_log_likelihood(lg.model, lg.exact_guide, x, k, chunk_size=chunk)
    torch.testing.assert_close(est.log_px, truth, atol=1e-9, rtol=0)
    torch.testing.assert_close(est.elbo, truth, atol=1e-9, rtol=0)
    assert est.num_samples == k and est.kl_method == {"z1": "monte-carlo"}  # a full-covariance q: no closed form


def test_iwae_at_least_elbo_and_kl_is_closed_form_for_standard_normal_prior(toy):
    lg, x = toy
    est = M.importance_log_likelihood(lg.model, lg.rough_guide, x, 50)
    assert (est.log_px >= est.elbo - 1e-12).all()
    assert est.kl_method == {"z1": "analytic"}
    # KL(N(m, diag(v)) || N(0, I)) = 0.5 * sum(v + m^2 - 1 - log v), computed here by hand
    m, v = lg.post_mean(x) + 0.3, (1.5 * lg.post_cov.diagonal().sqrt()) ** 2
    torch.testing.assert_close(est.kl["z1"], 0.5 * (v + m**2 - 1 - v.log()).sum(-1), atol=1e-10, rtol=0)


def test_kl_scale_does_not_change_the_likelihood(toy):
    lg, x = toy
    pyro.set_rng_seed(3)
    a = M.importance_log_likelihood(lg.model, lg.rough_guide, x, 5)
    pyro.set_rng_seed(3)
    scaled = poutine.scale(lg.model, scale=0.1), poutine.scale(lg.rough_guide, scale=0.1)
    b = M.importance_log_likelihood(*scaled, x, 5)
    torch.testing.assert_close(a.log_px, b.log_px)


def test_rejects_sites_outside_the_data_plate():
    def model(x=None, *, batch_size=None, kl_scale=1.0):
        z = pyro.sample("z1", dist.Normal(torch.zeros(2), 1.0).to_event(1))  # global latent
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z.sum(), 1.0).expand([x.shape[0], 3]).to_event(1), obs=x)

    def guide(x=None, *, batch_size=None, kl_scale=1.0):
        pyro.sample("z1", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    with pytest.raises(ValueError, match="plate"):
        M.importance_log_likelihood(model, guide, torch.zeros(4, 3), 2)


KINDS = ["vlae", "hvae", "hvae-ar", "vae"]


@pytest.mark.parametrize("kind", KINDS, ids=KINDS)
def test_iwae_bounds_on_the_real_models(kind):
    cfg = get_preset("tiny").model
    model, guide = get_model(kind, cfg), get_guide(kind, cfg)
    x = torch.rand(6, *cfg.image_shape, generator=torch.Generator().manual_seed(0))
    one = M.importance_log_likelihood(model, guide, x, 1)
    torch.testing.assert_close(one.log_px, one.elbo)  # K = 1: the bound is the single-draw ELBO
    est = M.importance_log_likelihood(model, guide, x, 20, chunk_size=6)
    assert (est.log_px >= est.elbo - 1e-9).all()
    assert set(est.kl) == set(model.latent_sites) and model.training and guide.training  # modes restored
    # the ELBO averaged over draws matches the training code's independent estimate, recon - sum(KL)
    reps = x.repeat(40, 1, 1, 1)
    draws = M.importance_log_likelihood(model, guide, reps, 1)
    with M.eval_mode(model, guide):
        kls = layer_kls(model, guide, reps)
    reference = kls["recon"] - sum(v for k, v in kls.items() if k.startswith("z"))
    tol = 5 * draws.elbo.std().item() * math.sqrt(2 / reps.shape[0])
    assert abs(draws.elbo.mean().item() - reference) < tol


def test_bits_per_dim():
    assert M.bits_per_dim(-784 * math.log(2.0), 784) == pytest.approx(1.0)
    assert M.bits_per_dim(10.0, 5) < 0  # a density above 1: negative bits/dim


def test_active_units_find_the_unused_dimension():
    w = torch.tensor([[1.0, 0.0], [0.5, 0.0], [-1.0, 0.0], [0.3, 0.0]], dtype=torch.float64)  # z1[1] is ignored
    lg = LinearGaussian(w=w)
    x = lg.sample(200, torch.Generator().manual_seed(2))
    means = M.posterior_means(lg.exact_guide, x)["z1"]
    torch.testing.assert_close(means, lg.post_mean(x))
    au = M.active_units(means)
    assert au["active"] == 1 and au["dims"] == 2
    assert au["variance"][0] > 0.5 and au["variance"][1] == 0.0


def test_posterior_means_of_a_sequential_guide():
    def guide(x=None, *, batch_size=None, kl_scale=1.0):  # z1 ~ N(x, 1), z2 ~ N(2 z1, 1): E[z2 | x] = 2 x
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x, 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(2 * z1, 1.0).to_event(1))

    x = torch.linspace(-2, 2, 5).unsqueeze(1)
    means = M.posterior_means(guide, x, num_samples=4000)
    torch.testing.assert_close(means["z1"], x)
    assert (means["z2"] - 2 * x).abs().max() < 4 * 2 / math.sqrt(4000)


def _clusters(n, gen, spread):
    y = torch.arange(n) % 3
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    return centres[y] + spread * torch.randn(n, 2, generator=gen), y


def test_linear_probe_separable_and_uninformative_codes():
    gen = torch.Generator().manual_seed(0)
    (ctr, ytr), (cte, yte) = _clusters(300, gen, 0.3), _clusters(150, gen, 0.3)
    res = M.linear_probe(ctr, ytr, cte, yte, 3)
    assert res["test_accuracy"] == 1.0 and res["train_accuracy"] == 1.0
    assert res["majority_baseline"] == pytest.approx(1 / 3)
    assert M.linear_probe(ctr, ytr, cte, yte, 3) == res  # deterministic
    noise = M.linear_probe(torch.randn(300, 2, generator=gen), ytr, torch.randn(150, 2, generator=gen), yte, 3)
    assert noise["test_accuracy"] < 0.5


def _scaled_guide(x=None, *, batch_size=None, kl_scale=1.0):
    """``z1``: a code of scale 0.05 that x determines (posterior scale 1e-3); ``z2``: unit noise that ignores x;
    ``z3 = 5 z2`` (scale 1e-3 about it): noise of scale 5 reached through a sampled lower layer, so its posterior mean
    is a Monte Carlo average over draws of ``z2``, as a Markov HVAE's upper layers are."""
    n = x.shape[0]
    with pyro.plate("data", n):
        pyro.sample("z1", dist.Normal(0.05 * x[:, :1], 1e-3).to_event(1))
        z2 = pyro.sample("z2", dist.Normal(torch.zeros(n, 1, dtype=x.dtype), 1.0).to_event(1))
        pyro.sample("z3", dist.Normal(5.0 * z2, 1e-3).to_event(1))


def test_activity_is_the_share_of_variance_x_explains():
    """Issue 29 item 8: a code of scale 0.05 fully determined by x is active, noise is not at any scale. Burda et
    al.'s posterior-mean variance > 0.01 (kept as ``active_mean_variance``) gets two of three wrong: 0.05**2 is below
    the threshold, and the 16-draw mean of noise of scale 5 varies by 25/16 across items (the unit noise's mean is
    exactly 0: it depends on no draw)."""
    x = torch.randn(1000, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moments = M.posterior_moments(_scaled_guide, x, num_samples=16)
    au = {
        s: M.active_units(m["mean"], variance=m["variance"], mc_variance=m["mc_variance"]) for s, m in moments.items()
    }
    assert [au[s]["active"] for s in ("z1", "z2", "z3")] == [1, 0, 0]
    assert au["z1"]["explained_share"][0] > 0.99
    assert au["z2"]["explained_share"][0] < M.ACTIVE_SHARE and au["z3"]["explained_share"][0] < M.ACTIVE_SHARE
    assert [au[s]["active_mean_variance"] for s in ("z1", "z2", "z3")] == [0, 0, 1]  # the old count
    assert au["z3"]["variance"][0] == pytest.approx(25 / 16, rel=0.15)
    assert au["z1"]["criterion"] == "explained_share" and M.active_units(moments["z1"]["mean"])["active"] == 0


def test_posterior_moments_of_a_sequential_guide():
    """Law of total variance over the draws: z1 ~ N(x, 1), z2 ~ N(2 z1, 1) gives Var(z2 | x) = 4 + 1; the Monte
    Carlo mean's own variance is Var_s(E[z2 | z1_s]) / S = 4 / S; an exact layer has none."""

    def guide(x=None, *, batch_size=None, kl_scale=1.0):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x, 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(2 * z1, 1.0).to_event(1))

    x = torch.linspace(-2, 2, 5).unsqueeze(1)
    m = M.posterior_moments(guide, x, num_samples=4000)
    torch.testing.assert_close(m["z1"]["variance"], torch.ones(5, 1))
    assert torch.equal(m["z1"]["mc_variance"], torch.zeros(5, 1))
    assert (m["z2"]["variance"] - 5.0).abs().max() < 0.4
    assert (m["z2"]["mc_variance"] * 4000 - 4.0).abs().max() < 0.4
    torch.testing.assert_close(M.posterior_means(guide, x, num_samples=3)["z2"].shape, torch.Size([5, 1]))
    one = M.posterior_moments(guide, x, num_samples=1)["z2"]
    assert torch.equal(one["mc_variance"], torch.zeros(5, 1))


def test_explained_share_is_scale_free():
    """Multiplying a layer's codes (means and posterior spread) by any constant leaves the share unchanged."""
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(300, 3, generator=g, dtype=torch.float64), torch.rand(300, 3, generator=g).double()
    base = M.explained_share(mean, var)
    for c in (0.01, 7.0):
        torch.testing.assert_close(M.explained_share(c * mean, c**2 * var), base)
    assert torch.equal(M.explained_share(torch.zeros(4, 1), torch.zeros(4, 1)), torch.zeros(1))  # no variance at all
    nan = M.active_units(mean, variance=torch.full_like(var, float("nan")))  # a distribution without a variance
    assert nan["active"] is None and nan["explained_share"] == [None] * 3 and nan["active_mean_variance"] == 3


@pytest.mark.slow
def test_activity_of_a_trained_markov_hvae_does_not_depend_on_units(tmp_path):
    """A tiny Markov HVAE (codes 8 / 8 / 8, learned conditional scales) trained 400 steps on the synthetic bars. Its
    z1 measured in units 20 times smaller is the same model (q(z1|x) and p(z1|z2) scaled by 0.05, z2's conditional
    and the decoder reading z1 / 0.05): same p(x), same ELBO, same active units by the explained share, while Burda
    et al.'s count drops to none. (2000 steps: z1 8/8 either way, z2 8/8, z3 6/6 by both, z1 rescaled 8/8 against
    0/8.)"""
    import dataclasses

    from pyro_vlae.data import load_data
    from pyro_vlae.evaluation.pipeline import SEQUENTIAL_MEAN_SAMPLES, moments_of
    from pyro_vlae.experiments.interventions import eval_mode
    from pyro_vlae.nets import children
    from pyro_vlae.training import fit
    from pyro_vlae.training.runs import RunConfig, load_run, write_config

    preset = get_preset("tiny")
    preset.train.num_steps = preset.train.checkpoint_every = 400
    model_cfg = dataclasses.replace(preset.model, latent_dims=(8, 8, 8))
    config = RunConfig("hvae", "synthetic", "tiny", model_cfg, preset.train, seed=0, data_dir=str(tmp_path / "data"))
    bundle = load_data("synthetic", config.data_dir, preset.train.batch_size)
    write_config(str(tmp_path), config)
    fit(config, bundle, str(tmp_path), "cpu", progress=False, log=lambda *_: None)
    model, guide, _, _ = load_run(str(tmp_path), "cpu")
    x = bundle.tensors("test")[0][:500]

    def counts(moments):
        return {
            s: M.active_units(m["mean"], variance=m["variance"], mc_variance=m["mc_variance"])
            for s, m in moments.items()
        }

    base = counts(moments_of(model, guide, x, 100))
    assert base["z1"]["active"] == base["z1"]["active_mean_variance"] == 8  # unit-scale z1: the criteria agree

    def rescaled(x=None, *, batch_size=None, kl_scale=1.0, c=0.05):
        h = x
        with pyro.plate("data", x.shape[0]):
            for l, net in enumerate(children(guide, "conditionals")[0], start=1):
                loc, scale = net(h)
                k = c if l == 1 else 1.0
                h = pyro.sample(f"z{l}", dist.Normal(k * loc, k * scale).to_event(1)) / k

    with eval_mode(guide):
        small = counts(M.posterior_moments(rescaled, x, SEQUENTIAL_MEAN_SAMPLES))
    assert small["z1"]["active"] == 8 and small["z1"]["active_mean_variance"] == 0
    torch.testing.assert_close(
        torch.tensor(small["z1"]["explained_share"]), torch.tensor(base["z1"]["explained_share"]), atol=1e-6, rtol=0
    )
