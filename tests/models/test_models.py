"""Models and guides: shapes, sites, likelihoods, KL scaling, batch independence and composability."""

import contextlib
import dataclasses
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.contrib.autoname import scope
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_vlae.guides import GUIDES, get_guide
from pyro_vlae.models import MODELS, get_model
from pyro_vlae.nets import LIKELIHOODS
from pyro_vlae.presets import PRESETS, get_preset

KINDS = sorted(MODELS)


def tiny(**kw):
    return dataclasses.replace(get_preset("tiny").model, **kw)


def reduced(name):
    """A preset at reduced width (same structure: layers, latent sizes, image shape, number of convolutions)."""
    cfg = get_preset(name).model
    return dataclasses.replace(cfg, hidden=16, channels=tuple(4 for _ in cfg.channels))


def pair(kind, cfg):
    return get_model(kind, cfg), get_guide(kind, cfg)


def test_packages_import_under_pyro_vlae():
    import pyro_vlae.guides
    import pyro_vlae.models

    assert pyro_vlae.models.__name__ == "pyro_vlae.models"
    assert set(pyro_vlae.models.MODELS) == set(pyro_vlae.guides.GUIDES) == {"vlae", "hvae", "hvae-ar", "vae"}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("batch", [1, 7], ids=["b1", "b7"])
def test_shapes_every_preset(kind, preset, batch):
    cfg = reduced(preset)
    model, guide = pair(kind, cfg)
    model.eval(), guide.eval()
    x = torch.rand(batch, *cfg.image_shape)
    if cfg.likelihood == "bernoulli":
        x = x.round()
    gtr = poutine.trace(guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    dims = [sum(cfg.latent_dims)] if kind == "vae" else list(cfg.latent_dims)
    for l, d in enumerate(dims, start=1):
        assert gtr.nodes[f"z{l}"]["value"].shape == (batch, d)
        assert mtr.nodes[f"z{l}"]["value"].shape == (batch, d)
    assert mtr.nodes["x"]["fn"].batch_shape == (batch,)
    assert mtr.nodes["x"]["fn"].event_shape == cfg.image_shape
    assert model(batch_size=batch).shape == (batch, *cfg.image_shape)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_one_svi_step_every_model_and_likelihood(kind, likelihood):
    cfg = tiny(likelihood=likelihood)
    model, guide = pair(kind, cfg)
    x = torch.rand(8, *cfg.image_shape)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO())
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    loss = svi.step(x, kl_scale=0.3)
    assert math.isfinite(loss)
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(before[k], v)]
    assert changed, "an SVI step must update the generative network"


@pytest.mark.parametrize("kind", KINDS)
def test_model_and_guide_share_latent_sites(kind):
    cfg = tiny()
    model, guide = pair(kind, cfg)
    x = torch.rand(5, *cfg.image_shape)
    gsites = {n for n, s in poutine.trace(guide).get_trace(x).nodes.items() if s["type"] == "sample" and n != "data"}
    mtr = poutine.trace(model).get_trace(x)
    msites = {n for n, s in mtr.nodes.items() if s["type"] == "sample" and not s["is_observed"] and n != "data"}
    assert gsites == msites == set(model.latent_sites)
    assert mtr.nodes["x"]["is_observed"]
    assert all("data" in [f.name for f in mtr.nodes[s]["cond_indep_stack"]] for s in msites | {"x"})


def test_guides_registry_matches_models():
    assert set(GUIDES) == set(MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        get_model("nope", tiny())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")], ids=["zero", "neg", "nan"])
def test_kl_scale_must_be_positive(kind, bad):
    model, guide = pair(kind, tiny())
    x = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="kl_scale must be"):
        model(x, kl_scale=bad)
    with pytest.raises(ValueError, match="kl_scale must be"):
        guide(x, kl_scale=bad)


