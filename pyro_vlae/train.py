"""The SVI training loop: ``data -> model/guide -> SVI -> checkpoint``, in small named steps.

``train_step`` takes one SVI step, ``evaluate_elbo`` measures the test ELBO, ``save_run_checkpoint`` writes
``checkpoints/latest.pt`` atomically, and :mod:`pyro_vlae.progress` logs each step.  :func:`fit` strings them together
with deterministic data order (so a resumed run continues exactly), SIGINT handling and NaN detection.  Under torchrun
the same loop trains data-parallel through :mod:`pyro_vlae.distributed`, with only rank 0 writing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

from . import distributed
from .annealing import KLSchedule, ladder_gains
from .checkpoint import atomic_write_json, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .guides import get_guide
from .models import get_model
from .nets import ModelConfig
from .optim import FusedAdam
from .presets import TrainConfig
from .progress import layer_kls, log_record, open_tensorboard, postfix, truncate_metrics  # noqa: F401 - re-exported


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


@dataclass
class RunConfig:
    """Everything needed to rebuild a run: saved as ``config.json`` and inside every checkpoint."""

    model_kind: str
    dataset: str
    preset: str
    model: ModelConfig
    train: TrainConfig
    seed: int = 0
    data_dir: str = "data"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model_kind": self.model_kind,
            "dataset": self.dataset,
            "preset": self.preset,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "seed": self.seed,
            "data_dir": self.data_dir,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = dict(d)
        return cls(
            model_kind=d["model_kind"],
            dataset=d["dataset"],
            preset=d["preset"],
            model=ModelConfig.from_dict(d["model"]),
            train=TrainConfig.from_dict(d["train"]),
            seed=int(d.get("seed", 0)),
            data_dir=d.get("data_dir", "data"),
            extra=dict(d.get("extra", {})),
        )


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    return torch.device(name)


def build(config: RunConfig, device) -> tuple:
    """Model, guide (on ``device``), Pyro Adam optimiser and SVI object.  Clears the param store first."""
    pyro.clear_param_store()
    model = get_model(config.model_kind, config.model).to(device)
    guide = get_guide(config.model_kind, config.model).to(device)
    optim = FusedAdam({"lr": config.train.lr})
    elbo_cls = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
    if config.train.elbo not in elbo_cls:
        raise ValueError(f"--elbo must be one of {sorted(elbo_cls)}, got {config.train.elbo!r}")
    svi = SVI(model, guide, optim, elbo_cls[config.train.elbo]())
    return model, guide, optim, svi


def train_step(svi: SVI, x: torch.Tensor, kl_scale: float) -> float:
    """One SVI step on the batch ``x``; returns the (KL-scaled) negative ELBO summed over the batch."""
    return svi.step(x, kl_scale=kl_scale)


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
# Deterministic data order.


class BatchOrder:
    """Batches drawn from a fresh seeded permutation each epoch, addressable by global step.

    Step ``s`` always sees the same images for a given seed, so a resumed run reads the data a straight run would.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({n} images)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = None, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


def fetch_batch(dataset, idx: torch.Tensor, tensors=None) -> torch.Tensor:
    """Images of ``dataset`` at ``idx``: tensor indexing when the data is in memory, item by item otherwise."""
    if tensors is not None:
        return tensors[0][idx]
    return torch.stack([dataset[int(i)][0] for i in idx])


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints.


def save_run_checkpoint(run_dir: str, model, guide, optim, step: int, config: RunConfig, keep: bool = False) -> str:
    """Write ``checkpoints/latest.pt`` (and ``step<k>.pt`` when ``keep``) atomically; returns the path."""
    state = {
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optim": optim.get_state(),
        "step": int(step),
        "rng": rng_state(),
        "config": config.to_dict(),
        "format": 1,
    }
    folder = os.path.join(run_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "latest.pt")
    save_checkpoint(path, state)
    if keep:
        save_checkpoint(os.path.join(folder, f"step{step}.pt"), state)
    return path


def load_run(run_dir: str, device="cpu", checkpoint: str = "latest.pt"):
    """Rebuild ``(model, guide, config, state)`` from a run folder's checkpoint (eval mode, on ``device``)."""
    state = load_checkpoint(os.path.join(run_dir, "checkpoints", checkpoint), map_location=device)
    config = RunConfig.from_dict(state["config"])
    model, guide, _, _ = build(config, device)
    model.load_state_dict(state["model"])
    guide.load_state_dict(state["guide"])
    model.eval(), guide.eval()
    return model, guide, config, state


def write_config(run_dir: str, config: RunConfig, argv=None) -> None:
    d = config.to_dict()
    if argv is not None:
        d["command"] = list(argv)
    atomic_write_json(os.path.join(run_dir, "config.json"), d)


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


# Steps checked by Pyro's validation at each start or resume before it is switched off (see ``fit``).
VALIDATED_STEPS = 10


def _check_every_parameter_trains(optim, model, guide) -> None:
    """After the first step: refuse to go on when a network parameter is not held by the optimiser (it would never
    move; see :meth:`pyro_vlae.optim.FusedAdam.untrained`)."""
    missed = optim.untrained([model, guide])
    if missed:
        raise ValueError(
            f"{len(missed)} network parameter(s) are not held by the optimiser and would never train: "
            f"{', '.join(missed[:5])}. Register every module with pyro.module or PyroModule, and keep the default "
            "memory layout (Pyro's param store copies channels_last weights)."
        )


