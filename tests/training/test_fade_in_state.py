"""The fade-in state (the VLAE's ladder gains) is part of the checkpoint: every path that loads a run gets the model
that was trained, also when the checkpoint was taken in the middle of a fade-in."""

import argparse
import dataclasses

import pyro
import pytest
import torch

from pyro_vlae import evaluate as E
from pyro_vlae import run as R
from pyro_vlae.data import load_data
from pyro_vlae.evaluation import pipeline
from pyro_vlae.presets import get_preset
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR
from pyro_vlae.training.checkpoint import load_checkpoint, save_checkpoint

FADE_IN, STEPS = 4, 12  # tiny has 3 layers: z2 ramps in over steps [4, 8), z1 over [8, 12)


def config():
    p = get_preset("tiny")
    train = dataclasses.replace(
        p.train, num_steps=STEPS, fade_in=FADE_IN, log_every=4, checkpoint_every=2, keep_every=6
    )
    return TR.RunConfig("vlae", "synthetic", "tiny", p.model, train, seed=3, data_dir="unused")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run whose last step (index 11) took z1's gain to (11 - 8) / 4 = 0.75: past the middle of its fade-in."""
    run_dir = tmp_path_factory.mktemp("fade") / "run"
    bundle = load_data("synthetic", "unused", 16)
    pyro.set_rng_seed(0)
    result = T.fit(config(), bundle, str(run_dir), "cpu", progress=False)
    return str(run_dir), result, bundle


@torch.no_grad()
def generated(model, n=16):
    """Mean images of ``n`` seeded draws from the prior (eval mode)."""
    model.eval()
    pyro.set_rng_seed(123)
    return model(batch_size=n)


def test_the_trained_model_ends_inside_the_fade_in(trained):
    _, result, _ = trained
    assert result.step == STEPS and result.model.ladder_gain.tolist() == [0.75, 1.0]  # [z1, z2]
    ones = TR.load_run(trained[0])[0]
    ones.ladder_gain.fill_(1.0)  # what loading gave before the gains were saved
    assert not torch.allclose(generated(ones), generated(result.model), atol=1e-3)  # the gains matter


def test_load_run_generates_the_images_of_the_in_process_model(trained):
    run_dir, result, _ = trained
    model, _, _, state = TR.load_run(run_dir)
    assert state["step"] == STEPS and model.ladder_gain.tolist() == [0.75, 1.0]
    assert torch.equal(generated(model), generated(result.model))


def test_a_kept_checkpoint_from_the_middle_of_the_fade_in_reloads_with_its_gains(trained):
    # step6.pt follows step index 5: z2 is a quarter faded in, z1 not at all.
    model, _, _, state = TR.load_run(trained[0], checkpoint="step6.pt")
    assert state["step"] == 6 and model.ladder_gain.tolist() == [0.0, 0.25]


def _write_old_format(run_dir, tmp_path, name):
    """A copy of the run whose checkpoint lacks the gains, as checkpoints written before they were saved."""
    state = load_checkpoint(f"{run_dir}/checkpoints/{name}")
    del state["model"]["ladder_gain"]
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    save_checkpoint(str(old / "checkpoints" / "latest.pt"), state)
    return str(old), state


@pytest.mark.parametrize("name, gains", [("latest.pt", [0.75, 1.0]), ("step6.pt", [0.0, 0.25])], ids=["12", "6"])
def test_checkpoints_without_saved_gains_get_them_from_the_step(trained, tmp_path, name, gains):
    old, _ = _write_old_format(trained[0], tmp_path, name)
    model, _, _, _ = TR.load_run(old)
    assert model.ladder_gain.tolist() == gains
    if name == "latest.pt":
        assert torch.equal(generated(model), generated(trained[1].model))


def test_a_checkpoint_without_saved_gains_resumes(trained, tmp_path):
    old, state = _write_old_format(trained[0], tmp_path, "step6.pt")
    resumed = T.fit(config(), trained[2], old, "cpu", resume=state, progress=False)
    assert resumed.step == STEPS and resumed.model.ladder_gain.tolist() == [0.75, 1.0]
    assert torch.equal(generated(resumed.model), generated(trained[1].model))  # the resume is exact


def test_a_forced_resume_without_fade_in_sets_every_gain_to_one(trained, tmp_path):
    # The checkpoint holds gains below 1; a resume that turns the fade-in off must not keep them.
    old, state = _write_old_format(trained[0], tmp_path, "step6.pt")
    cfg = config()
    cfg.train = dataclasses.replace(cfg.train, fade_in=0, num_steps=7)
    assert T.fit(cfg, trained[2], old, "cpu", resume=state, progress=False).model.ladder_gain.tolist() == [1.0, 1.0]


def _capture(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that records the model it is given, then calls the original (except for
    ``write_figures``: drawing every figure takes a minute, and only the model it would draw matters here)."""
    real, seen = getattr(module, name), []

    def wrapper(*args, **kwargs):
        if name == "write_figures":
            seen.append(args[1])
            return []
        seen.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


def test_visualize_only_draws_the_trained_model(trained, monkeypatch):
    seen = _capture(monkeypatch, R, "write_figures")
    assert R.main(["--visualize-only", trained[0], "--device", "cpu"]) == 0
    assert torch.equal(generated(seen[0]), generated(trained[1].model))


def test_end_of_run_figures_and_test_elbo_use_the_trained_model(trained, monkeypatch):
    run_dir, result, bundle = trained
    figures = _capture(monkeypatch, R, "write_figures")
    elbo = _capture(monkeypatch, R, "evaluate_elbo")
    args = argparse.Namespace(no_figures=False, no_eval=True, eval_samples=2)
    assert R._finish(run_dir, config(), bundle, result, "cpu", args) == 0
    assert torch.equal(generated(figures[0]), generated(result.model))
    assert torch.equal(generated(elbo[0]), generated(result.model))


def test_python_m_evaluate_measures_the_trained_model(trained, monkeypatch):
    seen = _capture(monkeypatch, pipeline, "likelihood_block")
    argv = [trained[0], "--num-samples", "2", "--max-images", "16", "--device", "cpu", "--no-classifier"]
    assert E.main([*argv, "--no-diagnostics"]) == 0
    assert torch.equal(generated(seen[0]), generated(trained[1].model))
