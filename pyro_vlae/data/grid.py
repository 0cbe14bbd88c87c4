"""Datasets of images rendered on access from a full grid of ground-truth factors (sprites, shapes3d)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class FactorGridDataset(Dataset):
    """Images rendered on access: item ``i`` is ``(x, factor_indices)`` of flat grid index ``indices[i]``.

    Subclasses set :attr:`factor_sizes`, the grid, and :meth:`render`, which maps integer factor indices ``(N, K)``
    and an image size to float32 images ``(N, C, size, size)``. A batch from a :class:`~torch.utils.data.DataLoader`
    is rendered in one call (``__getitems__``).

    :param indices: flat row-major indices into the factor grid of sizes :attr:`factor_sizes`.
    :param size: image height and width.
    """

    factor_sizes: tuple = ()
    #: ``staticmethod(f)`` with ``f(factors (N, K), size) -> float32 (N, C, size, size)``, set by each subclass.
    render = None
    #: optional: a class ``R(size, device)`` whose instances map integer factors ``(N, K)`` on ``device`` to the images
    #: :attr:`render` gives, bit for bit, drawn by torch on that device (see :meth:`renderer`).
    device_render = None

    def __init__(self, indices, size: int = 64):
        if self.render is None or not self.factor_sizes:
            raise TypeError(f"{type(self).__name__} must set factor_sizes and render (see FactorGridDataset)")
        self.indices, self.size = np.asarray(indices, dtype=np.int64), int(size)

    def __len__(self) -> int:
        return len(self.indices)

    def factors(self, items=None) -> np.ndarray:
        """Factor indices ``(N, K)`` of the given items (all by default)."""
        flat = self.indices if items is None else self.indices[np.asarray(items)]
        return np.stack(np.unravel_index(flat, self.factor_sizes), axis=-1).astype(np.int64)

    def images(self, items) -> torch.Tensor:
        """The images ``(N, C, size, size)`` of the given items, rendered in one call."""
        return torch.from_numpy(self.render(self.factors(items), self.size))

    def renderer(self, device) -> GridRenderer | None:
        """A :class:`GridRenderer` drawing this dataset's items on ``device`` (``None`` without
        :attr:`device_render`)."""
        return None if self.device_render is None else GridRenderer(self, device)

    def __getitems__(self, items) -> list:
        f = self.factors(items)
        return list(zip(torch.from_numpy(self.render(f, self.size)), torch.from_numpy(f)))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


class GridRenderer:
    """The images of items of a :class:`FactorGridDataset`, drawn on ``device`` by its :attr:`~FactorGridDataset.
    device_render`: ``renderer(items)`` with item indices (int64, on ``device``) equals ``dataset.images(items)``, bit
    for bit, with no host read (the flat grid indices live on the device; factors are integer divisions).

    :param dataset: the dataset whose items are drawn.
    :param device: where the items' grid indices live and the images are drawn.
    """

    def __init__(self, dataset: FactorGridDataset, device):
        self.device = torch.device(device)
        self.flat = torch.from_numpy(dataset.indices).to(self.device)
        sizes = dataset.factor_sizes
        self.sizes, self.strides = sizes, [int(np.prod(sizes[k + 1 :], dtype=np.int64)) for k in range(len(sizes))]
        self.draw = dataset.device_render(dataset.size, self.device)

    def factors(self, items: torch.Tensor) -> torch.Tensor:
        """Factor indices ``(N, K)`` of the given items, on the device (``np.unravel_index`` of their flat index)."""
        flat = torch.index_select(self.flat, 0, items)
        return torch.stack([flat // stride % size for stride, size in zip(self.strides, self.sizes)], dim=-1)

    def __call__(self, items: torch.Tensor) -> torch.Tensor:
        return self.draw(self.factors(items))


__all__ = ["FactorGridDataset", "GridRenderer"]
