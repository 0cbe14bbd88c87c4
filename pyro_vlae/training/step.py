r"""The SVI training step as tensors: Pyro's ELBO without host reads, eager or captured in a CUDA graph.

:meth:`pyro.infer.SVI.step` reads the device on every step: ``Trace_ELBO`` calls ``.item()`` on each site's
``log_prob_sum`` and the step returns a Python float.  :class:`GraphSafeStep` takes the same step with no host read: it
traces the guide and replays the model against it with Pyro's handlers (``get_importance_trace``, as ``Trace_ELBO``
does), sums the scaled ``log_prob_sum`` terms into a loss *tensor* exactly as
``Trace_ELBO._differentiable_loss_particle`` does (or the closed-form KLs of ``TraceMeanField_ELBO`` for
``elbo="meanfield"``; :mod:`~pyro_vlae.training.elbo`), back-propagates and steps the optimiser.  The per-step KL scale
is a device tensor changed in place (``fill_``), and the loss of the step and a flag for non-finite or overflowing
values (the loss, the gradients and the updated parameters) are kept in device accumulators (:class:`DeviceStats`) that
:meth:`GraphSafeStep.read` reads when the caller chooses (every ``log_every`` steps and before every checkpoint in
:func:`~pyro_vlae.training.loop.fit`).

The step is bit-identical to ``SVI.step`` with the same ELBO and optimiser (:class:`~pyro_vlae.training.optim.FusedAdam`
or any :class:`~pyro.optim.PyroOptim`): the same operations in the same order (``tests/training/test_step.py`` compares
parameters bit for bit), so training has one path.  :class:`GraphStep` is the same step captured in a CUDA graph: after
the validated steps it runs :data:`WARMUP_STEPS` real steps on the side stream it captures on, captures one whole step
(model and guide traces, loss, backward, the fused Adam step, the accumulators) reading a static input buffer that each
batch is copied into, and replays it; if the capture fails it puts the stream and the CUDA generator back, trains
eagerly and warns once, saying why (:mod:`~pyro_vlae.training.capture`).

Build and call it (``kl_scale`` is a Python float; it is copied into the device scalar only when it changes)::

    from pyro_vlae.training.runs import build
    from pyro_vlae.training.step import make_step

    model, guide, optim, _ = build(config, device)
    step = make_step(model, guide, optim, config.train.elbo, device, graph=False)  # graph=True: CUDA graph
    for s in range(num_steps):
        loss = step.step(x, kl_scale=schedule(s))   # a device tensor; nothing is read on the host
        if (s + 1) % log_every == 0:
            stats = step.read()                     # host read: StepStats(loss=..., first_bad=None | step)

The hot path reads nothing only with Pyro's validation off (``pyro.enable_validation(False)``; its checks read tensors),
as :func:`~pyro_vlae.training.loop.fit` runs after its first validated steps.  A :class:`GraphStep` runs its first call
and every call made with validation on eagerly, the next :data:`WARMUP_STEPS` on a side stream, captures the one after
and replays from then on.  :func:`~pyro_vlae.training.capture.use_cuda_graph` resolves ``--cuda-graph auto|on|off`` for
a device and :func:`~pyro_vlae.training.capture.tf32` sets TF32 on CUDA (both importable from here too);
``make_step(..., precision="bf16")`` runs the networks under a bfloat16 autocast with every log-probability in float32.
"""

from __future__ import annotations

import contextlib
import gc
import math
import warnings
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled, zero_grads
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger

from ..nets import without_param_registration
from . import capture
from .capture import CUDA_GRAPH_MODES, tf32, use_cuda_graph  # noqa: F401 - the loop and the CLI import them from here
from .elbo import ELBO_LOSSES

#: Real steps run eagerly on a side stream before the capture (PyTorch's whole-network capture recipe).
WARMUP_STEPS = 3
PRECISIONS = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------------------------------
# Device accumulators.


@dataclass
class StepStats:
    """What :meth:`GraphSafeStep.read` returns: the loss of the last step (as ``SVI.step`` reports it), the first
    step (1-based, counted from the start of training) that was not finite (``None`` if none was), that step's loss,
    and whether the loss was finite there while a gradient or an updated parameter was non-finite or overflowing
    (``bad_gradient``: its norm was infinite, :func:`all_finite`)."""

    loss: float
    first_bad: int | None = None
    bad_loss: float | None = None
    bad_gradient: bool = False

    @property
    def problem(self) -> str | None:
        """What went wrong at :attr:`first_bad`, for a message that goes on "... at step N"."""
        if self.first_bad is None:
            return None
        if self.bad_gradient:
            return (
                "a gradient or an updated parameter became NaN or infinite, or its norm overflowed "
                f"(the loss was {self.bad_loss})"
            )
        return f"the loss became {self.bad_loss}"


