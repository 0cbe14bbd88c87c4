"""Tests for :mod:`pyro_vlae.evaluation.classifier` (small fabricated data only; offline and fast)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from pyro_vlae.evaluation import classifier as C

NUM_CLASSES = 10
SIZE = 16


def make_patterns(n_per_class: int, seed: int, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten fixed random binary 16x16 patterns (the same for every seed), plus per-image Gaussian noise."""
    protos = (torch.rand(NUM_CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1234)) > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = (protos[y] + noise * torch.randn(len(y), 1, SIZE, SIZE, generator=g)).clamp(0.0, 1.0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """These networks are tiny: one thread is as fast, and much faster when other processes share the CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    return make_patterns(40, seed=0), make_patterns(20, seed=1)


@pytest.fixture(scope="module")
def trained(data):
    (x, y), _ = data
    return C.train_classifier(x, y, num_classes=NUM_CLASSES, epochs=2, batch_size=32, seed=0, log=lambda _: None)


def fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2.0 * covmean))


# ----------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_identical_sets_is_zero():
    f = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert C.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-9)
    assert C.frechet_distance(f.numpy(), f.double()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_matches_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    v1, v2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([2.0, 1.0, 0.25, 0.5])
    a = mu1 + np.sqrt(v1) * rng.standard_normal((200_000, 4))
    b = mu2 + np.sqrt(v2) * rng.standard_normal((200_000, 4))
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2.0 * np.sqrt(v1 * v2)).sum()
    assert C.frechet_distance(a, b) == pytest.approx(expected, abs=0.05)


def test_frechet_matches_scipy_sqrtm_on_full_covariances():
    rng = np.random.default_rng(1)
    d = 12
    a = rng.standard_normal((300, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    b = rng.standard_normal((250, d)) @ rng.standard_normal((d, d)) * 0.5 - 1.0
    ours = C.frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    ref = fd_reference(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
    assert ours == pytest.approx(ref, rel=1e-6)
    assert isinstance(ours, float)


def test_frechet_rank_deficient_covariances():
    # fewer samples than dimensions gives singular covariances (as with small generated batches); the reference takes
    # Tr (S_a S_b)^{1/2} as the sum of square roots of the (non-negative) eigenvalues of the non-symmetric product
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 10)), rng.standard_normal((8, 10)) + 0.3
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0.0, None)).sum()
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt
    assert C.frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_frechet_is_symmetric():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((100, 5)), 2.0 * rng.standard_normal((80, 5)) + 1.0
    assert C.frechet_distance(a, b) == pytest.approx(C.frechet_distance(b, a), rel=1e-9)


@pytest.mark.parametrize(
    "a, b",
    [
        (np.zeros(10), np.zeros(10)),  # 1-d
        (np.zeros((4, 3, 2)), np.zeros((4, 3, 2))),  # 3-d
        (np.zeros((10, 3)), np.zeros((10, 4))),  # feature dimensions differ
        (np.zeros((1, 3)), np.zeros((10, 3))),  # a single sample
        (np.full((10, 3), np.nan), np.zeros((10, 3))),  # non-finite
    ],
)
def test_frechet_rejects_bad_inputs(a, b):
    with pytest.raises(ValueError):
        C.frechet_distance(a, b)
    with pytest.raises(ValueError):
        C.frechet_distance(b, a)


# ---------------------------------------------------------------------------------------------- network and training


@pytest.mark.parametrize("channels, h, w", [(1, 28, 28), (3, 32, 32), (1, 16, 16), (3, 20, 37)])
def test_small_cnn_shapes(channels, h, w):
    net = C.SmallCNN(channels, 7, feature_dim=32).eval()
    x = torch.rand(5, channels, h, w)
    assert net(x).shape == (5, 7)
    assert net.features(x).shape == (5, 32)


def test_small_cnn_rejects_bad_inputs():
    net = C.SmallCNN(1, 10)
    with pytest.raises(ValueError):
        net(torch.rand(2, 1, 8, 8))  # too small
    with pytest.raises(ValueError):
        net(torch.rand(2, 3, 28, 28))  # wrong channel count
    with pytest.raises(ValueError):
        net(torch.rand(2, 784))  # flat
    with pytest.raises(ValueError):
        C.SmallCNN(2, 10)


def test_training_reaches_high_accuracy(data, trained):
    _, (x_test, y_test) = data
    assert not trained.training
    assert C.accuracy(trained, x_test, y_test) > 0.9
    pred = C.predict(trained, x_test, batch_size=17)
    assert pred.dtype == torch.long and pred.shape == y_test.shape


def test_training_is_deterministic_and_leaves_global_rng_alone(data):
    (x, y), _ = data
    x, y = x[:100], y[:100]
    state = torch.get_rng_state()
    kw = {"num_classes": NUM_CLASSES, "epochs": 1, "batch_size": 32, "log": lambda _: None}
    a = C.train_classifier(x, y, seed=3, **kw).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = C.train_classifier(x, y, seed=3, **kw).state_dict()
    c = C.train_classifier(x, y, seed=4, **kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_rejects_bad_labels(data):
    (x, y), _ = data
    with pytest.raises(ValueError):
        C.train_classifier(x, y, num_classes=5, epochs=1)  # labels out of range
    with pytest.raises(ValueError):
        C.train_classifier(x, y[:-1], num_classes=NUM_CLASSES, epochs=1)
    with pytest.raises(ValueError):
        C.train_classifier(x, y.float(), num_classes=NUM_CLASSES, epochs=1)


# ---------------------------------------------------------------------------------------------- features, class change


def test_features_shape_and_batch_independence(data, trained):
    _, (x_test, _) = data
    x = x_test[:64]
    feats = C.extract_features(trained, x)
    assert feats.shape == (64, 128) and feats.dtype == torch.float32
    assert torch.equal(feats, C.extract_features(trained, x))  # deterministic
    for i in (0, 37, 63):
        single = C.extract_features(trained, x[i : i + 1])
        torch.testing.assert_close(single[0], feats[i], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(C.extract_features(trained, x, batch_size=5), feats, rtol=1e-5, atol=1e-6)


def test_inference_uses_eval_mode_and_restores_training_mode(data, trained):
    _, (x_test, _) = data
    bn = trained.body[1]
    stats = bn.running_mean.clone()
    trained.train()
    try:
        feats = C.extract_features(trained, x_test[:8])
        assert trained.training  # mode restored
        assert torch.equal(bn.running_mean, stats)  # no batch-norm update at inference
    finally:
        trained.eval()
    torch.testing.assert_close(feats, C.extract_features(trained, x_test[:8]))


def test_class_change_rate(data, trained):
    _, (x_test, y_test) = data
    assert C.class_change_rate(trained, x_test, x_test) == 0.0
    x0, x1 = x_test[y_test == 0][:15], x_test[y_test == 1][:15]
    assert C.class_change_rate(trained, x0, x1) >= 0.9
    half = torch.cat([x0[:10], x1[:10]])
    assert C.class_change_rate(trained, torch.cat([x0[:10], x0[:10]]), half) == pytest.approx(0.5, abs=0.1)
    with pytest.raises(ValueError):
        C.class_change_rate(trained, x0, x1[:-1])


# ---------------------------------------------------------------------------------------------- fingerprint and cache


def test_data_fingerprint():
    x, y = torch.rand(50, 1, 16, 16), torch.randint(0, 10, (50,))
    fp = C.data_fingerprint(x, y)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert C.data_fingerprint(x.clone(), y.clone()) == fp
    x2 = x.clone()
    x2[7, 0, 3, 3] += 1e-6
    assert C.data_fingerprint(x2, y) != fp
    assert C.data_fingerprint(x, y.roll(1)) != fp
    assert C.data_fingerprint(x.reshape(50, 256), y) != fp  # same bytes, other shape
    assert C.data_fingerprint(x.double(), y) != fp
    xt = x.transpose(2, 3)  # a non-contiguous view hashes like its contiguous copy
    assert C.data_fingerprint(xt, y) == C.data_fingerprint(xt.contiguous(), y) != fp


def _call(data, cache_dir, messages, x=None, y=None, **kw):
    (x_train, y_train), (x_test, y_test) = data
    return C.get_classifier(
        x_train if x is None else x, y_train if y is None else y, num_classes=NUM_CLASSES, cache_dir=cache_dir,
        x_test=x_test, y_test=y_test, epochs=1, log=messages.append, **kw,
    )  # fmt: skip


def _no_training(*args, **kwargs):
    raise AssertionError("train_classifier must not be called on a cache hit")


def _no_accuracy(*args, **kwargs):
    raise AssertionError("the test accuracy must not be recomputed on a cache hit")


def test_get_classifier_caches(data, tmp_path, monkeypatch):
    _, (x_test, _) = data
    msgs = []
    clf, info = _call(data, tmp_path / "cache", msgs)
    assert info["cached"] is False and isinstance(info["test_accuracy"], float)
    assert os.path.isfile(info["path"]) and info["path"].endswith(".pt")
    assert info["fingerprint"] == C.data_fingerprint(*data[0])
    assert any("epoch" in m for m in msgs)
    assert not [f for f in os.listdir(tmp_path / "cache") if f.endswith(".tmp")]
    meta = json.loads(Path(info["path"]).with_suffix(".json").read_text())
    assert meta["test_accuracy"] == info["test_accuracy"]

    monkeypatch.setattr(C, "train_classifier", _no_training)
    monkeypatch.setattr(C, "accuracy", _no_accuracy)
    msgs2 = []
    clf2, info2 = _call(data, tmp_path / "cache", msgs2)
    assert info2["cached"] is True
    assert not any("epoch" in m for m in msgs2)
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert info2["path"] == info["path"] and info2["fingerprint"] == info["fingerprint"]
    assert not clf2.training
    assert torch.equal(C.predict(clf2, x_test), C.predict(clf, x_test))
    torch.testing.assert_close(C.extract_features(clf2, x_test), C.extract_features(clf, x_test))


def test_get_classifier_keys_on_data_and_hparams(data, tmp_path):
    (x, y), _ = data
    msgs = []
    _, info = _call(data, tmp_path, msgs)
    x_other = x.clone()
    x_other[0, 0, 0, 0] = 1.0 - x_other[0, 0, 0, 0]
    _, info_x = _call(data, tmp_path, msgs, x=x_other)
    assert info_x["fingerprint"] != info["fingerprint"] and info_x["path"] != info["path"]
    assert info_x["cached"] is False
    _, info_seed = _call(data, tmp_path, msgs, seed=1)
    assert info_seed["fingerprint"] == info["fingerprint"] and info_seed["path"] != info["path"]
    assert info_seed["cached"] is False


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty", "wrong_state", "nan_weights"])
def test_get_classifier_retrains_on_corrupt_cache(data, tmp_path, corruption):
    _, (x_test, _) = data
    msgs = []
    clf0, info = _call(data, tmp_path, msgs)
    pred0 = C.predict(clf0, x_test)
    path = Path(info["path"])
    raw = path.read_bytes()
    if corruption == "garbage":
        path.write_bytes(b"not a torch file at all" * 10)
    elif corruption == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif corruption == "empty":
        path.write_bytes(b"")
    elif corruption == "wrong_state":
        torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    else:
        state = clf0.state_dict()
        state["fc.weight"][0, 0] = float("nan")
        torch.save(state, path)
    msgs.clear()
    clf, info2 = _call(data, tmp_path, msgs)
    assert info2["cached"] is False
    assert any("unreadable" in m and "retraining" in m for m in msgs)
    assert any("epoch" in m for m in msgs)
    assert torch.equal(C.predict(clf, x_test), pred0)  # deterministic retraining gives the same network
    # the retrained weights replaced the corrupt file
    msgs.clear()
    clf3, info3 = _call(data, tmp_path, msgs)
    assert info3["cached"] is True
    assert torch.equal(C.predict(clf3, x_test), pred0)


def test_get_classifier_without_test_data(data, tmp_path):
    (x, y), _ = data
    msgs = []
    kw = {"num_classes": NUM_CLASSES, "cache_dir": tmp_path, "epochs": 1, "log": msgs.append}
    _, info = C.get_classifier(x, y, **kw)
    assert info["test_accuracy"] is None and info["cached"] is False
    _, info2 = C.get_classifier(x, y, **kw)
    assert info2["test_accuracy"] is None and info2["cached"] is True
    with pytest.raises(ValueError):
        C.get_classifier(x, y, x_test=x, **kw)


def test_get_classifier_survives_unwritable_cache(data, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(C.torch, "save", disk_full)
    msgs = []
    clf, info = _call(data, tmp_path, msgs)
    assert info["cached"] is False and isinstance(info["test_accuracy"], float)
    assert any("could not write" in m for m in msgs)
    assert not os.path.exists(info["path"])
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
