"""The SVI loop: schedules, exact resume, NaN handling, checkpoints and per-layer KLs."""

import dataclasses
import json
import math
import os

import pyro
import pytest
import torch

from pyro_vlae.data import load_data
from pyro_vlae.presets import get_preset
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR
from pyro_vlae.training.annealing import MIN_KL_SCALE, KLSchedule
from pyro_vlae.training.checkpoint import load_checkpoint


def tiny_config(kind="vlae", **train):
    p = get_preset("tiny")
    tc = dataclasses.replace(p.train, **{"num_steps": 8, "log_every": 2, "checkpoint_every": 4, **train})
    return TR.RunConfig(kind, "synthetic", "tiny", p.model, tc, seed=1)


@pytest.fixture(scope="module")
def bundle():
    return load_data("synthetic", "unused", 16)


def test_schedules():
    s = KLSchedule("exp:2000")
    assert s(0) == MIN_KL_SCALE and s(2000) == pytest.approx(1 - math.exp(-1))
    assert KLSchedule("linear:10")(5) == 0.5 and KLSchedule("linear:10")(50) == 1.0
    assert KLSchedule("none")(0) == 1.0 and KLSchedule("const:0.3")(99) == 0.3
    for bad in ("exp", "exp:-1", "const:0", "linear:x", "cosine:3"):
        with pytest.raises(ValueError, match="invalid --anneal"):
            KLSchedule(bad)


def test_batch_order_is_a_deterministic_function_of_step():
    a, b = T.BatchOrder(50, 10, seed=3), T.BatchOrder(50, 10, seed=3)
    seen = torch.cat([a.indices(s) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(50))  # one epoch covers every image once
    assert torch.equal(b.indices(7), a.indices(7)) and not torch.equal(a.indices(0), a.indices(5))
    with pytest.raises(ValueError, match="larger than the training set"):
        T.BatchOrder(5, 10, 0)


@pytest.mark.parametrize("kind", ["vlae", "hvae"])
def test_resume_is_exact(kind, bundle, tmp_path):
    """2N straight steps and N steps + resume for N more give identical parameters, optimizer state included."""
    cfg = tiny_config(kind, num_steps=8)
    straight = T.fit(cfg, bundle, str(tmp_path / "a"), "cpu", progress=False)
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=4))
    T.fit(half, bundle, str(tmp_path / "b"), "cpu", progress=False)
    state = load_checkpoint(str(tmp_path / "b" / "checkpoints" / "latest.pt"))
    assert state["step"] == 4
    resumed = T.fit(cfg, bundle, str(tmp_path / "b"), "cpu", resume=state, progress=False)
    assert straight.step == resumed.step == 8
    a = load_checkpoint(straight.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    for part in ("model", "guide"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    for name, st in a["optim"].items():
        for pk, pv in st["state"].items():
            for k, v in pv.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["optim"][name]["state"][pk][k]))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(bundle, tmp_path, monkeypatch):
    real = T.train_step
    calls = {"n": 0}

    def flaky(svi, x, kl_scale):
        calls["n"] += 1
        return float("nan") if calls["n"] == 7 else real(svi, x, kl_scale)

    monkeypatch.setattr(T, "train_step", flaky)
    run = tmp_path / "run"
    with pytest.raises(T.TrainingDiverged, match=r"at step 7.*latest\.pt.*left intact"):
        T.fit(tiny_config(), bundle, str(run), "cpu", progress=False)
    state = load_checkpoint(str(run / "checkpoints" / "latest.pt"))
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_metrics_and_layer_kls(bundle, tmp_path):
    T.fit(tiny_config(num_steps=6), bundle, str(tmp_path), "cpu", progress=False)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6]
    for r in lines:
        kl = sum(r[f"kl_z{l}"] for l in (1, 2, 3))
        assert r["elbo"] == pytest.approx(r["recon"] - kl)
        assert all(r[f"kl_z{l}"] > -1.0 for l in (1, 2, 3))  # single-sample estimates of a KL: not far below 0


def test_evaluate_elbo_and_load_run(bundle, tmp_path):
    T.fit(tiny_config(num_steps=4), bundle, str(tmp_path), "cpu", progress=False)
    model, guide, config, state = TR.load_run(str(tmp_path))
    assert config.model_kind == "vlae" and state["step"] == 4 and not model.training
    out = T.evaluate_elbo(model, guide, (x for x, _ in bundle.test_loader), max_batches=2)
    assert out["num_images"] == 32 and out["elbo"] < 0 and math.isfinite(out["elbo"])


