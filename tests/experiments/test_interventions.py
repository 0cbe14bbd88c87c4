"""Interventions: per-layer noise resampling (Fig. 3, 6, 7), variance shares, traversals, top-KL dims, fix_layers."""

import dataclasses
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from pyro_vlae.experiments import interventions as iv
from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.presets import get_preset


def tiny(**kw):
    return dataclasses.replace(get_preset("tiny").model, **kw)


def pair(kind, cfg=None):
    cfg = cfg or tiny()
    return get_model(kind, cfg), get_guide(kind, cfg)


# ------------------------------------------------------------------------ linear toys with known variance shares
class LinearMarkov(PyroModule):
    """``z2 ~ N(0, 1)``, ``z1 ~ N(B z2, C^2)``, mean image ``A z1``: resampling ``eps_2`` alone leaves the variance
    ``A^2 B^2`` and ``eps_1`` alone ``A^2 C^2``, out of ``A^2 (B^2 + C^2)``."""

    latent_sites = ["z1", "z2"]
    A, B, C = 3.0, 2.0, 1.0

    def __init__(self):
        super().__init__()
        self.conditionals = nn.ModuleList()  # marks a stacked model, as in MarkovHVAEModel
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                z2 = pyro.sample("z2", dist.Normal(torch.zeros(n, 1), 1.0).to_event(1))
                z1 = pyro.sample("z1", dist.Normal(self.B * z2, self.C).to_event(1))
            mean = self.A * z1
            pyro.sample("x", dist.Normal(mean, 0.1).to_event(1), obs=x)
        return mean


class LinearFlat(PyroModule):
    """``z1, z2 ~ N(0, 1)`` independent, mean image ``a1 z1 + a2 z2``: share of layer ``l`` is
    ``a_l^2 / (a_1^2 + a_2^2)``."""

    latent_sites = ["z1", "z2"]
    a = (1.0, 3.0)

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x=None, *, batch_size=None, kl_scale=1.0):
        n = x.shape[0] if x is not None else batch_size
        with pyro.plate("data", n):
            with poutine.scale(scale=kl_scale):
                z = [pyro.sample(f"z{l}", dist.Normal(torch.zeros(n, 1), 1.0).to_event(1)) for l in (1, 2)]
            mean = self.a[0] * z[0] + self.a[1] * z[1]
            pyro.sample("x", dist.Normal(mean, 0.1).to_event(1), obs=x)
        return mean


@pytest.mark.parametrize(
    "toy, expected",
    [(LinearMarkov, {"z1": 1 / 5, "z2": 4 / 5}), (LinearFlat, {"z1": 1 / 10, "z2": 9 / 10})],
    ids=["markov", "flat"],
)
def test_variance_share_matches_closed_form(toy, expected):
    shares = iv.variance_share(toy(), num_groups=200, num_samples=50, seed=0)
    assert shares.keys() == expected.keys()
    for site, share in shares.items():
        assert share == pytest.approx(expected[site], rel=0.08)


# ------------------------------------------------------------------- real models: what varies inside a group
def _grouped(tr, site, groups, samples):
    v = tr.nodes[site]["value"]
    return v.reshape(groups, samples, *v.shape[1:])


def _constant_in_groups(v):
    """Equal within each group up to float rounding.  A layer above the intervened one is computed from the same
    values in every row of a group, but a batched matrix product may round a row differently by where it sits in the
    batch (the CPU kernel's blocking): on one machine z2 differed by 3e-8 inside a group while its noise was bit-equal.
    A resampled value differs by order 1, so 1e-5 still tells the two apart."""
    return torch.allclose(v, v[:, :1].expand_as(v), rtol=0.0, atol=1e-5)


def _varies_in_every_group(v):
    return bool((v != v[:, :1]).flatten(2).any(-1)[:, 1:].all())


@pytest.mark.parametrize("layer", ["z1", "z2", "z3"])
def test_hvae_intervention_resamples_one_noise_and_the_layers_below(layer):
    """Trace the intervention itself: only ``layer``'s noise varies in a row, and it moves ``z_layer`` and every
    ``z`` below it (their conditionals see it), never a ``z`` above it."""
    model, _ = pair("hvae")
    g, s = 3, 4
    tr = poutine.trace(iv.intervene_layer).get_trace(model, layer, g, s, generator=torch.Generator().manual_seed(0))
    k = int(layer[1:])
    for l in (1, 2, 3):
        noise, z = _grouped(tr, f"z{l}_decentered", g, s), _grouped(tr, f"z{l}", g, s)
        if l == k:
            assert _varies_in_every_group(noise)
        else:
            assert _constant_in_groups(noise)
        if l <= k:
            assert _varies_in_every_group(z)
        else:
            assert _constant_in_groups(z)
    images = tr.nodes["_RETURN"]["value"]
    assert images.shape == (g, s, 1, 16, 16)
    assert _varies_in_every_group(images)


@pytest.mark.parametrize("kind", ["vlae", "vae"])
def test_flat_models_resample_the_code_itself(kind):
    model, _ = pair(kind)
    tr = poutine.trace(iv.intervene_layer).get_trace(model, "z1", 2, 5, generator=torch.Generator().manual_seed(0))
    assert "z1_decentered" not in tr.nodes
    assert _varies_in_every_group(_grouped(tr, "z1", 2, 5))
    for site in model.latent_sites[1:]:
        assert _constant_in_groups(_grouped(tr, site, 2, 5))


def test_intervention_runs_in_eval_mode_and_rejects_unknown_layers():
    """In training mode batch norm would mix the items of a batch; the intervention must not depend on the mode."""
    model, _ = pair("vlae")
    model.train()
    a = iv.intervene_layer(model, "z2", 2, 3, generator=torch.Generator().manual_seed(1))
    assert model.training
    model.eval()
    b = iv.intervene_layer(model, "z2", 2, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"valid layers are \['z1', 'z2', 'z3'\]"):
        iv.intervene_layer(model, "z7")


