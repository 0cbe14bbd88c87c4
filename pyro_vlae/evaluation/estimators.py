"""Numerical building blocks of :mod:`.disentangle`: input checks, binning, plug-in mutual information,
closed-form LDA and 1-D nearest-class-mean scores. Everything is numpy and deterministic given the seed.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import numpy as np

BINNINGS = ("equal_width", "quantile")


def _as_array(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensors, on any device
        a = a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} could not be converted to an array: {err}") from err


def check_seed(seed) -> int:
    """:return: ``seed`` as an int; non-negative integers only (they seed :func:`numpy.random.default_rng`)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    return int(seed)


def prepare(codes, factors, max_samples, seed, min_samples: int) -> tuple:
    """Validate, subsample and re-encode the inputs.

    :param codes: array-like ``(N, D)`` of finite floats.
    :param factors: array-like ``(N, K)`` of integer (or integral float) factor indices.
    :param max_samples: ``None`` or the number of rows to keep, drawn without replacement.
    :param seed: non-negative int; the subsample uses ``default_rng([seed, 0])``.
    :param min_samples: smallest accepted ``N``.
    :return: ``(x, y, cards, n_total)``: float64 codes ``(n, D)``, factor codes ``0..C_k-1`` ``(n, K)``, the
        cardinalities ``C_k`` present in the kept rows, and the number of rows before subsampling.
    :raises ValueError: on malformed input.
    """
    seed = check_seed(seed)
    x, f = _as_array(codes, "codes"), _as_array(factors, "factors")
    if x.ndim != 2:
        raise ValueError(f"codes must be a 2-D array (N, D); got shape {x.shape}")
    if f.ndim != 2:
        raise ValueError(
            f"factors must be a 2-D array (N, K); got shape {f.shape} (use factors[:, None] for one factor)"
        )
    if x.shape[0] != f.shape[0]:
        raise ValueError(f"codes and factors must have the same number of rows; got {x.shape[0]} and {f.shape[0]}")
    if x.shape[1] < 1 or f.shape[1] < 1:
        raise ValueError(f"need at least one code dim and one factor; got codes {x.shape}, factors {f.shape}")
    if x.shape[0] < min_samples:
        raise ValueError(f"need at least {min_samples} samples; got {x.shape[0]}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"codes must be real numbers; got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"codes must be finite; found {x[tuple(bad)]} at row {bad[0]}, dim {bad[1]}")
    if not (np.issubdtype(f.dtype, np.number) or f.dtype == bool):
        raise ValueError(f"factors must be integer indices; got dtype {f.dtype}")
    if not np.issubdtype(f.dtype, np.integer) and f.dtype != bool:
        if not np.all(np.isfinite(f)) or not np.all(f == np.round(f)):
            raise ValueError("factors must be integer indices; found non-integral or non-finite values")
    f = f.astype(np.int64)
    n_total = x.shape[0]
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral) or max_samples < min_samples:
            raise ValueError(f"max_samples must be None or an integer >= {min_samples}; got {max_samples!r}")
        if n_total > max_samples:
            keep = np.sort(np.random.default_rng([seed, 0]).choice(n_total, int(max_samples), replace=False))
            x, f = x[keep], f[keep]
    y = np.empty_like(f)
    cards = []
    for k in range(f.shape[1]):
        values, y[:, k] = np.unique(f[:, k], return_inverse=True)
        cards.append(len(values))
    if max(cards) < 2:
        raise ValueError("every factor is constant in the (subsampled) rows; there is nothing to measure")
    return x, y, cards, n_total


def split_indices(n: int, train_frac: float, seed) -> tuple:
    """Random train/test split with ``default_rng([seed, 1])``; ``round(train_frac * n)`` training rows.

    :return: ``(train_idx, test_idx)``, both non-empty.
    :raises ValueError: if ``train_frac`` is not in ``(0, 1)`` or a side would be empty.
    """
    if not isinstance(train_frac, numbers.Real) or not 0.0 < float(train_frac) < 1.0:
        raise ValueError(f"train_frac must be a number in (0, 1); got {train_frac!r}")
    n_train = int(round(float(train_frac) * n))
    if n_train < 1 or n_train >= n:
        raise ValueError(f"train_frac={train_frac} leaves an empty train or test split for {n} samples")
    perm = np.random.default_rng([check_seed(seed), 1]).permutation(n)
    return perm[:n_train], perm[n_train:]


