"""FusedAdam against Pyro's own per-parameter Adam: the same steps, interchangeable state, clear errors."""

import io

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_vlae.training.optim import FusedAdam

LR = 0.05


def _problem(detached=True):
    """A small model with an nn.Module, a param used from step 3 on, and one used on even steps only."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    x = torch.randn(8, 3)
    y = torch.randn(8)

    def model(step):
        pyro.module("net", net)
        loc = net(x) + pyro.param("a", torch.zeros(2))
        if step >= 3:
            loc = loc + pyro.param("late", torch.full((2,), 0.5))
        if step % 2 == 0:
            loc = loc * pyro.param("even", torch.ones(2))
        # In the trace every step, but with a gradient only on steps divisible by 3: Adam still moves it in between
        # (on the zeros SVI left), as pyro.optim.Adam does.
        if detached:
            d = pyro.param("sometimes_detached", torch.zeros(2))
            loc = loc + (d if step % 3 == 0 else d.detach())
        with pyro.plate("data", 8):
            z = pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))
            pyro.sample("y", dist.Normal(z.sum(-1), 0.5), obs=y)

    def guide(step):
        m = pyro.param("m", torch.zeros(8, 2))
        s = pyro.param("s", torch.ones(8, 2), constraint=dist.constraints.positive)
        with pyro.plate("data", 8):
            pyro.sample("z", dist.Normal(m, s).to_event(1))

    return model, guide, net


def _train(optim, steps, start=0, state=None, detached=True):
    """Run ``steps`` SVI steps from a fresh param store; returns every parameter's value and the optimiser."""
    pyro.clear_param_store()
    model, guide, net = _problem(detached)
    if state is not None:
        # The module is restored from its state dict (as train.load_run does); the store holds the other params.
        net.load_state_dict(state["net"])
        pyro.get_param_store().set_state(
            {k: {n: v for n, v in d.items() if not n.startswith("net$$$")} for k, d in state["params"].items()}
        )
        optim.set_state(state["optim"])
    svi = SVI(model, guide, optim, Trace_ELBO())
    for t in range(start, start + steps):
        pyro.set_rng_seed(100 + t)
        svi.step(t)
    values = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    snapshot = {"params": pyro.get_param_store().get_state(), "net": net.state_dict(), "optim": optim.get_state()}
    return values, snapshot


def _assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_same_trajectory_as_pyro_adam(fused):
    ref, _ = _train(Adam({"lr": LR}), 10)
    got, _ = _train(FusedAdam({"lr": LR}, fused=fused), 10)
    _assert_close(ref, got)
    # Not a vacuous comparison: the late and the even-only parameters did move, and by different amounts.
    assert not torch.allclose(got["late"], torch.full((2,), 0.5))
    assert not torch.allclose(got["even"], torch.ones(2))
    assert not torch.allclose(got["sometimes_detached"], torch.zeros(2))


def test_parameter_missing_from_a_step_is_not_moved():
    pyro.clear_param_store()
    p = pyro.param("p", torch.zeros(3))
    q = pyro.param("q", torch.zeros(3))
    opt = FusedAdam({"lr": 0.1})
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt([p, q])  # both are known to the optimiser now
    before = q.detach().clone()
    p.grad, q.grad = torch.ones(3), torch.ones(3)
    opt([p])
    assert torch.all(p.detach() < before) and torch.equal(q.detach(), before)
    assert torch.equal(q.grad, torch.ones(3)), "the unused parameter's gradient must be left as it was"
    assert p.grad is None, "stepped parameters' gradients are cleared"


