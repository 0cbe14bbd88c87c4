"""A small CNN image classifier used by the evaluation code.

It serves two evaluation purposes:

* **class-change rates**: how often the predicted class of a generated image changes when one latent layer of a
  generative model is resampled (:func:`class_change_rate`);
* **sample quality**: a Fréchet distance between the classifier's penultimate features of generated samples and of
  test images, i.e. an "FID" computed with our own classifier (:func:`extract_features`, :func:`frechet_distance`).

Trained classifiers are cached on disk by a fingerprint of the training data and the training hyper-parameters
(:func:`get_classifier`), so that every evaluation run uses the very same network and trains it only once.
Only ``numpy`` and ``torch`` are used here (the matrix square root comes from symmetric eigendecompositions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..training.checkpoint import read_json_dict
from .classifier_cache import atomic_write, data_fingerprint, load_weights, write_json

__all__ = [
    "SmallCNN",
    "accuracy",
    "class_change_rate",
    "data_fingerprint",
    "extract_features",
    "frechet_distance",
    "get_classifier",
    "predict",
    "train_classifier",
]

#: Bumped whenever the architecture or the training procedure changes, so that stale cache entries are not reused.
CACHE_VERSION = 1
MIN_SIZE = 16


class SmallCNN(nn.Module):
    """Two conv blocks (32 and 64 channels, batch norm, ReLU, max-pooling: 2x2, then adaptive to 7x7, so any image
    of at least 16x16 works and 28x28 images are pooled 2x2 twice), a fully connected layer of ``feature_dim`` units
    with ReLU (the penultimate features) and a linear read-out. Inputs are images in [0, 1].

    :param in_channels: number of image channels, 1 or 3.
    :param num_classes: number of classes (at least 2).
    :param feature_dim: width of the penultimate feature layer.
    """

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 128):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if feature_dim < 1:
            raise ValueError(f"feature_dim must be positive, got {feature_dim}")
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d((7, 7)),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 7 * 7, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[2] < MIN_SIZE or x.shape[3] < MIN_SIZE:
            raise ValueError(f"images must be at least {MIN_SIZE}x{MIN_SIZE}, got {tuple(x.shape[2:])}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of images ``(B, C, H, W)`` in [0, 1]."""
        self._check_input(x)
        return F.relu(self.fc(self.body(2.0 * x - 1.0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of images ``(B, C, H, W)`` in [0, 1]."""
        return self.head(self.features(x))


@contextlib.contextmanager
def _inference(clf: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; restores the previous training mode afterwards."""
    was_training = clf.training
    clf.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        clf.train(was_training)


def _batched(
    clf: SmallCNN, x: torch.Tensor, batch_size: int, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = torch.as_tensor(x)
    device = next(clf.parameters()).device
    with _inference(clf):
        if x.shape[0] == 0:
            return fn(torch.zeros(0, clf.in_channels, MIN_SIZE, MIN_SIZE, device=device)).cpu()
        return torch.cat(
            [fn(x[i : i + batch_size].to(device, torch.float32)).cpu() for i in range(0, len(x), batch_size)]
        )


def predict(clf: SmallCNN, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes, as a CPU ``LongTensor`` ``(N,)``, of images ``x`` ``(N, C, H, W)`` in [0, 1] (any device).

    :param batch_size: inference batch size.
    """
    return _batched(clf, x, batch_size, lambda b: clf(b).argmax(dim=1))


def extract_features(clf: SmallCNN, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate features, as a CPU tensor ``(N, feature_dim)``, of images ``x`` ``(N, C, H, W)`` in [0, 1].

    :param batch_size: inference batch size.
    """
    return _batched(clf, x, batch_size, clf.features)


def accuracy(clf: SmallCNN, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of the images ``x`` ``(N, C, H, W)`` whose predicted class equals the integer label in ``y`` ``(N,)``.

    :param batch_size: inference batch size.
    """
    y = torch.as_tensor(y).reshape(-1).cpu()
    if y.shape[0] != x.shape[0] or y.shape[0] == 0:
        raise ValueError(f"need as many labels as images (and at least one), got {y.shape[0]} and {x.shape[0]}")
    return (predict(clf, x, batch_size) == y.long()).double().mean().item()


def class_change_rate(clf: SmallCNN, x_ref: torch.Tensor, x_new: torch.Tensor) -> float:
    """Fraction of image pairs ``(x_ref[i], x_new[i])`` whose predicted classes differ.

    :param x_ref: reference images ``(N, C, H, W)``.
    :param x_new: images paired with ``x_ref`` (same number).
    """
    if x_ref.shape[0] != x_new.shape[0] or x_ref.shape[0] == 0:
        raise ValueError(f"need the same non-zero number of images, got {x_ref.shape[0]} and {x_new.shape[0]}")
    return (predict(clf, x_ref) != predict(clf, x_new)).double().mean().item()


def _as_features(f, name: str) -> np.ndarray:
    if isinstance(f, torch.Tensor):
        f = f.detach().cpu().double().numpy()
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {f.shape[0]}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} contains non-finite values")
    return f


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``(N_a, D)`` and ``(N_b, D)`` (the FID formula).

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})``, with unbiased sample covariances, in float64. The
    trace of the square root is computed as ``Tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})``, whose symmetric argument has the
    same eigenvalues as ``S_a S_b``. Each set needs 2 rows or more. Round-off negatives are clipped to 0.

    >>> import torch
    >>> import pyro_vlae as pv
    >>> a = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    >>> round(pv.frechet_distance(a, a + 1.0), 6)  # the same spread, the means 1 apart in each of 4 dims
    4.0
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca, cb = a - mu_a, b - mu_b
    s_a = ca.T @ ca / (a.shape[0] - 1)
    s_b = cb.T @ cb / (b.shape[0] - 1)
    r = _psd_sqrt(s_a)
    m = r @ s_b @ r
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def _check_training_data(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (N, C, H, W), got {tuple(x.shape)}")
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.shape[0] == 0:
        raise ValueError(f"y must have shape ({x.shape[0]},) with N > 0, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    return x, y


def train_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    num_classes: int,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[str], object] = print,
) -> SmallCNN:
    """Train a :class:`SmallCNN` with Adam and a cosine learning-rate decay; deterministic given ``seed`` on CPU. The
    global torch RNG is left untouched (initialisation runs under a forked RNG, shuffling uses its own generator).

    :param x_train: images ``(N, C, H, W)`` in [0, 1] (kept where they are; batches are moved to ``device``).
    :param y_train: integer labels ``(N,)``.
    :param num_classes: number of classes.
    :param epochs: passes over the data.
    :param batch_size: mini-batch size.
    :param lr: peak Adam learning rate.
    :param seed: seed for initialisation and shuffling.
    :param device: training device.
    :param log: callback receiving progress messages.
    :return: the trained classifier, in eval mode, on ``device``.
    """
    x_train, y_train = _check_training_data(x_train, y_train, num_classes)
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = SmallCNN(x_train.shape[1], num_classes)
    clf.to(device)
    gen = torch.Generator().manual_seed(seed)
    n = x_train.shape[0]
    total = epochs * math.ceil(n / batch_size)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * s / total)))
    clf.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = x_train[idx].to(device=device, dtype=torch.float32)
            yb = y_train[idx].to(device)
            logits = clf(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * idx.shape[0]
            correct += int((logits.argmax(1) == yb).sum())
        log(
            f"classifier epoch {epoch + 1}/{epochs}: loss {loss_sum / n:.4f}, train acc {correct / n:.4f}, "
            f"{time.perf_counter() - t0:.1f}s"
        )
    clf.eval()
    return clf


def get_classifier(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    num_classes: int,
    cache_dir: str | os.PathLike,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    epochs: int = 3,
    seed: int = 0,
    log: Callable[[str], object] = print,
) -> tuple[SmallCNN, dict]:
    """Return a classifier trained on ``(x_train, y_train)``, training it only if it is not cached yet.

    The cache key hashes the data fingerprint, the architecture and the training hyper-parameters; weights are
    stored as ``<cache_dir>/<key>.pt`` and the test accuracy beside them as ``<key>.json`` (both written atomically).
    A cache file that cannot be loaded is reported through ``log`` and the classifier is retrained.

    :param x_train: training images ``(N, C, H, W)`` in [0, 1].
    :param y_train: integer labels ``(N,)``.
    :param num_classes: number of classes.
    :param cache_dir: cache folder (created if needed).
    :param x_test: optional test images; with ``y_test`` the test accuracy is computed (once) and reported.
    :param y_test: optional test labels.
    :param device: device of the returned classifier (and of training).
    :param epochs: training epochs.
    :param seed: training seed.
    :param log: callback receiving progress messages.
    :return: ``(classifier in eval mode, info)`` with info keys ``test_accuracy`` (float or None), ``fingerprint``,
        ``cached`` (whether the weights came from the cache) and ``path`` (the weights file).

    >>> import tempfile
    >>> import pyro_vlae as pv
    >>> x, y = pv.load_data("synthetic").tensors("train")
    >>> with tempfile.TemporaryDirectory() as cache:  # a second call with this data and these settings reads the cache
    ...     clf, info = pv.get_classifier(x, y, num_classes=10, cache_dir=cache, epochs=1, log=lambda line: None)
    >>> tuple(clf(x[:4]).shape), info["cached"]
    ((4, 10), False)
    """
    if (x_test is None) != (y_test is None):
        raise ValueError("pass both x_test and y_test, or neither")
    x_train, y_train = _check_training_data(x_train, y_train, num_classes)
    fingerprint = data_fingerprint(x_train, y_train)
    in_channels, feature_dim = int(x_train.shape[1]), 128
    hparams = {
        "version": CACHE_VERSION,
        "arch": repr(SmallCNN(in_channels, num_classes, feature_dim)),  # any layer change gives a new key
        "in_channels": in_channels,
        "num_classes": int(num_classes),
        "feature_dim": feature_dim,
        "epochs": int(epochs),
        "batch_size": 128,
        "lr": 1e-3,
        "seed": int(seed),
        "fingerprint": fingerprint,
    }
    key = hashlib.sha256(json.dumps(hparams, sort_keys=True).encode()).hexdigest()[:32]
    cache_dir = os.fspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{key}.pt")
    meta_path = os.path.join(cache_dir, f"{key}.json")

    clf, cached = None, False
    if os.path.exists(path):
        candidate = SmallCNN(in_channels, num_classes, feature_dim)
        try:
            load_weights(path, candidate)
            clf, cached = candidate, True
            log(f"classifier loaded from cache {path}")
        except Exception as e:  # any unreadable cache entry means: retrain
            log(f"classifier cache file {path} is unreadable ({type(e).__name__}: {e}); retraining")
    if clf is None:
        clf = train_classifier(
            x_train,
            y_train,
            num_classes=num_classes,
            epochs=epochs,
            batch_size=hparams["batch_size"],
            lr=hparams["lr"],
            seed=seed,
            device=device,
            log=log,
        )
        clf.cpu()
        atomic_write(path, lambda tmp: torch.save(clf.state_dict(), tmp), log)
    clf.to(device).eval()

    test_accuracy = None
    if x_test is not None:
        test_fp = data_fingerprint(x_test, y_test)
        meta = read_json_dict(meta_path) if cached else {}
        if meta.get("test_fingerprint") == test_fp and isinstance(meta.get("test_accuracy"), float):
            test_accuracy = meta["test_accuracy"]
        else:
            test_accuracy = accuracy(clf, x_test, y_test)
            write_json(meta_path, {"test_accuracy": test_accuracy, "test_fingerprint": test_fp, **hparams}, log)
        log(f"classifier test accuracy {test_accuracy:.4f}")
    elif not cached:
        write_json(meta_path, {"test_accuracy": None, "test_fingerprint": None, **hparams}, log)
    return clf, {"test_accuracy": test_accuracy, "fingerprint": fingerprint, "cached": cached, "path": path}