def test_variance_shares_of_the_tiny_models_are_shares():
    for kind in ("vlae", "hvae"):
        shares = iv.variance_share(pair(kind)[0], num_groups=4, num_samples=4)
        assert list(shares) == ["z1", "z2", "z3"]
        assert all(0.0 <= v <= 2.0 for v in shares.values())


# ------------------------------------------------------------------------------------------ traversals and KL
def test_traversal_sweeps_the_chosen_dims_only():
    model, _ = pair("vae", tiny(latent_dims=(2, 2, 2)))  # one 6-d code
    tr = poutine.trace(iv.traverse_layer).get_trace(model, "z1", 3, 2.0, dims=(4, 1))
    z = tr.nodes["z1"]["value"].reshape(3, 3, 6)
    ticks = torch.tensor([-2.0, 0.0, 2.0])
    assert torch.equal(z[:, 0, 4], ticks) and torch.equal(z[0, :, 1], ticks)
    for d in (0, 2, 3, 5):
        assert torch.equal(z[..., d], z[..., d].flatten()[0].expand(3, 3))
    with pytest.raises(ValueError, match="two different dimensions"):
        iv.traverse_layer(model, "z1", 3, dims=(1, 1))
    with pytest.raises(ValueError, match="two different dimensions"):
        iv.traverse_layer(model, "z1", 3, dims=(0, 6))


def test_kl_per_dim_is_the_gaussian_kl_and_top_dims_follow_it():
    """Closed form against the guide's own ``posterior``: ``KL(N(m, s^2) || N(0, 1)) = (m^2 + s^2 - 1) / 2 - log s``.
    Pushing the posterior means of two dimensions away from 0 makes them the top two."""
    model, guide = pair("vae")
    with torch.no_grad():
        guide.head.loc.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 4.0, 0.0, 2.0]))
        guide.head.loc.weight.mul_(0.01)
    guide.eval()
    x = torch.rand(16, 1, 16, 16)
    ((m, s),) = guide.posterior(x)
    expected = ((m**2 + s**2 - 1) / 2 - s.log()).mean(0).detach()
    assert torch.allclose(iv.kl_per_dim(model, guide, x, "z1"), expected, atol=1e-5)
    assert iv.top_kl_dims(model, guide, x, "z1") == (3, 5)
    assert iv.top_kl_dims(model, guide, x, "z1", k=1) == (3,)
    with pytest.raises(ValueError, match="fewer than k=7"):
        iv.top_kl_dims(model, guide, x, "z1", k=7)


def test_kl_per_dim_of_the_hvae_sums_to_the_layer_kl():
    """Monte Carlo per-dimension terms of a stacked model add up to the layer's ``log q - log p`` from full traces."""
    model, guide = pair("hvae")
    model.eval(), guide.eval()
    x = torch.rand(8, 1, 16, 16)
    pyro.set_rng_seed(3)
    per_dim = iv.kl_per_dim(model, guide, x, "z2")
    pyro.set_rng_seed(3)
    gtr = poutine.trace(guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    z = gtr.nodes["z2"]["value"]
    total = (gtr.nodes["z2"]["fn"].log_prob(z) - mtr.nodes["z2"]["fn"].log_prob(z)).mean()
    assert per_dim.shape == (2,)
    assert per_dim.sum().item() == pytest.approx(total.item(), abs=1e-4)


# --------------------------------------------------------------------------------------------------- fix_layers
def test_fix_layers_names_the_valid_sites_and_shapes():
    model, _ = pair("vlae", tiny(latent_dims=(2, 3, 4)))
    msg = "valid sites are z1: (N, 2), z2: (N, 3), z3: (N, 4)"
    with pytest.raises(ValueError, match=re.escape(f"cannot fix 'z4': the model has no such latent site; {msg}")):
        iv.fix_layers(model, {"z4": torch.zeros(2)})
    with pytest.raises(ValueError, match=re.escape("code has shape (2,); expected (N, 4) or (4,)")):
        iv.fix_layers(model, {"z3": torch.zeros(2)})
    with pytest.raises(ValueError, match=re.escape("code has shape (1, 1, 3)")):
        iv.fix_layers(model, {"z2": torch.zeros(1, 1, 3)})
    with pytest.raises(ValueError, match="holds 3 codes but the batch has 5"):
        iv.fix_layers(model, {"z2": torch.zeros(3, 3)})(batch_size=5)


def test_fix_layers_fixes_exactly_the_given_layers():
    model, _ = pair("vlae")
    model.train()  # fix_layers reads shapes in eval mode, so a training-mode model with batch norm works too
    code = torch.tensor([1.5, -0.5])
    fixed = iv.fix_layers(model, {"z3": code})
    model.eval()
    tr = poutine.trace(fixed).get_trace(batch_size=5)
    assert torch.equal(tr.nodes["z3"]["value"], code.expand(5, 2))
    assert tr.nodes["z3"]["is_observed"] and not tr.nodes["z1"]["is_observed"]
    assert not torch.equal(tr.nodes["z1"]["value"][0], tr.nodes["z1"]["value"][1])


def test_fixing_every_layer_gives_the_decoder_output():
    model, _ = pair("vlae")
    model.eval()
    zs = [torch.randn(4, 2) for _ in range(3)]
    images = iv.fix_layers(model, dict(zip(model.latent_sites, zs)))(batch_size=4)
    with torch.no_grad():
        direct = model.likelihood.mean(model.decode(zs))
    assert torch.allclose(images, direct)