def test_device_resolution():
    assert TR.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert TR.resolve_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="no CUDA device"):
            TR.resolve_device("cuda")


def test_fit_leaves_param_store_consistent_with_modules(bundle, tmp_path):
    T.fit(tiny_config(num_steps=2), bundle, str(tmp_path), "cpu", progress=False)
    store = pyro.get_param_store()
    assert len(store.keys()) > 0
    assert os.path.exists(tmp_path / "checkpoints" / "latest.pt")


def test_ladder_gains_fade_lower_layers_in_from_the_top():
    from pyro_vlae.training.annealing import ladder_gains

    assert ladder_gains(0, 3, 0) == [1.0, 1.0]
    assert ladder_gains(0, 3, 100) == [0.0, 0.0]
    assert ladder_gains(150, 3, 100) == [0.0, 0.5]  # z2 fades in over steps 100..200
    assert ladder_gains(250, 3, 100) == [0.5, 1.0]  # then z1 over 200..300
    assert ladder_gains(300, 3, 100) == [1.0, 1.0]


def test_zero_gain_cuts_a_layer_off_and_resume_with_fade_in_is_exact(bundle, tmp_path):
    from pyro import poutine

    model, _, _, _ = TR.build(tiny_config(), "cpu")
    model.eval()
    model.ladder_gain.zero_()
    codes = {"z2": torch.zeros(3, 2), "z3": torch.ones(3, 2)}
    a = poutine.condition(model, data={**codes, "z1": torch.zeros(3, 2)})(batch_size=3)
    b = poutine.condition(model, data={**codes, "z1": 5 * torch.ones(3, 2)})(batch_size=3)
    assert torch.equal(a, b)
    cfg = tiny_config(num_steps=8, fade_in=2)
    straight = T.fit(cfg, bundle, str(tmp_path / "a"), "cpu", progress=False)
    T.fit(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=3)),
        bundle,
        str(tmp_path / "b"),
        "cpu",
        progress=False,
    )
    resumed = T.fit(
        cfg,
        bundle,
        str(tmp_path / "b"),
        "cpu",
        progress=False,
        resume=load_checkpoint(str(tmp_path / "b" / "checkpoints" / "latest.pt")),
    )
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.parametrize("validate_all", [False, True], ids=["first-steps", "all-steps"])
def test_validation_checks_the_first_steps_of_each_start(bundle, tmp_path, monkeypatch, validate_all):
    from pyro.distributions.util import is_validation_enabled

    real, seen = T.train_step, []

    def recording(svi, x, kl_scale):
        seen.append(is_validation_enabled())
        return real(svi, x, kl_scale)

    monkeypatch.setattr(T, "train_step", recording)
    monkeypatch.setattr(T, "VALIDATED_STEPS", 3)
    cfg = tiny_config(num_steps=6, checkpoint_every=3)
    half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_steps=5))
    T.fit(half, bundle, str(tmp_path), "cpu", progress=False, validate_all=validate_all)
    state = load_checkpoint(str(tmp_path / "checkpoints" / "latest.pt"))
    T.fit(cfg, bundle, str(tmp_path), "cpu", resume=state, progress=False, validate_all=validate_all)
    expected = [True] * 6 if validate_all else [True, True, True, False, False, True]  # steps 1-5, then resume at 6
    assert seen == expected
    assert is_validation_enabled(), "the global setting is restored after training"
    # Validation that was switched off by the user stays off.
    seen.clear()
    with pyro.validation_enabled(False):
        T.fit(tiny_config(num_steps=2), bundle, str(tmp_path / "off"), "cpu", progress=False)
    assert seen == [False, False]


def test_stop_signals_set_a_flag_and_only_a_second_ctrl_c_interrupts():
    import os
    import signal

    with T._StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's second SIGTERM is ignored
        assert stop.raised and stop.signum == signal.SIGTERM
    with T._StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.raised and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "handlers are restored"


def test_parameters_the_optimiser_does_not_hold_stop_training(bundle, tmp_path, monkeypatch):
    """A channels_last convolution weight is copied by Pyro's param store, so SVI would step the copy and the network
    would never train: the first step refuses to go on, naming the parameters."""
    real_build = TR.build

    def channels_last_build(config, device):
        model, guide, optim, svi = real_build(config, device)
        model.to(memory_format=torch.channels_last)
        return model, guide, optim, svi

    monkeypatch.setattr(T, "build", channels_last_build)
    with pytest.raises(ValueError, match=r"would never train: .*decoder.*channels_last"):
        T.fit(tiny_config(), bundle, str(tmp_path), "cpu", progress=False)


