"""Stacked HVAEs on vector data: dense-only networks, affine conditionals, real-valued Gaussian likelihood."""

import dataclasses
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.nets import AffineGaussian, ModelConfig

D = 6


def vector(**kw):
    base = dict(image_shape=(D,), latent_dims=(3, 2, 2), hidden=8, likelihood="gaussian-learned", value_range=None)
    return ModelConfig(**{**base, **kw})


CASES = [("hvae", "mlp"), ("hvae", "affine"), ("hvae-ar", "mlp"), ("hvae-ar", "affine")]
IDS = [f"{k}-{c}" for k, c in CASES]


@pytest.mark.parametrize("kind, conditionals", CASES, ids=IDS)
def test_sites_shapes_and_an_svi_step(kind, conditionals):
    cfg = vector(conditionals=conditionals)
    model, guide = get_model(kind, cfg), get_guide(kind, cfg)
    x = torch.randn(5, D)
    gtr = poutine.trace(guide).get_trace(x)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(x)
    for l, d in enumerate(cfg.latent_dims, start=1):
        assert gtr.nodes[f"z{l}"]["value"].shape == mtr.nodes[f"z{l}"]["value"].shape == (5, d)
    assert mtr.nodes["x"]["fn"].batch_shape == (5,) and mtr.nodes["x"]["fn"].event_shape == (D,)
    assert model(batch_size=4).shape == (4, D)
    svi = SVI(model, guide, Adam({"lr": 1e-2}), Trace_ELBO())
    before = [p.detach().clone() for p in list(model.parameters()) + list(guide.parameters())]
    assert math.isfinite(svi.step(x))
    after = list(model.parameters()) + list(guide.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after)), "every parameter trains"


def test_affine_networks_have_no_hidden_layer_and_no_convolution():
    cfg = vector(conditionals="affine")
    model, guide = get_model("hvae", cfg), get_guide("hvae", cfg)
    for net in list(model.conditionals) + list(guide.conditionals):
        assert isinstance(net, AffineGaussian)
    assert len(model.decoder.net) == 1 and isinstance(model.decoder.net[0], nn.Linear)
    assert not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in [*model.modules(), *guide.modules()])
    assert model.likelihood.raw_scale.shape == (D,), "one learned standard deviation per dimension"


def test_affine_model_density_is_the_linear_gaussian_one():
    """With affine conditionals, p(x, z) = prod of N(W h + b, diag(s)^2) with s independent of the input: the model's
    joint log density equals the one written from its weights (Eq. 4) for inputs far apart."""
    cfg = vector(conditionals="affine")
    model = get_model("hvae", cfg)
    z3, z2, z1, x = torch.randn(4, 2) * 10, torch.randn(4, 2), torch.randn(4, 3), torch.randn(4, D)
    tr = poutine.trace(poutine.condition(model, data={"z3": z3, "z2": z2, "z1": z1})).get_trace(x)
    sp = lambda r, floor: nn.functional.softplus(r) + floor  # noqa: E731
    c2, c1, dec = model.conditionals[1], model.conditionals[0], model.decoder.net[0]
    expect = (
        dist.Normal(0.0, 1.0).log_prob(z3).sum(-1)
        + dist.Normal(c2.loc(z3), sp(c2.raw_scale, 1e-3)).log_prob(z2).sum(-1)
        + dist.Normal(c1.loc(z2), sp(c1.raw_scale, 1e-3)).log_prob(z1).sum(-1)
        + dist.Normal(z1 @ dec.weight.T + dec.bias, sp(model.likelihood.raw_scale, 1e-3)).log_prob(x).sum(-1)
    )
    got = sum(tr.nodes[s]["fn"].log_prob(tr.nodes[s]["value"]) for s in ("z3", "z2", "z1", "x"))
    assert torch.allclose(got, expect, atol=1e-4)


def test_affine_gaussian_starts_at_its_initial_scale():
    loc, scale = AffineGaussian(3, 4, init_scale=0.7)(torch.randn(5, 3))
    assert loc.shape == scale.shape == (5, 4)
    assert torch.allclose(scale, torch.full((5, 4), 0.7))


def test_unbounded_mean_and_bounded_mean():
    """value_range=None leaves the decoder output as the mean; a range squashes it into the range."""
    free, boxed = vector(conditionals="affine"), vector(conditionals="affine", value_range=(0.0, 1.0))
    z1 = torch.full((2, 3), 50.0)
    m_free = poutine.condition(get_model("hvae", free), data={"z1": z1})(batch_size=2)
    m_boxed = poutine.condition(get_model("hvae", boxed), data={"z1": z1})(batch_size=2)
    assert m_free.abs().max() > 1
    assert ((m_boxed >= 0) & (m_boxed <= 1)).all()


def test_config_round_trips_through_json():
    cfg = vector(conditionals="affine")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.is_vector and not ModelConfig().is_vector
    assert ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items() if k != "conditionals"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_shape": (4, 4)}, r"\(C, H, W\) for images or \(D,\) for vectors"),
        ({"image_shape": (0,)}, "image_shape must be"),
        ({"conditionals": "linear"}, "conditionals must be one of"),
    ],
    ids=["2d", "empty", "conditionals"],
)
def test_bad_vector_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vector(**kwargs)


@pytest.mark.parametrize("kind", ["vlae", "vae"])
def test_image_only_models_refuse_vector_data(kind):
    with pytest.raises(ValueError, match=r"needs image data \(C, H, W\).*'hvae', 'hvae-ar'"):
        get_model(kind, vector())


def test_wrong_data_shape_is_named():
    model, guide = get_model("hvae", vector()), get_guide("hvae", vector())
    with pytest.raises(ValueError, match=r"data shape \(7,\) does not match the preset's image shape \(6,\)"):
        guide(torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"batch of shape \(N, 6\)"):
        guide()
    assert model(batch_size=2).shape == (2, D)


def test_image_configs_keep_their_networks():
    """The affine option changes only the latent conditionals of image models; the convolutions stay."""
    cfg = dataclasses.replace(ModelConfig(image_shape=(1, 16, 16), channels=(4,), hidden=8), conditionals="affine")
    model, guide = get_model("hvae", cfg), get_guide("hvae", cfg)
    assert isinstance(model.conditionals[0], AffineGaussian)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in model.decoder.modules())
    assert any(isinstance(m, nn.Conv2d) for m in guide.conditionals[0].modules())
    pyro.clear_param_store()
    assert math.isfinite(Trace_ELBO().loss(model, guide, torch.rand(3, 1, 16, 16)))
