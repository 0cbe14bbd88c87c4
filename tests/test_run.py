"""The command line, end to end on tiny synthetic data (subprocesses, as Pyro's tests/test_examples.py does)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyro_vlae import run as R
from pyro_vlae.data import common as DC
from pyro_vlae.data import mnist as DM
from pyro_vlae.training.checkpoint import load_checkpoint
from pyro_vlae.training.runs import load_run

#: A bound for a hung subprocess, not a speed test: a busy 2-core machine runs these several times slower.
HANG_S = 1800

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

QUIET_FLAGS = ("--no-progress", "--no-figures", "--no-eval")


def cli(*args, cwd=None, timeout=HANG_S):
    return subprocess.run(
        [sys.executable, "-m", "pyro_vlae.run", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=ENV,
        timeout=timeout,
    )


@pytest.mark.parametrize("model", ["vlae", "hvae"])
def test_cli_smoke_run_writes_the_run_folder(model, tmp_path):
    run = tmp_path / "run"
    out = cli(
        "--data-dir",
        str(tmp_path / "data"),
        "--eval-samples",
        "4",
        "--model",
        model,
        "--dataset",
        "synthetic",
        "--num-steps",
        "12",
        "--log-every",
        "4",
        "--run-dir",
        str(run),
        "--no-progress",
    )
    assert out.returncode == 0, out.stderr
    for rel in (
        "config.json",
        "metrics.jsonl",
        "checkpoints/latest.pt",
        "eval.json",
        "figures/reconstructions.png",
        "figures/prior_samples.png",
        "figures/interventions.png",
        "figures/intervention_layer3.png",
        "figures/gibbs_vs_ancestral.png",
        "report.md",
    ):
        assert (run / rel).is_file(), rel
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model_kind"] == model and cfg["preset"] == "tiny" and cfg["train"]["num_steps"] == 12
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [4, 8, 12]
    assert load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == 12
    assert "figures written" in out.stdout and "trained 12 steps" in out.stdout
    ev = json.loads((run / "eval.json").read_text())
    assert ev["test"]["num_images"] > 0 and ev["test"]["elbo"] < 0
    assert {"evaluation", "layers", "gibbs"} <= set(ev)  # the end-of-run evaluation and diagnostics
    assert "figures/interventions.png" in (run / "report.md").read_text()
    assert not (run / "run.lock").exists()
    # A second fresh run into the same folder is refused; --visualize-only rewrites the figures.
    again = cli("--dataset", "synthetic", "--num-steps", "2", "--run-dir", str(run), "--no-progress")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    (run / "figures" / "prior_samples.png").unlink()
    vis = cli("--visualize-only", str(run))
    assert vis.returncode == 0 and (run / "figures" / "prior_samples.png").is_file()


def test_cli_help_from_any_directory(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pyro_vlae.run", "--help"], capture_output=True, text=True, cwd=tmp_path, env=ENV
    )
    assert out.returncode == 0 and "--num-steps" in out.stdout and "--resume" in out.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-steps", "-3"], "must be a positive integer"),
        (["--batch-size", "0"], "must be a positive integer"),
        (["--model", "nope"], "invalid choice"),
        (["--dataset", "imagenet"], "invalid choice"),
        (["--anneal", "const:0"], "must be a finite number > 0"),
        (["--lr", "-1"], "must be > 0"),
        (["--num-steps", "3", "--epochs", "2"], "not allowed with argument"),
        (["--latent-dims", "4,x"], "comma-separated list of sizes"),
        (["--latent-dims", "4,0"], "every latent size must be >= 1"),
    ],
    ids=["neg-steps", "batch0", "model", "dataset", "kl0", "lr", "steps+epochs", "dims-text", "dims-zero"],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        R.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(DC, "_torchvision_download", lambda *a, **k: "network unreachable")
    monkeypatch.setattr(DM, "_fashion_debian_dir", lambda: tmp_path / "nowhere")
    code = R.main(["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err
    assert "dataset-fashion-mnist" in err and "FashionMNIST" in err


def test_preset_shape_mismatch_names_both_shapes(tmp_path, capsys):
    code = R.main(["--dataset", "synthetic", "--preset", "mnist-cpu", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "(1, 16, 16)" in err and "(1, 28, 28)" in err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_stop_signal_checkpoints_and_resume_finishes(tmp_path, sig, code):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "pyro_vlae.run",
        "--dataset",
        "synthetic",
        "--num-steps",
        "100000",
        "--log-every",
        "1",
        "--checkpoint-every",
        "100000",
        "--run-dir",
        str(run),
        "--no-progress",
        "--no-figures",
        "--no-eval",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics, deadline = run / "metrics.jsonl", time.time() + 600  # a bound for a hung start, not a speed test
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.2)
    # signal only a run that is training (its handlers are in place once it logs a step): a signal sent during a
    # slow start on a loaded machine would end the import with a traceback instead
    if proc.poll() is not None or not (metrics.exists() and metrics.stat().st_size):
        proc.kill()
        raise AssertionError(f"the run did not start training: {proc.communicate()[1]}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err
    step = load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"]
    assert 1 <= step < 100000 and "--resume" in out
    res = cli("--resume", str(run), "--num-steps", str(step + 5), *QUIET_FLAGS)
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == step + 5


def test_latent_dims_flag_sets_layers_and_sizes_and_is_checked_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--model", "hvae", "--num-steps", "2", "--run-dir", str(run), *QUIET_FLAGS]
    assert R.main([*argv, "--latent-dims", "5,3"]) == 0
    assert json.loads((run / "config.json").read_text())["model"]["latent_dims"] == [5, 3]
    model, _, _, _ = load_run(str(run))
    assert model.latent_sites == ["z1", "z2"]
    capsys.readouterr()
    assert R.main(["--resume", str(run), "--latent-dims", "5,4", *QUIET_FLAGS]) == 2
    assert "--latent-dims (5, 4) (the run has (5, 3))" in capsys.readouterr().err


def test_resume_refuses_a_different_model(tmp_path):
    run = tmp_path / "run"
    assert cli("--dataset", "synthetic", "--num-steps", "2", "--run-dir", str(run), *QUIET_FLAGS).returncode == 0
    out = cli("--resume", str(run), "--model", "hvae", *QUIET_FLAGS)
    assert out.returncode == 2 and "--model hvae (the run has vlae)" in out.stderr and "--force-config" in out.stderr


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "other, edit, message",
    [
        (["--model", "hvae"], None, "model kind hvae in the checkpoint, vlae in config.json"),
        (["--latent-dims", "2,3"], None, "latent sizes [2, 3] in the checkpoint, [2, 2] in config.json"),
        ([], {"dataset": "fashion-mnist"}, "dataset synthetic in the checkpoint, fashion-mnist in config.json"),
    ],
    ids=["hvae-checkpoint-in-vlae-run", "latent-sizes", "dataset"],
)
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys, other, edit, message):
    """A checkpoint placed in a run folder whose config.json names another model kind, dataset or latent sizes is
    refused with one error line, and nothing in the folder changes."""
    base = ["--dataset", "synthetic", "--num-steps", "2", *QUIET_FLAGS]
    run, donor = tmp_path / "run", tmp_path / "donor"
    assert R.main([*base, "--latent-dims", "2,2", "--run-dir", str(run)]) == 0
    assert R.main([*base, "--latent-dims", "2,2", *other, "--run-dir", str(donor)]) == 0
    (run / "checkpoints" / "latest.pt").write_bytes((donor / "checkpoints" / "latest.pt").read_bytes())
    if edit:
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, **edit}))
    capsys.readouterr()
    before = snapshot(run)
    assert R.main(["--resume", str(run), "--num-steps", "4", *QUIET_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: refusing to resume {run}: its checkpoint") and err.count("\n") == 1
    assert message in err and "belongs to another run" in err
    assert snapshot(run) == before


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert R.main(["--resume", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
