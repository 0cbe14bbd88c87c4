"""Collapse detection of Gibbs chains: a chain stuck on black images, on one or two digits, or on one mean image whose
binary draws it feeds back, is flagged, in eval.json, in report.md and in the run's summary line; a chain whose states
are real data images (grey or binarised) is not."""

import dataclasses
import math

import pyro
import pytest
import torch
from torch import nn

from pyro_vlae.data.loaders import make_synthetic
from pyro_vlae.evaluation import collapse as C
from pyro_vlae.evaluation import diagnostics as D
from pyro_vlae.evaluation import report as R
from pyro_vlae.guides import get_guide
from pyro_vlae.models import get_model
from pyro_vlae.presets import get_preset
from pyro_vlae.training.runs import RunConfig


class TemplateClassifier(nn.Module):
    """Logits ``<x, mean image of class k>``: a fixed nearest-template classifier of the synthetic bars."""

    def __init__(self, x, y):
        super().__init__()
        means = torch.stack([x[y == k].mean(0).flatten() for k in range(10)])
        self.w = nn.Parameter(means - means.mean(1, keepdim=True), requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.w.T

    def features(self, x):  # the Fréchet distance's feature space: the logits
        return self.forward(x)


@pytest.fixture(scope="module")
def bars():
    x, y = make_synthetic(600, seed=0)
    return x, y, TemplateClassifier(x, y)


def test_template_classifier_reads_the_bars(bars):
    x, y, clf = bars
    assert (clf(x).argmax(-1) == y).double().mean() > 0.95


def test_black_chain_is_flagged(bars):
    x, _, clf = bars
    out = D.chain_collapse(torch.zeros(200, 1, 16, 16), x, clf)
    assert out["collapsed"]
    assert out["spread_ratio"] == 0.0 and out["class_entropy"] == 0.0
    assert any("principal directions" in r for r in out["reasons"]) and any(
        "class entropy" in r for r in out["reasons"]
    )


def test_chain_of_real_data_is_not_flagged(bars):
    x, _, clf = bars
    out = D.chain_collapse(x[:300], x[300:], clf, fd=12.0, fd_baseline=10.0)
    assert not out["collapsed"] and out["reasons"] == []
    assert out["spread_ratio"] == pytest.approx(1.0, abs=0.15)
    assert out["class_entropy_ratio"] == pytest.approx(1.0, abs=0.05)
    assert out["fd_ratio"] == pytest.approx(1.2)
    assert out["mode_images"] == 300 and out["modes_ratio"] == pytest.approx(1.0, abs=0.05)
    assert out["distinct_modes"] > 250 and out["duplicate_rate"] < 0.1


@pytest.mark.parametrize("modes", [1, 6, 20], ids=["1", "6", "20"])
def test_chain_stuck_on_a_few_images_is_flagged_by_its_distinct_modes(bars, modes):
    """Issue 29 item 10: 256 states that are ``modes`` data images repeated (each copy jittered far below the data's
    own nearest-neighbour distance), with no classifier and no Fréchet distance. Six or twenty images keep most of
    the data's spread along its principal directions, so the spread check passes them; the count of distinct modes
    (states within the data's 5 % nearest-neighbour distance of each other are one mode) does not."""
    x, _, _ = bars
    g = torch.Generator().manual_seed(modes)
    states = x[torch.arange(256) % modes] + 0.01 * torch.randn(256, 1, 16, 16, generator=g)
    out = C.chain_collapse(states, x[300:])
    assert out["collapsed"]
    assert out["distinct_modes"] == modes and out["reference_distinct_modes"] > 200 and out["mode_images"] == 256
    assert out["duplicate_rate"] == 1.0  # every state has a twin
    assert any(f"distinct modes {modes} among 256 states" in r for r in out["reasons"])
    if modes > 1:
        assert out["spread_ratio"] > C.COLLAPSE_SPREAD_RATIO  # the check that was there before sees nothing


def test_smooth_states_are_counted_against_smooth_samples():
    """Mean images are smoother than data images, so they crowd closer together: blurred data images (a healthy
    set of smooth images) form a seventh of the modes of as many data images at the data's radius, as the ancestral
    mean images of a shapes3d VLAE did (36 of 249). Against as many independent images of their own kind (the
    Gibbs verdict passes ancestral mean images) they are not flagged, and twenty repeated ones still are."""
    x, _ = make_synthetic(900, seed=0)
    blur = lambda t: nn.functional.avg_pool2d(t, 3, 1, 1)  # noqa: E731
    smooth, reference, baseline = blur(x[:256]), x[300:], blur(x[600:856])
    assert C.chain_collapse(smooth, reference)["modes_ratio"] < 0.2  # against data images: a false alarm
    out = C.chain_collapse(smooth, reference, baseline=baseline)
    assert not out["collapsed"] and out["modes_ratio"] > 0.9 and out["modes_reference"] == "baseline"
    stuck = C.chain_collapse(blur(x[torch.arange(256) % 20]), reference, baseline=baseline)
    assert stuck["collapsed"] and stuck["distinct_modes"] == 20
    assert any("among as many independent samples" in r for r in stuck["reasons"])


def test_distinct_modes_of_exact_copies_and_of_too_few_images():
    """Exact copies are one mode whatever the data's duplicate distance (it may be 0 when the data repeat images);
    fewer than :data:`MIN_MODE_IMAGES` states are not judged."""
    ref = torch.rand(100, 8, generator=torch.Generator().manual_seed(0))
    out = C.distinct_modes(ref[:3].repeat(30, 1), torch.cat([ref[:10]] * 10))  # data: 10 images, each 10 times
    assert out["duplicate_radius"] == 0.0 and out["distinct_modes"] == 3 and out["reference_distinct_modes"] == 10
    small = C.chain_collapse(ref[:1].repeat(5, 1), ref)
    assert small["distinct_modes"] is None and not any("modes" in r for r in small["reasons"])


def test_chain_stuck_on_two_digits_is_flagged_by_class_entropy(bars):
    """Real images of classes 0 and 1 only, in equal numbers: entropy log 2 against log 10 for balanced classes."""
    x, y, clf = bars
    two = x[(y == 0) | (y == 1)]
    out = D.chain_collapse(two, x, clf)
    assert out["class_entropy"] == pytest.approx(math.log(2), abs=0.01)
    assert out["data_class_entropy"] == pytest.approx(math.log(10), abs=0.02)
    assert out["collapsed"] and any("class entropy" in r for r in out["reasons"])


def test_blown_up_frechet_distance_is_flagged(bars):
    x, _, _ = bars
    assert D.chain_collapse(x[:300], x[300:], fd=400.0, fd_baseline=100.0)["collapsed"]
    assert not D.chain_collapse(x[:300], x[300:], fd=250.0, fd_baseline=100.0)["collapsed"]


def _pixel_variance(x):
    return x.flatten(1).var(0, unbiased=False).mean().item()


def test_binary_chain_stuck_on_one_mean_image_is_flagged(bars):
    """Binary MNIST-like states: a chain stuck on one blurry image feeds back binary draws of it. Each 0/1 pixel has
    variance m (1 - m) whatever the images are, so the pixel variance is the data's (the check this one replaces saw
    nothing); along the data's principal directions the independent draws have a small fraction of the data's spread.
    No classifier and no Fréchet distance: the spread alone must tell."""
    x, _, _ = bars
    g = torch.Generator().manual_seed(0)
    data = torch.bernoulli(x, generator=g)  # binarised data: the reference, and a sound chain's states
    stuck = torch.bernoulli(x.mean(0).expand(300, -1, -1, -1), generator=g)
    reference = data[300:]
    assert _pixel_variance(stuck) / _pixel_variance(reference) == pytest.approx(1.0, abs=0.05)
    out = D.chain_collapse(stuck, reference)
    assert out["collapsed"] and out["spread_ratio"] < 0.2
    assert any("principal directions" in r for r in out["reasons"])
    sound = D.chain_collapse(data[:300], reference)
    assert not sound["collapsed"] and sound["spread_ratio"] > 0.8


def test_spread_along_known_directions():
    """Data varying along one axis only: its top direction is that axis; states with the same spread along it score
    1, states varying only along another axis score 0."""
    g = torch.Generator().manual_seed(1)
    ref = torch.zeros(500, 4)
    ref[:, 0] = 2.0 * torch.randn(500, generator=g)
    states = torch.zeros(400, 4)
    states[:, 0] = 2.0 * torch.randn(400, generator=g)
    out = D.chain_collapse(states, ref)
    assert out["data_spread"] == pytest.approx(ref[:, 0].var(unbiased=False).item(), rel=1e-6)
    assert out["spread_ratio"] == pytest.approx(1.0, abs=0.2) and not out["collapsed"]
    other = torch.zeros(400, 4)
    other[:, 1] = 2.0 * torch.randn(400, generator=g)
    assert D.chain_collapse(other, ref)["spread_ratio"] == pytest.approx(0.0, abs=1e-9)


def test_class_entropy_closed_form():
    pred = torch.tensor([0, 0, 1, 2])  # frequencies 1/2, 1/4, 1/4
    assert C.class_entropy(pred, 10) == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))