def entropy(p: np.ndarray) -> float:
    """Entropy in nats of a probability vector (zeros allowed)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def normalized_entropy(weights: np.ndarray) -> float:
    """Entropy of ``weights / sum(weights)`` in base ``len(weights)`` (0 for a single entry)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.size < 2:
        return 0.0
    return entropy(weights / weights.sum()) / np.log(weights.size)


def top2_gap(values: np.ndarray) -> float:
    """Largest minus second largest entry (the second is 0 for a single entry)."""
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return float(v[0] - (v[1] if v.size > 1 else 0.0))


def discretize(x: np.ndarray, num_bins: int, binning: str = "equal_width") -> np.ndarray:
    """Bin each column of ``x`` into ``0..num_bins-1``.

    ``equal_width``: ``floor(num_bins (x - min) / (max - min))`` clipped to the last bin (a constant column is bin 0).
    ``quantile``: the number of the ``num_bins - 1`` empirical quantiles (``method="inverted_cdf"``, i.e. data
    points) strictly below ``x``; equal values share a bin.

    :raises ValueError: on a bad ``num_bins`` or ``binning``.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2; got {num_bins!r}")
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}; got {binning!r}")
    if binning == "equal_width":
        lo, hi = x.min(axis=0), x.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        return np.clip(np.floor((x - lo) / span * num_bins), 0, num_bins - 1).astype(np.int64)
    qs = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    out = np.empty(x.shape, dtype=np.int64)
    for j in range(x.shape[1]):
        edges = np.quantile(x[:, j], qs, method="inverted_cdf")
        out[:, j] = np.searchsorted(edges, x[:, j], side="left")
    return out


def mutual_info_matrix(x: np.ndarray, y: np.ndarray, cards, num_bins: int, binning: str) -> np.ndarray:
    """Plug-in ``I(c_j; v_k)`` in nats between binned code dims and factors.

    :return: float array ``(D, K)``, non-negative.
    """
    bins = discretize(x, num_bins, binning)
    n = len(x)
    mi = np.zeros((x.shape[1], y.shape[1]))
    for k, card in enumerate(cards):
        for j in range(x.shape[1]):
            joint = np.bincount(bins[:, j] * card + y[:, k], minlength=num_bins * card).reshape(num_bins, card) / n
            pb, pv = joint.sum(axis=1, keepdims=True), joint.sum(axis=0, keepdims=True)
            nz = joint > 0
            mi[j, k] = max(0.0, float(np.sum(joint[nz] * np.log(joint[nz] / (pb @ pv)[nz]))))
    return mi


def class_means(x: np.ndarray, inv: np.ndarray, n_classes: int) -> tuple:
    """Per-class means of the rows of ``x`` for labels ``inv`` in ``0..n_classes-1``, each present at least once.

    Sums with :func:`numpy.add.reduceat` over rows sorted by label rather than a one-hot matrix product: a skinny
    transposed BLAS product can be hundreds of times slower when the BLAS threads compete for busy cores.

    :return: ``(means, counts)`` of shapes ``(n_classes, D)`` and ``(n_classes,)``.
    """
    counts = np.bincount(inv, minlength=n_classes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.add.reduceat(x[np.argsort(inv, kind="stable")], starts, axis=0)
    return sums / counts[:, None], counts.astype(np.float64)


def lda_fit_predict(z_tr: np.ndarray, y_tr: np.ndarray, z_te: np.ndarray, ridge: float) -> tuple:
    """Linear discriminant analysis with a shared, ridge-regularised covariance, fitted in closed form.

    :param z_tr: standardised training codes ``(n, D)``.
    :param y_tr: training labels ``(n,)``.
    :param z_te: test codes ``(m, D)``.
    :param ridge: positive value added to the diagonal of the pooled within-class covariance.
    :return: ``(pred, weights)``: predicted labels ``(m,)`` and the class weights ``(P, D)`` of the ``P`` classes
        present in ``y_tr``.
    """
    if not isinstance(ridge, numbers.Real) or not float(ridge) > 0:
        raise ValueError(f"ridge must be a positive number; got {ridge!r}")
    classes, inv = np.unique(y_tr, return_inverse=True)
    n, d = z_tr.shape
    means, counts = class_means(z_tr, inv, len(classes))
    resid = z_tr - means[inv]
    cov = resid.T @ resid / max(n - len(classes), 1) + float(ridge) * np.eye(d)
    weights = np.linalg.solve(cov, means.T).T
    bias = -0.5 * np.sum(weights * means, axis=1) + np.log(counts / n)
    return classes[np.argmax(z_te @ weights.T + bias, axis=1)], weights


def sap_score_matrices(x_tr, y_tr, x_te, y_te, cards) -> tuple:
    """Balanced test accuracy of a 1-D nearest-class-mean classifier for every (code dim, factor) pair.

    :return: ``(adjusted, raw)``, float arrays ``(D, K)``: ``adjusted = (raw - 1/C) / (1 - 1/C)`` with ``C`` the
        number of classes present in the test rows; a column is NaN where the factor has fewer than 2 test classes.
    """
    n_dims, n_factors = x_tr.shape[1], y_tr.shape[1]
    raw = np.full((n_dims, n_factors), np.nan)
    adj = np.full((n_dims, n_factors), np.nan)
    for k in range(n_factors):
        test_classes, test_inv = np.unique(y_te[:, k], return_inverse=True)
        if cards[k] < 2 or len(test_classes) < 2:
            continue
        classes, inv = np.unique(y_tr[:, k], return_inverse=True)
        means = class_means(x_tr, inv, len(classes))[0]
        test_counts = np.bincount(test_inv)
        for j in range(n_dims):
            pred = classes[np.argmin(np.abs(x_te[:, j, None] - means[None, :, j]), axis=1)]
            recall = np.bincount(test_inv, weights=pred == y_te[:, k], minlength=len(test_classes)) / test_counts
            raw[j, k] = recall.mean()
        chance = 1.0 / len(test_classes)
        adj[:, k] = (raw[:, k] - chance) / (1.0 - chance)
    return adj, raw


def parse_groups(groups, n_dims: int) -> list:
    """Check ``groups``, a list of ``(name, slice or index list)`` pairs or a mapping name -> selection.

    :return: list of ``(name, dims)`` with ``dims`` an int array; groups must be non-empty, named uniquely and disjoint.
    :raises ValueError: on a malformed, empty, out-of-range, repeated or overlapping group.
    """
    items = list(groups.items()) if isinstance(groups, Mapping) else list(groups)
    out, seen, names = [], set(), set()
    for item in items:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"each group must be a (name, slice or index list) pair; got {item!r}")
        name, sel = item
        try:
            if not isinstance(sel, slice):  # integer indices, or a boolean mask over the code dims
                sel = np.asarray(sel)
                if not (sel.dtype == bool or np.issubdtype(sel.dtype, np.integer) or sel.size == 0):
                    raise TypeError(f"dtype {sel.dtype} is neither integer nor boolean")
                sel = sel.astype(sel.dtype if sel.dtype == bool else np.int64)
            dims = np.arange(n_dims)[sel]
        except (IndexError, ValueError, TypeError) as err:
            raise ValueError(f"group {name!r}: indices {sel!r} are not valid for {n_dims} code dims ({err})") from err
        dims = np.atleast_1d(dims)
        if dims.size == 0:
            raise ValueError(f"group {name!r} selects no code dims")
        if name in names:
            raise ValueError(f"group name {name!r} is used twice")
        if len(set(dims.tolist())) != dims.size or seen & set(dims.tolist()):
            raise ValueError(f"group {name!r} repeats code dims or overlaps another group: {dims.tolist()}")
        names.add(name)
        seen |= set(dims.tolist())
        out.append((name, dims))
    if not out:
        raise ValueError("groups is empty; pass None to skip the per-layer evaluation")
    return out
