r"""The SVI training step as tensors: Pyro's ELBO without host reads, eager or captured in a CUDA graph.

:meth:`pyro.infer.SVI.step` reads the device on every step: ``Trace_ELBO`` calls ``.item()`` on each site's
``log_prob_sum`` and the step returns a Python float.  :class:`GraphSafeStep` takes the same step with no host read:
it traces the guide and replays the model against it with Pyro's handlers (``get_importance_trace``, as
``Trace_ELBO`` does), sums the scaled ``log_prob_sum`` terms into a loss *tensor* exactly as
``Trace_ELBO._differentiable_loss_particle`` does (or the closed-form KLs of ``TraceMeanField_ELBO`` for
``elbo="meanfield"``), back-propagates and steps the optimiser.  The per-step KL scale is a device tensor changed in
place (``fill_``), and the loss of the step and a finite flag are kept in device accumulators (:class:`DeviceStats`)
that :meth:`GraphSafeStep.read` reads when the caller chooses (every ``log_every`` steps and before every checkpoint
in :func:`~pyro_vlae.training.loop.fit`).

The step is bit-identical to ``SVI.step`` with the same ELBO and :class:`~pyro_vlae.training.optim.FusedAdam`: the
same operations in the same order (``tests/training/test_step.py`` compares parameters bit for bit), so training has
one path.  :class:`GraphStep` is the same step captured in a CUDA graph: after the validated steps it runs
:data:`WARMUP_STEPS` real steps on a side stream, captures one whole step (model and guide traces, loss, backward,
the fused Adam step, the accumulators) reading a static input buffer that each batch is copied into, and replays it;
if the capture fails it trains eagerly and warns once, saying why.

Build and call it (``kl_scale`` is a Python float; it is copied into the device scalar only when it changes)::

    from pyro_vlae.training.runs import build
    from pyro_vlae.training.step import make_step

    model, guide, optim, _ = build(config, device)
    step = make_step(model, guide, optim, config.train.elbo, device, graph=False)  # graph=True: CUDA graph
    for s in range(num_steps):
        loss = step.step(x, kl_scale=schedule(s))   # a device tensor; nothing is read on the host
        if (s + 1) % log_every == 0:
            stats = step.read()                     # host read: StepStats(loss=..., first_bad=None | step)

The hot path reads nothing only with Pyro's validation off (``pyro.enable_validation(False)``; its checks read
tensors), as :func:`~pyro_vlae.training.loop.fit` runs after its first validated steps.  A :class:`GraphStep` runs its
first call and every call made with validation on eagerly, the next :data:`WARMUP_STEPS` on a side stream, captures
the one after and replays from then on.  :func:`use_cuda_graph` resolves ``--cuda-graph auto|on|off`` for a device
and :func:`tf32` sets TF32 on CUDA; ``make_step(..., precision="bf16")`` runs the networks under a bfloat16 autocast
with every log-probability in float32.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from torch.distributions import kl_divergence

from ..nets import without_param_registration

#: Real steps run eagerly on a side stream before the capture (PyTorch's whole-network capture recipe).
WARMUP_STEPS = 3
CUDA_GRAPH_MODES = ("auto", "on", "off")
PRECISIONS = ("fp32", "bf16")


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


# ---------------------------------------------------------------------------------------------------------------------
# The loss, as Pyro's ELBOs compute it, with no host read.


def trace_elbo_loss(model_trace, guide_trace) -> tuple:
    """``(loss, surrogate)`` of ``Trace_ELBO._differentiable_loss_particle`` for reparameterised guides.

    ``surrogate`` is the tensor Pyro back-propagates, built by the same operations in the same order.  ``loss`` is
    Pyro's reported value, the sum of the sites' ``log_prob_sum`` in double precision in the same order (Pyro sums
    their ``.item()`` floats), but kept on the device.
    """
    elbo, surrogate = 0, 0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            elbo = elbo + site["log_prob_sum"].detach().double()
            surrogate = surrogate + site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample":
            _, score_function_term, entropy_term = site["score_parts"]
            elbo = elbo - site["log_prob_sum"].detach().double()
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                raise ValueError(
                    f"guide site {name!r} is not reparameterised; the graph-safe step supports reparameterised guides "
                    "only (train it with pyro.infer.SVI)"
                )
    return -elbo, -surrogate


def meanfield_elbo_loss(model_trace, guide_trace) -> tuple:
    """``(loss, surrogate)`` of ``TraceMeanField_ELBO._differentiable_loss_particle``: closed-form KLs where torch has
    them, Pyro's log-ratio otherwise, in the same order."""
    elbo = 0
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            elbo = elbo + model_site["log_prob_sum"]
            continue
        guide_site = guide_trace.nodes[name]
        try:
            kl = kl_divergence(guide_site["fn"], model_site["fn"])
            kl = scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])
            elbo = elbo - kl.sum()
        except NotImplementedError:
            elbo = elbo + model_site["log_prob_sum"] - guide_site["score_parts"].entropy_term.sum()
    for name, guide_site in guide_trace.nodes.items():
        if guide_site["type"] == "sample" and name not in model_trace.nodes:
            elbo = elbo - guide_site["score_parts"].entropy_term.sum()
    return -elbo.detach().double(), -elbo


