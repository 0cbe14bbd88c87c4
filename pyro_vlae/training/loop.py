"""The SVI training loop: ``data -> model/guide -> SVI -> checkpoint``, in small named steps.

:class:`~pyro_vlae.training.batches.Batches` reads a step's images, :func:`set_fade_in` sets the VLAE's ladder gains,
:func:`train_step` takes one SVI step (:mod:`pyro_vlae.training.step`: no host read, eager or in a CUDA graph),
:func:`read_loss` reads its device accumulators and stops on a NaN, :class:`StepLog` writes one record to
``metrics.jsonl`` and :func:`write_checkpoint` writes ``checkpoints/latest.pt`` atomically, every ``checkpoint_every``
steps and every ``checkpoint_seconds`` of wall time, and never a state that is not finite.  :func:`fit` strings them
together with deterministic data order (so a resumed run continues exactly) and SIGINT/SIGTERM handling.  Under
torchrun the same loop trains data-parallel through :mod:`pyro_vlae.training.distributed`, with only rank 0 writing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer.util import is_validation_enabled

from ..data import DataBundle
from . import distributed
from .annealing import KLSchedule, ladder_gains
from .batches import Batches, BatchOrder, fetch_batch  # noqa: F401  (re-exported)
from .checkpoint import set_rng_state
from .progress import layer_kls, log_record, open_tensorboard, postfix
from .runs import NonFiniteStateError, RunConfig, build, check_objective, load_weights, save_run_checkpoint
from .step import make_step, tf32, use_cuda_graph

#: The host clock of the wall-time checkpoints (a seam for tests).
monotonic = time.monotonic


class TrainingDiverged(RuntimeError):
    """The loss, or the state to checkpoint, became NaN or infinite; the last good checkpoint is left intact."""


def train_step(stepper, x: torch.Tensor, kl_scale: float):
    """One SVI step on the batch ``x``: the (KL-scaled) negative ELBO summed over the batch, as a device tensor that is
    not read (:class:`~pyro_vlae.training.step.GraphSafeStep`) or as a float (``SVI``-like steps, data-parallel)."""
    return stepper.step(x, kl_scale=kl_scale)


@torch.no_grad()
def evaluate_elbo(model, guide, batches, max_batches: int = 20) -> dict:
    """Test ELBO per image (and per-layer KLs) over up to ``max_batches`` batches, in eval mode."""
    was = model.training, guide.training
    model.eval(), guide.eval()
    totals, count = {}, 0
    try:
        for i, x in enumerate(batches):
            if i >= max_batches:
                break
            kls = layer_kls(model, guide, x)
            for k, v in kls.items():
                totals[k] = totals.get(k, 0.0) + v * x.shape[0]
            count += x.shape[0]
    finally:
        model.train(was[0]), guide.train(was[1])
    if not count:
        return {}
    out = {k: v / count for k, v in totals.items()}
    out["elbo"] = out["recon"] - sum(v for k, v in out.items() if k.startswith("z"))
    out["num_images"] = count
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Stop signals and the result of a run.


class _StopSignals:
    """Turns Ctrl-C (SIGINT) or SIGTERM (what a cluster scheduler sends before killing a job) into a flag the loop
    checks between steps, so the run ends with a checkpoint.  A second Ctrl-C interrupts at once; further SIGTERMs
    are ignored, since schedulers and torchrun's agent often send one each.  The handlers stay installed until the
    final checkpoint is written."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.raised = False
        self.signum = 0
        self._old = {}

    def _handler(self, signum, frame):
        if self.raised:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.raised, self.signum = True, signum

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class TrainResult:
    step: int
    interrupted: bool
    checkpoint: str
    last_metrics: dict
    seconds: float
    stop_signal: int = 0  # the signal that interrupted the run (SIGINT or SIGTERM), 0 otherwise
    # The trained networks in eval mode: the model the final checkpoint holds, fade-in gains included.
    model: object = field(default=None, repr=False, compare=False)
    guide: object = field(default=None, repr=False, compare=False)


# Steps checked by Pyro's validation at each start or resume before it is switched off (see ``fit``).
VALIDATED_STEPS = 10


def _check_every_parameter_trains(optim, model, guide) -> None:
    """After the first step: refuse to go on when a network parameter is not held by the optimiser (it would never
    move; see :meth:`pyro_vlae.training.optim.FusedAdam.untrained`)."""
    missed = optim.untrained([model, guide])
    if missed:
        raise ValueError(
            f"{len(missed)} network parameter(s) are not held by the optimiser and would never train: "
            f"{', '.join(missed[:5])}. Register every module with pyro.module or PyroModule, and keep the default "
            "memory layout (Pyro's param store copies channels_last weights)."
        )


