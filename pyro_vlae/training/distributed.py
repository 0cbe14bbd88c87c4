r"""Data-parallel training under ``torchrun``: ``torchrun --nproc-per-node N -m pyro_vlae.run ...``.

:func:`join` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), starts the process group (NCCL on
CUDA, each rank on ``cuda:LOCAL_RANK``; gloo on CPU) and returns a :class:`DataParallel` context; outside torchrun it
returns :class:`SingleProcess`, whose methods change nothing, so a plain run takes exactly the code path it always
took.  :func:`~.loop.fit` asks :func:`current` for the context and calls into it at four places: wrapping the
SVI object, sharding each batch, binarising, and agreeing on Ctrl-C.

Design.  A run with ``W`` processes of ``--batch-size B`` takes the same step as one process with batch ``W B``:

* **Data.**  :class:`~pyro_vlae.training.batches.BatchOrder` draws the global batch of ``W B`` indices of each step from
  a permutation seeded by the epoch (what ``DistributedSampler.set_epoch`` does), and rank ``r`` takes rows
  ``[r B, (r + 1) B)``: the shards are disjoint and their concatenation is the one-process batch.  This works for
  in-memory tensors and for lazily loaded datasets alike, since only the shard's items are read.
* **Gradients.**  Model and guide go, unchanged, into one container module wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel`, whose forward returns ``elbo.differentiable_loss(model, guide,
  x)``.  The forward therefore runs through DDP's hooks and ``backward`` all-reduces every gradient of both networks,
  bucketed and overlapped with the backward pass.  Pyro's ELBO is a *sum* over the ``data`` plate, and DDP *averages*
  gradients over ranks, so each rank back-propagates ``W`` times its loss: the averaged gradient is then the sum over
  all ``W B`` images, the gradient of the one-process batch (Adam is nearly scale-invariant, so an average would train
  almost alike, but the optimizer state would differ by the factor ``W``).  The step itself stays Pyro's: the
  parameters seen by ``poutine.trace(param_only=True)`` are stepped by the same optimiser as in one process
  (:class:`pyro_vlae.training.optim.FusedAdam`) and zeroed, as :meth:`pyro.infer.SVI.step` does, so checkpoints
  (``optim.get_state()``) keep their format and a run may be resumed with another number of processes.
* **Latent noise.**  All ranks share one random stream (rank 0's state is broadcast at start and on resume).  For each
  latent site the guide draws the standard-normal noise of the *whole* global batch and keeps its own rows
  (:class:`ShardNoise`), and binarisation does the same (:meth:`DataParallel.bernoulli`).  Each rank thus uses
  different noise, and image ``i`` of the global batch gets the noise it would get in the one-process run: the two runs
  agree to rounding, which makes the equivalence testable with a tight tolerance.  Drawing ``W`` times the noise costs
  a few latent-sized tensors per step.
* **Batch norm.**  By default each rank normalises by the statistics of its own ``B`` images (DDP's usual behaviour) and
  running statistics drift apart between ranks; rank 0's are the ones saved.  DDP does not broadcast them
  (``broadcast_buffers=False``): only rank 0's are ever used.  ``--sync-batch-norm`` replaces every batch-norm layer by
  :class:`GlobalBatchNorm`, which normalises by the statistics of the global batch (two differentiable all-reduces per
  layer, on any backend; ``torch.nn.SyncBatchNorm`` refuses CPU tensors), so the running statistics are equal on all
  ranks and the run matches the one-process run exactly.
* **Side effects.**  Only rank 0 prints, shows a progress bar, and writes ``config.json``, ``metrics.jsonl``,
  checkpoints, ``eval.json`` and figures.  The loss is all-reduced every step (so a NaN on any rank stops every rank at
  the same step) and so is the Ctrl-C flag (so all ranks stop after the same step, and rank 0 saves it).  On
  ``--resume`` every rank reads the same ``checkpoints/latest.pt`` (the run folder must be visible to all nodes) and
  DDP's start-up broadcast makes the parameters bit-identical to rank 0's.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from pyro import poutine
from pyro.infer.util import zero_grads
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.distributions import Distribution, Independent, Normal
from torch.nn.parallel import DistributedDataParallel

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class SingleProcess:
    """The context of a plain run: one process, which does everything; every method is the identity."""

    rank, world_size, local_rank, is_lead = 0, 1, 0, True

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of the global batch ``idx``."""
        return idx

    def bernoulli(self, x: torch.Tensor) -> torch.Tensor:
        """Binarise this rank's images ``x`` (pixel values are the probabilities)."""
        return torch.bernoulli(x)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        return bool(flag)

    def broadcast(self, obj):
        """Rank 0's ``obj`` (picklable), on every rank."""
        return obj

    def wrap(self, svi, model, guide, sync_batch_norm: bool = False):
        """An object whose ``step(x, kl_scale=...)`` takes one SVI step for the global batch."""
        return svi


