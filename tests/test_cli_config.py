"""Command-line flags to RunConfig: overrides apply only what they name; resume conflicts and forced configs; flags
that the model would ignore, or under which it would not train its ELBO, are refused."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from pyro_vlae import run as R
from pyro_vlae.cli_config import (
    build_parser,
    check_weights_fit,
    config_from_args,
    forced_config,
    resume_conflicts,
    saved_config,
)
from pyro_vlae.presets import get_preset
from pyro_vlae.training.checkpoint import CheckpointError
from pyro_vlae.training.runs import build

#: A bound for a hung subprocess, not a speed test: a busy 2-core machine runs these several times slower.
HANG_S = 1800


def parse(*argv):
    args = build_parser().parse_args(list(argv))
    args.model, args.dataset = args.model or "vlae", args.dataset or "synthetic"
    return args


def test_flags_replace_only_the_fields_they_name():
    cfg = config_from_args(parse("--model", "hvae", "--latent-dims", "5,3", "--lr", "0.01"), (1, 16, 16), cuda=False)
    tiny = get_preset("tiny")
    assert cfg.preset == "tiny" and cfg.model_kind == "hvae"
    assert cfg.model.latent_dims == (5, 3) and cfg.model.num_layers == 2 and cfg.train.lr == 0.01
    assert dataclasses.replace(cfg.model, latent_dims=tiny.model.latent_dims) == tiny.model
    assert dataclasses.replace(cfg.train, lr=tiny.train.lr) == tiny.train


def test_resume_conflicts_and_forced_config():
    saved = config_from_args(parse(), (1, 16, 16), cuda=False)
    assert resume_conflicts(parse(), saved) == []
    got = resume_conflicts(parse("--model", "hvae", "--lr", "0.5", "--latent-dims", "4,4,4"), saved)
    assert any(c.startswith("--model hvae") for c in got) and any(c.startswith("--lr 0.5") for c in got)
    assert any(c.startswith("--latent-dims (4, 4, 4)") for c in got)
    forced = forced_config(parse("--lr", "0.5"), saved, cuda=False)
    assert forced.train.lr == 0.5 and forced.model == saved.model and forced.seed == saved.seed


def test_weights_that_do_not_fit_are_refused_before_anything_is_written():
    saved = config_from_args(parse(), (1, 16, 16), cuda=False)
    model, guide, _, _ = build(saved, "cpu")
    state = {"model": model.state_dict(), "guide": guide.state_dict()}
    check_weights_fit(saved, state)  # the same architecture fits
    wider = forced_config(parse("--latent-dims", "3,3,3"), saved, cuda=False)
    with pytest.raises(CheckpointError, match="start a new run"):
        check_weights_fit(wider, state)


def test_python_m_run_refuses_hvae_with_meanfield_in_one_line_before_reading_data(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pyro_vlae.run", "--model", "hvae", "--elbo", "meanfield"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=HANG_S,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: --elbo meanfield is valid for vlae and vae only")
    assert out.stderr.count("\n") == 1  # one line
    assert not os.listdir(tmp_path)  # no data read or downloaded, no run folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "hvae-ar", "--elbo", "meanfield"], "--elbo meanfield is valid for vlae and vae only"),
        (["--model", "vlae", "--beta", "4"], "--beta 4.0 weights the KL of the flat vae only"),
        (["--model", "hvae", "--fade-in", "100"], "--fade-in 100 fades in the ladder inputs of the vlae only"),
        (["--model", "vae", "--noise-injection", "gated_add"], "--noise-injection combines the vlae's ladder inputs"),
    ],
    ids=["hvae-ar-meanfield", "vlae-beta", "hvae-fade-in", "vae-noise-injection"],
)
def test_flags_the_model_would_ignore_or_misuse_are_refused(capsys, argv, message):
    assert R.main([*argv, "--dataset", "synthetic", "--data-dir", "unused"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


@pytest.mark.parametrize("argv", [["--model", "vlae", "--elbo", "meanfield"], ["--model", "vae", "--beta", "4"]])
def test_valid_flags_pass(argv):
    cfg = config_from_args(parse(*argv), (1, 16, 16), cuda=False)
    assert cfg.model_kind == argv[1]


def test_preset_settings_another_model_cannot_use_are_dropped_from_its_config():
    hvae = config_from_args(parse("--model", "hvae", "--preset", "mnist-cpu"), (1, 28, 28), cuda=False)
    assert hvae.train.fade_in == 0 and get_preset("mnist-cpu").train.fade_in > 0
    paper = config_from_args(parse("--model", "hvae", "--preset", "mnist-paper"), (1, 28, 28), cuda=False)
    assert paper.train.elbo == "trace" and paper.train.fade_in == 0
    vlae = config_from_args(parse("--model", "vlae", "--preset", "mnist-paper"), (1, 28, 28), cuda=False)
    assert vlae.train == get_preset("mnist-paper").train and vlae.model == get_preset("mnist-paper").model


def test_old_runs_of_other_models_resume_without_their_inert_fade_in():
    saved = config_from_args(parse("--model", "hvae"), (1, 16, 16), cuda=False)
    saved.train = dataclasses.replace(saved.train, fade_in=1000)  # as runs configured before this was dropped
    assert saved_config({"config": saved.to_dict()}).train.fade_in == 0


def test_changing_the_fade_in_on_resume_is_a_conflict():
    saved = config_from_args(parse("--fade-in", "5"), (1, 16, 16), cuda=False)
    assert resume_conflicts(parse("--fade-in", "6"), saved) == ["--fade-in 6 (the run has 5)"]
    assert resume_conflicts(parse("--fade-in", "5"), saved) == []


def test_weights_saved_without_ladder_gains_still_fit():
    saved = config_from_args(parse(), (1, 16, 16), cuda=False)
    model, guide, _, _ = build(saved, "cpu")
    weights = {k: v for k, v in model.state_dict().items() if k != "ladder_gain"}
    check_weights_fit(saved, {"model": weights, "guide": guide.state_dict(), "step": 3})


def test_cuda_graph_tf32_and_precision_flags_reach_the_config_and_config_json(tmp_path):
    cfg = config_from_args(parse("--cuda-graph", "off", "--tf32", "off"), (1, 16, 16), cuda=False)
    assert cfg.train.cuda_graph == "off" and cfg.train.tf32 is False
    default = config_from_args(parse(), (1, 16, 16), cuda=False)
    assert default.train.cuda_graph == "auto" and default.train.tf32 is True and default.train.precision == "fp32"
    run = tmp_path / "run"
    argv = ["--dataset", "synthetic", "--num-steps", "2", "--tf32", "off", "--cuda-graph", "off", "--run-dir", run]
    argv += ["--precision", "bf16"]  # trains end to end with the networks in bfloat16
    assert R.main([*map(str, argv), "--no-progress", "--no-figures", "--no-eval"]) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["tf32"] is False and saved["cuda_graph"] == "off" and saved["precision"] == "bf16"


def test_cuda_graph_on_without_cuda_is_one_error_line(capsys, tmp_path):
    argv = ["--cuda-graph", "on", "--device", "cpu", "--dataset", "synthetic", "--run-dir", str(tmp_path / "r")]
    assert R.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cuda-graph on captures the training step in a CUDA graph, and this run is on cpu")
    assert "--cuda-graph auto" in err and err.count("\n") == 1 and not (tmp_path / "r").exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--tf32", "maybe"])


def test_changing_cuda_graph_or_tf32_on_resume_is_a_conflict():
    saved = config_from_args(parse(), (1, 16, 16), cuda=False)
    got = resume_conflicts(parse("--cuda-graph", "off", "--tf32", "off"), saved)
    assert got == ["--cuda-graph off (the run has auto)", "--tf32 off (the run has on)"]
    forced = forced_config(parse("--cuda-graph", "off", "--tf32", "off"), saved, cuda=False)
    assert forced.train.cuda_graph == "off" and forced.train.tf32 is False
    assert resume_conflicts(parse("--tf32", "on"), saved) == []