def is_finite(loss: float) -> bool:
    return isinstance(loss, float) and math.isfinite(loss)


def set_fade_in(model, config: RunConfig, step: int, current: list | None = None) -> list | None:
    """Set the VLAE's ladder gains for ``step`` of the fade-in (all 1 when the run has none, also when a resumed
    checkpoint holds the gains of an earlier schedule); returns them.

    ``current`` is what the previous call returned: only gains that differ from it are written, each with a fill
    kernel (no tensor is made from host data), so a step outside the ramp changes nothing on the device.
    """
    if not hasattr(model, "ladder_gain"):
        return None
    gains = ladder_gains(step, config.model.num_layers, config.train.fade_in)
    for i, g in enumerate(gains):
        if current is None or current[i] != g:
            model.ladder_gain[i].fill_(g)
    return gains


def check_loss(loss, step: int, last_good: str | None) -> None:
    """:raises TrainingDiverged: when ``loss``, the loss of step ``step + 1``, is NaN or infinite."""
    if not is_finite(float(loss)):
        raise diverged(loss, step + 1, last_good)


def diverged(loss, step: int, last_good: str | None, what: str = "") -> TrainingDiverged:
    """The error of a run stopped at ``step``: by a NaN or infinite ``loss``, or by the state ``what`` describes."""
    return TrainingDiverged(
        f"{what or f'the loss became {loss} at step {step}'}; training stopped. The last good checkpoint is "
        f"{last_good or 'none (no checkpoint was written before this step)'} and was left intact. "
        "Lower --lr, or check the data for extreme values, then --resume from that checkpoint."
    )


def write_checkpoint(run_dir: str, model, guide, optim, step: int, config: RunConfig, par, last_good, keep=False):
    """Save the run's checkpoint of ``step`` on the lead rank (:func:`~pyro_vlae.training.runs.save_run_checkpoint`,
    atomic); returns the path of ``latest.pt``.

    :raises TrainingDiverged: on every rank, when a weight, buffer or optimiser state is not finite (a gradient that
        overflowed while the loss stayed finite); nothing is written and ``last_good`` is named.
    """
    path, bad = os.path.join(run_dir, "checkpoints", "latest.pt"), None
    if par.is_lead:
        try:
            path = save_run_checkpoint(run_dir, model, guide, optim, step, config, keep=keep)
        except NonFiniteStateError as e:
            bad = e
    if par.any(bad is not None):
        what = str(bad) if bad is not None else f"the training state is not finite at step {step} on the lead rank"
        raise diverged(None, step, last_good, what=f"{what}, so its checkpoint was not written")
    return path


def poll(par, stop, wall_due: bool) -> tuple:
    """``(interrupted, wall-time checkpoint due)``, the same on every rank: one collective per step, as for the stop
    signal alone, and a second only on a step where either is set."""
    if not par.any(stop.raised or wall_due):
        return False, False
    interrupted = par.any(stop.raised)
    return interrupted, not interrupted


def read_loss(stepper, loss, last_good: str | None) -> float:
    """The loss of the last step on the host: ``loss`` itself when it is a float (checked when it was returned), else
    read from the step's device accumulators (:meth:`~pyro_vlae.training.step.GraphSafeStep.read`).

    :raises TrainingDiverged: when a step since the start was not finite (its loss, or where the step checks them, its
        gradients or updated parameters), naming the first and what went wrong there.
    """
    if not torch.is_tensor(loss):
        return float(loss)
    stats = stepper.read()
    if stats.first_bad is not None:
        problem = getattr(stats, "problem", None) or f"the loss became {stats.bad_loss}"
        raise diverged(stats.bad_loss, stats.first_bad, last_good, what=f"{problem} at step {stats.first_bad}")
    return stats.loss


def restore(resume: dict, model, guide, optim, config: RunConfig) -> int:
    """Load a checkpoint dict into the model, guide, optimiser and RNGs; returns its step."""
    load_weights(model, guide, resume, config)
    optim.set_state(resume["optim"])
    if "rng" in resume:
        set_rng_state(resume["rng"])
    return int(resume["step"])


