"""No checkpoint holds a non-finite state (issue 29, item 1, the checkpoint side): a gradient that overflows while the
loss stays finite, or any other non-finite weight, buffer or optimiser state, stops the run before its periodic,
interrupt or final checkpoint is written, and the message names the last checkpoint that is finite."""

import dataclasses
import math
import os
import signal

import pytest
import torch

from pyro_vlae.data import load_data
from pyro_vlae.presets import get_preset
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR
from pyro_vlae.training.checkpoint import load_checkpoint


def tiny_config(**train):
    p = get_preset("tiny")
    tc = dataclasses.replace(p.train, **{"num_steps": 12, "log_every": 100, "checkpoint_every": 3, **train})
    return TR.RunConfig("vlae", "synthetic", "tiny", p.model, tc, seed=1)


@pytest.fixture(autouse=True)
def few_validated_steps(monkeypatch):
    """Pyro's validation would refuse the NaN a poisoned weight makes in the next step before the loop sees it."""
    monkeypatch.setattr(T, "VALIDATED_STEPS", 2)


@pytest.fixture(scope="module")
def bundle():
    return load_data("synthetic", "unused", 16)


def finite(state) -> bool:
    tensors = [v for part in ("model", "guide") for v in state[part].values()]
    tensors += [v for st in state["optim"].values() for s in st["state"].values() for v in s.values()]
    return all(torch.isfinite(v).all() for v in tensors if torch.is_tensor(v) and v.is_floating_point())


def saves(monkeypatch) -> list:
    real, saved = TR.save_run_checkpoint, []

    def recording(*args, **kwargs):  # the steps whose checkpoint was written
        path = real(*args, **kwargs)
        saved.append(args[4])
        return path

    monkeypatch.setattr(T, "save_run_checkpoint", recording)
    return saved


def inf_gradient_at(monkeypatch, bad_step: int) -> None:
    """The first model parameter gets an infinite gradient in the backward pass of step ``bad_step``; the loss, computed
    before it, stays finite."""
    real = T.build

    def build(*args, **kwargs):
        out = real(*args, **kwargs)
        calls = []

        def hook(grad):
            calls.append(1)
            return grad * math.inf if len(calls) == bad_step else grad

        next(out[0].parameters()).register_hook(hook)
        return out

    monkeypatch.setattr(T, "build", build)


def assert_no_bad_checkpoint(err: str, run, good_step):
    path = run / "checkpoints" / "latest.pt"
    if good_step is None:
        assert not path.exists() or finite(load_checkpoint(str(path)))
        assert "none (no checkpoint was written" in err
    else:
        state = load_checkpoint(str(path))
        assert state["step"] == good_step and finite(state)
        assert f"The last good checkpoint is {path} and was left intact" in err


@pytest.mark.parametrize("bad_step, good_step", [(3, None), (5, 3)], ids=["first-checkpoint", "after-a-good-one"])
def test_an_overflowing_gradient_with_a_finite_loss_never_reaches_a_checkpoint(
    bad_step, good_step, bundle, tmp_path, monkeypatch
):
    inf_gradient_at(monkeypatch, bad_step)
    saved = saves(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(T.TrainingDiverged) as info:
        T.fit(tiny_config(), bundle, str(run), "cpu", progress=False)
    err = str(info.value)
    assert_no_bad_checkpoint(err, run, good_step)
    assert saved == ([] if good_step is None else [good_step])


def _poison(model, guide, optim, what: str) -> None:
    with torch.no_grad():
        if what == "weight":
            next(guide.parameters()).view(-1)[0] = math.nan
        elif what == "buffer":
            next(b for n, b in model.named_buffers() if n.endswith("running_var")).fill_(math.inf)
        else:  # Adam's second moment of one parameter
            st = next(iter(optim.optimizer.state.values()))
            st["exp_avg_sq"].view(-1)[0] = math.inf


def poisoned_after(monkeypatch, bad_step: int, what: str, then=None) -> None:
    """After step ``bad_step`` is taken (its loss finite), make one weight, buffer or optimiser state non-finite:
    something no loss flag of the step sees, so only the check at checkpoint time can refuse it."""
    real_build, real_step, held, calls = T.build, T.train_step, {}, []

    def build(*args, **kwargs):
        held["parts"] = out = real_build(*args, **kwargs)
        return out

    def step(stepper, x, kl_scale):
        loss = real_step(stepper, x, kl_scale)
        calls.append(1)
        if len(calls) == bad_step:
            model, guide, optim, _ = held["parts"]
            _poison(model, guide, optim, what)
            if then is not None:
                then()
        return loss

    monkeypatch.setattr(T, "build", build)
    monkeypatch.setattr(T, "train_step", step)


@pytest.mark.parametrize("what", ["weight", "buffer", "optimiser-state"])
def test_a_non_finite_state_stops_the_run_before_a_periodic_checkpoint(what, bundle, tmp_path, monkeypatch):
    poisoned_after(monkeypatch, 6, what)  # after step 6's loss: its checkpoint must see the state itself
    saved = saves(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(T.TrainingDiverged, match=r"not finite at step 6") as info:
        T.fit(tiny_config(), bundle, str(run), "cpu", progress=False)
    assert_no_bad_checkpoint(str(info.value), run, 3)
    assert saved == [3]


def test_the_final_checkpoint_is_checked_too(bundle, tmp_path, monkeypatch):
    poisoned_after(monkeypatch, 8, "optimiser-state")  # the weights stay finite: the final log record runs
    run = tmp_path / "run"
    with pytest.raises(T.TrainingDiverged, match=r"not finite at step 8") as info:
        T.fit(tiny_config(num_steps=8, checkpoint_every=3), bundle, str(run), "cpu", progress=False)
    assert_no_bad_checkpoint(str(info.value), run, 6)


def test_the_interrupt_checkpoint_is_checked_too(bundle, tmp_path, monkeypatch):
    poisoned_after(monkeypatch, 4, "buffer", then=lambda: os.kill(os.getpid(), signal.SIGINT))
    run = tmp_path / "run"
    with pytest.raises(T.TrainingDiverged, match=r"not finite at step 4") as info:
        T.fit(tiny_config(), bundle, str(run), "cpu", progress=False)
    assert_no_bad_checkpoint(str(info.value), run, 3)


def test_non_finite_entries_are_named():
    state = {"model": {"w": torch.tensor([1.0, math.nan]), "n": torch.tensor(3)}, "optim": {"p": {"state": {0: {}}}}}
    assert TR.nonfinite_entries(state) == ["model.w"]
    assert TR.nonfinite_entries({"model": {"w": torch.ones(2)}}) == []