ELBO_LOSSES = {"trace": trace_elbo_loss, "meanfield": meanfield_elbo_loss}


# ---------------------------------------------------------------------------------------------------------------------
# Device accumulators.


@dataclass
class StepStats:
    """What :meth:`GraphSafeStep.read` returns: the loss of the last step (as ``SVI.step`` reports it), the first
    step (1-based, counted from the start of training) whose loss was NaN or infinite (``None`` if none was) and that
    loss."""

    loss: float
    first_bad: int | None = None
    bad_loss: float | None = None


class DeviceStats:
    """The step's loss and finite check on the device, updated in place inside the step (so inside a CUDA graph).

    ``last`` holds the last step's loss (float64), ``steps`` the number of steps taken (set with :meth:`start`),
    ``first_bad`` the first step whose loss was not finite (``-1``: none) and ``bad_loss`` that loss.
    """

    def __init__(self, device):
        self.last = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def start(self, step: int) -> None:
        """Count steps from ``step`` (the resumed step) on; forget any earlier non-finite step."""
        self.steps.fill_(step)
        self.first_bad.fill_(-1)

    def record(self, loss: torch.Tensor) -> None:
        self.last.copy_(loss)
        self.steps.add_(1)
        first = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, self.steps, self.first_bad))
        self.bad_loss.copy_(torch.where(first, loss, self.bad_loss))

    def read(self) -> StepStats:
        """Read the accumulators on the host (one device synchronisation)."""
        last, bad_loss, first_bad = torch.stack([self.last, self.bad_loss, self.first_bad.double()]).tolist()
        if first_bad < 0:
            return StepStats(last)
        return StepStats(last, int(first_bad), bad_loss)


# ---------------------------------------------------------------------------------------------------------------------
# The steps.


