"""Checkpoints by wall time (issue 27, "What to build" 2): ``checkpoint_seconds`` writes a checkpoint once that much
time has passed since the last one, read from a host clock only (no device read until the checkpoint is due)."""

import dataclasses
import json

import pytest

from pyro_vlae import run as R
from pyro_vlae.cli_config import build_parser
from pyro_vlae.data import load_data
from pyro_vlae.presets import TrainConfig, get_preset
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR
from pyro_vlae.training.checkpoint import load_checkpoint
from pyro_vlae.training.step import GraphSafeStep


def tiny_config(**train):
    p = get_preset("tiny")
    tc = dataclasses.replace(p.train, **{"num_steps": 8, "log_every": 100, "checkpoint_every": 1000, **train})
    return TR.RunConfig("vlae", "synthetic", "tiny", p.model, tc, seed=1)


@pytest.fixture(scope="module")
def bundle():
    return load_data("synthetic", "unused", 16)


def fake_clock(monkeypatch, jumps: dict) -> None:
    """A host clock that stands still, and moves on by ``jumps[k]`` seconds while step ``k`` is taken."""
    now, calls, real_step = [1000.0], [], T.train_step

    def step(stepper, x, kl_scale):
        calls.append(1)
        now[0] += jumps.get(len(calls), 0.0)
        return real_step(stepper, x, kl_scale)

    monkeypatch.setattr(T, "monotonic", lambda: now[0])
    monkeypatch.setattr(T, "train_step", step)


def record(monkeypatch) -> tuple:
    real_save, saved = TR.save_run_checkpoint, []
    real_read, reads = GraphSafeStep.read, []
    monkeypatch.setattr(T, "save_run_checkpoint", lambda *a, **k: saved.append(a[4]) or real_save(*a, **k))
    monkeypatch.setattr(GraphSafeStep, "read", lambda self: reads.append(int(self.stats.steps)) or real_read(self))
    return saved, reads


@pytest.mark.parametrize(
    "jumps, expect",
    [({}, [8]), ({5: 61.0}, [5, 8]), ({2: 30.0, 3: 29.0}, [8]), ({2: 61.0, 6: 61.0}, [2, 6, 8])],
    ids=["clock-still", "passes-at-step-5", "59-seconds-is-not-60", "twice"],
)
def test_a_checkpoint_is_written_when_the_wall_time_passes_and_not_otherwise(
    jumps, expect, bundle, tmp_path, monkeypatch
):
    fake_clock(monkeypatch, jumps)
    saved, reads = record(monkeypatch)
    result = T.fit(tiny_config(checkpoint_seconds=60), bundle, str(tmp_path), "cpu", progress=False)
    assert saved == expect and result.step == 8
    assert sorted(set(reads)) == expect  # the device is read only for the checkpoints that were due
    assert load_checkpoint(str(tmp_path / "checkpoints" / "latest.pt"))["step"] == 8


def test_off_by_default(bundle, tmp_path, monkeypatch):
    fake_clock(monkeypatch, {2: 1e6})
    saved, _ = record(monkeypatch)
    T.fit(tiny_config(), bundle, str(tmp_path), "cpu", progress=False)
    assert saved == [8]


def test_a_step_checkpoint_restarts_the_wall_clock(bundle, tmp_path, monkeypatch):
    fake_clock(monkeypatch, {3: 60.0, 5: 60.0})
    saved, _ = record(monkeypatch)
    T.fit(tiny_config(checkpoint_seconds=100, checkpoint_every=3), bundle, str(tmp_path), "cpu", progress=False)
    assert saved == [3, 6, 8]  # 120 s had passed at step 5, but only 60 since step 3's checkpoint


def test_old_train_configs_load_and_the_flag_reaches_the_config(tmp_path, capsys):
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "checkpoint_seconds"}
    assert TrainConfig.from_dict(old).checkpoint_seconds == 0
    assert build_parser().parse_args(["--checkpoint-seconds", "60"]).checkpoint_seconds == 60
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--checkpoint-seconds", "-1"])
    assert "must be >= 0" in capsys.readouterr().err
    run = tmp_path / "run"
    quiet = ["--no-progress", "--no-figures", "--no-eval"]
    assert (
        R.main(
            ["--dataset", "synthetic", "--num-steps", "2", "--checkpoint-seconds", "90", "--run-dir", str(run), *quiet]
        )
        == 0
    )
    assert json.loads((run / "config.json").read_text())["train"]["checkpoint_seconds"] == 90
    assert R.main(["--resume", str(run), "--num-steps", "3", "--checkpoint-seconds", "30", *quiet]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["checkpoint_seconds"] == 30
