"""Per-layer numbers of :func:`.disentangle.evaluate_all`: which code dims are active, each layer's share of each
factor's importance over all codes, and the factor -> layer assignments.

A layer's own DCI disentanglement and completeness are not computed: with one or two dims per layer they are fixed
before any data is seen (scikit-learn's importances sum to 1 for every factor, so a single dim gets all of every
factor's importance: ``D = 0``, ``C = 1``). What varies with the data, and is computed here, is each layer's share of
the importance that the DCI fit on all codes gives each factor, counted only for factors that fit predicts above
chance, and only over active dims. A factor gets a layer only when that layer clearly leads (:data:`RULE`).
"""

from __future__ import annotations

import math

import numpy as np

from .estimators import none_if_nan, normalized_mi
from .predictors import dci_result

#: Burda et al. (2016): a code dim is active when the variance of its posterior mean across items exceeds this
#: (the threshold of the report's "active units").
ACTIVE_VARIANCE = 0.01
#: A factor counts as predicted when its test accuracy exceeds the majority-class rate by this many binomial
#: standard errors, ``sqrt(c (1 - c) / n_test)``.
CHANCE_Z = 3.0
#: A layer is named for a factor only when it clearly leads: its entry is at least ``LEAD_RATIO`` times every other
#: layer's and, for the shares (parts of the factor's whole), at least ``MAJORITY``. On the shapes3d runs of
#: benchmarks/RESULTS.md the factors at chance, whose shares and best dims are estimator noise, lead by 1.3x at most.
LEAD_RATIO = 2.0
MAJORITY = 0.5
#: The assignment of a factor predicted above chance that no layer clearly leads (it is spread over layers).
SPREAD = "spread"
#: The rule in words, for tables of assignments.
RULE = (
    f"A factor gets a layer only when that layer's share is at least {MAJORITY:g} and {LEAD_RATIO:g}x every other "
    f"layer's (by top dim: when its best dim has {LEAD_RATIO:g}x the information of every other layer's best dim); "
    f"`{SPREAD}` where no layer leads so, `-` where the codes do not predict the factor above chance."
)
#: The keys of a layer's ``dci`` block: what the classifiers fitted on the layer's active dims predict.
LAYER_DCI_KEYS = (
    "informativeness",
    "informativeness_train",
    "informativeness_normalized",
    "informativeness_per_factor",
    "chance_per_factor",
    "estimator",
)


def active_mask(x: np.ndarray, threshold: float = ACTIVE_VARIANCE) -> np.ndarray:
    """Boolean ``(D,)``: the dims of ``x`` ``(N, D)`` whose variance across rows (``ddof=1``) exceeds ``threshold``."""
    return x.var(axis=0, ddof=1) > float(threshold)


def fit_active(x, y, split, active, overall: dict, estimator: str, seed: int) -> dict | None:
    """The DCI fit on the active dims: ``overall`` when every dim is active, ``None`` when none is, else a refit
    whose ``importance`` is padded with zero rows for the inactive dims."""
    if active.all():
        return overall
    if not active.any():
        return None
    fit = dci_result(x[:, active], y, split, estimator, seed, 1e-6)
    importance = np.zeros((x.shape[1], y.shape[1]))
    importance[active] = np.asarray(fit["importance"])
    return {**fit, "importance": importance.tolist()}


def predicted_factors(fit: dict | None, n_test: int, n_factors: int, z: float = CHANCE_Z) -> list:
    """For each factor, whether the DCI ``fit`` predicts it above chance: test accuracy ``a`` and majority-class rate
    ``c`` with ``a > c + z sqrt(c (1 - c) / n_test)``; ``None`` where the factor was not fitted (constant), all
    ``False`` without a fit (no active dim)."""
    if fit is None:
        return [False] * n_factors
    out = []
    for acc, chance in zip(fit["informativeness_per_factor"], fit["chance_per_factor"]):
        if acc is None or chance is None:
            out.append(None)
        else:
            out.append(bool(acc > chance + z * math.sqrt(chance * (1.0 - chance) / n_test)))
    return out


