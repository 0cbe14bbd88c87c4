"""Numerical building blocks of :mod:`.disentangle`: input checks, the train/test split, layer groups, binning,
plug-in entropy and mutual information, and the result dicts of MIG, MIG-sup and SAP built from their matrices (the
classifiers are in :mod:`.predictors`). Everything is numpy and deterministic given the seed.
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


def normalized_entropy(weights: np.ndarray, eps: float = 0.0) -> float:
    """Entropy of ``(weights + eps) / sum(weights + eps)`` in base ``len(weights)`` (0 for a single entry)."""
    weights = np.asarray(weights, dtype=np.float64) + eps
    if weights.size < 2:
        return 0.0
    return entropy(weights / weights.sum()) / np.log(weights.size)


def top2_gap(values: np.ndarray) -> float:
    """Largest minus second largest entry (the second is 0 for a single entry)."""
    v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return float(v[0] - (v[1] if v.size > 1 else 0.0))


def discretize(x: np.ndarray, num_bins: int, binning: str = "equal_width") -> np.ndarray:
    """Bin each column of ``x`` into ``0..num_bins-1``.

    ``equal_width``: the bin of ``numpy.histogram(x, num_bins)`` over ``[min, max]`` (the last bin closed), found with
    ``numpy.digitize`` against the left edges, as disentanglement_lib's ``_histogram_discretize``; a constant column
    falls into one bin.
    ``quantile``: the number of the ``num_bins - 1`` empirical quantiles (``method="inverted_cdf"``, i.e. data
    points) strictly below ``x``; equal values share a bin.

    :raises ValueError: on a bad ``num_bins`` or ``binning``.
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 2:
        raise ValueError(f"num_bins must be an integer >= 2; got {num_bins!r}")
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}; got {binning!r}")
    if binning == "equal_width":  # disentanglement_lib's histogram_discretizer, shifted to start at bin 0
        out = np.empty(x.shape, dtype=np.int64)
        for j in range(x.shape[1]):
            out[:, j] = np.digitize(x[:, j], np.histogram(x[:, j], num_bins)[1][:-1]) - 1
        return out
    qs = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    out = np.empty(x.shape, dtype=np.int64)
    for j in range(x.shape[1]):
        edges = np.quantile(x[:, j], qs, method="inverted_cdf")
        out[:, j] = np.searchsorted(edges, x[:, j], side="left")
    return out


def mutual_info_matrix(x: np.ndarray, y: np.ndarray, cards, num_bins: int, binning: str) -> np.ndarray:
    """Plug-in ``I(c_j; v_k)`` in nats between binned code dims and factors (:func:`discretize`, :func:`binned_mi`).

    :return: float array ``(D, K)``, non-negative.
    """
    return binned_mi(discretize(x, num_bins, binning), y, cards, num_bins)


def _plugin_mi(joint: np.ndarray) -> np.ndarray:
    """Plug-in MI in nats of joint distributions ``(..., B, C)`` (each summing to 1), clipped at 0 against rounding."""
    pb, pv = joint.sum(axis=-1, keepdims=True), joint.sum(axis=-2, keepdims=True)
    ratio = np.divide(joint, pb * pv, out=np.ones_like(joint), where=joint > 0)
    return np.maximum(0.0, np.sum(joint * np.log(ratio), axis=(-2, -1)))


def binned_mi(bins: np.ndarray, y: np.ndarray, cards, num_bins: int) -> np.ndarray:
    """Plug-in ``I(c_j; v_k)`` in nats between already binned code dims ``bins`` ``(N, D)`` (``0..num_bins-1``) and
    factor codes ``y`` ``(N, K)``: float array ``(D, K)``."""
    return _weighted_mi(bins, y, cards, num_bins, np.ones((1, len(bins))))[0]


def bootstrap_mi(bins: np.ndarray, y: np.ndarray, cards, num_bins: int, resamples: int, seed) -> np.ndarray:
    """:func:`binned_mi` of ``resamples`` bootstrap resamples of the items (rows drawn with replacement, as
    multinomial counts from ``default_rng([seed, 2])``), with each item's bins kept from all items (no refit).

    :return: float array ``(resamples, D, K)``.
    """
    n = len(bins)
    counts = np.random.default_rng([check_seed(seed), 2]).multinomial(n, np.full(n, 1.0 / n), size=int(resamples))
    return _weighted_mi(bins, y, cards, num_bins, counts)