class GraphSafeStep:
    """One SVI step of ``model`` and ``guide`` with no host read: the interface of :meth:`pyro.infer.SVI.step`, with
    the loss left on the device.

    The first step registers the parameters with Pyro and collects those its trace reaches, as ``SVI.step`` does;
    later steps take the same parameters (the model's structure is static, as a CUDA graph needs anyway) and run
    the networks inside :func:`~pyro_vlae.nets.without_param_registration`, which computes the same values without
    a ``pyro.module`` statement per child module and step.

    :param model: the model, called as ``model(x, kl_scale=...)``.
    :param guide: the guide, same signature.
    :param optim: the optimiser, a :class:`~pyro_vlae.training.optim.FusedAdam` (any Pyro optimiser works eagerly).
    :param elbo: ``"trace"`` (``Trace_ELBO``) or ``"meanfield"`` (``TraceMeanField_ELBO``).
    :param device: where the per-step scalars and the accumulators live.
    :param precision: ``"fp32"``, or ``"bf16"``: the networks' forward pass under a bfloat16 autocast (weights, Adam
        and every log-probability stay float32: the models cast distribution parameters back,
        :func:`pyro_vlae.nets.full`).
    """

    def __init__(self, model, guide, optim, elbo: str, device, precision: str = "fp32"):
        if elbo not in ELBO_LOSSES:
            raise ValueError(f"--elbo must be one of {sorted(ELBO_LOSSES)}, got {elbo!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.model, self.guide, self.optim, self.elbo = model, guide, optim, elbo
        self._loss_fn = ELBO_LOSSES[elbo]
        self.device = torch.device(device)
        self.stats = DeviceStats(self.device)
        self.kl_scale = torch.ones((), dtype=torch.float64, device=self.device)  # float64: Pyro's float arithmetic
        self._kl_host: float | None = None
        self.params: list | None = None  # the parameters of the first step's trace (static structure)

    def set_kl_scale(self, kl_scale: float) -> None:
        """Copy ``kl_scale`` into the device scalar when it changed (a fill kernel, no host-to-device copy)."""
        if kl_scale != self._kl_host:
            self.kl_scale.fill_(kl_scale)
            self._kl_host = kl_scale

    def _loss(self, x) -> tuple:
        with self._autocast():
            model_trace, guide_trace = get_importance_trace(
                "flat", math.inf, self.model, self.guide, (x,), {"kl_scale": self.kl_scale}
            )
            return self._loss_fn(model_trace, guide_trace)

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # No cast cache: a CUDA graph must not capture casts cached from an eager step.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _step(self, x) -> None:
        """Loss, backward and optimiser step (what ``SVI.step`` does), and the accumulators."""
        if self.params is None:  # the first step: register and collect the parameters as SVI does
            with poutine.trace(param_only=True) as capture:
                loss, surrogate = self._loss(x)
            self.params = list({site["value"].unconstrained() for site in capture.trace.nodes.values()})
        else:  # the same parameters: Pyro need not be told of them again
            with without_param_registration():
                loss, surrogate = self._loss(x)
        (surrogate / 1).backward()  # Trace_ELBO divides by num_particles = 1
        self.optim(self.params)  # FusedAdam leaves every gradient None, so the next backward writes fresh ones
        self.stats.record(loss)

    def step(self, x: torch.Tensor, kl_scale: float = 1.0) -> torch.Tensor:
        """One step on the batch ``x``; returns the device tensor holding its loss (not read)."""
        self.set_kl_scale(kl_scale)
        self._step(x)
        return self.stats.last

    def read(self) -> StepStats:
        return self.stats.read()


class GraphStep(GraphSafeStep):
    """:class:`GraphSafeStep` captured in a CUDA graph after the validated steps, replayed from then on.

    Steps taken while Pyro's validation is on run eagerly (validation reads tensors on the host).  The next
    :data:`WARMUP_STEPS` run eagerly on a side stream, reading the static input buffer; the step after them is captured
    and replayed.  Each later batch is copied into the buffer before the replay; a batch of another shape runs
    eagerly.  A capture that fails leaves the step eager, with one warning that says why.

    :param warn: called once with the reason when the capture fails (default: :func:`warnings.warn`).
    """

    def __init__(self, model, guide, optim, elbo: str, device, precision: str = "fp32", warn=None):
        super().__init__(model, guide, optim, elbo, device, precision)
        self.graph = None
        self.failed: str | None = None
        self._static_x: torch.Tensor | None = None
        self._warmed = 0
        self._warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))

    def step(self, x: torch.Tensor, kl_scale: float = 1.0) -> torch.Tensor:
        self.set_kl_scale(kl_scale)
        if self.failed or self.params is None or is_validation_enabled():
            self._step(x)
            return self.stats.last
        if self._static_x is None:
            self._static_x = torch.empty_like(x)
        if x.shape != self._static_x.shape or x.dtype != self._static_x.dtype:
            self._step(x)
            return self.stats.last
        self._static_x.copy_(x)
        if self.graph is not None:
            self.graph.replay()
        elif self._warmed < WARMUP_STEPS:
            side_stream_step(self._step, self._static_x)
            self._warmed += 1
        else:
            self._capture()
        return self.stats.last

    def _capture(self) -> None:
        try:
            self.graph = capture_graph(self._step, self._static_x, self.optim)
        except Exception as e:  # noqa: BLE001 - any capture fault falls back to the eager step
            self.graph = None
            self.failed = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            self._warn(f"CUDA graph capture of the training step failed ({self.failed}); training eagerly")
            _set_capturable(self.optim, False)
            for p in self.params:  # gradients the failed capture may have left point into its memory pool
                p.grad = None
            self._step(self._static_x)  # this step was not taken
            return
        self.graph.replay()  # the capture recorded the step without running it


def _set_capturable(optim, on: bool) -> None:
    capturable = getattr(optim, "capturable", None)
    if capturable is not None:
        capturable(on)


def side_stream_step(fn, x) -> None:
    """Run ``fn(x)`` on a side stream (CUDA only), as PyTorch's capture recipe warms up."""
    if x.device.type != "cuda":
        fn(x)
        return
    stream = torch.cuda.Stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        fn(x)
    torch.cuda.current_stream(x.device).wait_stream(stream)


def capture_graph(fn, x, optim):
    """Capture ``fn(x)`` in a :class:`torch.cuda.CUDAGraph` (the optimiser made capturable first) and return it.

    The seam that tests replace to force a capture failure on a CPU.
    """
    if x.device.type != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device; the batch is on {x.device}")
    _set_capturable(optim, True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(x)
    return graph


def make_step(
    model, guide, optim, elbo: str, device, *, graph: bool = False, precision: str = "fp32", warn=None
) -> GraphSafeStep:
    """The training step: :class:`GraphStep` when ``graph``, else the eager :class:`GraphSafeStep`."""
    if graph:
        return GraphStep(model, guide, optim, elbo, device, precision, warn=warn)
    return GraphSafeStep(model, guide, optim, elbo, device, precision)