def test_every_network_parameter_moves_in_training(bundle, tmp_path, monkeypatch):
    real_build, init = TR.build, {}

    def recording_build(config, device):
        model, guide, optim, svi = real_build(config, device)
        for prefix, m in (("model", model), ("guide", guide)):
            init.update({f"{prefix}.{n}": p.detach().clone() for n, p in m.named_parameters()})
        return model, guide, optim, svi

    monkeypatch.setattr(T, "build", recording_build)
    T.fit(tiny_config(num_steps=3), bundle, str(tmp_path), "cpu", progress=False)
    state = load_checkpoint(str(tmp_path / "checkpoints" / "latest.pt"))
    after = {f"{prefix}.{n}": v for prefix in ("model", "guide") for n, v in state[prefix].items()}
    assert init and init.keys() <= after.keys()
    frozen = [n for n in init if torch.equal(init[n], after[n])]
    assert not frozen, f"parameters that never moved: {frozen}"


@pytest.mark.parametrize("name", ["sprites", "shapes3d"])
def test_fetch_batch_renders_procedural_data_in_one_call_with_the_same_images(name):
    bundle = load_data(name, "unused", 8, **{f"{name}_size": 32})
    idx = torch.tensor([5, 0, 17, 3, 3])
    one_call = T.fetch_batch(bundle.train, idx)
    assert torch.equal(one_call, torch.stack([bundle.train[int(i)][0] for i in idx]))


def _poisoned_make_step(monkeypatch, bad_step):
    """Make the step's loss (and so its gradients) NaN at step ``bad_step`` of the run, inside the device step."""
    real, calls = T.make_step, []

    def make_step(*args, **kwargs):
        stepper = real(*args, **kwargs)
        loss_fn = stepper._loss_fn

        def poisoned(model_trace, guide_trace):
            loss, surrogate = loss_fn(model_trace, guide_trace)
            calls.append(1)
            nan = float("nan") if len(calls) == bad_step else 1.0
            return loss * nan, surrogate * nan

        stepper._loss_fn = poisoned
        return stepper

    monkeypatch.setattr(T, "make_step", make_step)
    return calls


def test_a_nan_between_reads_stops_at_the_next_read_naming_its_step(bundle, tmp_path, monkeypatch):
    """Step 5 turns NaN; nothing is read until the checkpoint of step 6, which is refused: the run stops there, names
    step 5, and latest.pt is step 3's, untouched."""
    calls = _poisoned_make_step(monkeypatch, bad_step=5)
    monkeypatch.setattr(T, "VALIDATED_STEPS", 2)  # Pyro's validation would warn of the NaN in a validated step
    real_save, saved = TR.save_run_checkpoint, []

    def recording_save(*args, **kwargs):
        saved.append(args[4])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(T, "save_run_checkpoint", recording_save)
    run = tmp_path / "run"
    cfg = tiny_config(num_steps=12, log_every=4, checkpoint_every=3)
    with pytest.raises(T.TrainingDiverged, match=r"the loss became nan at step 5; .*latest\.pt and was left intact"):
        T.fit(cfg, bundle, str(run), "cpu", progress=False)
    assert len(calls) == 6 and saved == [3]  # step 6 was taken, its checkpoint was not written
    assert load_checkpoint(str(run / "checkpoints" / "latest.pt"))["step"] == 3
    assert [json.loads(s)["step"] for s in (run / "metrics.jsonl").read_text().splitlines()] == [4]


def test_the_loop_reads_the_device_only_to_log_and_before_checkpoints(bundle, tmp_path, monkeypatch):
    from pyro_vlae.training.step import GraphSafeStep

    real_read, reads = GraphSafeStep.read, []
    monkeypatch.setattr(GraphSafeStep, "read", lambda self: reads.append(int(self.stats.steps)) or real_read(self))
    cfg = tiny_config(num_steps=12, log_every=4, checkpoint_every=3)
    T.fit(cfg, bundle, str(tmp_path), "cpu", progress=False)
    assert sorted(set(reads)) == [3, 4, 6, 8, 9, 12]


def test_cuda_graph_on_is_refused_on_the_cpu(bundle, tmp_path):
    cfg = tiny_config(cuda_graph="on")
    with pytest.raises(ValueError, match="--cuda-graph on captures the training step in a CUDA graph"):
        T.fit(cfg, bundle, str(tmp_path), "cpu", progress=False)
