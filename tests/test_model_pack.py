"""``benchmarks/gpu/model_pack.py`` as the way a GPU run comes back: the pack is for evaluation and export only (and
says so), and a run the driver stopped before its ``--num-steps`` goes from the returned parts to a shipped entry."""

import json
import os
import sys

import pytest
import torch
from test_pretrained import checkout, finished_tiny_run  # noqa: F401 - checkout is a fixture

import pyro_vlae as pv
from pyro_vlae import pretrained as P
from pyro_vlae.pretrained import export as E
from pyro_vlae.training.checkpoint import load_checkpoint
from pyro_vlae.training.runs import save_run_checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu"))
import model_pack as MP  # noqa: E402


@pytest.fixture
def returned_run(tmp_path):
    """A tiny run stopped at step 2 of 4, exported in float16, packed and unpacked as the GPU check returns it;
    returns ``(unpacked run folder, the parts' folder)``."""
    run, model, guide, optim, config = finished_tiny_run(tmp_path)
    save_run_checkpoint(run, model, guide, optim, 2, config)
    info = MP.export_half(run, tmp_path / "half" / "tiny_vlae")
    assert info["step"] == 2 and info["resumable"] is False
    MP.pack([tmp_path / "half" / "tiny_vlae"], tmp_path / "parts", max_bytes=MP.MAX_TOTAL_BYTES, tmp_dir=tmp_path)
    (back,) = MP.unpack(tmp_path / "parts", tmp_path / "back")
    return back, tmp_path / "parts"


def test_the_pack_says_it_is_for_evaluation_and_export_only(returned_run, capsys, tmp_path):
    back, parts = returned_run
    state = load_checkpoint(str(back / "checkpoints" / "latest.pt"))
    assert state["resumable"] is False and state["precision"] == "float16"
    assert state["optim"] == {} and "rng" not in state  # nothing a resume would need
    manifest = json.loads((parts / MP.MANIFEST).read_text())
    assert manifest["resumable"] is False and manifest["use"] == MP.USE
    assert "evaluation and export only" in MP.USE and "cannot be resumed" in MP.USE and "--allow-partial" in MP.USE
    assert MP.main(["unpack", str(parts), "--dest", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"# {MP.USE}" and out[1].startswith("python -m pyro_vlae.evaluate ")
    assert "cannot be resumed" in MP.__doc__ and "evaluation and export only" in MP.__doc__


def test_a_run_the_driver_stopped_ships_from_the_returned_parts(returned_run, checkout, monkeypatch):  # noqa: F811
    """The returned float16 run exports with --allow-partial, and the entry loads with exactly its weights."""
    back, _ = returned_run
    out = checkout / "pretrained"
    argv = [str(back), "--name", "tiny-vlae", "--no-classifier", "--out", str(out)]
    assert E.main(argv) == 2  # stopped at step 2 of 4: refused without the option
    assert E.main([*argv, "--allow-partial", "--description", "tiny VLAE returned by the driver"]) == 0
    meta = json.loads((out / "tiny-vlae.json").read_text())
    assert meta["trained_steps"] == 2 and meta["planned_steps"] == 4 and meta["partial"]["step"] == 2
    assert meta["description"] == "tiny VLAE returned by the driver"
    monkeypatch.setattr(P, "FOLDER", str(out))
    model, guide = pv.load_pretrained("tiny-vlae")
    half = load_checkpoint(str(back / "checkpoints" / "latest.pt"))
    for net, part in ((model, "model"), (guide, "guide")):
        loaded = net.state_dict()
        for k, v in half[part].items():
            assert torch.equal(loaded[k], v.float() if v.is_floating_point() else v), (part, k)


def test_resuming_a_returned_run_is_refused(returned_run, capsys):
    from pyro_vlae.run import main

    back, _ = returned_run
    rc = main(["--resume", str(back), "--num-steps", "3", "--no-progress", "--no-figures", "--no-eval"])
    err = capsys.readouterr().err
    assert rc != 0 and "float16" in err and "cannot be resumed" in err
