"""``python -m pyro_vlae.evaluate`` end to end on tiny synthetic runs trained here, and its error paths."""

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

from pyro_vlae import evaluate as E
from pyro_vlae.data import DatasetError, load_data
from pyro_vlae.evaluation import pipeline as EP
from pyro_vlae.evaluation import report as R
from pyro_vlae.presets import get_preset
from pyro_vlae.training import RunConfig, fit
from pyro_vlae.training.checkpoint import atomic_write_json
from pyro_vlae.training.runs import write_config

#: A bound for a hung subprocess, not a speed test: a busy 2-core machine runs these several times slower.
HANG_S = 1800

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def cli(*args, timeout=HANG_S):
    return subprocess.run(
        [sys.executable, "-m", "pyro_vlae.evaluate", *args], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG (the report only links figures, so their content does not matter here)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def train_tiny(run_dir, kind, data_dir, steps=2):
    """A tiny synthetic run folder as the training CLI leaves it: config, checkpoint, eval.json and figures."""
    preset = get_preset("tiny")
    preset.train.num_steps = steps
    config = RunConfig(kind, "synthetic", "tiny", preset.model, preset.train, seed=0, data_dir=str(data_dir))
    bundle = load_data("synthetic", str(data_dir), preset.train.batch_size)
    os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
    write_config(str(run_dir), config)
    fit(config, bundle, str(run_dir), "cpu", progress=False, log=lambda *_: None)
    atomic_write_json(os.path.join(run_dir, "eval.json"), {"step": steps, "test": {"elbo": -1.0}})
    for name in ("reconstructions.png", "prior_samples.png", "intervention_layer1.png"):
        with open(os.path.join(run_dir, "figures", name), "wb") as f:
            f.write(tiny_png())
    return config


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    return {"root": root, "data": root / "data", "cache": root / "classifiers"}


@pytest.fixture(scope="module")
def vlae_run(shared):
    run = shared["root"] / "vlae"
    train_tiny(run, "vlae", shared["data"])
    args = [str(run), "--num-samples", "8", "--max-images", "64", "--probe-images", "128", "--no-diagnostics"]
    out = cli(*args, "--classifier-cache", str(shared["cache"]))
    return run, out


def test_cli_writes_eval_json_and_keeps_other_blocks(vlae_run):
    run, out = vlae_run
    assert out.returncode == 0, out.stderr
    assert "log p(x) >=" in out.stdout and "report.md written" in out.stdout
    data = json.loads((run / "eval.json").read_text())
    assert data["test"] == {"elbo": -1.0} and data["step"] == 2  # the training CLI's block survives
    ev = data["evaluation"]["test"]
    lik = ev["likelihood"]
    assert lik["num_images"] == 64 and lik["num_samples"] == 8 and lik["num_dims"] == 256
    assert lik["iwae"] >= lik["elbo"] and lik["density"] is True
    assert lik["iwae_bpd"] == pytest.approx(-lik["iwae"] / (256 * 0.6931471805599453))
    assert set(ev["latents"]) == {"z1", "z2", "z3"}
    for layer in ev["latents"].values():
        assert 0 <= layer["active_units"] <= layer["dims"] == 2 and layer["kl_method"] == "analytic"
        assert 0.0 <= layer["probe_accuracy"] <= 1.0
    assert ev["classifier"]["test_accuracy"] > 0.5  # synthetic bars are easy to classify
    assert ev["sample_quality"]["fd_samples"] > 0 and set(ev["probes"]) == {"z1", "z2", "z3", "all"}
    assert ev["settings"]["checkpoint_step"] == 2


def test_cli_report_has_numbers_and_figures(vlae_run):
    run, out = vlae_run
    assert out.returncode == 0, out.stderr
    text = (run / "report.md").read_text()
    ev = json.loads((run / "eval.json").read_text())["evaluation"]["test"]
    assert text.startswith("# VLAE on synthetic: preset tiny, 2 steps")
    for value in (ev["likelihood"]["elbo"], ev["likelihood"]["iwae"], ev["likelihood"]["iwae_bpd"]):
        assert R.fmt(value) in text
    for site, layer in ev["latents"].items():
        assert f"| {site} | 2 | {R.fmt(layer['kl'])} | {layer['active_units']}/2 | " in text
    assert R.fmt(ev["classifier"]["test_accuracy"]) in text
    for name in os.listdir(run / "figures"):
        assert f"![{R.figure_caption(name)}](figures/{name})" in text


@pytest.mark.parametrize("kind", ["hvae", "hvae-ar", "vae"], ids=["hvae", "hvae-ar", "vae"])
def test_evaluate_run_on_every_model_kind(kind, shared, capsys):
    run = shared["root"] / kind
    train_tiny(run, kind, shared["data"])
    res = EP.evaluate_run(
        str(run), num_samples=4, max_images=32, device="cpu", batch_size=16, chunk_size=2, probe_images=64,
        classifier_cache=str(shared["cache"]), run_diagnostics=False,
    )  # fmt: skip
    assert res["likelihood"]["iwae"] >= res["likelihood"]["elbo"]
    sites = ["z1"] if kind == "vae" else ["z1", "z2", "z3"]
    assert list(res["latents"]) == sites
    if kind != "vae":  # the stacked HVAE: closed-form KL only for the top layer, whose prior is N(0, I)
        assert [res["latents"][s]["kl_method"] for s in sites] == ["monte-carlo", "monte-carlo", "analytic"]
        assert res["settings"]["posterior_mean_draws"] == EP.SEQUENTIAL_MEAN_SAMPLES
    assert "averages E[z_l | z_(l-1)]" in (run / "report.md").read_text() or kind == "vae"
    assert "diagnostics skipped" in capsys.readouterr().out


def test_no_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert E.main([str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: no checkpoint at ") and "train first" in captured.err
    assert "Traceback" not in captured.err and not (tmp_path / "empty" / "eval.json").exists()


def test_missing_dataset_is_a_clear_error(vlae_run, monkeypatch, capsys):
    run, _ = vlae_run

    def missing(*args, **kwargs):
        raise DatasetError("mnist not found in data/: put the idx files in data/MNIST/raw/")

    monkeypatch.setattr(EP, "load_data", missing)
    assert E.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mnist not found")


def test_bad_flags(capsys):
    assert E.main(["somewhere", "--num-samples", "0"]) == 2
    assert "--num-samples must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_with_diagnostics(shared):
    run = shared["root"] / "vlae-diag"
    train_tiny(run, "vlae", shared["data"])
    out = cli(str(run), "--num-samples", "4", "--max-images", "64", "--classifier-cache", str(shared["cache"]))
    assert out.returncode == 0, out.stderr
    data = json.loads((run / "eval.json").read_text())
    assert {"evaluation", "layers", "gibbs", "test"} <= set(data)
    text = (run / "report.md").read_text()
    assert "variance share" in text and "## Gibbs chain" in text


@pytest.mark.parametrize("dataset", ["shapes3d"])
def test_factor_datasets_get_disentanglement_at_their_preset_size(tmp_path, dataset):
    """A 32x32 shapes3d run is evaluated on 32x32 data (not the loader's default 64), with MIG, SAP and DCI."""
    preset = get_preset(f"{dataset}-32")
    preset.train.num_steps, preset.train.batch_size = 2, 8
    config = RunConfig("vlae", dataset, f"{dataset}-32", preset.model, preset.train, seed=0, data_dir=str(tmp_path))
    bundle = load_data(dataset, str(tmp_path), 8, shapes3d_size=32)
    (tmp_path / "run").mkdir()
    write_config(str(tmp_path / "run"), config)
    fit(config, bundle, str(tmp_path / "run"), "cpu", progress=False, log=lambda *_: None)
    block = EP.evaluate_run(
        str(tmp_path / "run"), num_samples=2, max_images=16, device="cpu", batch_size=16, disentangle_images=60,
        classifier=False, run_diagnostics=False, dci_estimator="lda", log=lambda *_: None,
    )  # fmt: skip
    dis = block["disentanglement"]
    assert dis["factor_names"] == list(bundle.factor_names) and dis["n_samples_total"] == 60
    assert {"mig", "sap", "dci_disentanglement"} <= set(dis["overall"]["summary"])
    assert set(dis["layers"]) == {"z1", "z2", "z3"}
    assert "DCI from the LDA variant, not comparable" in (tmp_path / "run" / "report.md").read_text()


def test_disentangle_images_flag_reaches_evaluate_run(monkeypatch, capsys):
    """--disentangle-images sets evaluate_run's item count (default 5000); values below 1 are a clear error."""
    seen = []
    monkeypatch.setattr(E, "evaluate_run", lambda *a, **kw: seen.append(kw["disentangle_images"]))
    assert E.main(["somewhere", "--disentangle-images", "1234"]) == 0
    assert E.main(["somewhere"]) == 0
    assert seen == [1234, 5000]
    assert E.main(["somewhere", "--disentangle-images", "0"]) == 2
    assert "--disentangle-images must be >= 1" in capsys.readouterr().err