class StepLog:
    """One record per logging step to ``metrics.jsonl`` (and TensorBoard when installed), with the images per
    second since the previous record.  Only the lead rank writes; elsewhere :meth:`due` is always false."""

    def __init__(self, metrics_file, writer, every: int, last_step: int, is_lead: bool):
        self.metrics, self.writer, self.every = metrics_file, writer, every
        self.last_step, self.is_lead = last_step, is_lead
        self.t0 = self.window_t = time.time()
        self.window_n = 0
        self.last: dict = {}

    def count(self, num_images: int) -> None:
        self.window_n += num_images

    def due(self, step: int) -> bool:
        return self.is_lead and (step % self.every == 0 or step == self.last_step)

    def write(self, model, guide, x, step: int, loss: float, kl_scale: float) -> dict:
        now = time.time()
        img_per_s = self.window_n / max(now - self.window_t, 1e-9)
        self.last = log_record(model, guide, x, step, loss, kl_scale, img_per_s, now - self.t0)
        self.window_t, self.window_n = now, 0
        self.metrics.write(json.dumps(self.last) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k, v in self.last.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)
        return self.last


def start_run(config: RunConfig, device, resume, par, validate_all: bool, log=print) -> tuple:
    """``(model, guide, optim, stepper, start)``: the networks in training mode and the optimiser, restored from the
    checkpoint dict ``resume`` (seeded otherwise), the step :func:`fit` takes and its first step number.

    The step is the graph-safe step (:mod:`pyro_vlae.training.step`), captured in a CUDA graph when
    ``config.train.cuda_graph`` asks for one on ``device``; under torchrun, the data-parallel SVI step.
    """
    if resume is None:
        pyro.set_rng_seed(config.seed)
    model, guide, optim, svi = build(config, device)
    start = restore(resume, model, guide, optim, config) if resume is not None else 0
    model.train(), guide.train()
    tc = config.train
    if isinstance(par, distributed.DataParallel):
        if tc.precision != "fp32":
            raise ValueError(f"--precision {tc.precision} is not supported under torchrun: use --precision fp32")
        if tc.cuda_graph == "on" and par.is_lead:
            log("note: --cuda-graph on: the data-parallel step under torchrun is not captured in a graph")
        return model, guide, optim, par.wrap(svi, model, guide, bool(config.extra.get("sync_batch_norm"))), start
    graph = use_cuda_graph(config.train.cuda_graph, device)
    if graph and validate_all:
        log("note: --validate-all-steps reads tensors on the host at every step: the step is not captured in a graph")
    warn = lambda msg: log(f"warning: {msg}")  # noqa: E731
    graph = graph and not validate_all
    stepper = make_step(model, guide, optim, config.train.elbo, device, graph=graph, precision=tc.precision, warn=warn)
    stepper.stats.start(start)
    return model, guide, optim, stepper, start