@pytest.mark.parametrize("kind", KINDS)
def test_kl_scale_scales_exactly_the_latent_terms(kind):
    """loss(a) - loss(1) = (a - 1) * sum_l [log q(z_l|.) - log p(z_l|.)] with the same samples (poutine.scale)."""
    cfg = tiny()
    model, guide = pair(kind, cfg)
    model.eval(), guide.eval()
    x = torch.rand(6, *cfg.image_shape)
    losses = []
    for a in (1.0, 0.25):
        pyro.set_rng_seed(3)
        losses.append(Trace_ELBO().loss(model, guide, x, kl_scale=a))
    pyro.set_rng_seed(3)  # the same samples, traced by hand
    gtr = poutine.trace(guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    kl = sum(
        float(
            (gtr.nodes[s]["fn"].log_prob(gtr.nodes[s]["value"]) - mtr.nodes[s]["fn"].log_prob(gtr.nodes[s]["value"]))
            .sum()
            .detach()
        )
        for s in model.latent_sites
    )
    assert losses[1] - losses[0] == pytest.approx((0.25 - 1.0) * kl, rel=1e-4, abs=1e-3)


def test_vae_beta_weights_the_kl():
    cfg1, cfg4 = tiny(beta=1.0), tiny(beta=4.0)
    m1, g1 = pair("vae", cfg1)
    m4, g4 = pair("vae", cfg4)
    m4.load_state_dict(m1.state_dict()), g4.load_state_dict(g1.state_dict())
    for m in (m1, g1, m4, g4):
        m.eval()
    x = torch.rand(4, *cfg1.image_shape)
    elbo = TraceMeanField_ELBO()
    pyro.set_rng_seed(1)
    l1 = elbo.loss(m1, g1, x)
    pyro.set_rng_seed(1)
    l1_scaled = elbo.loss(m1, g1, x, kl_scale=4.0)
    pyro.set_rng_seed(1)
    l4 = elbo.loss(m4, g4, x)
    assert l4 == pytest.approx(l1_scaled, rel=1e-5)
    assert l4 > l1


def test_laplace_elbo_is_reference_l1_objective_up_to_constant():
    """log r(x) = -loss_ratio * sum |x - mean| - D log(2 b) with b = 1 / loss_ratio."""
    cfg = tiny(likelihood="laplace", obs_scale=1 / 8)
    model, guide = pair("vlae", cfg)
    model.eval(), guide.eval()
    x = torch.rand(5, *cfg.image_shape)
    gtr = poutine.trace(guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    mean = mtr.nodes["_RETURN"]["value"]
    loss_ratio, D = 8.0, x[0].numel()
    reference = -loss_ratio * (x - mean).abs().sum() - x.shape[0] * D * math.log(2 / loss_ratio)
    assert float(mtr.nodes["x"]["fn"].log_prob(x).sum().detach()) == pytest.approx(float(reference.detach()), rel=1e-5)


def test_linear_gaussian_elbo_matches_closed_form():
    """Trace_ELBO with poutine.scale on a linear-Gaussian toy equals E_q log p(x|z) - s * KL(q || p) in closed form."""
    torch.manual_seed(0)
    d, D, n, sigma, s = 2, 3, 4, 0.7, 0.5
    W, b = torch.randn(D, d), torch.randn(D)
    x = torch.randn(n, D)
    m, sd = torch.randn(n, d), torch.rand(n, d) + 0.3

    def model(x, kl_scale=1.0):
        with pyro.plate("data", n), poutine.scale(scale=kl_scale):
            z = pyro.sample("z1", dist.Normal(torch.zeros(n, d), 1.0).to_event(1))
        with pyro.plate("data_x", n):
            pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    def guide(x, kl_scale=1.0):
        with pyro.plate("data", n), poutine.scale(scale=kl_scale):
            pyro.sample("z1", dist.Normal(m, sd).to_event(1))

    # E_q ||x - Wz - b||^2 = ||x - Wm - b||^2 + tr(W diag(sd^2) W^T)
    resid = ((x - m @ W.T - b) ** 2).sum() + (sd**2 @ (W**2).T).sum()
    recon = -0.5 * resid / sigma**2 - n * D * math.log(sigma * math.sqrt(2 * math.pi))
    kl = (0.5 * (sd**2 + m**2 - 1) - sd.log()).sum()
    exact = float(recon - s * kl)
    est = -Trace_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1).loss(model, guide, x, s)
    assert est == pytest.approx(exact, rel=2e-3)
    mf = -TraceMeanField_ELBO(num_particles=20000, vectorize_particles=True, max_plate_nesting=1).loss(
        model, guide, x, s
    )
    assert mf == pytest.approx(exact, rel=2e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_independence_in_eval_mode(kind):
    """Generating or reconstructing one example alone gives the same image as inside a batch of 64."""
    cfg = tiny()
    model, guide = pair(kind, cfg)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):  # move the batch-norm running statistics away from their initial values
        svi.step(torch.rand(16, *cfg.image_shape))
    model.eval(), guide.eval()
    sites = model.latent_sites
    dims = {s: model.config.latent_dims[i] if kind != "vae" else sum(cfg.latent_dims) for i, s in enumerate(sites)}
    codes = {s: torch.randn(64, dims[s]) for s in sites}
    with torch.no_grad():
        batch = poutine.condition(model, data=codes)(batch_size=64)
        alone = poutine.condition(model, data={s: c[5:6] for s, c in codes.items()})(batch_size=1)
        assert torch.allclose(batch[5:6], alone, atol=1e-6)
        x = torch.rand(64, *cfg.image_shape)
        means = guide.posterior(x) if hasattr(guide, "posterior") else None
        if means is not None:
            one = guide.posterior(x[5:6])
            for (lb, sb), (lo, so) in zip(means, one):
                assert torch.allclose(lb[5:6], lo, atol=1e-6) and torch.allclose(sb[5:6], so, atol=1e-6)


def test_predictive_and_unconditional_generation():
    cfg = tiny()
    model, guide = pair("vlae", cfg)
    model.eval(), guide.eval()
    x = torch.rand(3, *cfg.image_shape)
    prior = Predictive(model, num_samples=4, return_sites=["z3", "x", "_RETURN"])(batch_size=3)
    assert prior["z3"].shape == (4, 3, 2) and prior["x"].shape == (4, 3, *cfg.image_shape)
    post = Predictive(model, guide=guide, num_samples=2, return_sites=["z1", "_RETURN"])(x)
    assert post["z1"].shape == (2, 3, 2)
    assert post["_RETURN"].shape == (2, 3, *cfg.image_shape)


def test_condition_and_do_fix_a_layer():
    cfg = tiny()
    model, _ = pair("vlae", cfg)
    model.eval()
    code = torch.tensor([[1.5, -0.5]]).expand(4, 2)
    tr = poutine.trace(poutine.condition(model, data={"z3": code})).get_trace(batch_size=4)
    assert torch.equal(tr.nodes["z3"]["value"], code) and tr.nodes["z3"]["is_observed"]
    assert not torch.equal(tr.nodes["z2"]["value"][0], tr.nodes["z2"]["value"][1])
    # do() intervenes: downstream sees the fixed codes, exactly as under condition().
    full = {"z1": torch.zeros(4, 2), "z2": torch.ones(4, 2), "z3": code}
    done = poutine.trace(poutine.do(model, data=full)).get_trace(batch_size=4)
    assert torch.equal(done.nodes["_RETURN"]["value"], poutine.condition(model, data=full)(batch_size=4))
    assert not any(site.get("is_observed") for name, site in done.nodes.items() if name.startswith("z"))
    # With z1..z3 all fixed the image is deterministic.
    full = {"z1": torch.zeros(4, 2), "z2": torch.ones(4, 2), "z3": code}
    a = poutine.condition(model, data=full)(batch_size=4)
    b = poutine.condition(model, data=full)(batch_size=4)
    assert torch.equal(a, b)


def test_two_instances_compose_in_one_pyro_model():
    cfg = tiny()
    a, b = get_model("vlae", cfg, name="a"), get_model("vlae", cfg, name="b")
    ga, gb = get_guide("vlae", cfg, name="ga"), get_guide("vlae", cfg, name="gb")

    def model(x):
        with scope(prefix="a"):
            a(x)
        with scope(prefix="b"):
            b(x)

    def guide(x):
        with scope(prefix="a"):
            ga(x)
        with scope(prefix="b"):
            gb(x)

    x = torch.rand(4, *cfg.image_shape)
    tr = poutine.trace(model).get_trace(x)
    names = {n for n, s in tr.nodes.items() if s["type"] == "sample"}
    assert {"a/z1", "a/z3", "b/z1", "b/x"} <= names
    SVI(model, guide, Adam({"lr": 1e-3}), Trace_ELBO()).step(x)
    params = set(pyro.get_param_store().keys())
    assert any(p.startswith("a.") for p in params) and any(p.startswith("b.") for p in params)
    assert not {p for p in params if p.startswith("a.")} & {p for p in params if p.startswith("b.")}


def test_semi_supervised_composition_improves_elbo():
    """A label site tied to the VLAE's top layer, y ~ Categorical(W z3), trained jointly with Trace_ELBO."""
    cfg = tiny()
    vlae, vlae_guide = pair("vlae", cfg)
    classify = nn.Linear(cfg.latent_dims[-1], 10)
    y = torch.arange(40) % 10
    x = torch.zeros(40, *cfg.image_shape)
    x[torch.arange(40), 0, y + 3, :] = 1.0  # one horizontal bar per class

    def model(x, y):
        pyro.module("classify", classify)
        z3 = poutine.trace(vlae).get_trace(x).nodes["z3"]["value"]  # the VLAE's sites still reach SVI's handlers
        with pyro.plate("labels", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=classify(z3)), obs=y)

    def guide(x, y):
        vlae_guide(x)

    svi = SVI(model, guide, Adam({"lr": 3e-3}), Trace_ELBO())
    elbo = Trace_ELBO(num_particles=10)
    first = elbo.loss(model, guide, x, y)
    tr = poutine.trace(model).get_trace(x, y)
    assert {"z1", "z2", "z3", "x", "y"} <= set(tr.nodes)
    for _ in range(30):
        svi.step(x, y)
    last = elbo.loss(model, guide, x, y)
    assert last < first - 0.1 * abs(first)


