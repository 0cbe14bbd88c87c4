"""Presets are data: JSON round trips, matched capacity across model kinds, clear shape errors."""

import json

import pytest

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
    assert get_preset("mnist-paper").model.to_dict() | {"name": "mnist"} == m.to_dict()


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
    ],
    ids=["size", "latents", "likelihood", "injection", "scale"],
)
def test_bad_architectures_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