def is_finite(loss: float) -> bool:
    return isinstance(loss, float) and math.isfinite(loss)


def fit(
    config: RunConfig,
    bundle,
    run_dir: str,
    device,
    *,
    resume: dict | None = None,
    progress: bool = True,
    log=print,
    validate_all: bool = False,
) -> TrainResult:
    """Train ``config`` on ``bundle`` in ``run_dir``; resume from a loaded checkpoint dict when given.

    Pyro's validation (distribution arguments, supports, plate shapes) checks the first :data:`VALIDATED_STEPS`
    steps of every start or resume and is then switched off for speed, as Pyro advises for a model that has
    passed it; ``validate_all`` keeps it on (it is never switched on if it was off).  A NaN loss is caught either way.

    :raises TrainingDiverged: when the loss is NaN or infinite (no checkpoint is written after that step).
    """
    from tqdm.auto import tqdm

    tc = config.train
    par = distributed.current(device)  # SingleProcess outside torchrun: every call below is then the identity
    if par.is_lead:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    if resume is None:
        pyro.set_rng_seed(config.seed)
    model, guide, optim, svi = build(config, device)
    start = 0
    ckpt_path = os.path.join(run_dir, "checkpoints", "latest.pt")
    last_good = None
    if resume is not None:
        model.load_state_dict(resume["model"])
        guide.load_state_dict(resume["guide"])
        optim.set_state(resume["optim"])
        if "rng" in resume:
            set_rng_state(resume["rng"])
        start = int(resume["step"])
        last_good = ckpt_path
    model.train(), guide.train()
    svi = par.wrap(svi, model, guide, sync_batch_norm=bool(config.extra.get("sync_batch_norm")))
    tensors = bundle.tensors("train")
    order = BatchOrder(len(bundle.train), tc.batch_size * par.world_size, config.seed)  # the global batch
    schedule = KLSchedule(tc.anneal)
    binarize = config.model.likelihood == "bernoulli"
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    writer = open_tensorboard(run_dir, log) if par.is_lead else None
    step, t0, last = start, time.time(), {}
    window_t, window_n = time.time(), 0
    interrupted = False
    progress = progress and par.is_lead
    validation = is_validation_enabled()
    bar = tqdm(total=tc.num_steps, initial=start, disable=not progress, dynamic_ncols=True, desc=config.model_kind)
    with _StopSignals() as stop:  # kept until the final checkpoint is written
        with open(metrics_path, "a") if par.is_lead else open(os.devnull, "w") as metrics:
            while step < tc.num_steps:
                x = fetch_batch(bundle.train, par.shard(order.indices(step)), tensors).to(device, non_blocking=True)
                if binarize:
                    x = par.bernoulli(x)
                kl_scale = schedule(step)
                if tc.fade_in and hasattr(model, "ladder_gain"):
                    model.ladder_gain.copy_(torch.tensor(ladder_gains(step, config.model.num_layers, tc.fade_in)))
                with pyro.validation_enabled(validation and (validate_all or step < start + VALIDATED_STEPS)):
                    loss = train_step(svi, x, kl_scale)
                if not is_finite(float(loss)):
                    bar.close()
                    raise TrainingDiverged(
                        f"the loss became {loss} at step {step + 1}; training stopped. The last good checkpoint is "
                        f"{last_good or 'none (no checkpoint was written before this step)'} and was left intact. "
                        "Lower --lr, or check the data for extreme values, then --resume from that checkpoint."
                    )
                step += 1
                if step == start + 1:
                    _check_every_parameter_trains(optim, model, guide)
                window_n += x.shape[0] * par.world_size
                bar.update(1)
                if par.is_lead and (step % tc.log_every == 0 or step == tc.num_steps):
                    now = time.time()
                    img_per_s = window_n / max(now - window_t, 1e-9)
                    # the loss is summed over all ranks' images; the KLs are measured on rank 0's shard
                    last = log_record(model, guide, x, step, loss / par.world_size, kl_scale, img_per_s, now - t0)
                    window_t, window_n = now, 0
                    metrics.write(json.dumps(last) + "\n")
                    metrics.flush()
                    if writer is not None:
                        for k, v in last.items():
                            if isinstance(v, (int, float)) and k != "step":
                                writer.add_scalar(k, v, step)
                    bar.set_postfix(postfix(last), refresh=False)
                if par.any(stop.raised):
                    interrupted = True
                    break
                if step % tc.checkpoint_every == 0 and step < tc.num_steps:
                    keep = bool(tc.keep_every) and step % tc.keep_every == 0
                    last_good = ckpt_path
                    if par.is_lead:
                        save_run_checkpoint(run_dir, model, guide, optim, step, config, keep=keep)
        bar.close()
        if writer is not None:
            writer.close()
        path = save_run_checkpoint(run_dir, model, guide, optim, step, config) if par.is_lead else ckpt_path
        if interrupted and par.is_lead:
            log(f"interrupted at step {step}: checkpoint written to {path}; continue with --resume {run_dir}")
        signum = 0
        if interrupted:  # every rank reports the same signal (a rank may have been stopped by another's)
            signum = signal.SIGTERM if par.any(stop.signum == signal.SIGTERM) else signal.SIGINT
    model.eval(), guide.eval()
    return TrainResult(step, interrupted, path, last, time.time() - t0, int(signum))
