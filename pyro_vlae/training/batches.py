"""Which images each step reads, and reading them where the step runs: :class:`BatchOrder` (a seeded permutation per
epoch, addressable by global step, so a resumed run reads what a straight run would) and :class:`Batches`, what
:func:`~pyro_vlae.training.loop.fit` reads (in-memory data as one tensor on the training device, procedural data
rendered there); :func:`fetch_batch` is the host-side reading it falls back on."""

from __future__ import annotations

import warnings

import torch

#: Largest share of the device's free memory an in-memory training set may take to be moved there whole.
DEVICE_MEMORY_SHARE = 0.5
#: Whether procedural data is drawn by the torch renderers on the CPU too.  No: they draw the same images, but on one
#: thread they are not faster than numpy there (shapes3d 0.8x numpy's time at 32 px but 1.25x at 64 px, sprites
#: 1.35x and 2.0x; ``benchmarks/RESULTS.md``, *Batches on the device*).  The tests set it to run that path on the CPU.
RENDER_ON_CPU = False


class BatchOrder:
    """Batches drawn from a fresh seeded permutation each epoch, addressable by global step.

    Step ``s`` always sees the same images for a given seed, so a resumed run reads the data a straight run would.
    On the CPU the permutation of epoch ``e`` is ``torch.randperm(n)`` from a CPU generator seeded ``seed * 1_000_003
    + e``.  After :meth:`to` a CUDA device, it is drawn on that device from a device generator with the same seed: as
    deterministic (per seed and epoch, so resume stays exact), but **a different order from the CPU's** (the two
    generators are different algorithms), so a CUDA run does not read the batches of a CPU run with the same seed.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({n} images)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self.device = torch.device("cpu")
        self._epoch, self._perm = None, None

    def to(self, device) -> BatchOrder:
        """Draw the permutations on ``device`` from now on (returns ``self``)."""
        device = torch.device(device)
        if device != self.device:
            self.device, self._epoch, self._perm = device, None, None
        return self

    def indices(self, step: int) -> torch.Tensor:
        """The global batch of ``step``: int64 indices on :attr:`device` (a view into the epoch's permutation)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            seed = self.seed * 1_000_003 + epoch
            g = torch.Generator(device=self.device).manual_seed(seed)
            self._perm, self._epoch = torch.randperm(self.n, generator=g, device=self.device), epoch
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


def fetch_batch(dataset, idx: torch.Tensor, tensors=None) -> torch.Tensor:
    """Images of ``dataset`` at ``idx``: tensor indexing when the data is in memory, one rendering call for the
    procedural datasets (:class:`~pyro_vlae.data.grid.FactorGridDataset`), item by item otherwise."""
    if tensors is not None:
        return tensors[0][idx]
    if hasattr(dataset, "images"):
        return dataset.images(idx.numpy())
    return torch.stack([dataset[int(i)][0] for i in idx])


def full_device(device) -> torch.device:
    """``device`` with its index: ``cuda`` becomes ``cuda:<current device>``, so tensors' devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether ``nbytes`` may be moved to ``device`` whole (always on the CPU; at most :data:`DEVICE_MEMORY_SHARE` of
    a CUDA device's free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= DEVICE_MEMORY_SHARE * free


class Batches:
    """The training images of every step, on ``device``: what :func:`~pyro_vlae.training.loop.fit` reads.

    ``batches(step)`` returns this rank's shard of step ``step``'s global batch of ``batch_size * par.world_size``
    images (the order of :class:`BatchOrder`, so a resumed run reads what a straight run would), dynamically
    binarized when ``binarize``.  ``batches.fill(step, out)`` writes the same images into ``out``, in place (a float32
    tensor of shape :attr:`shape` on ``device``, for instance the static input of a captured CUDA graph), and returns
    it.  Where the images come from is settled at construction (:attr:`source`):

    * ``"memory"``: a dataset held in memory (MNIST, Fashion-MNIST, SVHN, synthetic, any ``TensorDataset``) is moved
      to ``device`` once, as one tensor; a step's batch is a gather (``index_select``) on the device, from indices
      drawn on the device.  Nothing on this path reads a device value on the host (no ``.item()``, no ``.tolist()``,
      no numpy): tested on the CPU by the operators it dispatches, and on CUDA (where a GPU is present) with
      ``torch.cuda.set_sync_debug_mode("error")``.
    * ``"render"``: a procedural dataset (shapes3d, sprites) is drawn on the device by its torch renderer
      (:meth:`~pyro_vlae.data.grid.FactorGridDataset.renderer`), bit-identical to the numpy renderer (shapes3d from
      its geometry cache, copied to the device once), from indices drawn on the device; not on the CPU, where numpy
      is as fast or faster (:data:`RENDER_ON_CPU`).
    * ``"host"``: anything else (CelebA, read lazily; a training set larger than :data:`DEVICE_MEMORY_SHARE` of the
      device's free memory; procedural data on the CPU) is read on the host and copied, as before.

    On the CPU every source reads exactly the images of the host path, in the order it always had: a run's batches do
    not depend on this class.  On CUDA the permutation is drawn on the device and differs from the CPU's (see
    :class:`BatchOrder`).

    :param bundle: a :class:`~pyro_vlae.data.DataBundle`.
    :param batch_size: images per rank and step.
    :param seed: the run's seed (the order of every epoch follows from it).
    :param par: the data-parallel context (:func:`pyro_vlae.training.distributed.current`).
    :param device: the training device.
    :param binarize: draw a Bernoulli image per step (pixel values are the probabilities).
    """

    def __init__(self, bundle, batch_size: int, seed: int, par, device, binarize: bool):
        self.bundle, self.par, self.device, self.binarize = bundle, par, full_device(device), binarize
        self.order = BatchOrder(len(bundle.train), batch_size * par.world_size, seed)  # the global batch
        self.shape = (batch_size, *bundle.image_shape)
        self.tensors = bundle.tensors("train")
        self.data, self.render, self.source = None, None, "host"
        if self.tensors is not None and fits_on(self.device, self.tensors[0].nbytes):
            self.data, self.source = self.tensors[0].to(self.device), "memory"
        elif self.tensors is not None:
            warnings.warn(
                f"the training set ({self.tensors[0].nbytes / 2**30:.1f} GiB) takes more than "
                f"{DEVICE_MEMORY_SHARE:.0%} of {self.device}'s free memory: its batches are read on the host",
                stacklevel=2,
            )
        elif getattr(bundle.train, "device_render", None) is not None and (self.device.type != "cpu" or RENDER_ON_CPU):
            self.render, self.source = bundle.train.renderer(self.device), "render"
        if self.source != "host":
            self.order.to(self.device)

    def __call__(self, step: int) -> torch.Tensor:
        x = self._read(self.par.shard(self.order.indices(step)))
        return self.par.bernoulli(x) if self.binarize else x

    def fill(self, step: int, out: torch.Tensor) -> torch.Tensor:
        """Write the images of ``step`` (what ``self(step)`` returns, the same random draws included) into ``out``,
        in place, and return ``out``."""
        if tuple(out.shape) != self.shape or out.dtype != torch.float32 or out.device != self.device:
            raise ValueError(
                f"fill needs a float32 tensor of shape {self.shape} on {self.device}, got {out.dtype} "
                f"{tuple(out.shape)} on {out.device}: allocate it with torch.empty(batches.shape, device=...)"
            )
        idx = self.par.shard(self.order.indices(step))
        if self.source == "memory":
            torch.index_select(self.data, 0, idx, out=out)
        else:
            out.copy_(self._read(idx))
        if self.binarize:
            out.copy_(self.par.bernoulli(out))
        return out

    def _read(self, idx: torch.Tensor) -> torch.Tensor:
        if self.source == "memory":
            return torch.index_select(self.data, 0, idx)
        if self.source == "render":
            return self.render(idx)
        return fetch_batch(self.bundle.train, idx, self.tensors).to(self.device, non_blocking=True)