def all_finite(tensors: list) -> torch.Tensor | None:
    """One device boolean: no tensor in ``tensors`` is non-finite or overflowing.  One fused norm over them all
    (``torch._foreach_norm``) and one ``isfinite``, nothing read on the host, so it can be captured.  A tensor of
    finite but huge entries (float32 near 2e19) whose norm overflows to infinity counts as not finite.  ``None`` for no
    tensors."""
    if not tensors:
        return None
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()


class DeviceStats:
    """The step's loss and finite check on the device, updated in place inside the step (so inside a CUDA graph).

    ``last`` holds the last step's loss (float64), ``steps`` the number of steps taken (set with :meth:`start`),
    ``first_bad`` the first step whose loss was not finite or whose gradients or updated parameters were non-finite
    or overflowing (:func:`all_finite`; ``-1``: none),
    ``bad_loss`` that step's loss and ``bad_gradient`` whether that loss was finite.
    """

    def __init__(self, device):
        self.last = torch.zeros((), dtype=torch.float64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_gradient = torch.zeros((), dtype=torch.bool, device=device)

    def start(self, step: int) -> None:
        """Count steps from ``step`` (the resumed step) on; forget any earlier non-finite step."""
        self.steps.fill_(step)
        self.first_bad.fill_(-1)
        self.bad_gradient.fill_(False)

    def record(self, loss: torch.Tensor, state_finite: torch.Tensor | None = None) -> None:
        """Record a step's ``loss`` and ``state_finite``, the device boolean of :func:`all_finite` over its gradients
        and updated parameters (``None``: the loss only)."""
        self.last.copy_(loss)
        self.steps.add_(1)
        loss_finite = torch.isfinite(loss)
        finite = loss_finite if state_finite is None else loss_finite & state_finite
        first = ~finite & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, self.steps, self.first_bad))
        self.bad_loss.copy_(torch.where(first, loss, self.bad_loss))
        self.bad_gradient.copy_(torch.where(first, loss_finite, self.bad_gradient))

    def read(self) -> StepStats:
        """Read the accumulators on the host (one device synchronisation)."""
        values = torch.stack([self.last, self.bad_loss, self.first_bad.double(), self.bad_gradient.double()])
        last, bad_loss, first_bad, bad_gradient = values.tolist()
        if first_bad < 0:
            return StepStats(last)
        return StepStats(last, int(first_bad), bad_loss, bool(bad_gradient))


# ---------------------------------------------------------------------------------------------------------------------
# The steps.


