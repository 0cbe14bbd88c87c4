"""The graph-safe training step: Pyro's ELBO step bit for bit, with nothing read on the host.

Each test compares with something the step does not use: ``pyro.infer.SVI`` with ``Trace_ELBO`` or
``TraceMeanField_ELBO`` and the same optimiser (parameters and losses after a few steps, bit for bit), the gradients
of Pyro's ``differentiable_loss`` on the same noise, and a record of every operator the step dispatches.
"""

import collections
import dataclasses
import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_vlae.presets import get_preset
from pyro_vlae.training import capture as C
from pyro_vlae.training import loop as T
from pyro_vlae.training import runs as TR
from pyro_vlae.training import step as S

KINDS = ["vlae", "hvae", "hvae-ar", "vae"]
LIKELIHOODS = ["gaussian", "laplace", "bernoulli", "gaussian-learned"]  # the last: the mnist-hvae-b1-learned preset
CASES = [(k, lik, "trace") for k in KINDS for lik in LIKELIHOODS] + [
    (k, lik, "meanfield") for k in ("vlae", "vae") for lik in LIKELIHOODS
]
KL_SCALES = [1e-4, 0.3, 0.55, 0.8, 1.0]  # a schedule that changes every step


def config(kind="vlae", likelihood="laplace", elbo="trace", **model):
    p = get_preset("tiny")
    scale = 1.0 if likelihood == "bernoulli" else 0.3
    m = dataclasses.replace(p.model, likelihood=likelihood, obs_scale=scale, **model)
    return TR.RunConfig(kind, "synthetic", "tiny", m, dataclasses.replace(p.train, elbo=elbo), seed=1)


def batch(likelihood, n=12, seed=5):
    x = torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed)) if likelihood == "bernoulli" else x


def train(cfg, x, graph_safe: bool, scales=KL_SCALES, **step_kwargs):
    """One step per KL scale in ``scales`` from the same seed, Pyro's validation on for the first two (as in ``fit``);
    returns the losses and every entry of the model's and guide's state dicts."""
    pyro.set_rng_seed(3)
    model, guide, optim, svi = TR.build(cfg, "cpu")
    stepper = S.make_step(model, guide, optim, cfg.train.elbo, "cpu", **step_kwargs) if graph_safe else svi
    losses = []
    for i, k in enumerate(scales):
        with pyro.validation_enabled(i < 2):
            loss = stepper.step(x, kl_scale=k)
        losses.append(stepper.read().loss if graph_safe else loss)
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    state.update({f"guide.{k}": v.clone() for k, v in guide.state_dict().items()})
    return losses, state


@pytest.mark.parametrize("kind,likelihood,elbo", CASES, ids=["-".join(c) for c in CASES])
def test_steps_equal_svi_steps_bit_for_bit(kind, likelihood, elbo):
    """Parameters, batch-norm statistics and reported losses after five steps equal ``SVI.step``'s exactly."""
    cfg, x = config(kind, likelihood, elbo), batch(likelihood)
    svi_losses, svi_state = train(cfg, x, graph_safe=False)
    losses, state = train(cfg, x, graph_safe=True)
    assert losses == svi_losses
    assert svi_state.keys() == state.keys()
    differ = [k for k in state if not torch.equal(state[k], svi_state[k])]
    assert not differ, f"differ from SVI.step: {differ}"
    assert any(not torch.equal(v, train(cfg, x, True, scales=[1.0])[1][k]) for k, v in state.items())  # they moved


@pytest.mark.parametrize("kind,likelihood,elbo", CASES[::3], ids=["-".join(c) for c in CASES[::3]])
def test_loss_and_gradients_equal_pyro_differentiable_loss_on_fixed_noise(kind, likelihood, elbo):
    cfg, x = config(kind, likelihood, elbo), batch(likelihood)
    model, guide, optim, _ = TR.build(cfg, "cpu")
    params = [p for m in (model, guide) for p in m.parameters()]
    pyro.set_rng_seed(7)
    elbo_cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}[elbo]
    ref = elbo_cls().differentiable_loss(model, guide, x, kl_scale=0.37)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    pyro.set_rng_seed(7)
    stepper = S.make_step(model, guide, optim, elbo, "cpu")
    stepper.set_kl_scale(0.37)
    loss, surrogate = stepper._loss(x)
    grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    assert float(loss) == pytest.approx(ref.item(), rel=1e-6) and surrogate.item() == pytest.approx(
        ref.item(), rel=1e-6
    )
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, ref_grads))


