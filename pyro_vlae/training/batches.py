"""Which images each step reads, and reading them: :class:`BatchOrder` (a seeded permutation per epoch, addressable by
global step, so a resumed run reads what a straight run would), :func:`fetch_batch` and :func:`next_batch`."""

from __future__ import annotations

import torch


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
    """Images of ``dataset`` at ``idx``: tensor indexing when the data is in memory, one rendering call for the
    procedural datasets (:class:`~pyro_vlae.data.grid.FactorGridDataset`), item by item otherwise."""
    if tensors is not None:
        return tensors[0][idx]
    if hasattr(dataset, "images"):
        return dataset.images(idx.numpy())
    return torch.stack([dataset[int(i)][0] for i in idx])


def next_batch(bundle, order: BatchOrder, par, tensors, step: int, device, binarize: bool) -> torch.Tensor:
    """The images of ``step`` (this rank's shard of the global batch), on ``device``; dynamically binarized (one
    Bernoulli draw per pixel, the same on every rank count) when the likelihood is Bernoulli."""
    x = fetch_batch(bundle.train, par.shard(order.indices(step)), tensors).to(device, non_blocking=True)
    return par.bernoulli(x) if binarize else x


class Batches:
    """The training images of every step, on ``device``: what :func:`~pyro_vlae.training.loop.fit` reads.

    ``batches(step)`` returns this rank's shard of step ``step``'s global batch of ``batch_size * par.world_size``
    images (the order of :class:`BatchOrder`, so a resumed run reads what a straight run would), dynamically
    binarized when ``binarize``.

    :param bundle: a :class:`~pyro_vlae.data.DataBundle`.
    :param batch_size: images per rank and step.
    :param seed: the run's seed (the order of every epoch follows from it).
    :param par: the data-parallel context (:func:`pyro_vlae.training.distributed.current`).
    """

    def __init__(self, bundle, batch_size: int, seed: int, par, device, binarize: bool):
        self.bundle, self.par, self.device, self.binarize = bundle, par, device, binarize
        self.order = BatchOrder(len(bundle.train), batch_size * par.world_size, seed)  # the global batch
        self.tensors = bundle.tensors("train")

    def __call__(self, step: int) -> torch.Tensor:
        return next_batch(self.bundle, self.order, self.par, self.tensors, step, self.device, self.binarize)