class GraphSafeStep:
    """One SVI step of ``model`` and ``guide`` with no host read: the interface of :meth:`pyro.infer.SVI.step`, with
    the loss left on the device.

    The first step and every step taken with Pyro's validation on register the parameters with Pyro and collect those
    the trace reaches, as ``SVI.step`` does (a parameter first seen in such a step joins the trained set).  Later steps
    take the collected parameters (the model's structure is static, as a CUDA graph needs anyway), run the networks
    inside :func:`~pyro_vlae.nets.without_param_registration`, which computes the same values without a
    ``pyro.module`` statement per child module and step, and refuse a ``pyro.param`` they have not collected: it would
    never be trained.  After the optimiser step the gradients are zeroed as ``SVI.step`` zeroes them
    (``pyro.infer.util.zero_grads``), so any :class:`~pyro.optim.PyroOptim` gives ``SVI.step``'s parameters.

    :param model: the model, called as ``model(x, kl_scale=...)``.
    :param guide: the guide, same signature.
    :param optim: the optimiser, a :class:`~pyro.optim.PyroOptim`; a CUDA graph captures only
        :class:`~pyro_vlae.training.optim.FusedAdam` (with another, :class:`GraphStep` stays eager and warns once).
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
        if not isinstance(optim, PyroOptim):
            raise ValueError(
                f"optim must be a pyro.optim.PyroOptim (as pyro.infer.SVI takes), got {type(optim).__name__}; wrap "
                "the torch optimiser in Pyro's, e.g. pyro.optim.Adam({'lr': 1e-3})"
            )
        self.precision = precision
        self.model, self.guide, self.optim, self.elbo = model, guide, optim, elbo
        self._loss_fn = ELBO_LOSSES[elbo]
        self.device = torch.device(device)
        self.stats = DeviceStats(self.device)
        self.kl_scale = torch.ones((), dtype=torch.float64, device=self.device)  # float64: Pyro's float arithmetic
        self._kl_host: float | None = None
        self.params: list | None = None  # the parameters collected so far (static structure after that)
        self._names: set = set()  # their param-store names

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

    def _collecting_loss(self, x) -> tuple:
        """The loss, its parameters registered and traced as ``SVI.step`` does; they join :attr:`params`."""
        with poutine.trace(param_only=True) as traced:
            loss, surrogate = self._loss(x)
        sites = traced.trace.nodes
        params = list({site["value"].unconstrained(): None for site in sites.values()})
        self.params = list(dict.fromkeys([*(self.params or []), *params]))
        self._names.update(sites)
        return loss, surrogate, params

    def _step(self, x) -> None:
        """Loss, backward, optimiser step and zeroed gradients (what ``SVI.step`` does), and the accumulators."""
        if self.params is None or is_validation_enabled():
            loss, surrogate, params = self._collecting_loss(x)
        else:  # the collected parameters: Pyro need not be told of them again
            with without_param_registration(), _KnownParams(self._names):
                loss, surrogate = self._loss(x)
            params = self.params
        (surrogate / 1).backward()  # Trace_ELBO divides by num_particles = 1
        grads = [p.grad for p in params if p.grad is not None]
        grad_norms = torch._foreach_norm(grads) if grads else []  # before the optimiser may clip or drop them
        self.optim(params)  # FusedAdam leaves every gradient None, so the next backward writes fresh ones
        zero_grads(params)  # what SVI.step does next; other Pyro optimisers leave the gradients to add up
        self.stats.record(loss, all_finite([*grad_norms, *params]))

    def step(self, x: torch.Tensor, kl_scale: float = 1.0) -> torch.Tensor:
        """One step on the batch ``x``; returns the device tensor holding its loss (not read)."""
        self.set_kl_scale(kl_scale)
        self._step(x)
        return self.stats.last

    def read(self) -> StepStats:
        return self.stats.read()


class _KnownParams(Messenger):
    """Refuses a ``pyro.param`` statement whose name is not among ``names`` (the parameters the step trains)."""

    def __init__(self, names: set):
        super().__init__()
        self.names = names

    def _pyro_param(self, msg) -> None:
        if msg["name"] not in self.names:
            raise ValueError(
                f"pyro.param {msg['name']!r} first appeared after the steps that collect the trained parameters (the "
                "first step and those run with Pyro's validation on): the graph-safe step would never train it. "
                "Create it in the first step, or train this model with pyro.infer.SVI"
            )


class GraphStep(GraphSafeStep):
    """:class:`GraphSafeStep` captured in a CUDA graph after the validated steps, replayed from then on.

    Steps taken while Pyro's validation is on run eagerly (validation reads tensors on the host).  The next
    :data:`WARMUP_STEPS` run eagerly on the side stream the capture will use, reading the static input buffer; the
    step after them is captured and replayed.  Each later batch is copied into the buffer before the replay; a batch
    of another shape runs eagerly.  A capture that fails leaves the step eager, with one warning that says why: the
    stream and the CUDA generator are put back as they were before it (:mod:`~pyro_vlae.training.capture`), and the
    step it should have taken is taken eagerly, drawing the noise an eager run draws.

    :param warn: called once with the reason when the capture fails (default: :func:`warnings.warn`).
    """

    def __init__(self, model, guide, optim, elbo: str, device, precision: str = "fp32", warn=None):
        super().__init__(model, guide, optim, elbo, device, precision)
        self.graph = None
        self.failed: str | None = None
        self._static_x: torch.Tensor | None = None
        self._stream = None
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
            if self._warmed == 0:
                gc.collect()  # an earlier step's autograd graph, held by a reference cycle, must not reach the capture
                self._stream = capture.new_stream(self.device)
            capture.warm_up(self._step, self._static_x, self._stream)
            self._warmed += 1
        else:
            self._capture()
        return self.stats.last

    def _capture(self) -> None:
        if not hasattr(self.optim, "capturable"):
            name = getattr(self.optim, "pt_optim_constructor", type(self.optim)).__name__
            self._fall_back(f"{name} cannot be captured; FusedAdam can")
            return
        saved = capture.save(self.device)
        try:
            self.graph = capture.capture_graph(self._step, self._static_x, self.optim, self._stream)
        except Exception as e:  # noqa: BLE001 - any capture fault falls back to the eager step
            capture.restore(saved)
            self.graph = None
            self._fall_back(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            return
        self.graph.replay()  # the capture recorded the step without running it

    def _fall_back(self, reason: str) -> None:
        """Train eagerly from this step on, warning once with ``reason``; this step is taken eagerly."""
        self.failed = reason
        self._warn(f"CUDA graph capture of the training step failed ({reason}); training eagerly")
        capture.set_capturable(self.optim, False)
        for p in self.params:  # gradients a failed capture may have left point into its memory pool
            p.grad = None
        self._step(self._static_x)


def make_step(
    model, guide, optim, elbo: str, device, *, graph: bool = False, precision: str = "fp32", warn=None
) -> GraphSafeStep:
    """The training step: :class:`GraphStep` when ``graph``, else the eager :class:`GraphSafeStep`."""
    if graph:
        return GraphStep(model, guide, optim, elbo, device, precision, warn=warn)
    return GraphSafeStep(model, guide, optim, elbo, device, precision)