def _weighted_mi(bins: np.ndarray, y: np.ndarray, cards, num_bins: int, counts: np.ndarray) -> np.ndarray:
    """Plug-in MI ``(R, D, K)`` of the items weighted by each row of ``counts`` ``(R, N)`` (how often each item is
    drawn; every row sums to ``N``), one joint histogram per row, code dim and factor."""
    n, d = bins.shape
    r = len(counts)
    offsets = np.arange(r)[:, None]
    out = np.zeros((r, d, y.shape[1]))
    for k, card in enumerate(cards):
        cells = num_bins * card
        for j in range(d):
            flat = (offsets * cells + (bins[:, j] * card + y[:, k])[None, :]).ravel()
            joint = np.bincount(flat, weights=counts.ravel(), minlength=r * cells) / n
            out[:, j, k] = _plugin_mi(joint.reshape(-1, num_bins, card))
    return out


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


def none_if_nan(values) -> list:
    """Floats, with ``None`` for NaN or missing entries (JSON has no NaN)."""
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def nanmean(values) -> float:
    """Mean of the finite entries; 0 when there are none."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


def mig_result(mi: np.ndarray, h: np.ndarray) -> dict:
    """MIG from an MI matrix ``(D, K)`` and factor entropies ``(K,)`` (0 for constant factors)."""
    per_factor = [top2_gap(mi[:, k]) / h[k] if h[k] > 0 else np.nan for k in range(mi.shape[1])]
    return {"mig": nanmean(per_factor), "per_factor": none_if_nan(per_factor), "mi_matrix": mi.tolist()}


def normalized_mi(mi: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``I(c_j; v_k) / H(v_k)`` clipped to ``[0, 1]`` against rounding; 0 for constant factors."""
    return np.clip(np.where(h > 0, mi / np.where(h > 0, h, 1.0), 0.0), 0.0, 1.0)


def mig_sup_result(mi: np.ndarray, h: np.ndarray, active_threshold: float) -> dict:
    """MIG-sup from an MI matrix ``(D, K)`` and factor entropies ``(K,)``."""
    nmi = normalized_mi(mi, h)
    per_dim = np.array([top2_gap(row) for row in nmi[:, h > 0]])
    active = nmi.max(axis=1) > active_threshold
    return {
        "mig_sup": float(per_dim.mean()),
        "mig_sup_active": float(per_dim[active].mean()) if active.any() else None,
        "per_dim": per_dim.tolist(),
        "active_dims": np.flatnonzero(active).tolist(),
        "normalized_mi_matrix": nmi.tolist(),
    }


def factor_entropies(y: np.ndarray) -> np.ndarray:
    """Plug-in entropy in nats of each factor column of ``y`` (0 for a constant factor)."""
    return np.array([entropy(np.bincount(y[:, k]) / len(y)) for k in range(y.shape[1])])


def sap_result(scores: np.ndarray) -> dict:
    """SAP from a score matrix ``(D, K)``: the mean over factors of the gap between the two best dims."""
    per_factor = [top2_gap(col) if np.all(np.isfinite(col)) else np.nan for col in scores.T]
    return {
        "sap": nanmean(per_factor),
        "per_factor": none_if_nan(per_factor),
        "score_matrix": [none_if_nan(row) for row in scores],
    }


def score_bundle(mi, h, scores, dci_result, active_threshold) -> dict:
    """Every score of one set of code dims from its MI and SAP score matrices and its DCI result (a layer's,
    :func:`.assignment.layer_dci`, has no D or C), with a ``summary`` of the headline numbers."""
    res = {
        "mig": mig_result(mi, h),
        "mig_sup": mig_sup_result(mi, h, active_threshold),
        "dci": dci_result,
        "sap": sap_result(scores),
    }
    res["summary"] = {"mig": res["mig"]["mig"], "mig_sup": res["mig_sup"]["mig_sup"]}
    if "disentanglement" in dci_result:
        res["summary"]["dci_disentanglement"] = dci_result["disentanglement"]
        res["summary"]["dci_completeness"] = dci_result["completeness"]
    res["summary"]["dci_informativeness"] = dci_result["informativeness"]
    res["summary"]["sap"] = res["sap"]["sap"]
    return res