def importance_shares(layers, importance: np.ndarray, active: np.ndarray, predicted) -> np.ndarray:
    """``share[l, k] = sum_{j in l, active} R_jk / sum_{j active} R_jk`` from the importances ``R`` ``(D, K)`` of the
    fit on all codes; NaN for a factor not predicted above chance or with no importance on an active dim."""
    r = np.where(active[:, None], np.asarray(importance, dtype=np.float64), 0.0)
    total = r.sum(axis=0)
    share = np.array([r[dims].sum(axis=0) for _, dims in layers]) / np.where(total > 0, total, 1.0)
    keep = np.array([bool(p) for p in predicted]) & (total > 0)
    return np.where(keep[None, :], share, np.nan)


def layer_dci(full: dict | None, shares: np.ndarray, n_factors: int) -> dict:
    """A layer's ``dci`` block: informativeness of the fit on its active dims (``None`` without active dims) and its
    ``importance_share`` of each factor from the fit on all codes."""
    if full is None:
        block = {k: None for k in LAYER_DCI_KEYS if k != "estimator"}
        block["informativeness_per_factor"] = block["chance_per_factor"] = [None] * n_factors
    else:
        block = {k: full[k] for k in LAYER_DCI_KEYS}
    block["importance_share"] = none_if_nan(shares)
    return block


def leading_layer(col: np.ndarray, majority: float | None) -> int | None:
    """The index of the entry of ``col`` (one factor's column, one entry per layer) that clearly leads: at least
    :data:`LEAD_RATIO` times the runner-up and, unless ``majority`` is ``None``, at least ``majority``; else
    ``None``."""
    order = np.argsort(col)[::-1]
    top = float(col[order[0]])
    second = float(col[order[1]]) if len(col) > 1 else 0.0
    if top > 0 and top >= LEAD_RATIO * second and (majority is None or top >= majority):
        return int(order[0])
    return None


def assignment(layers, names, mi: np.ndarray, h: np.ndarray, shares: np.ndarray, active, predicted) -> dict:
    """The factor-by-layer matrices and the three assignments, over active dims only.

    ``mi_mass[l, k] = sum_{j in l} I(c_j; v_k) / sum_j I(c_j; v_k)`` and ``best_unit_nmi[l, k] = max_{j in l}
    I(c_j; v_k) / H(v_k)`` with inactive dims counted as 0; ``importance_share`` from :func:`importance_shares`. A
    factor goes to the layer whose entry clearly leads (:func:`leading_layer`: the shares need a :data:`MAJORITY`,
    all three a :data:`LEAD_RATIO` over the runner-up), to :data:`SPREAD` when none does, and to no layer (``None``)
    when the fit on all codes does not predict it above chance or no active dim carries it.

    :raises ValueError: when a layer is named :data:`SPREAD`.
    """
    layer_names = [name for name, _ in layers]
    if SPREAD in layer_names:
        raise ValueError(f"a layer may not be named {SPREAD!r}: it is the assignment of a spread factor")
    mi = np.where(active[:, None], mi, 0.0)
    total = mi.sum(axis=0)
    mi_mass = np.array([mi[dims].sum(axis=0) for _, dims in layers]) / np.where(total > 0, total, 1.0)
    nmi = normalized_mi(mi, h)
    best = np.array([nmi[dims].max(axis=0) for _, dims in layers])

    def assign(mass, majority):
        out = {}
        for k, name in enumerate(names):
            col = mass[:, k]
            if not (bool(predicted[k]) and np.all(np.isfinite(col)) and col.sum() > 0):
                out[name] = None
                continue
            lead = leading_layer(col, majority)
            out[name] = SPREAD if lead is None else layer_names[lead]
        return out

    return {
        "layers": layer_names,
        "factors": names,
        "active_dims": [dims[active[dims]].tolist() for _, dims in layers],
        "predicted": list(predicted),
        "mi_mass": mi_mass.tolist(),
        "importance_share": [none_if_nan(row) for row in shares],
        "best_unit_nmi": best.tolist(),
        "assigned_layer": assign(mi_mass, MAJORITY),
        "assigned_layer_by_importance": assign(shares, MAJORITY),
        "assigned_layer_by_top_dim": assign(best, None),
    }
