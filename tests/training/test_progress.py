"""Per-run reporting: per-layer KLs against the closed form, metrics records and their truncation on resume."""

import json

import pytest
import torch

from pyro_vlae.presets import get_preset
from pyro_vlae.training.progress import layer_kls, log_record, postfix, truncate_metrics
from pyro_vlae.training.runs import RunConfig, build


def test_layer_kls_match_analytic_kl_for_vlae():
    """For the VLAE the prior is N(0, I): the Monte Carlo per-layer KL averages to the closed form."""
    cfg = get_preset("tiny").model
    model, guide, _, _ = build(RunConfig("vlae", "synthetic", "tiny", cfg, get_preset("tiny").train), "cpu")
    model.eval(), guide.eval()
    x = torch.rand(1, *cfg.image_shape).expand(4000, -1, -1, -1)
    mc = layer_kls(model, guide, x)
    with torch.no_grad():
        posterior = guide.posterior(x[:1])
    for l, (loc, scale) in enumerate(posterior, start=1):
        exact = float((0.5 * (scale**2 + loc**2 - 1) - scale.log()).sum())
        assert mc[f"z{l}"] == pytest.approx(exact, abs=0.05 + 0.05 * exact)


def test_truncate_metrics(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s}) + "\n" for s in (5, 10, 15)) + '{"step": 2')
    truncate_metrics(str(p), 10)
    assert [json.loads(s)["step"] for s in p.read_text().splitlines()] == [5, 10]


def test_log_record_is_consistent_and_leaves_training_mode():
    p = get_preset("tiny")
    model, guide, _, _ = build(RunConfig("hvae", "synthetic", "tiny", p.model, p.train), "cpu")
    model.train(), guide.train()
    x = torch.rand(8, *p.model.image_shape)
    rec = log_record(model, guide, x, step=3, loss=80.0, kl_scale=0.5, img_per_s=100.0, elapsed=1.0)
    kls = [rec[f"kl_{s}"] for s in model.latent_sites]
    assert rec["loss"] == 10.0 and rec["elbo"] == pytest.approx(rec["recon"] - sum(kls))
    assert model.training and guide.training, "logging must not leave the nets in eval mode"
    assert set(postfix(rec)) == {"loss", "elbo", "img/s", *model.latent_sites}