# ---------------------------------------------------------------------------------------------------------------------
# Nothing read on the host.
#
# A CPU run cannot see a device synchronisation, so the test records the operators one step dispatches and refuses
# those that would be one, or that would make a CUDA graph replay a stale value:
# * an operator whose output depends on the data on the host (torch's ``data_dependent_output`` tag:
#   ``aten._local_scalar_dense`` for ``.item()``, ``float(t)``, ``bool(t)``; ``aten.equal``; ``aten.allclose``) or
#   whose output shape does (``dynamic_output_shape``: ``nonzero``, ``masked_select``, ``unique``, indexing with a
#   boolean mask): a read of a tensor on the host;
# * ``Tensor.tolist``, ``Tensor.numpy`` and ``__array__``, which read a CPU tensor's memory without an operator (seen
#   by a ``TorchFunctionMode``);
# * ``aten.lift_fresh`` / ``lift_fresh_copy`` of a non-empty tensor (``torch.tensor(data)``) and ``aten.scalar_tensor``:
#   a tensor made from host data, a host-to-device copy on CUDA (Pyro's ``plate`` makes an empty CPU tensor, no copy);
# * ``aten._to_copy`` / ``aten.copy_`` between devices: a transfer;
# * the step's KL scale or a fade-in gain passed as a Python number to any operator but the ``fill_`` that sets the
#   device scalar: a per-step value baked into a kernel, which a captured graph would replay at its capture value.


class _HostMethods(TorchFunctionMode):
    """The tensor methods that read data on the host without dispatching an operator (on a CPU tensor)."""

    READS = ("tolist", "numpy", "__array__")

    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.found[name] += 1
        return func(*args, **(kwargs or {}))


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class HostTraffic(TorchDispatchMode):
    def __init__(self, step_values=()):
        super().__init__()
        self.step_values, self.found = tuple(step_values), collections.Counter()
        self._methods = _HostMethods(self.found)

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._methods.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "scalar_tensor" or torch.Tag.data_dependent_output in func.tags:
            self.found[name] += 1
        elif name.startswith("index") or name == "_index_put_impl_":
            if _boolean_index(args):
                self.found[f"{name} with a boolean mask"] += 1
        elif torch.Tag.dynamic_output_shape in func.tags:
            self.found[name] += 1
        elif name in ("lift_fresh", "lift_fresh_copy") and out.numel() > 0:
            self.found["tensor from host data"] += 1
        elif name == "_to_copy" and "device" in kwargs and torch.device(kwargs["device"]) != args[0].device:
            self.found["device transfer"] += 1
        elif name == "copy_" and args[0].device != args[1].device:
            self.found["device transfer"] += 1
        if name != "fill_":
            for a in [*args, *kwargs.values()]:
                if isinstance(a, float) and any(math.isclose(a, v, rel_tol=1e-9) for v in self.step_values):
                    self.found[f"{name} with a per-step value baked in"] += 1
        return out


KL, GAIN_STEP = 0.123457, 5  # a KL scale no constant of the networks has; a step inside the fade-in ramp


def _fade_config(kind="vlae", likelihood="laplace", elbo="trace"):
    cfg = config(kind, likelihood, elbo)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fade_in=4 if kind == "vlae" else 0))


HOST_CASES = [  # (model, likelihood, ELBO, precision)
    ("vlae", "laplace", "trace", "fp32"),
    ("vlae", "laplace", "meanfield", "fp32"),
    ("vae", "laplace", "meanfield", "fp32"),
    ("hvae", "bernoulli", "trace", "fp32"),
    ("vlae", "laplace", "trace", "bf16"),
]


