"""The shipped pretrained VLAE and digit classifier (pyro_vlae/pretrained/), and the export that regenerates them."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess

import pytest
import torch
from pyro import poutine

import pyro_vlae as pv
from pyro_vlae import pretrained as P
from pyro_vlae.data import DatasetError
from pyro_vlae.evaluation.classifier import predict
from pyro_vlae.guides.vlae import VLAEGuide
from pyro_vlae.models.vlae import VLAEModel
from pyro_vlae.pretrained import export as E
from pyro_vlae.pretrained import provenance
from pyro_vlae.training.runs import RunConfig, build, load_run, save_run_checkpoint, write_config


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def pair():
    return pv.load_pretrained("vlae-mnist")


def test_shipped_entries_carry_their_provenance():
    assert {"vlae-mnist", "mnist-classifier"} <= set(P.available())
    meta = P.info("vlae-mnist")
    assert meta["command"].startswith("python -m pyro_vlae.run --model vlae")
    assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"])
    for stage in ("trained_at", "exported_at"):  # the weights come from committed code, exported by committed code
        assert re.fullmatch(r"[0-9a-f]{40}", meta[stage]["commit"]) and meta[stage]["dirty"] == [], stage
    assert meta["trained_at"]["commit"] == meta["commit"] and "/tmp/" not in meta["command"]
    assert meta["config"]["preset"] == "mnist-cpu" and meta["trained_steps"] == meta["config"]["train"]["num_steps"]
    assert meta["ladder_gain"] == [1.0, 1.0]  # the fade-in is over at the end of the run
    lik = meta["evaluation"]["likelihood"]
    assert lik["iwae"] >= lik["elbo"]  # an importance-sampled bound is never below the ELBO
    for name in ("vlae-mnist", "mnist-classifier"):
        with open(os.path.join(P.FOLDER, name + ".pt"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == P.info(name)["sha256"]
    effect = meta["half_precision_effect"]
    if meta["dtype"] != "float32":  # half precision was kept only within one 8-bit grey level of the float32 means
        assert max(effect["prior_means"]["max_abs_diff"], effect["reconstructions"]["max_abs_diff"]) <= 1 / 255


def test_load_pretrained_offline_gives_a_plain_vlae_pair(offline):
    model, guide = pv.load_pretrained("vlae-mnist")
    assert isinstance(model, VLAEModel) and isinstance(guide, VLAEGuide)
    assert not model.training and not guide.training
    assert model.latent_sites == ["z1", "z2", "z3"]
    assert torch.equal(model.ladder_gain, torch.ones(2))
    assert all(p.dtype == torch.float32 for p in [*model.parameters(), *guide.parameters()])
    images = poutine.condition(model, data={"z3": torch.zeros(4, 2)})(batch_size=4)
    assert images.shape == (4, 1, 28, 28) and 0 <= images.min() and images.max() <= 1


def test_ladder_gains_are_set_explicitly_by_the_loader(monkeypatch):
    """Whatever a fresh model's gains start at, the loaded model has the trained ones (all 1)."""
    build = P.get_model

    def zero_gains(*args, **kwargs):
        m = build(*args, **kwargs)
        m.ladder_gain.zero_()
        return m

    monkeypatch.setattr(P, "get_model", zero_gains)
    model, _ = pv.load_pretrained("vlae-mnist")
    assert torch.equal(model.ladder_gain, torch.ones(2))


@torch.no_grad()
def test_outputs_are_deterministic_given_the_codes(pair):
    model, _ = pair
    g = torch.Generator().manual_seed(0)
    codes = {s: torch.randn(16, 2, generator=g) for s in model.latent_sites}
    first = poutine.condition(model, data=codes)(batch_size=16)
    again = poutine.condition(model, data=codes)(batch_size=16)
    fresh, _ = pv.load_pretrained("vlae-mnist")
    other = poutine.condition(fresh, data=codes)(batch_size=16)
    assert torch.equal(first, again) and torch.equal(first, other)
    alone = poutine.condition(model, data={s: c[:1] for s, c in codes.items()})(batch_size=1)
    assert torch.allclose(alone, first[:1], atol=1e-6)  # eval mode: an image does not depend on its batch


