"""A failed CUDA-graph capture that leaves behind what a real one leaves: training goes on with the eager losses.

On a GPU, a capture whose ``capture_end`` raises leaves its capture stream current and the default CUDA generator's
state marked as capturing; the next eager random draw then raises ``Offset increment outside graph capture encountered
unexpectedly``.  The CPU cannot capture, so the test imitates that state through the capture module's seams: a fake
capture makes a "capture stream" current and marks a fake default generator as capturing before raising torch's error,
and a dispatch mode raises torch's error at any random draw while the generator is so marked.  The step must put both
back and take every step eagerly, with the losses and parameters of a run that never tried to capture.
"""

import dataclasses

import pyro
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_vlae.presets import get_preset
from pyro_vlae.training import capture as C
from pyro_vlae.training import runs as TR
from pyro_vlae.training import step as S

SCALES = [1e-4, 0.3, 0.55, 0.8, 1.0] * 2  # 2 validated steps, 3 warm-up, the failed capture at 6, 4 more


class FakeState:
    def __init__(self):
        self.capturing = False


class FakeGenerator:
    """The parts of a CUDA ``torch.Generator`` the recovery uses: a state that a capture marks, ``clone_state`` (a new
    state, never capturing, as torch's) and ``graphsafe_set_state``."""

    def __init__(self, state=None):
        self.state = state or FakeState()

    def clone_state(self):
        return FakeGenerator()

    def graphsafe_set_state(self, other):
        self.state = other.state


class FakeCuda:
    """The device state the seams read and write, and a capture that fails as a real one does."""

    DEFAULT, CAPTURE = "default stream", "capture stream"

    def __init__(self):
        self.current, self.generator, self.captures = self.DEFAULT, FakeGenerator(), 0

    def install(self, monkeypatch):
        monkeypatch.setattr(C, "current_stream", lambda device: self.current)
        monkeypatch.setattr(C, "set_stream", lambda stream: setattr(self, "current", stream))
        monkeypatch.setattr(C, "default_generator", lambda device: self.generator)
        monkeypatch.setattr(C, "capture_graph", self.capture_graph)

    def capture_graph(self, fn, x, optim, stream):
        # torch.cuda.graph.__enter__: the capture stream made current; capture_begin: the generator marked capturing.
        self.captures += 1
        self.current = self.CAPTURE
        self.generator.state.capturing = True
        for p in optim.optimizer.param_groups[0]["params"]:  # as a capture that failed after its backward
            p.grad = torch.full_like(p, float("nan"))
        # capture_end raises from cudaStreamEndCapture, before the stream and the generator are put back.
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


class GeneratorCheck(TorchDispatchMode):
    """A random draw while the fake generator is marked as capturing raises what torch raises."""

    def __init__(self, cuda):
        super().__init__()
        self.cuda, self.draws = cuda, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.draws += 1
            # The capture has ended: its stream, current or not, is no longer capturing.
            if self.cuda.generator.state.capturing:
                raise RuntimeError("Offset increment outside graph capture encountered unexpectedly.")
        return func(*args, **(kwargs or {}))


def config():
    p = get_preset("tiny")
    m = dataclasses.replace(p.model, likelihood="laplace", obs_scale=0.3)
    return TR.RunConfig("vlae", "synthetic", "tiny", m, p.train, seed=1)


def train(graph: bool, cuda=None, warn=None, optim=None):
    """One step per KL scale from the same seed, validation on for the first two; the losses and the parameters."""
    pyro.set_rng_seed(3)
    x = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    model, guide, fused, _ = TR.build(config(), "cpu")
    optim = optim() if optim else fused
    stepper = S.make_step(model, guide, optim, "trace", "cpu", graph=graph, warn=warn)
    losses = []
    for i, k in enumerate(SCALES):
        with pyro.validation_enabled(i < 2):
            stepper.step(x, kl_scale=k)
        losses.append(stepper.read().loss)
    return losses, [p.detach().clone() for p in [*model.parameters(), *guide.parameters()]], stepper


def test_a_failed_capture_that_leaves_its_stream_and_generator_recovers_with_the_eager_losses(monkeypatch):
    eager_losses, eager_params, _ = train(graph=False)
    cuda, warnings = FakeCuda(), []
    cuda.install(monkeypatch)
    with GeneratorCheck(cuda) as draws:
        losses, params, stepper = train(graph=True, cuda=cuda, warn=warnings.append)
    assert cuda.captures == 1 and stepper.failed and len(warnings) == 1
    assert "operation failed due to a previous error during capture" in warnings[0]
    assert cuda.current == FakeCuda.DEFAULT, "the capture stream was left current"
    assert not cuda.generator.state.capturing, "the generator was left capturing"
    assert draws.draws >= len(SCALES) * 2  # the steps after the capture drew noise (z and the reparameterised sites)
    assert losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))


def test_the_seam_is_not_blind_a_generator_left_capturing_stops_the_next_draw(monkeypatch):
    """Without the recovery (``restore`` made a no-op), the leftover state stops training at the next draw, as on a
    GPU."""
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    monkeypatch.setattr(C, "restore", lambda saved: None)
    with GeneratorCheck(cuda), pytest.raises(RuntimeError, match="Offset increment outside graph capture"):
        train(graph=True, cuda=cuda, warn=lambda msg: None)
    assert cuda.current == FakeCuda.CAPTURE


def test_save_and_restore_are_no_ops_off_cuda():
    saved = C.save("cpu")
    assert (saved.stream, saved.generator, saved.state) == (None, None, None)
    C.restore(saved)
    assert C.new_stream("cpu") is None
    ran = []
    C.warm_up(ran.append, 1, None)
    assert ran == [1]
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device; the batch is on cpu"):
        C.capture_graph(lambda x: None, torch.zeros(1), None)


def test_an_optimiser_that_cannot_be_captured_is_not_captured_and_trains_eagerly(monkeypatch):
    monkeypatch.setattr(C, "capture_graph", lambda *args: pytest.fail("a non-capturable optimiser was captured"))
    adam = lambda: pyro.optim.Adam({"lr": 1e-3})  # noqa: E731
    eager_losses, eager_params, _ = train(graph=False, optim=adam)
    warnings = []
    losses, params, stepper = train(graph=True, warn=warnings.append, optim=adam)
    assert warnings == ["CUDA graph capture of the training step failed (Adam cannot be captured; FusedAdam can); "
                        "training eagerly"]  # fmt: skip
    assert losses == eager_losses and all(torch.equal(a, b) for a, b in zip(params, eager_params))