@pytest.mark.parametrize("kind,likelihood,elbo,precision", HOST_CASES, ids=["-".join(c) for c in HOST_CASES])
def test_one_step_reads_nothing_on_the_host_and_bakes_no_per_step_value(kind, likelihood, elbo, precision):
    cfg, x = _fade_config(kind, likelihood, elbo), batch(likelihood)
    model, guide, optim, _ = TR.build(cfg, "cpu")
    stepper = S.make_step(model, guide, optim, elbo, "cpu", precision=precision)
    gains = T.set_fade_in(model, cfg, GAIN_STEP - 1)
    with pyro.validation_enabled(False):
        T.train_step(stepper, x, 0.5)  # the first step also collects the parameters
        new_gains = T.ladder_gains(GAIN_STEP, 3, 4) if kind == "vlae" else []
        with HostTraffic([KL, *[g for g in new_gains if g not in (0.0, 1.0)]]) as seen:
            gains = T.set_fade_in(model, cfg, GAIN_STEP, gains)
            loss = T.train_step(stepper, x, KL)
    assert torch.is_tensor(loss) and not seen.found, dict(seen.found)
    if kind != "vlae":
        return
    assert model.ladder_gain.tolist() == pytest.approx(new_gains) and 0 < new_gains[1] < 1
    with HostTraffic() as seen:  # outside the ramp the gains are not touched at all
        T.set_fade_in(model, cfg, 100, T.set_fade_in(model, cfg, 99, gains))
    assert not seen.found


def test_the_host_traffic_record_catches_svi_step_and_a_copied_gain():
    """The record is not blind: Pyro's own step reads every site's loss on the host and bakes the KL scale into its
    kernels, and the previous fade-in code made the gains a tensor from host data."""
    cfg, x = _fade_config(), batch("laplace")
    model, guide, optim, svi = TR.build(cfg, "cpu")
    with pyro.validation_enabled(False):
        svi.step(x, kl_scale=0.5)
        with HostTraffic([KL]) as seen:
            svi.step(x, kl_scale=KL)
    assert seen.found["_local_scalar_dense"] >= 7  # 2L + 1 sites, then the returned float
    assert seen.found["mul with a per-step value baked in"] > 0
    with HostTraffic() as seen:
        model.ladder_gain.copy_(torch.tensor([0.25, 0.5]))
    assert seen.found["tensor from host data"] == 1


# Each way of reading a tensor on the host, put into a copy of the step, is caught by the record (the step itself
# passes: the test above).
HOST_READS = {
    ".item()": lambda t: t.item(),
    "float()": lambda t: float(t),
    "bool()": lambda t: bool(t > 0),
    "torch.tensor(data)": lambda t: t + torch.tensor([1.0]),
    "tolist": lambda t: t.tolist(),
    "numpy": lambda t: t.detach().numpy(),
    "torch.equal": lambda t: torch.equal(t, t),
    "allclose": lambda t: torch.allclose(t, t),
    "nonzero": lambda t: t.reshape(-1).nonzero(),
    "mask indexing": lambda t: t.reshape(-1)[t.reshape(-1) > 0],
    "unique": lambda t: t.unique(),
}


@pytest.mark.parametrize("read", list(HOST_READS), ids=list(HOST_READS))
def test_the_host_traffic_record_catches_each_host_read_put_into_the_step(read):
    cfg, x = config("vlae", "laplace"), batch("laplace")
    model, guide, optim, _ = TR.build(cfg, "cpu")

    class ReadingStep(S.GraphSafeStep):
        def _step(self, x):
            super()._step(x)
            HOST_READS[read](self.stats.last)

    stepper = ReadingStep(model, guide, optim, "trace", "cpu")
    with pyro.validation_enabled(False):
        stepper.step(x, kl_scale=0.5)
        with HostTraffic() as seen:
            stepper.step(x, kl_scale=0.5)
    assert seen.found, f"{read} in the step was not caught"


# ---------------------------------------------------------------------------------------------------------------------
# The accumulators, the CUDA-graph mode and its fallback.


def test_device_stats_name_the_first_non_finite_step_and_its_loss():
    stats = S.DeviceStats("cpu")
    stats.start(10)
    for v in (3.0, float("inf"), float("nan"), 2.0):
        stats.record(torch.tensor(v, dtype=torch.float64))
    assert stats.read() == S.StepStats(2.0, 12, float("inf"))
    stats.start(20)
    stats.record(torch.tensor(1.5, dtype=torch.float64))
    assert stats.read() == S.StepStats(1.5)


def test_the_finite_flag_also_trips_on_a_finite_gradient_whose_norm_overflows():
    """``torch._foreach_norm`` of finite float32 entries near 2e19 is infinite: the check reads "non-finite or
    overflowing", and the message says so."""
    huge = torch.full((4,), 2e19)
    assert torch.isfinite(huge).all() and not S.all_finite([huge]) and S.all_finite([huge / 1e10])
    assert S.StepStats(1.0, 3, 2.0, True).problem == (
        "a gradient or an updated parameter became NaN or infinite, or its norm overflowed (the loss was 2.0)"
    )


