"""The colour datasets, SVHN and CelebA, read from torchvision's layouts (see :mod:`pyro_vlae.data` for the sources).

:func:`pyro_vlae.data.load_data` calls :func:`load_svhn` and :func:`load_celeba`; downloads go through
``pyro_vlae.data.common._torchvision_download``, looked up at call time so that tests can replace it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import common
from .common import _CORRUPT, DatasetError, _check_split, _not_found, _u8_to_float

CELEBA_CROP = 148
_CELEBA_TXT = "list_attr_celeba identity_CelebA list_bbox_celeba list_landmarks_align_celeba list_eval_partition"


# ---------------------------------------------------------------------------------------------------- SVHN
def load_svhn(root: Path, extra: bool, download: bool) -> tuple:
    import torchvision
    from torchvision.datasets.utils import check_integrity

    cls = torchvision.datasets.SVHN
    splits = ["train", "test"] + (["extra"] if extra else [])
    files = [cls.split_list[s][1] for s in splits]
    folders = [d for d in (root / "svhn", root) if all((d / f).is_file() for f in files)]
    failed = None
    if not folders and download:
        tries = (common._torchvision_download("SVHN", root / "svhn", split=s) for s in splits)
        failed = next(filter(None, tries), None)
        folders = [root / "svhn"] if all((root / "svhn" / f).is_file() for f in files) else []
    if not folders:
        raise _not_found(
            f"svhn not found: put {', '.join(files)} (the SVHN site's cropped digits) in {root / 'svhn'}/ "
            f"or {root}/, or call load_data with download=True on a machine with internet access",
            download,
            failed,
        )
    data = {}
    for s, f in zip(splits, files):
        path = folders[0] / f
        try:
            ds = cls(str(folders[0]), split=s, download=False)
            x, y = np.asarray(ds.data), np.asarray(ds.labels).reshape(-1)
        except ImportError as e:
            raise DatasetError(f"reading {path} needs scipy: `pip install scipy` ({e})") from e
        except Exception as e:
            why = "does not match its published MD5" if not check_integrity(str(path), cls.split_list[s][2]) else e
            raise DatasetError(f"cannot read {path}: {why}; {_CORRUPT}") from e
        _check_split(x, y, str(path), (3, 32, 32))
        data[s] = (_u8_to_float(x), torch.from_numpy(np.array(y, dtype=np.int64)))
    train = [data[s] for s in splits if s != "test"]
    x_tr, y_tr = (torch.cat(t) for t in zip(*train)) if len(train) > 1 else train[0]
    return x_tr, y_tr, *data["test"], f"torchvision SVHN layout under {folders[0]}"


# -------------------------------------------------------------------------------------------------- CelebA
def _to_rgb(img):
    with img:  # closes the file even when a truncated image fails to decode
        return img.convert("RGB")


class CelebAImages(Dataset):
    """A ``torchvision.datasets.CelebA`` split whose unreadable images raise :class:`DatasetError` naming the file.

    :param ds: the torchvision dataset (``target_type="attr"``, with an image transform).
    :param folder: its ``img_align_celeba`` folder, for messages.
    """

    def __init__(self, ds, folder: Path):
        self.ds, self.folder = ds, folder
        self.attr_names = tuple(a for a in ds.attr_names if a)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        try:
            x, y = self.ds[i]
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError or SyntaxError on broken files
            raise DatasetError(f"cannot read image {self.folder / self.ds.filename[i]}: {e}; {_CORRUPT}") from e
        return x, y.long()


def load_celeba(root: Path, size: int, download: bool) -> tuple:
    import torchvision
    from torchvision import transforms
    from torchvision.datasets.utils import check_integrity

    base, cls = root / "celeba", torchvision.datasets.CelebA
    folder, txt = base / "img_align_celeba", [f"{t}.txt" for t in _CELEBA_TXT.split()]
    failed = None
    if download and not all(p.exists() for p in [folder] + [base / t for t in txt]):
        failed = common._torchvision_download("CelebA", root)
    missing = [p for p in [folder] + [base / t for t in txt] if not p.exists()]
    if missing:
        raise _not_found(
            f"celeba not found ({missing[0]} is missing): put the aligned images (img_align_celeba/*.jpg)"
            f" and the five annotation files ({', '.join(txt)}) from the CelebA site in {base}/ "
            "(torchvision's layout), or call load_data with download=True (torchvision downloads from "
            "Google Drive; needs the gdown package)",
            download,
            failed,
        )
    tf = transforms.Compose(
        [transforms.Lambda(_to_rgb), transforms.CenterCrop(CELEBA_CROP), transforms.Resize(size), transforms.ToTensor()]
    )
    names, out = set(os.listdir(folder)), []
    for split in ("train", "test"):
        try:
            ds = cls(str(root), split=split, target_type="attr", transform=tf, download=False)
        except Exception as e:
            bad = [base / f for _, md5, f in cls.file_list if f.endswith(".txt") and not check_integrity(base / f, md5)]
            why = f"{bad[0]} does not match its published MD5" if bad else f"cannot parse the files in {base}: {e}"
            raise DatasetError(f"celeba: {why}; the annotation files are truncated or corrupt: get them again") from e
        absent = [f for f in ds.filename if f not in names]
        if absent or not len(ds):
            what = f"{len(absent)} listed images are missing, e.g. {folder / absent[0]}" if absent else "no images"
            raise DatasetError(f"celeba {split} split: {what}; list_eval_partition.txt and {folder} disagree")
        images = CelebAImages(ds, folder)
        x, y = images[0]  # a broken first image fails here, at load time
        if tuple(y.shape) != (40,):
            raise DatasetError(f"celeba: {base / txt[0]} gives {tuple(y.shape)} attributes, not 40; {_CORRUPT}")
        out.append(images)
    return out[0], out[1], f"torchvision CelebA layout under {base}"