def fit(
    config: RunConfig,
    bundle: DataBundle,
    run_dir: str,
    device: str | torch.device,
    *,
    resume: dict | None = None,
    progress: bool = True,
    log: Callable[[str], object] = print,
    validate_all: bool = False,
) -> TrainResult:
    """Train ``config`` on ``bundle`` in ``run_dir``; resume from a loaded checkpoint dict when given.

    Pyro's validation (distribution arguments, supports, plate shapes) checks the first :data:`VALIDATED_STEPS`
    steps of every start or resume and is then switched off for speed, as Pyro advises for a model that has
    passed it; ``validate_all`` keeps it on (it is never switched on if it was off).  The step reads nothing on the
    host: its loss and a finite check are read every ``log_every`` steps and before every checkpoint, so a NaN loss
    stops the run at the next of those, naming the step where it appeared, and no checkpoint is written after it.
    Every checkpoint (periodic, interrupt, final) also checks that the state it holds is finite.  Checkpoints come
    every ``checkpoint_every`` steps and, when ``checkpoint_seconds`` is set, once that much wall time has passed
    since the last one (a host clock read between steps; the device is read only when one is due).
    On CUDA the step is captured in a CUDA graph after the validated steps (``config.train.cuda_graph``) and matrix
    products use TF32 unless ``config.train.tf32`` is off.

    :raises TrainingDiverged: when the loss is NaN or infinite (no checkpoint is written after that step), or the
        state of a checkpoint is not (that checkpoint is not written).
    :raises ValueError: for settings :func:`~pyro_vlae.training.runs.check_objective` refuses.

    >>> import tempfile
    >>> import pyro_vlae as pv
    >>> preset = pv.get_preset("tiny")  # a copy, free to edit
    >>> preset.train.num_steps = 4
    >>> config = pv.RunConfig("vlae", "synthetic", "tiny", preset.model, preset.train, seed=1)
    >>> with tempfile.TemporaryDirectory() as run_dir:
    ...     result = pv.fit(config, pv.load_data("synthetic", batch_size=16), run_dir, "cpu", progress=False)
    >>> result.step, result.interrupted, [k for k in result.last_metrics if k.startswith("kl_z")]  # the last record
    (4, False, ['kl_z1', 'kl_z2', 'kl_z3'])
    """
    from tqdm.auto import tqdm

    check_objective(config)
    tc, device = config.train, torch.device(device)
    par = distributed.current(device)  # SingleProcess outside torchrun: every call below is then the identity
    if par.is_lead:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    model, guide, optim, stepper, start = start_run(config, device, resume, par, validate_all, log)
    ckpt_path = os.path.join(run_dir, "checkpoints", "latest.pt")
    last_good = ckpt_path if resume is not None else None
    batches = Batches(bundle, tc.batch_size, config.seed, par, device, config.model.likelihood == "bernoulli")
    schedule, validation = KLSchedule(tc.anneal), is_validation_enabled()
    writer = open_tensorboard(run_dir, log) if par.is_lead else None
    step, interrupted, show = start, False, progress and par.is_lead
    bar = tqdm(total=tc.num_steps, initial=start, disable=not show, dynamic_ncols=True, desc=config.model_kind)
    with _StopSignals() as stop, tf32(device, tc.tf32):  # the handlers stay until the final checkpoint is written
        metrics_path = os.path.join(run_dir, "metrics.jsonl") if par.is_lead else os.devnull
        with open(metrics_path, "a" if par.is_lead else "w") as metrics:
            steplog = StepLog(metrics, writer, tc.log_every, tc.num_steps, par.is_lead)
            wall_at = monotonic() + tc.checkpoint_seconds
            try:
                gains = set_fade_in(model, config, step)  # also resets the gains of a resumed earlier schedule
                while step < tc.num_steps:
                    x, kl_scale = batches(step), schedule(step)
                    if tc.fade_in:  # without a fade-in the gains stay 1: nothing to set on the hot path
                        gains = set_fade_in(model, config, step, gains)
                    with pyro.validation_enabled(validation and (validate_all or step < start + VALIDATED_STEPS)):
                        loss = train_step(stepper, x, kl_scale)
                    if not torch.is_tensor(loss):  # a float is on the host already: check it at once
                        check_loss(loss, step, last_good)
                    step += 1
                    if step == start + 1:
                        _check_every_parameter_trains(optim, model, guide)
                    steplog.count(x.shape[0] * par.world_size)
                    bar.update(1)
                    if steplog.due(step):  # the loss is summed over all ranks' images; KLs on rank 0's shard
                        value = read_loss(stepper, loss, last_good) / par.world_size
                        bar.set_postfix(postfix(steplog.write(model, guide, x, step, value, kl_scale)), refresh=False)
                    wall_due = tc.checkpoint_seconds > 0 and monotonic() >= wall_at  # a host clock only
                    interrupted, wall_due = poll(par, stop, wall_due)
                    periodic = step < tc.num_steps and (step % tc.checkpoint_every == 0 or wall_due)
                    if interrupted or periodic or step == tc.num_steps:
                        read_loss(stepper, loss, last_good)  # no checkpoint after a NaN
                    if interrupted:
                        break
                    if periodic:
                        keep = bool(tc.keep_every) and step % tc.keep_every == 0
                        write_checkpoint(run_dir, model, guide, optim, step, config, par, last_good, keep=keep)
                        last_good, wall_at = ckpt_path, monotonic() + tc.checkpoint_seconds
            finally:
                bar.close()
        if writer is not None:
            writer.close()
        path = write_checkpoint(run_dir, model, guide, optim, step, config, par, last_good)
        if interrupted and par.is_lead:
            log(f"interrupted at step {step}: checkpoint written to {path}; continue with --resume {run_dir}")
        signum = 0
        if interrupted:  # every rank reports the same signal (a rank may have been stopped by another's)
            signum = signal.SIGTERM if par.any(stop.signum == signal.SIGTERM) else signal.SIGINT
    model.eval(), guide.eval()
    seconds = time.time() - steplog.t0
    return TrainResult(step, interrupted, path, steplog.last, seconds, int(signum), model=model, guide=guide)
