"""``python -m pyro_vlae.pretrained.export`` on a run stopped before its ``--num-steps`` (as the GPU driver stops its
runs): refused with a message naming ``--allow-partial``; with it, the step reached and a description of its own are
recorded and the entry loads."""

import json

import pytest
import torch
from test_pretrained import checkout, finished_tiny_run  # noqa: F401 - checkout is a fixture

import pyro_vlae as pv
from pyro_vlae import pretrained as P
from pyro_vlae.pretrained import export as E
from pyro_vlae.training.checkpoint import load_checkpoint
from pyro_vlae.training.runs import save_run_checkpoint

DESCRIPTION = "tiny VLAE on synthetic data, stopped by the driver at its deadline"


def stopped_run(tmp_path, step=2):
    """A tiny run whose ``latest.pt`` is at ``step`` of its 4 steps, as a run stopped by SIGTERM leaves it."""
    run, model, guide, optim, config = finished_tiny_run(tmp_path)
    save_run_checkpoint(run, model, guide, optim, step, config)
    return run


def test_a_stopped_run_is_refused_with_a_message_naming_the_option(tmp_path, checkout, capsys):  # noqa: F811
    run, out = stopped_run(tmp_path), checkout / "pretrained"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert E.main([run, "--name", "tiny-vlae", "--no-classifier", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "stopped at step 2 of 4" in err and "--resume" in err and "--allow-partial" in err and "--description" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "nothing is written"


def test_allow_partial_needs_a_description_of_its_own(tmp_path, checkout, capsys):  # noqa: F811
    run, out = stopped_run(tmp_path), checkout / "pretrained"
    assert E.main([run, "--name", "tiny-vlae", "--no-classifier", "--out", str(out), "--allow-partial"]) == 2
    err = capsys.readouterr().err
    assert "--allow-partial needs --description" in err and not (out / "tiny-vlae.pt").exists()


def test_allow_partial_records_the_step_reached_and_the_description(tmp_path, checkout, monkeypatch):  # noqa: F811
    run, out = stopped_run(tmp_path), checkout / "pretrained"
    argv = [run, "--name", "tiny-vlae", "--no-classifier", "--out", str(out), "--allow-partial"]
    assert E.main([*argv, "--description", DESCRIPTION]) == 0
    meta = json.loads((out / "tiny-vlae.json").read_text())
    assert meta["description"] == DESCRIPTION and "default job" not in json.dumps(meta)
    assert meta["trained_steps"] == 2 and meta["planned_steps"] == 4
    assert meta["partial"] == {"step": 2, "num_steps": 4, "note": E.PARTIAL_NOTE}
    assert meta["command"] == "python -m pyro_vlae.run --dataset synthetic --fade-in 1 --run-dir runs/tiny"
    assert meta["regenerate"].startswith(meta["command"] + " && python -m pyro_vlae.pretrained.export runs/tiny")
    assert "--allow-partial" in meta["regenerate"]
    monkeypatch.setattr(P, "FOLDER", str(out))
    model, _ = pv.load_pretrained("tiny-vlae")
    assert load_checkpoint(f"{run}/checkpoints/latest.pt")["step"] == 2 and torch.equal(
        model.ladder_gain, torch.tensor(meta["ladder_gain"])
    )


def test_a_finished_run_gets_a_description_from_its_own_settings_or_the_one_given(tmp_path, checkout):  # noqa: F811
    run, out = finished_tiny_run(tmp_path)[0], checkout / "pretrained"
    argv = [run, "--name", "tiny-vlae", "--no-classifier", "--out", str(out)]
    assert E.main(argv) == 0
    meta = json.loads((out / "tiny-vlae.json").read_text())
    assert meta["description"] == "vlae on synthetic, preset tiny, 4 steps of batch 16"
    assert meta["partial"] is None and meta["trained_steps"] == meta["planned_steps"] == 4
    assert meta["regenerate"] == meta["command"] + " && python -m pyro_vlae.pretrained.export runs/tiny"
    assert E.main([*argv, "--allow-partial", "--description", "mine"]) == 0  # harmless on a finished run
    assert json.loads((out / "tiny-vlae.json").read_text())["description"] == "mine"


@pytest.mark.parametrize(
    "command, default",
    [
        (["python", "-m", "pyro_vlae.run", "--model", "vlae", "--device", "cpu", "--run-dir", "runs/x"], True),
        (
            ["/x/pyro_vlae/run.py", "--model", "vlae", "--device", "cpu", "--run-dir", "/tmp/vlae-mnist-pretrained"],
            True,
        ),
        (["python", "-m", "pyro_vlae.run", "--model", "vlae", "--device", "cuda", "--run-dir", "runs/x"], False),
        (["python", "-m", "pyro_vlae.run", "--model", "vlae", "--preset", "mnist-paper"], False),
    ],
    ids=["default", "default-from-a-script", "cuda", "another-preset"],
)
def test_only_the_default_job_is_described_as_the_default_job(command, default):
    assert E.is_default_job(command) is default