@pytest.mark.parametrize("seed", [0, 1])
def test_top_layer_changes_the_digit_far_more_often_than_the_bottom(pair, seed):
    """The paper's Fig. 5 claim with the shipped classifier: resampling z3 alone changes the predicted class at least
    twice as often as resampling z1 alone (each image against the first of its group; 256 groups of 4).

    Over seeds 0-5 the rates average 0.24 (z1, 0.21-0.25) and 0.87 (z3, 0.85-0.88), a ratio of 3.5-4.1; with 768
    comparisons per layer the rates spread by about 0.02 between seeds, so a ratio of 2 leaves many of those."""
    model, _ = pair
    clf = P.load_classifier()
    rates = {}
    for site in ("z1", "z3"):
        g = torch.Generator().manual_seed(seed)
        imgs = pv.intervene_layer(model, site, num_groups=256, num_samples=4, generator=g)
        classes = predict(clf, imgs.flatten(0, 1)).reshape(256, 4)
        rates[site] = (classes[:, 1:] != classes[:, :1]).double().mean().item()
    assert rates["z3"] >= 2 * rates["z1"], rates


def test_shipped_classifier_is_accurate_on_mnist_test_images():
    try:
        bundle = pv.load_data("mnist", "data", 100)
    except DatasetError as e:
        pytest.skip(f"MNIST is not available here: {e}")
    x, y = bundle.tensors("test")
    clf = P.load_classifier("mnist-classifier")
    acc = (predict(clf, x[:2000]) == y[:2000]).double().mean().item()
    assert acc >= 0.98  # a two-block CNN reaches 99 % on MNIST


