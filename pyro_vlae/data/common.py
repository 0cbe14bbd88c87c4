"""What every data source shares: the error type, the checks on raw arrays, and the download hook.

Downloads go through :func:`_torchvision_download`; the loaders look it up on this module at call time, so tests can
replace it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_CORRUPT = "the file is truncated or corrupt: delete it and get it again"


class DatasetError(RuntimeError):
    """A dataset is missing, corrupt or malformed; the message names the problem, the file and the fix.

    >>> import pyro_vlae as pv
    >>> try:
    ...     pv.load_data("mnsit")
    ... except pv.DatasetError as err:
    ...     print(err)
    unknown dataset 'mnsit'; valid names are: mnist, fashion-mnist, svhn, celeba, sprites, shapes3d, synthetic
    """


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
