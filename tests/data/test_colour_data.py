"""SVHN and CelebA loaders (end-to-end cases on fabricated files are in test_data.py): error messages and downloads."""

from pathlib import Path

import pytest

from pyro_vlae import data as D
from pyro_vlae.data import colour as C
from pyro_vlae.data import common as DC


class _BrokenCelebA:
    attr_names = ["Smiling", ""]
    filename = ["000001.jpg"]

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise OSError("broken data stream when reading image file")


def test_unreadable_celeba_image_names_the_file_and_the_fix():
    images = C.CelebAImages(_BrokenCelebA(), Path("celeba") / "img_align_celeba")
    assert images.attr_names == ("Smiling",) and len(images) == 1
    with pytest.raises(D.DatasetError, match=r"img_align_celeba/000001\.jpg: broken data stream.*get it again"):
        images[0]


@pytest.mark.parametrize("loader", ["svhn", "celeba"])
def test_downloads_go_through_the_data_module_at_call_time(loader, tmp_path, monkeypatch):
    """Tests and offline users replace ``data._torchvision_download``; the moved loaders must still use it."""
    calls = []

    def offline(name, root, **kwargs):
        calls.append(name)
        return "URLError: network is unreachable"

    monkeypatch.setattr(DC, "_torchvision_download", offline)
    load = (
        (lambda: C.load_svhn(tmp_path, False, True))
        if loader == "svhn"
        else (lambda: C.load_celeba(tmp_path, 64, True))
    )
    with pytest.raises(D.DatasetError, match="network is unreachable"):
        load()
    assert calls and calls[0] in ("SVHN", "CelebA")
