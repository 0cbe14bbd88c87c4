r"""Capturing the training step in a CUDA graph, and surviving a capture that fails; the CUDA settings of a run.

:func:`use_cuda_graph` resolves ``--cuda-graph auto|on|off`` for a device and :func:`tf32` sets TF32 on CUDA.
:class:`~pyro_vlae.training.step.GraphStep` warms the step up with :func:`warm_up` on the stream that
:func:`capture_graph` then captures on (one side stream, :func:`new_stream`), and brackets the capture with
:func:`save` and :func:`restore`.

**What a failed capture leaves behind, and how the run recovers.**  When a capture is invalidated (a host read, a
synchronising call, an allocation the capture may not make), ``torch.cuda.graph.__exit__`` calls
``CUDAGraph.capture_end``, which raises from ``cudaStreamEndCapture`` before two things are undone:

* the capture stream stays the current stream (``__exit__`` raises before it leaves its ``torch.cuda.stream``
  context), so later eager work would run on a side stream that nothing orders against the default stream;
* the default CUDA generator's state stays marked as capturing (``capture_epilogue`` runs only after a capture that
  ended cleanly), so on the torch versions that keep one capture flag per generator state the next eager random draw
  raises ``Offset increment outside graph capture encountered unexpectedly``.

The recovery is in-process: :func:`save` notes the current stream and clones the generator's state (seed and offset;
a clone is never capturing) before the capture, and :func:`restore` makes that stream current again and points the
default generator at the clone (``Generator.graphsafe_set_state``), so the eager step that replaces the captured one
draws the noise an eager run draws at that step; a capture the failure left open is ended first (:func:`capture_graph`).
The capture runs in ``capture_error_mode="thread_local"`` (:data:`CAPTURE_ERROR_MODE`), the mode torch's own
CUDA-graph trees use: a prohibited call made by *this* thread still fails the capture (so it is reported and the run
falls back), but a call made by another thread (a data-loading or logging thread) neither fails that thread's work nor
invalidates the capture, as it would in the default ``"global"`` mode.  ``"relaxed"`` was not chosen: it lets this
thread's own prohibited calls through silently, so a capture that is wrong would be replayed instead of refused.  An
in-process recovery was chosen over probing the capture in a child process because the step's state (the parameters,
the optimiser's moments, the generator) lives in this process: a child's successful capture would say nothing about
this one, and this recovery puts back everything a failed capture changes.

:func:`current_stream`, :func:`set_stream` and :func:`default_generator` are the seams the CPU tests replace to leave
the same state behind as a real failure does.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch

#: The ``cudaStreamCaptureMode`` of the capture (see the module docstring for why).
CAPTURE_ERROR_MODE = "thread_local"
CUDA_GRAPH_MODES = ("auto", "on", "off")


def use_cuda_graph(mode: str, device) -> bool:
    """Whether ``--cuda-graph mode`` captures the step on ``device``: ``auto`` on CUDA only, ``off`` never.

    :raises ValueError: for ``on`` without a CUDA device, or an unknown mode.
    """
    if mode not in CUDA_GRAPH_MODES:
        raise ValueError(f"--cuda-graph must be one of {', '.join(CUDA_GRAPH_MODES)}, got {mode!r}")
    cuda = torch.device(device).type == "cuda"
    if mode == "on" and not cuda:
        raise ValueError(
            f"--cuda-graph on captures the training step in a CUDA graph, and this run is on {torch.device(device)}: "
            "use --cuda-graph auto (a graph on CUDA, eager elsewhere) or --cuda-graph off (with --force-config to "
            "change a resumed run's setting)"
        )
    return cuda and mode != "off"


@contextlib.contextmanager
def tf32(device, on: bool = True):
    """TF32 for matrix products and convolutions on a CUDA ``device`` while inside (``on``) or full float32 (not
    ``on``); the previous settings come back on exit.  Nothing changes on other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def new_stream(device):
    """A side stream on a CUDA ``device`` for the warm-up and the capture; ``None`` elsewhere."""
    device = torch.device(device)
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def current_stream(device):
    """The current stream of a CUDA ``device`` (``None`` elsewhere)."""
    device = torch.device(device)
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def set_stream(stream) -> None:
    torch.cuda.set_stream(stream)


def default_generator(device):
    """The default generator of a CUDA ``device``, which random draws on it use (``None`` elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


@dataclass
class Saved:
    """What :func:`restore` puts back after a failed capture."""

    device: torch.device
    stream: object  # the current stream before the capture
    generator: object  # the device's default generator
    state: object  # a clone of its state before the capture (not capturing)


def save(device) -> Saved:
    """Collect garbage (an earlier step's autograd graph held by a reference cycle must not reach the capture), then
    note the current stream and clone the default generator's state."""
    gc.collect()
    device = torch.device(device)
    generator = default_generator(device)
    state = generator.clone_state() if generator is not None and hasattr(generator, "clone_state") else None
    return Saved(device, current_stream(device), generator, state)


def restore(saved: Saved) -> None:
    """After a failed capture: the stream that was current before it is current again, and the default generator
    continues from its state before the capture, no longer marked as capturing."""
    if saved.stream is not None and current_stream(saved.device) != saved.stream:
        set_stream(saved.stream)
    if saved.state is not None:
        saved.generator.graphsafe_set_state(saved.state)


def set_capturable(optim, on: bool) -> None:
    capturable = getattr(optim, "capturable", None)
    if capturable is not None:
        capturable(on)


def warm_up(fn, x, stream) -> None:
    """Run ``fn(x)`` on ``stream`` (the capture's), ordered after the current stream's work and before what follows,
    as PyTorch's capture recipe warms up; ``fn(x)`` itself without a stream."""
    if stream is None:
        fn(x)
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    with torch.cuda.stream(stream):
        fn(x)
    torch.cuda.current_stream(stream.device).wait_stream(stream)


def capture_graph(fn, x, optim, stream=None):
    """Capture ``fn(x)`` on ``stream`` in a :class:`torch.cuda.CUDAGraph` (the optimiser made capturable first, in
    :data:`CAPTURE_ERROR_MODE`) and return it.  A capture the failure left open is ended before the error propagates.

    The seam that tests replace to force a capture failure on a CPU.
    """
    if x.device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device; the batch is on {x.device}")
    set_capturable(optim, True)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode=CAPTURE_ERROR_MODE):
            fn(x)
    except BaseException:
        _end_open_capture(graph, stream)
        raise
    return graph


def _end_open_capture(graph, stream) -> None:
    """End a capture that is still under way on ``stream`` (``capture_end`` refused before ending it), so that the
    stream and the memory it captured into can be used again; its own error is the one already raised."""
    if stream is None:
        return
    with torch.cuda.stream(stream):
        if torch.cuda.is_current_stream_capturing():
            with contextlib.suppress(Exception):
                graph.capture_end()