def test_cuda_graph_modes_resolve_by_device():
    assert S.use_cuda_graph("auto", "cpu") is False and S.use_cuda_graph("off", "cpu") is False
    with pytest.raises(ValueError, match=r"--cuda-graph on .* on cpu: use --cuda-graph auto"):
        S.use_cuda_graph("on", "cpu")
    with pytest.raises(ValueError, match="--cuda-graph must be one of auto, on, off"):
        S.use_cuda_graph("yes", "cpu")
    if not torch.cuda.is_available():
        assert S.use_cuda_graph("auto", "cuda") and S.use_cuda_graph("on", "cuda")
        assert not S.use_cuda_graph("off", "cuda")


def test_a_failed_capture_trains_eagerly_with_one_warning_and_the_same_parameters(monkeypatch):
    """The capture is forced to fail through its seam: the step warns once, saying why, and every step is still
    taken (the step of the failed capture too), so the parameters are those of the eager step."""
    cfg, x = config("vlae", "laplace"), batch("laplace")
    calls, warnings = [], []

    def failing_capture(fn, x, optim, stream):
        calls.append(1)
        for p in optim.optimizer.param_groups[0]["params"]:  # as a capture that failed after its backward
            p.grad = torch.full_like(p, float("nan"))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(C, "capture_graph", failing_capture)
    eager_losses, eager = train(cfg, x, graph_safe=True, scales=KL_SCALES * 2)
    # steps 1-2 validated, 3-5 warm-up, 6 the failed capture, then eager
    losses, state = train(cfg, x, graph_safe=True, scales=KL_SCALES * 2, graph=True, warn=warnings.append)
    assert len(calls) == 1 and len(warnings) == 1
    assert "capture of the training step failed (RuntimeError: operation not permitted" in warnings[0]
    assert warnings[0].endswith("training eagerly")
    assert losses == eager_losses and all(torch.equal(state[k], eager[k]) for k in eager)


def test_the_graph_step_takes_the_eager_steps_until_the_capture(monkeypatch):
    """Before the capture (validated steps, side-stream warm-up) the graph step is the eager step, bit for bit."""
    monkeypatch.setattr(C, "capture_graph", lambda *args: pytest.fail("captured before the warm-up ended"))
    cfg, x = config("hvae", "bernoulli"), batch("bernoulli")
    ref_losses, ref = train(cfg, x, graph_safe=True)
    losses, state = train(cfg, x, graph_safe=True, graph=True)  # 2 validated + 3 warm-up steps
    assert losses == ref_losses and all(torch.equal(state[k], ref[k]) for k in ref)


def test_tf32_is_set_on_cuda_only_and_restored():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with S.tf32("cpu", True):
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    for on in (True, False):
        with S.tf32("cuda", on):
            assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@pytest.mark.parametrize("kind", ["vlae", "hvae"])
def test_bf16_runs_the_networks_in_bfloat16_and_every_log_prob_in_float32(kind):
    cfg, x = config(kind, "laplace"), batch("laplace")
    model, guide, optim, _ = TR.build(cfg, "cpu")
    outputs = []
    for m in (model, guide):
        for layer in m.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                layer.register_forward_hook(lambda mod, args, out: outputs.append(out.dtype))
    losses = {}
    for precision in ("fp32", "bf16"):
        outputs.clear()
        stepper, traces = S.make_step(model, guide, optim, "trace", "cpu", precision=precision), []
        loss_fn = stepper._loss_fn
        stepper._loss_fn = lambda mt, gt, t=traces, f=loss_fn: t.extend([mt, gt]) or f(mt, gt)
        pyro.set_rng_seed(4)
        with pyro.validation_enabled(False):
            loss, _ = stepper._loss(x)
        losses[precision] = float(loss)
        expected = torch.bfloat16 if precision == "bf16" else torch.float32
        assert outputs and set(outputs) == {expected}
        sites = [s for tr in traces for s in tr.nodes.values() if s["type"] == "sample"]
        assert len(sites) == 2 * cfg.model.num_layers + 1
        assert all(s["log_prob"].dtype == s["value"].dtype == torch.float32 for s in sites)
    assert losses["bf16"] != losses["fp32"] and losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)
    with pyro.validation_enabled(False):
        for _ in range(3):
            stepper.step(x, kl_scale=0.5)
    assert math.isfinite(stepper.read().loss)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16"):
        S.make_step(model, guide, optim, "trace", "cpu", precision="fp16")
