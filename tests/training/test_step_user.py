"""The graph-safe step with a Pyro user's own model, guide and optimiser: it gives ``SVI.step``'s numbers or refuses.

Each case was a silent wrong answer once: a gradient that overflowed while the loss stayed finite passed the finite
flag; ``pyro.optim.Adam`` drifted from ``SVI.step`` as gradients piled up; a non-reparameterised guide site trained
under ``elbo="meanfield"``; a ``pyro.param`` first seen after the first step was never trained.
"""

import dataclasses

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_vlae.presets import get_preset
from pyro_vlae.training import runs as TR
from pyro_vlae.training import step as S

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def vlae_config(elbo="trace"):
    p = get_preset("tiny")
    m = dataclasses.replace(p.model, likelihood="laplace", obs_scale=0.3)
    return TR.RunConfig("vlae", "synthetic", "tiny", m, dataclasses.replace(p.train, elbo=elbo), seed=1)


X = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(5))


def run(model, guide, make_optim, elbo, x, steps, graph_safe, validated=2):
    """``steps`` steps from the same seed, Pyro's validation on for the first ``validated``; returns the losses and
    every parameter in the param store."""
    pyro.set_rng_seed(3)
    optim = make_optim()
    stepper = S.make_step(model, guide, optim, elbo, "cpu") if graph_safe else SVI(model, guide, optim, ELBOS[elbo]())
    losses = []
    for i in range(steps):
        with pyro.validation_enabled(i < validated):
            loss = stepper.step(x, kl_scale=0.5)
        losses.append(stepper.read().loss if graph_safe else loss)
    return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}


# ---------------------------------------------------------------------------------------------------------------------
# 1. The finite flag covers the gradients, not only the loss.


def test_an_inf_gradient_with_a_finite_loss_is_the_first_bad_step():
    cfg = vlae_config()
    model, guide, optim, _ = TR.build(cfg, "cpu")
    stepper = S.make_step(model, guide, optim, "trace", "cpu")
    loss_fn, calls = stepper._loss_fn, []

    def overflowing_gradient(model_trace, guide_trace):
        loss, surrogate = loss_fn(model_trace, guide_trace)
        calls.append(1)
        if len(calls) == 3:  # the loss is untouched; its gradient overflows
            surrogate.register_hook(lambda g: g * float("inf"))
        return loss, surrogate

    stepper._loss_fn = overflowing_gradient
    stepper.stats.start(0)
    with pyro.validation_enabled(False):
        for _ in range(5):
            stepper.step(X, kl_scale=0.5)
    stats = stepper.read()
    assert stats.first_bad == 3, stats
    assert stats.bad_loss is not None and torch.isfinite(torch.tensor(stats.bad_loss)), stats
    assert stats.bad_gradient and "gradient" in stats.problem and "at step" not in stats.problem
    assert not all(torch.isfinite(p).all() for p in stepper.params)  # what a checkpoint would have held


def test_a_nan_loss_is_named_as_a_loss_and_a_finite_run_has_no_bad_step():
    stats = S.DeviceStats("cpu")
    stats.start(0)
    ok = torch.tensor(True)
    stats.record(torch.tensor(1.0, dtype=torch.float64), ok)
    assert stats.read() == S.StepStats(1.0)
    stats.record(torch.tensor(float("nan"), dtype=torch.float64), ok)
    stats.record(torch.tensor(2.0, dtype=torch.float64), torch.tensor(False))
    read = stats.read()
    assert (read.first_bad, read.bad_gradient, read.problem) == (2, False, "the loss became nan")


# ---------------------------------------------------------------------------------------------------------------------
# 2. Any Pyro optimiser: SVI.step's parameters.


@pytest.mark.parametrize(
    "make_optim",
    [lambda: pyro.optim.Adam({"lr": 0.01}), lambda: pyro.optim.ClippedAdam({"lr": 0.01, "clip_norm": 5.0})],
    ids=["Adam", "ClippedAdam"],
)
def test_a_pyro_optimiser_gives_svi_step_parameters_bit_for_bit(make_optim):
    cfg = vlae_config()
    results = []
    for graph_safe in (False, True):
        pyro.set_rng_seed(1)
        model, guide, _, _ = TR.build(cfg, "cpu")
        results.append(run(model, guide, make_optim, "trace", X, 5, graph_safe))
    (svi_losses, svi_params), (losses, params) = results
    assert losses == svi_losses
    assert svi_params.keys() == params.keys()
    differ = {
        k: float((params[k] - svi_params[k]).abs().max()) for k in params if not torch.equal(params[k], svi_params[k])
    }
    assert not differ, f"differ from SVI.step: {differ}"


def test_an_optimiser_that_is_not_a_pyro_optimiser_is_refused():
    model, guide, _, _ = TR.build(vlae_config(), "cpu")
    with pytest.raises(ValueError, match=r"optim must be a pyro\.optim\.PyroOptim .* got Adam"):
        S.make_step(model, guide, torch.optim.Adam([torch.zeros(1, requires_grad=True)]), "trace", "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# 3. A guide site that is not reparameterised is refused under either objective.


def coin_model(x, kl_scale=1.0):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0])))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def coin_guide(x, kl_scale=1.0):
    logit = pyro.param("logit", torch.zeros(()))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=logit.expand(x.shape[0])))


@pytest.mark.parametrize("validation", [False, True], ids=["validation-off", "validation-on"])
@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_a_bernoulli_guide_site_is_refused(elbo, validation):
    stepper = S.make_step(coin_model, coin_guide, pyro.optim.Adam({"lr": 0.1}), elbo, "cpu")
    with pyro.validation_enabled(validation), pytest.raises(ValueError, match="guide site 'z' is not reparameterised"):
        stepper.step(torch.randn(8))


# ---------------------------------------------------------------------------------------------------------------------
# 4. Parameters first seen after the first step.


def late_param_model(x, kl_scale, first_at, calls):
    """A model whose ``pyro.param("shift")`` first appears in step ``first_at`` (``calls`` counts the steps)."""
    calls[0] += 1
    loc = pyro.param("loc", torch.zeros(()))
    shift = pyro.param("shift", torch.zeros(())) if calls[0] >= first_at else 0.0
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z + shift, 0.5), obs=x)


def normal_guide(x, kl_scale=1.0):
    m = pyro.param("m", torch.zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(m, 1.0))


def _late(first_at):
    calls = [0]
    return lambda x, kl_scale=1.0: late_param_model(x, kl_scale, first_at, calls)


def test_a_param_first_seen_after_the_validated_steps_is_refused_by_name():
    stepper = S.make_step(_late(3), normal_guide, pyro.optim.Adam({"lr": 0.1}), "trace", "cpu")
    x = torch.randn(8)
    with pyro.validation_enabled(False):
        stepper.step(x)
        stepper.step(x)
        with pytest.raises(ValueError, match=r"pyro\.param 'shift' first appeared after .* would never train it"):
            stepper.step(x)


def test_a_param_first_seen_in_a_validated_step_trains_as_svi_trains_it():
    x = torch.randn(8)
    results = []
    for graph_safe in (False, True):
        pyro.clear_param_store()
        results.append(run(_late(2), normal_guide, lambda: pyro.optim.Adam({"lr": 0.1}), "trace", x, 5, graph_safe))
    (svi_losses, svi_params), (losses, params) = results
    assert losses == svi_losses and params.keys() == svi_params.keys() == {"loc", "shift", "m"}
    assert all(torch.equal(params[k], svi_params[k]) for k in params) and params["shift"] != 0