def test_readme_python_api_example_runs():
    """The README's Python API block, executed as written: one SVI step, then the top layer fixed by a handler."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert isinstance(scope["loss"], float) and scope["loss"] == scope["loss"]
    assert scope["digits"].shape == (16, 1, 28, 28)


@pytest.mark.parametrize("kind", KINDS)
def test_a_device_scalar_kl_scale_gives_the_float_s_loss(kind):
    """The training step passes the KL scale as a float64 tensor changed in place: the same loss as the float, and
    ``poutine.scale`` refuses a tensor scale of 0 while validation is on."""
    model, guide = pair(kind, tiny())
    x = torch.rand(4, 1, 16, 16)
    losses = []
    for a in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        pyro.set_rng_seed(3)
        losses.append(Trace_ELBO().loss(model, guide, x, kl_scale=a))
    assert losses[0] == losses[1]
    with pytest.raises(ValueError, match="Expected scale > 0"):
        model(x, kl_scale=torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_the_fixed_likelihood_scale_is_a_buffer_outside_state_dicts(likelihood):
    """The fixed scale lives on the model's device (no tensor made from a float per call) and is not saved, so state
    dicts and checkpoints hold what they always held."""
    cfg = tiny(likelihood=likelihood, obs_scale=0.2)
    model, _ = pair("vlae", cfg)
    assert not any("fixed_scale" in k for k in model.state_dict())
    raw = torch.randn(3, *cfg.image_shape)
    assert torch.equal(model.likelihood(raw).base_dist.scale, torch.full_like(raw, 0.2))
    double = model.likelihood.double()(raw.double()).base_dist.scale
    assert double.dtype == torch.float64 and torch.equal(double, torch.full_like(raw.double(), 0.2))


@pytest.mark.parametrize("kind", KINDS)
def test_without_param_registration_the_networks_compute_the_same_and_tell_pyro_nothing(kind):
    from pyro_vlae.nets import without_param_registration

    model, guide = pair(kind, tiny())
    model.eval(), guide.eval()
    x = torch.rand(3, 1, 16, 16)
    traces = []
    for register in (True, False):
        pyro.set_rng_seed(2)
        with contextlib.nullcontext() if register else without_param_registration():
            gtr = poutine.trace(guide).get_trace(x)
            mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
        traces.append((gtr, mtr))
    (g1, m1), (g2, m2) = traces
    params = lambda tr: [n for n, s in tr.nodes.items() if s["type"] == "param"]  # noqa: E731
    assert params(g1) and params(m1) and not params(g2) and not params(m2)
    assert torch.equal(m1.log_prob_sum() - g1.log_prob_sum(), m2.log_prob_sum() - g2.log_prob_sum())