def test_bad_names_and_altered_files_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(P.PretrainedError, match="no pretrained entry 'vlae-svhn'; available: .*vlae-mnist"):
        pv.load_pretrained("vlae-svhn")
    with pytest.raises(P.PretrainedError, match="is a 'classifier' entry"):
        pv.load_pretrained("mnist-classifier")
    for f in ("vlae-mnist.pt", "vlae-mnist.json"):
        shutil.copy(os.path.join(P.FOLDER, f), tmp_path / f)
    data = bytearray((tmp_path / "vlae-mnist.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (tmp_path / "vlae-mnist.pt").write_bytes(bytes(data))
    monkeypatch.setattr(P, "FOLDER", str(tmp_path))
    with pytest.raises(P.PretrainedError, match="does not match the SHA-256"):
        pv.load_pretrained("vlae-mnist")


def test_the_hash_is_checked_on_the_bytes_that_are_loaded(tmp_path, monkeypatch):
    """The file is read once: replacing it between the SHA-256 check and the load (another valid file, as a
    concurrent reinstall would) cannot slip unchecked weights in."""
    for f in ("vlae-mnist.pt", "vlae-mnist.json"):
        shutil.copy(os.path.join(P.FOLDER, f), tmp_path / f)
    monkeypatch.setattr(P, "FOLDER", str(tmp_path))
    original = torch.load(tmp_path / "vlae-mnist.pt", weights_only=True)
    swapped = {**original, "guide": {k: torch.zeros_like(v) for k, v in original["guide"].items()}}
    real_load = torch.load

    def swap_then_load(f, *args, **kwargs):
        torch.save(swapped, tmp_path / "vlae-mnist.pt")  # the file changes after it was hashed
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(P.torch, "load", swap_then_load)
    _, guide = pv.load_pretrained("vlae-mnist")
    for k, v in guide.state_dict().items():
        assert torch.equal(v, original["guide"][k].float()), k


def finished_tiny_run(tmp_path):
    """A finished 4-step (untrained) tiny VLAE run on synthetic data; returns ``(run_dir, model, guide, optim,
    config)``."""
    preset = pv.get_preset("tiny")
    train = dataclasses.replace(preset.train, num_steps=4, fade_in=1)
    config = RunConfig("vlae", "synthetic", "tiny", preset.model, train, data_dir=str(tmp_path))
    model, guide, optim, _ = build(config, "cpu")
    run = str(tmp_path / "run")
    save_run_checkpoint(run, model, guide, optim, 4, config)
    argv = ["/somewhere/pyro_vlae/run.py", "--dataset", "synthetic", "--fade-in", "1", "--run-dir", "/scratch/x/tiny"]
    write_config(run, config, argv=argv)
    return run, model, guide, optim, config


def git(repo, *args):
    return subprocess.run(
        ["git", "-c", "user.email=test@example.com", "-c", "user.name=test", *args],
        cwd=repo, capture_output=True, check=True,
    ).stdout  # fmt: skip


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A git checkout with one committed source file and a committed shipped entry, standing in for the repository
    the export runs from; returns its folder."""
    repo = tmp_path / "repo"
    (repo / "pretrained").mkdir(parents=True)
    (repo / "nets.py").write_text("x = 1\n")
    (repo / "pretrained" / "tiny-vlae.json").write_text("{}\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "start")
    monkeypatch.setattr(provenance, "CHECKOUT", str(repo))
    return repo


def test_export_refuses_a_dirty_checkout_unless_allowed_and_then_records_the_diff(tmp_path, checkout, capsys):
    run = finished_tiny_run(tmp_path)[0]
    out = checkout / "pretrained"
    argv = [run, "--name", "tiny-vlae", "--no-classifier", "--out", str(out)]
    head = git(checkout, "rev-parse", "HEAD").decode().strip()
    (out / "tiny-vlae.json").write_text('{"old": 1}\n')  # the export's own output: overwritten, not code
    assert E.main(argv) == 0, capsys.readouterr().err
    meta = json.loads((out / "tiny-vlae.json").read_text())
    clean = {"commit": head, "dirty": [], "diff_sha256": None}
    assert meta["exported_at"] == clean and meta["commit"] == head and meta["dirty"] == []
    assert meta["trained_at"]["commit"] == head and "no --commit" in meta["trained_at"]["source"]

    git(checkout, "add", ".")
    git(checkout, "commit", "-q", "-m", "export")  # the outputs committed: the whole diff below is nets.py's
    head = git(checkout, "rev-parse", "HEAD").decode().strip()
    (checkout / "nets.py").write_text("x = 2\n")  # an uncommitted change to code
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert E.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "uncommitted changes in nets.py" in err and "--allow-dirty" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing is written"

    diff = hashlib.sha256(git(checkout, "diff", "--binary", "HEAD")).hexdigest()  # before the outputs change
    assert E.main([*argv, "--allow-dirty"]) == 0
    meta = json.loads((out / "tiny-vlae.json").read_text())
    assert meta["exported_at"] == {"commit": head, "dirty": ["nets.py"], "diff_sha256": diff}


def test_export_names_the_commit_that_trained_the_run(tmp_path, checkout, capsys):
    run = finished_tiny_run(tmp_path)[0]
    argv = [run, "--name", "tiny-vlae", "--no-classifier", "--out", str(checkout / "pretrained"), "--commit", "a" * 40]
    assert E.main([*argv, "--dirty", "models/vlae.py"]) == 2
    assert "trained with uncommitted changes in models/vlae.py" in capsys.readouterr().err
    assert E.main(argv) == 0
    meta = json.loads((checkout / "pretrained" / "tiny-vlae.json").read_text())
    assert meta["commit"] == "a" * 40 and meta["trained_at"]["dirty"] == []
    assert meta["exported_at"]["commit"] == git(checkout, "rev-parse", "HEAD").decode().strip()


def test_export_round_trip_matches_the_run(tmp_path, monkeypatch):
    """A finished (tiny, untrained) run exported with every weight in half precision loads back within the recorded
    (and tolerated) difference of the run's float32 model; an unfinished run is refused."""
    run, model, guide, optim, config = finished_tiny_run(tmp_path)
    monkeypatch.setattr(E, "HALF_MIN_NUMEL", 1)
    x = pv.load_data("synthetic", str(tmp_path), 16).tensors("test")[0][:64]
    out = tmp_path / "out"
    out.mkdir()
    E.export_model(run, str(out), "tiny-vlae", {"commit": "0" * 40, "dirty": []}, x)
    meta = json.loads((out / "tiny-vlae.json").read_text())
    assert meta["command"] == "python -m pyro_vlae.run --dataset synthetic --fade-in 1 --run-dir runs/tiny"
    assert meta["ladder_gain"] == [1.0, 1.0]  # the last step trained, 3, had both layers faded in
    monkeypatch.setattr(P, "FOLDER", str(out))
    loaded, _ = pv.load_pretrained("tiny-vlae")
    ref, _, _, _ = load_run(run)
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(1000, d, generator=g) for d in ref.config.latent_dims]  # the codes the export measured on
    with torch.no_grad():
        diff = (loaded.likelihood.mean(loaded.decode(zs)) - ref.likelihood.mean(ref.decode(zs))).abs().max().item()
    recorded = meta["half_precision_effect"]["prior_means"]["max_abs_diff"]
    assert diff == pytest.approx(recorded, abs=1e-6)
    if meta["dtype"] != "float32":
        assert diff <= E.HALF_TOLERANCE
    state = torch.load(out / "tiny-vlae.pt", weights_only=True)
    halves = [v.dtype == torch.float16 for v in state["model"].values() if v.is_floating_point()]
    assert all(halves) if meta["dtype"] != "float32" else not any(halves)
    save_run_checkpoint(run, model, guide, optim, 1, config)  # step 1 of 4: not finished
    with pytest.raises(ValueError, match="stopped at step 1 of 4: finish it with python -m pyro_vlae.run --resume"):
        E.export_model(run, str(out), "unfinished", {"commit": None, "dirty": None}, x)
