"""Diagnostics: chain summaries against known R-hat/ESS, Gibbs mixing on a linear-Gaussian model, eval.json blocks."""

import dataclasses
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import A, LinearGaussianModel, S
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from pyro_vlae.evaluation import diagnostics as D
from pyro_vlae.evaluation.classifier import extract_features, frechet_distance
from pyro_vlae.experiments.gibbs import ancestral_means, chain_snapshots, chain_starts
from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.presets import get_preset
from pyro_vlae.training.runs import RunConfig


# ------------------------------------------------------------------------------------------ chain_summary
def _ar1(rho, chains, draws, rng):
    """Stationary AR(1) chains with unit marginal variance; the ESS of ``chains * draws`` draws is
    ``chains * draws * (1 - rho) / (1 + rho)``."""
    x = np.empty((chains, draws))
    x[:, 0] = rng.standard_normal(chains)
    noise = rng.standard_normal((chains, draws)) * math.sqrt(1 - rho**2)
    for t in range(1, draws):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x


def test_chain_summary_of_independent_draws():
    rng = np.random.default_rng(0)
    s = D.chain_summary(rng.standard_normal((8, 500)))
    assert s["rhat"] == pytest.approx(1.0, abs=0.01)
    assert s["ess_bulk"] == pytest.approx(4000, rel=0.15)
    assert s["mean"] == pytest.approx(0.0, abs=0.06) and s["sd"] == pytest.approx(1.0, abs=0.05)


def test_chain_summary_reads_chain_then_draw():
    """Autocorrelation runs along axis 1: the ESS must shrink by (1 - rho) / (1 + rho) = 1/9 for rho = 0.8."""
    x = _ar1(0.8, 8, 2000, np.random.default_rng(1))
    expected = 8 * 2000 * 0.2 / 1.8
    assert D.chain_summary(x)["ess_bulk"] == pytest.approx(expected, rel=0.25)


def test_chain_summary_flags_chains_that_disagree():
    x = np.random.default_rng(2).standard_normal((4, 200)) + np.arange(4)[:, None]
    assert D.chain_summary(x)["rhat"] > 1.5


def test_chain_summary_undefined_cases():
    assert D.chain_summary(np.zeros((4, 50)))["rhat"] is None  # constant statistic
    assert D.chain_summary(np.random.randn(1, 50))["ess_bulk"] is None  # one chain
    with pytest.raises(ValueError, match=r"\(chain, draw\)"):
        D.chain_summary(np.zeros(10))


# --------------------------------------------------------------------------- Gibbs diagnostics on a known chain
class LinearGaussianGuide(PyroModule):
    """Exact posterior by default; ``stuck=True`` gives ``q(z|x) = N(x / A, 1e-3)``, a chain that random-walks."""

    def __init__(self, stuck=False):
        super().__init__()
        self.stuck = stuck

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        prec = A**2 + S**2
        loc, scale = (x / A, 1e-3) if self.stuck else (A * x / prec, S / math.sqrt(prec))
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=kl_scale):
            pyro.sample("z1", dist.Normal(loc, scale).to_event(1))


TOY = SimpleNamespace(model_kind="linear-gaussian")


def test_gibbs_diagnostics_of_a_mixing_chain():
    """From starts spread over [-10, 10] the exact chain forgets them: R-hat near 1; the pooled draws of E[x|z] = A z
    have the stationary mean 0 and standard deviation A (z ~ N(0, 1) at stationarity)."""
    starts = torch.linspace(-10, 10, 8).reshape(8, 1)
    out = D.gibbs_diagnostics(LinearGaussianModel(), LinearGaussianGuide(), TOY, starts, num_steps=400, burn_in=100)
    block = out["chains"]["z1"]
    assert list(out["chains"]) == ["z1"] and out["num_chains"] == 8
    assert block["max_rhat"] < 1.05
    m = block["stats"]["mean_intensity"]
    assert abs(m["mean"]) < 0.6 and m["sd"] == pytest.approx(A, rel=0.15)
    assert block["min_ess_bulk"] > 100


def test_gibbs_diagnostics_flag_a_stuck_chain():
    """Negative control: with q(z|x) collapsed on x / A the chain is a random walk and keeps its starts: R-hat >> 1."""
    starts = torch.linspace(-10, 10, 8).reshape(8, 1)
    out = D.gibbs_diagnostics(LinearGaussianModel(), LinearGaussianGuide(stuck=True), TOY, starts, num_steps=400)
    assert out["chains"]["z1"]["max_rhat"] > 1.3