def _black_decoder_pair():
    """The tiny HVAE with a decoder whose mean image is black whatever z1: its Gibbs chain collapses at once."""
    pyro.clear_param_store()
    cfg = dataclasses.replace(get_preset("tiny").model, likelihood="gaussian", obs_scale=1e-3)
    model, guide = get_model("hvae", cfg), get_guide("hvae", cfg)
    last = [m for m in model.decoder.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-30.0)  # sigmoid(-30): black
    return model, guide, RunConfig("hvae", "synthetic", "tiny", cfg, get_preset("tiny").train)


def test_collapsed_chain_reaches_eval_json_report_and_summary(bars):
    x, _, clf = bars
    model, guide, config = _black_decoder_pair()
    gibbs = D.gibbs_diagnostics(model, guide, config, x[:100], classifier=clf, num_chains=4, num_steps=8)
    assert gibbs["collapse_detected"] is True
    assert gibbs["chains"]["z1"]["collapse"]["collapsed"]
    text = "\n".join(R._gibbs_section(gibbs))
    assert "collapsed" in text and "not converged" in text
    assert "COLLAPSED" in D.collapse_summary(gibbs)


def test_healthy_gibbs_block_reads_as_not_collapsed(bars):
    """The block is what the verdict writes for a healthy chain (states: real data images), so the report reads the
    keys the verdict writes today: no collapse, and its spread and modes ratios in the table."""
    x, _, _ = bars
    collapse = C.chain_collapse(x[:300], x[300:])
    block = {"max_rhat": 1.01, "collapse": collapse}
    gibbs = {"num_chains": 8, "chains": {"z1": block}, "collapse_detected": False}
    text = "\n".join(R._gibbs_section(gibbs))
    assert "No collapse detected" in text and "collapsed (" not in text and "COLLAPSED" not in text
    row = f"| z1 | 1.010 | {R.fmt(collapse['spread_ratio'])} | {R.fmt(collapse['modes_ratio'])} | no |"
    assert "| chain keeps | max R-hat | spread ratio | modes ratio | collapsed |" in text and row in text
    assert "modes below 0.5" in text
    assert D.collapse_summary(gibbs).startswith("Gibbs chains: no collapse detected")
    assert D.collapse_summary({"num_chains": 8}) is None  # an eval.json from before the check


def test_gibbs_block_of_an_older_run_shows_its_pixel_variance_ratio():
    """Runs evaluated before the spread check wrote ``pixel_variance_ratio``; the report still shows it."""
    block = {"max_rhat": 1.01, "collapse": {"collapsed": False, "reasons": [], "pixel_variance_ratio": 0.9}}
    text = "\n".join(R._gibbs_section({"num_chains": 8, "chains": {"z1": block}}))
    assert "| z1 | 1.010 | 0.9000 | no |" in text and "No collapse detected" in text