class DataParallel(SingleProcess):
    """The context of one rank of a torchrun job; see the module docstring for the design."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.is_lead = rank == 0
        self.device = torch.device(device)

    def __repr__(self):
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    def shard(self, idx):
        n = len(idx) // self.world_size
        return idx[self.rank * n : (self.rank + 1) * n]

    def bernoulli(self, x):
        return global_draw(x, self.rank, self.world_size, torch.bernoulli)

    def any(self, flag):
        t = torch.tensor([float(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, svi, model, guide, sync_batch_norm=False):
        if sync_batch_norm:
            use_global_batch_norm(model), use_global_batch_norm(guide)
        self.share_rng()
        elbo = svi.loss.__self__  # SVI keeps the ELBO's bound ``loss`` method
        return DistributedSVI(model, guide, svi.optim, elbo, self)

    def share_rng(self) -> None:
        """Give every rank rank 0's torch random state (and that of its CUDA device)."""
        cuda = self.device.type == "cuda"
        state = self.broadcast([torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None])
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], self.device)


def from_env(environ=None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when running under torchrun, else ``None``."""
    environ = os.environ if environ is None else environ
    if not all(k in environ for k in TORCHRUN_KEYS):
        return None
    rank, world, local = (int(environ[k]) for k in TORCHRUN_KEYS)
    if not (0 <= rank < world and 0 <= local):
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def join(device: torch.device) -> tuple[SingleProcess, torch.device]:
    """Start this rank's process group when launched by torchrun; returns the context and the device to train on.

    NCCL with ``cuda:LOCAL_RANK`` when ``device`` is CUDA, gloo on CPU.  Outside torchrun: ``(SingleProcess(),
    device)``.
    """
    env = from_env()
    if env is None:
        return SingleProcess(), device
    rank, world, local = env
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: {torch.cuda.device_count()} visible on this node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DataParallel(rank, world, local, device), device


def current(device="cpu") -> SingleProcess:
    """The context of this process: :class:`DataParallel` once :func:`join` started a group, else single-process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SingleProcess()
    env = from_env() or (dist.get_rank(), dist.get_world_size(), 0)
    return DataParallel(dist.get_rank(), dist.get_world_size(), env[2], device)


def leave() -> None:
    """Tear the process group down (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def note_in_config(config, par: SingleProcess, sync_batch_norm: bool, resuming: bool, log=print) -> None:
    """Record the process count (and ``--sync-batch-norm``) in ``config.extra``; say so when a resume changes it."""
    before = int(config.extra.get("world_size", 1))
    if resuming and par.world_size != before and par.is_lead:
        b = config.train.batch_size
        log(
            f"note: this run was trained with {before} process(es) and continues with {par.world_size}: the global "
            f"batch changes from {before * b} to {par.world_size * b} images per step"
        )
    if par.world_size > 1 or "world_size" in config.extra:
        config.extra["world_size"] = par.world_size
    if sync_batch_norm:
        config.extra["sync_batch_norm"] = True


# ---------------------------------------------------------------------------------------------------------------------
# The distributed SVI step.


def global_draw(local: torch.Tensor, rank: int, world: int, draw) -> torch.Tensor:
    """Rows ``[rank n, (rank + 1) n)`` of ``draw`` applied to the global batch, where ``local`` (``n`` rows) sits.

    ``draw`` must use the random stream elementwise, as ``torch.bernoulli`` and ``normal_`` do: the other rows are
    zeros but consume the same random numbers as on the other ranks, so every rank stays on the shared stream.
    """
    n = local.shape[0]
    full = local.new_zeros((world * n, *local.shape[1:]))
    full[rank * n : (rank + 1) * n] = local
    return draw(full)[rank * n : (rank + 1) * n]


class ShardNoise(Messenger):
    """Draw each latent site's noise for the global batch and keep this rank's rows (reparameterised Normals).

    ``z = loc + eps * scale`` with ``eps`` the rows ``[rank n, (rank + 1) n)`` of a standard-normal draw of shape
    ``(world n, ...)``, which is what ``Normal.rsample`` draws for the global batch in one process.  The ``data`` plate
    must be the leftmost batch dimension, as in every guide of this package.
    """

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world = rank, world

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or not isinstance(msg["fn"], Distribution):
            return  # observed, replayed, or a plate's index site (which draws nothing without subsampling)
        fn, base = msg["fn"], msg["fn"]
        while isinstance(base, Independent):
            base = base.base_dist
        plates = [f for f in msg["cond_indep_stack"] if f.name == "data"]
        if not (isinstance(base, Normal) and len(plates) == 1 and plates[0].dim == -len(fn.batch_shape)):
            raise NotImplementedError(
                f"distributed training draws the latent noise of the global batch; site {msg['name']!r} "
                f"({type(base).__name__}, batch shape {tuple(fn.batch_shape)}) is not a Normal with the 'data' plate "
                "as its leftmost batch dimension"
            )
        if msg["args"] or msg["kwargs"].get("sample_shape", ()):
            raise NotImplementedError(f"site {msg['name']!r}: sample_shape is not supported in distributed training")
        n, r = base.loc.shape[0], self.rank
        eps = base.loc.new_empty((self.world * n, *base.loc.shape[1:])).normal_()[r * n : (r + 1) * n]
        msg["value"] = base.loc + eps * base.scale


class _Objective(nn.Module):
    """Model and guide in one module, so that a single DDP wrapper sees every parameter of both."""

    def __init__(self, model, guide, elbo, rank, world):
        super().__init__()
        self.model, self.guide, self.elbo = model, guide, elbo
        self.sharded_guide = ShardNoise(rank, world)(guide)

    def forward(self, x, kl_scale):
        return self.elbo.differentiable_loss(self.model, self.sharded_guide, x, kl_scale=kl_scale)


class DistributedSVI:
    """``step(x, kl_scale)`` like :meth:`pyro.infer.SVI.step`, with gradients summed over all ranks by DDP.

    :returns: the negative ELBO summed over the global batch (all ranks), the same number on every rank.
    """

    def __init__(self, model, guide, optim, elbo, par: DataParallel):
        self.optim, self.par = optim, par
        cuda = par.device.type == "cuda"
        self.objective = DistributedDataParallel(
            _Objective(model, guide, elbo, par.rank, par.world_size),
            device_ids=[par.device] if cuda else None,
            broadcast_buffers=False,
        )

    def step(self, x, kl_scale=1.0):
        with poutine.trace(param_only=True) as capture:
            loss = self.objective(x, kl_scale)
        (loss * self.par.world_size).backward()  # DDP averages over ranks; the ELBO is a sum over images
        params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        self.optim(params)
        zero_grads(params)
        total = loss.detach().reshape(1).clone()
        dist.all_reduce(total)
        return float(total.item())


# ---------------------------------------------------------------------------------------------------------------------
# Batch norm over the global batch.


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    r"""Batch norm whose training statistics are those of the global batch, all ranks together, on any backend.

    .. math::  \mu = \frac{1}{N} \sum_{r, i} x_{ri}, \qquad \sigma^2 = \frac{1}{N} \sum_{r, i} (x_{ri} - \mu)^2

    with both sums all-reduced with autograd (``torch.distributed.nn.functional.all_reduce``), so gradients flow
    through the statistics of every rank, as in ``torch.nn.SyncBatchNorm``.  In eval mode, or without a process group,
    this is plain batch norm.  Parameters, buffers and state-dict keys are those of the layer it replaces.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        sums = dist_nn.all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() / x.shape[1])]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = x - mean.reshape(shape)
        var = dist_nn.all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                self.running_var.mul_(1 - f).add_(var.detach() * (n / (n - 1)), alpha=f)
        return y


def use_global_batch_norm(module: nn.Module) -> nn.Module:
    """Replace, in place, every batch-norm layer under ``module`` by a :class:`GlobalBatchNorm` sharing its tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            c = child
            new = GlobalBatchNorm(c.num_features, c.eps, c.momentum, c.affine, c.track_running_stats)
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                if getattr(c, key, None) is not None:
                    setattr(new, key, getattr(c, key))
            new.train(child.training)
            setattr(module, name, new)
        else:
            use_global_batch_norm(child)
    return module