# --------------------------------------------- the collapse verdict on an exact but sticky chain, and a collapsed one
DIM, NOISE = 8, 0.1  # z ~ N(0, I_8), x ~ N(z, 0.01 I): each Gibbs step keeps x with correlation 1 / 1.01 = 0.99


class StickyModel(PyroModule):
    latent_sites = ["z1"]

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                z = pyro.sample("z1", dist.Normal(torch.zeros(n, DIM), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x)
        return z


class StickyGuide(PyroModule):
    """The exact posterior ``N(x / (1 + s^2), s^2 / (1 + s^2))``; ``collapsed=True``: ``q(z|x) = N(0, 1e-6)``, a chain
    whose every state is the same mean image, 0."""

    def __init__(self, collapsed=False):
        super().__init__()
        self.collapsed = collapsed

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        prec = 1.0 + NOISE**2
        loc, scale = (0.0 * x, 1e-3) if self.collapsed else (x / prec, NOISE / math.sqrt(prec))
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=kl_scale):
            pyro.sample("z1", dist.Normal(loc, scale).to_event(1))


class IdentityFeatures(nn.Module):
    """Features are the coordinates themselves; classes are the signs of the first two."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(DIM)[:2], requires_grad=False)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        logits = x.flatten(1) @ self.weight.T
        return torch.cat([logits, -logits], 1)


def _sticky_gibbs(guide):
    x = math.sqrt(1.0 + NOISE**2) * torch.randn(600, DIM, generator=torch.Generator().manual_seed(7))  # x ~ p(x)
    return D.gibbs_diagnostics(StickyModel(), guide, TOY, x, IdentityFeatures(), num_chains=8, num_steps=100)


def test_exact_but_sticky_chain_is_not_flagged():
    """An exact chain mixes slowly here: lag-1 correlation 0.99, so 8 chains x 50 pooled draws are about 8 distinct
    images, and their Fréchet distance is many times that of 400 independent ancestral images. Started from data, an
    exact chain stays at the data's law at every step, so independent chains scored at one step are as close to the
    data as as many ancestral samples: no collapse."""
    out = _sticky_gibbs(StickyGuide())
    block = out["chains"]["z1"]
    assert block["min_ess_bulk"] < 60  # slow mixing: 400 draws are worth few independent ones
    assert out["verdict"] == {"num_chains": 256, "step": 100, "reference_images": 344}
    fd = out["frechet_distance"]
    assert fd["num_images"] == 256 and fd["gibbs_z1"] < 1.5 * fd["ancestral"]
    assert not block["collapse"]["collapsed"] and out["collapse_detected"] is False
    assert block["collapse"]["spread_ratio"] > 0.7


def test_collapsed_chain_is_flagged():
    out = _sticky_gibbs(StickyGuide(collapsed=True))
    c = out["chains"]["z1"]["collapse"]
    assert out["collapse_detected"] is True and c["collapsed"]
    assert c["spread_ratio"] < 0.01 and c["fd_ratio"] > 10


def test_gibbs_diagnostics_needs_draws_after_burn_in():
    with pytest.raises(ValueError, match="at least 4 draws"):
        D.gibbs_diagnostics(LinearGaussianModel(), LinearGaussianGuide(), TOY, torch.zeros(2, 1), num_steps=6)


# ------------------------------------------------------------------------------------------------ real models
class ProjectionClassifier(nn.Module):
    """A fixed stand-in for the SmallCNN: classes from random projections of the pixels' deviation from ``center``
    (an untrained model's images differ little, so they are centred on their mean); features are the first pixels."""

    in_channels = 1

    def __init__(self, center=None, num_classes=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(num_classes, 256, generator=g))
        self.register_buffer("center", torch.zeros(256) if center is None else center.flatten())

    def features(self, x):
        return x.flatten(1)[:, :6]

    def forward(self, x):
        return 1e3 * (x.flatten(1) - self.center) @ self.weight.T


def run_config(kind, **kw):
    p = get_preset("tiny")
    return RunConfig(kind, "synthetic", "tiny", dataclasses.replace(p.model, **kw), p.train)


def trio(kind, **kw):
    cfg = run_config(kind, **kw)
    model, guide = get_model(kind, cfg.model), get_guide(kind, cfg.model)
    return model, guide, cfg


def test_layer_diagnostics_of_a_layer_without_effect():
    """Cut z1 out of a VLAE decoder: resampling it changes no pixel and no class, so both numbers are exactly 0."""
    model, guide, cfg = trio("vlae")
    with torch.no_grad():
        model.ladder[0][0].weight.zero_()
    x = torch.rand(20, 1, 16, 16)
    model.eval()
    with torch.no_grad():
        clf = ProjectionClassifier(center=model(batch_size=64).mean(0))
    before = torch.get_rng_state()
    out = D.layer_diagnostics(model, guide, cfg, x, classifier=clf, num_groups=8, num_samples=4)
    assert torch.equal(torch.get_rng_state(), before)
    layers = out["layers"]
    assert list(layers) == ["z1", "z2", "z3"]
    assert layers["z1"]["variance_share"] == 0.0 and layers["z1"]["class_change_rate"] == 0.0
    assert layers["z3"]["variance_share"] > 0
    assert out["baseline_class_change_rate"] > 0  # the stand-in classifier does tell samples apart
    assert all(0 <= v["class_change_rate"] <= 1 and len(v["kl_per_dim"]) == 2 for v in layers.values())
    again = D.layer_diagnostics(model, guide, cfg, x, classifier=clf, num_groups=8, num_samples=4)
    assert again == out
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize("kind, chains", [("hvae-ar", ["z1", "all"]), ("vae", ["z1"])], ids=["hvae-ar", "vae"])
def test_gibbs_diagnostics_blocks(kind, chains):
    model, guide, cfg = trio(kind)
    x = torch.rand(16, 1, 16, 16)
    out = D.gibbs_diagnostics(model, guide, cfg, x, ProjectionClassifier(), num_chains=3, num_steps=10)
    assert list(out["chains"]) == chains and out["burn_in"] == 5
    block = out["chains"]["z1"]
    assert {"mean_intensity", "z1[0]", "p(class 0)", "p(class 2)"} <= set(block["stats"])
    assert 0 <= block["class_switch_rate"] <= 1
    fd = out["frechet_distance"]
    assert fd["num_images"] == 8 and fd["reference_images"] == 8 and fd["step"] == 10  # half start chains
    # Re-derived: each distance scores its own images (the states at step 10 of chains from the start half, or as
    # many ancestral mean images) against the other half of x, through the classifier's features.
    clf = ProjectionClassifier()
    starts, rest = D.verdict_split(16, 256, 0)
    ref = extract_features(clf, x[rest])
    v_starts = chain_starts(model, x[starts], 8, 0)
    keeps = {"z1": ("z1",), "all": tuple(model.latent_sites)}
    for i, c in enumerate(chains):
        states = chain_snapshots(model, guide, v_starts, [10], keep=keeps[c], seed=100 + i)[10]["means"]
        assert fd[f"gibbs_{c}"] == pytest.approx(frechet_distance(extract_features(clf, states), ref), rel=1e-6), c
    anc = frechet_distance(extract_features(clf, ancestral_means(model, 8, seed=0)), ref)
    assert fd["ancestral"] == pytest.approx(anc, rel=1e-6)
    assert all(math.isfinite(fd[k]) and fd[k] > 0 for k in ["ancestral"] + [f"gibbs_{c}" for c in chains])
    json.dumps(out, allow_nan=False)


def test_update_eval_json_merges_and_sanitises(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"test": {"elbo": -1.0}, "gibbs": {"old": 1}}))
    D.update_eval_json(str(tmp_path), "gibbs", {"rhat": float("nan"), "ess": np.float32(3.5), "t": torch.ones(2)})
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data == {"test": {"elbo": -1.0}, "gibbs": {"rhat": None, "ess": 3.5, "t": [1.0, 1.0]}}
    assert os.listdir(tmp_path) == ["eval.json"]  # no temporary file left behind
    path.write_text("{torn")
    assert D.update_eval_json(str(tmp_path), "layers", {}) == {"layers": {}}


def test_run_diagnostics_writes_both_blocks(tmp_path):
    model, guide, cfg = trio("hvae")
    (tmp_path / "eval.json").write_text(json.dumps({"step": 3}))
    out = D.run_diagnostics(str(tmp_path), model, guide, cfg, torch.rand(8, 1, 16, 16), num_chains=2, num_steps=8)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert set(data) == {"step", "layers", "gibbs"}
    assert data["layers"] == out["layers"] and data["gibbs"] == out["gibbs"]
    assert data["gibbs"]["model_kind"] == "hvae" and "frechet_distance" not in data["gibbs"]
