"""Presets are data: JSON round trips, matched capacity across model kinds, clear shape errors."""

import json

import pytest
from torch import nn

from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.nets import ModelConfig
from pyro_vlae.presets import PRESETS, TrainConfig, check_image_shape, default_preset_name, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    p = get_preset(name)
    assert ModelConfig.from_dict(json.loads(json.dumps(p.model.to_dict()))) == p.model
    assert TrainConfig.from_dict(json.loads(json.dumps(p.train.to_dict()))) == p.train


def test_reference_sizes_follow_the_paper_code():
    m = get_preset("mnist").model
    assert (m.channels, m.hidden, m.latent_dims, m.obs_scale) == ((64, 128), 1024, (2, 2, 2), 1 / 8)
    assert get_preset("svhn").model.latent_dims == (5, 5, 5, 10)
    assert get_preset("celeba").model.latent_dims == (10, 10, 10, 10)
    paper = get_preset("mnist-paper").model
    assert (paper.channels, paper.hidden, paper.latent_dims, paper.obs_scale) == ((64, 128), 1024, (2, 2, 2), 1 / 8)


# The reference code's MNIST VLAE (vladder.py "vladder_mnist" with vladder_small.SmallLayers), layer by layer, in
# TensorFlow's conventions: every dense and conv layer has a bias; contrib batch_norm adds a shift (beta) and no scale.
def _fc(i, o, bn=True):
    return i * o + o + (o if bn else 0)


def _conv(i, o, bn=True, k=4):
    return k * k * i * o + o + (o if bn else 0)


def _reference_counts(codes=(2, 2, 2), cs=(1, 64, 128, 1024), fs=7):
    H, flat = cs[3], fs * fs * cs[2]
    conv_stack = _conv(cs[0], cs[1]) + _conv(cs[1], cs[2])
    gate = H  # combine_noise(method="gated_add"): one gate per unit
    generative = (
        _fc(codes[2], H) + _fc(H, H) + _fc(H, H, bn=False)  # generative2 on z3
        + _fc(codes[1], H) + gate + 2 * _fc(H, H) + _fc(H, H, bn=False)  # generative1: fc_bn_relu(z2), gate, 2 fc, fc
        + _fc(codes[0], H) + gate + _fc(H, flat)  # generative0: fc_bn_lrelu(z1), gate, fc to 7x7x128
        + _conv(cs[2], cs[1]) + _conv(cs[1], cs[0], bn=False)  # conv2d_t_bn_relu, output conv2d_transpose
    )  # fmt: skip
    heads = lambda i, z: 2 * _fc(i, z, bn=False)  # noqa: E731  mean and stddev
    inference = (
        conv_stack + heads(flat, codes[0])  # ladder0
        + conv_stack + _fc(flat, H, bn=False)  # inference0
        + 2 * _fc(H, H) + heads(H, codes[1])  # ladder1
        + 2 * _fc(H, H) + _fc(H, H, bn=False)  # inference1
        + 2 * _fc(H, H) + heads(H, codes[2])  # ladder2
    )  # fmt: skip
    return generative, inference


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_mnist_paper_has_the_reference_networks_parameter_counts():
    gen, inf = _reference_counts()
    assert (gen, inf) == (11_832_705, 14_075_148)  # the counts the preset's description states
    cfg = get_preset("mnist-paper").model
    assert (_count(get_model("vlae", cfg)), _count(get_guide("vlae", cfg))) == (gen, inf)


def test_mnist_paper_activations_batch_norm_and_schedule_are_the_references():
    p = get_preset("mnist-paper")
    model, guide = get_model("vlae", p.model), get_guide("vlae", p.model)
    acts = lambda m, kind: sum(isinstance(a, kind) for a in m.modules())  # noqa: E731
    # Generative: leaky ReLU after fc_bn_lrelu(z1) and conv2d_t_bn_relu (whose body applies lrelu); ReLU after the
    # other 2 + 1 + 2 + 1 dense blocks (generative2, v2, generative1, the fc to 7x7x128).  Inference: lrelu only.
    assert (acts(model, nn.LeakyReLU), acts(model, nn.ReLU)) == (2, 6)
    assert (acts(guide, nn.LeakyReLU), acts(guide, nn.ReLU)) == (10, 0)
    assert all(a.negative_slope == 0.1 for a in [*model.modules(), *guide.modules()] if isinstance(a, nn.LeakyReLU))
    bns = [m for m in [*model.modules(), *guide.modules()] if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all((b.eps, b.momentum) == pytest.approx((1e-3, 1 - 0.999)) for b in bns)  # contrib defaults
    t = p.train
    assert (t.lr, t.batch_size, t.anneal, t.elbo, t.fade_in) == (2e-4, 100, "exp:2000", "meanfield", 0)


def test_preset_descriptions_claim_no_bare_exactness():
    for name, preset in PRESETS.items():
        assert "exactly" not in preset.description, name
    assert "Unlike it:" in PRESETS["mnist-paper"].description


def test_configs_saved_before_the_reference_options_load_as_before():
    saved = get_preset("mnist").model.to_dict()
    for key in ("inference", "reference_activations", "bn_eps", "bn_momentum"):
        saved.pop(key)
    cfg = ModelConfig.from_dict(saved)
    assert (cfg.inference, cfg.reference_activations, cfg.bn_eps, cfg.bn_momentum) == ("trunk", False, 1e-5, 0.1)


def test_get_preset_returns_a_copy():
    p = get_preset("tiny")
    p.train.num_steps = 123456
    assert get_preset("tiny").train.num_steps != 123456


def test_defaults_depend_on_device():
    assert default_preset_name("mnist", cuda=False) == "mnist-cpu"
    assert default_preset_name("mnist", cuda=True) == "mnist"
    assert default_preset_name("synthetic", cuda=False) == "tiny"


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(1, 28, 28\)"):
        check_image_shape(get_preset("mnist").model, (3, 32, 32), "svhn")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_shape": (1, 30, 30), "channels": (8, 16)}, "not divisible"),
        ({"latent_dims": ()}, "latent_dims"),
        ({"likelihood": "poisson"}, "likelihood must be"),
        ({"noise_injection": "sum"}, "noise_injection"),
        ({"obs_scale": 0.0}, "obs_scale"),
        ({"inference": "ladder"}, "inference must be"),
        ({"bn_momentum": 0.0}, "bn_momentum"),
    ],
    ids=["size", "latents", "likelihood", "injection", "scale", "inference", "bn-momentum"],
)
def test_bad_architectures_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