@pytest.mark.parametrize(
    "first,second",
    [(Adam, FusedAdam), (FusedAdam, Adam), (FusedAdam, FusedAdam)],
    ids=["pyro-fused", "fused-pyro", "fused-fused"],
)
@pytest.mark.parametrize("split", [5, 6], ids=["late-param-after-resume", "all-params-before"])
def test_state_resumes_across_optimisers(first, second, split):
    """``split`` steps, save, the rest with either optimiser equals twelve uninterrupted Pyro Adam steps.  At split 5
    the parameter ``even`` first returns after the resume, so its saved state is loaded when it appears."""
    # pyro.optim.Adam itself is not resume-exact for a traced parameter without a gradient in the first step after a
    # resume (its gradient is then None, not the zeros zero_grads left), so that parameter is left out when Pyro's
    # optimiser is the one resuming.
    d = second is not Adam
    ref, _ = _train(Adam({"lr": LR}), 12, detached=d)
    _, snap = _train(first({"lr": LR}), split, detached=d)
    buf = io.BytesIO()  # the optimiser state survives a weights-only checkpoint round trip
    torch.save(snap["optim"], buf)
    buf.seek(0)
    snap["optim"] = torch.load(buf, weights_only=True)
    got, _ = _train(second({"lr": LR}), 12 - split, start=split, state=snap, detached=d)
    _assert_close(ref, got)
    # Resuming without the optimiser state is measurably different: the state matters and was used.
    fresh, _ = _train(second({"lr": LR}), 12 - split, start=split, state={**snap, "optim": {}}, detached=d)
    assert max((fresh[k] - ref[k]).abs().max().item() for k in ref) > 1e-3


def test_learning_rate_comes_from_the_constructor_on_resume():
    """A resumed run with another --lr uses it (pyro.optim.Adam would restore the saved one)."""
    _, snap = _train(FusedAdam({"lr": LR}), 4)
    opt = FusedAdam({"lr": 0.5})
    _train(opt, 1, start=4, state=snap)
    assert [g["lr"] for g in opt.optimizer.param_groups] == [0.5]
    param_of = {name: p for p, name in opt._names.items()}
    assert opt.optimizer.state[param_of["a"]]["step"].item() == 5, "the moments were restored, then stepped once"


def test_state_of_parameters_not_seen_yet_is_kept():
    opt = FusedAdam({"lr": LR})
    opt.set_state({"later": {"state": {}, "param_groups": []}})
    assert "later" in opt.get_state()


def test_errors_name_the_fix():
    with pytest.raises(TypeError, match="pyro.optim.Adam"):
        FusedAdam(lambda module, name: {"lr": 1.0})
    with pytest.raises(ValueError, match="fused"):
        FusedAdam({"lr": 1.0, "fused": True})
    pyro.clear_param_store()
    stray = torch.zeros(2, requires_grad=True)
    stray.grad = torch.ones(2)
    with pytest.raises(ValueError, match="param store"):
        FusedAdam({"lr": 1.0})([stray])


class _CapturableAfterFirstStep(FusedAdam):
    """FusedAdam made capturable after its first step, as the CUDA-graph step does before its capture."""

    def __call__(self, params, *args, **kwargs):
        super().__call__(params, *args, **kwargs)
        self.capturable(True)


def test_capturable_changes_the_flag_not_the_update_and_is_not_saved():
    ref, _ = _train(FusedAdam({"lr": LR}, fused=True), 6, detached=False)
    opt = _CapturableAfterFirstStep({"lr": LR}, fused=True)
    got, snap = _train(opt, 6, detached=False)
    assert all(g["capturable"] for g in opt.optimizer.param_groups)
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit for bit: the fused kernel ignores the flag
    groups = [g for st in snap["optim"].values() for g in st["param_groups"]]
    assert groups and not any(g["capturable"] for g in groups)  # the checkpoint loads into any optimiser
    resumed = Adam({"lr": LR})  # Pyro's own optimiser resumes it on the CPU
    _train(resumed, 2, start=6, state=snap, detached=False)


def test_capturable_needs_a_step_and_the_fused_kernel():
    with pytest.raises(RuntimeError, match="take one step first"):
        FusedAdam({"lr": LR}).capturable(True)
    _, _ = _train(opt := FusedAdam({"lr": LR}, fused=False), 1)
    with pytest.raises(RuntimeError, match="needs the fused kernel"):
        opt.capturable(True)
