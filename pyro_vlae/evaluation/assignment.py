"""Per-layer numbers of :func:`.disentangle.evaluate_all`: which code dims are active, each layer's share of each
factor's importance over all codes, and the factor -> layer assignments.

A layer's own DCI disentanglement and completeness are not computed: with one or two dims per layer they are fixed
before any data is seen (scikit-learn's importances sum to 1 for every factor, so a single dim gets all of every
factor's importance: ``D = 0``, ``C = 1``). What varies with the data, and is computed here, is each layer's share of
the importance that the DCI fit on all codes gives each factor, counted only for factors that fit predicts above
chance, and only over active dims.

The assignment has three ``(L, K)`` matrices over active dims: ``best_unit_nmi[l, k] = max_{j in l} I(c_j; v_k) /
H(v_k)``, how well the layer's best single dim captures the factor (the dim MIG credits); ``mi_mass[l, k] = sum_{j in
l} I(c_j; v_k) / sum_j I(c_j; v_k)``, the layer's share of the factor's information summed over dims; and
``importance_share`` (DCI). A factor gets a layer only when that layer clearly leads (:data:`RULE`). The headline,
``assigned_layer``, goes by the best dim: a sum over dims lets copies of one code win (three copies take 3/4 of a
factor from an equally good single dim), a best dim does not. The two information matrices get bootstrap intervals:
the test items are resampled :data:`BOOTSTRAP_RESAMPLES` times (multinomial counts, the bins of all items kept, no
classifier refitted), the MI re-estimated on each, and the central :data:`INTERVAL_LEVEL` percentile interval, shifted
by the bootstrap's bias, kept; a layer is named by them only when its interval lies above every other layer's. A
factor the codes do not predict above chance (:data:`CHANCE_Z`), or that no active dim carries, gets no layer.
"""

from __future__ import annotations

import math

import numpy as np

from .estimators import none_if_nan, normalized_mi
from .predictors import dci_result

#: Burda et al. (2016): a code dim is active when the variance of its posterior mean across items exceeds this
#: (the threshold of the report's "active units").
ACTIVE_VARIANCE = 0.01
#: A code dim is active when x explains more than this share of its variance over the aggregate posterior,
#: ``Var_x(E[z|x]) / Var(z)`` (scale-free; Burda et al.'s 0.01 for a code of unit aggregate variance).
ACTIVE_SHARE = 0.01
#: A factor counts as predicted when its test accuracy exceeds the majority-class rate by this many binomial
#: standard errors, ``sqrt(c (1 - c) / n_test)``.
CHANCE_Z = 3.0
#: A layer is named for a factor only when it clearly leads: its entry is at least ``LEAD_RATIO`` times every other
#: layer's and, for the shares (parts of the factor's whole), at least ``MAJORITY``. On the shapes3d runs of
#: benchmarks/RESULTS.md the factors at chance, whose shares and best dims are estimator noise, lead by 1.3x at most.
LEAD_RATIO = 2.0
MAJORITY = 0.5
#: The information-based rules also need the leader's bootstrap interval (this central level, from this many
#: resamples of the test items, the MI re-estimated on each with the bins kept) to lie above every other layer's.
BOOTSTRAP_RESAMPLES = 200
INTERVAL_LEVEL = 0.95
#: The assignment of a factor predicted above chance that no layer clearly leads (it is spread over layers).
SPREAD = "spread"
#: The rule in words, for tables of assignments.
RULE = (
    f"A factor gets a layer only when that layer's best single dim has {LEAD_RATIO:g}x the information about it of "
    f"every other layer's best dim (copies of one code in more dims count once) and its {INTERVAL_LEVEL:.0%} "
    f"bootstrap interval ({BOOTSTRAP_RESAMPLES} resamples of the test items) lies above theirs; by information or "
    f"DCI importance share, when that layer's share is at least {MAJORITY:g} and {LEAD_RATIO:g}x every other "
    f"layer's (the information shares with the same interval rule); `{SPREAD}` where no layer leads so, `-` where "
    "the codes do not predict the factor above chance."
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


def check_share(share, n_dims: int) -> np.ndarray | None:
    """``share`` (``None``, or each code dim's share of variance that x explains) as a float array ``(n_dims,)``.

    :raises ValueError: on a wrong length or values outside ``[0, 1]``.
    """
    if share is None:
        return None
    share = np.asarray(share.detach().cpu() if hasattr(share, "detach") else share, dtype=np.float64).reshape(-1)
    if share.shape != (n_dims,) or not np.all((share >= 0) & (share <= 1)):
        raise ValueError(
            f"explained_share must hold one share in [0, 1] per code dim ({n_dims}); got shape {share.shape}, values "
            f"{share[:8].tolist()}: pass pyro_vlae.evaluation.likelihood.explained_share of the layers' moments"
        )
    return share


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


def leading_layer(col: np.ndarray, majority: float | None, low=None, high=None) -> int | None:
    """The index of the entry of ``col`` (one factor's column, one entry per layer) that clearly leads: at least
    :data:`LEAD_RATIO` times the runner-up, at least ``majority`` unless that is ``None``, and, with intervals
    ``low`` and ``high`` (one entry per layer), a lower bound above every other entry's upper bound; else ``None``."""
    order = np.argsort(col)[::-1]
    top = float(col[order[0]])
    second = float(col[order[1]]) if len(col) > 1 else 0.0
    if not (top > 0 and top >= LEAD_RATIO * second and (majority is None or top >= majority)):
        return None
    if low is not None and len(col) > 1 and not float(low[order[0]]) > float(np.max(np.asarray(high)[order[1:]])):
        return None
    return int(order[0])


def _by_layer(mi: np.ndarray, h: np.ndarray, layers) -> tuple:
    """``mi_mass`` and ``best_unit_nmi`` ``(..., L, K)`` from MI matrices ``(..., D, K)`` over active dims."""
    total = mi.sum(axis=-2)
    mass = np.stack([mi[..., dims, :].sum(axis=-2) for _, dims in layers], axis=-2)
    nmi = normalized_mi(mi, h)
    best = np.stack([nmi[..., dims, :].max(axis=-2) for _, dims in layers], axis=-2)
    return mass / np.where(total > 0, total, 1.0)[..., None, :], best


def _interval(samples: np.ndarray | None, point: np.ndarray) -> tuple:
    """The central :data:`INTERVAL_LEVEL` percentile interval of bootstrap ``samples`` (first axis), shifted by the
    bootstrap's bias (their mean minus the estimate ``point``) and clipped to ``[0, 1]``; ``(None, None)`` without
    samples. The shift matters: a resample repeats items, which a plug-in MI reads as information, so a dim with none
    has resampled MIs all above its estimate."""
    if samples is None:
        return None, None
    tail = 50.0 * (1.0 - INTERVAL_LEVEL)
    bias = samples.mean(axis=0) - point
    lo, hi = np.percentile(samples, tail, axis=0) - bias, np.percentile(samples, 100.0 - tail, axis=0) - bias
    return np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)


def assignment(layers, names, mi, h, shares, active, predicted, mi_samples=None, seed: int = 0) -> dict:
    """The factor-by-layer matrices and the assignments, over active dims only.

    ``best_unit_nmi[l, k] = max_{j in l} I(c_j; v_k) / H(v_k)``, ``mi_mass[l, k] = sum_{j in l} I(c_j; v_k) /
    sum_j I(c_j; v_k)``, with inactive dims counted as 0, and ``importance_share`` from :func:`importance_shares`.
    With ``mi_samples``, bootstrap draws of the MI matrix, the first two get central :data:`INTERVAL_LEVEL`
    intervals. A factor goes to the layer whose entry clearly leads (:func:`leading_layer`: all rules need a
    :data:`LEAD_RATIO` over every other layer, the shares a :data:`MAJORITY` too, and the information-based rules an
    interval above every other layer's), to :data:`SPREAD` when none does, and to no layer (``None``) when the fit on
    all codes does not predict it above chance or no active dim carries it.

    The headline ``assigned_layer`` goes by the best dim (``assigned_layer_by_top_dim`` is the same): copies of one
    code in several dims of a layer add up in ``mi_mass`` (three copies take 3/4 of the factor from an equally good
    single dim, ``assigned_layer_by_mi_mass``), but not in a layer's best dim.

    :param mi_samples: ``None`` or ``(R, D, K)`` MI matrices of resampled items (:func:`.estimators.bootstrap_mi`).
    :param seed: the bootstrap's seed, for the record.
    :raises ValueError: when a layer is named :data:`SPREAD`.
    """
    layer_names = [name for name, _ in layers]
    if SPREAD in layer_names:
        raise ValueError(f"a layer may not be named {SPREAD!r}: it is the assignment of a spread factor")
    keep = active[:, None]
    mi_mass, best = _by_layer(np.where(keep, mi, 0.0), h, layers)
    samples = None if mi_samples is None else _by_layer(np.where(keep[None], mi_samples, 0.0), h, layers)
    mass_lo, mass_hi = _interval(None if samples is None else samples[0], mi_mass)
    best_lo, best_hi = _interval(None if samples is None else samples[1], best)

    def assign(mass, majority, lo=None, hi=None):
        out = {}
        for k, name in enumerate(names):
            col = mass[:, k]
            if not (bool(predicted[k]) and np.all(np.isfinite(col)) and col.sum() > 0):
                out[name] = None
                continue
            lead = leading_layer(col, majority, *((lo[:, k], hi[:, k]) if lo is not None else ()))
            out[name] = SPREAD if lead is None else layer_names[lead]
        return out

    top_dim = assign(best, None, best_lo, best_hi)
    out = {
        "layers": layer_names,
        "factors": names,
        "active_dims": [dims[active[dims]].tolist() for _, dims in layers],
        "predicted": list(predicted),
        "mi_mass": mi_mass.tolist(),
        "importance_share": [none_if_nan(row) for row in shares],
        "best_unit_nmi": best.tolist(),
        "assigned_layer": top_dim,
        "assigned_layer_by_importance": assign(shares, MAJORITY),
        "assigned_layer_by_top_dim": dict(top_dim),
        "assigned_layer_by_mi_mass": assign(mi_mass, MAJORITY, mass_lo, mass_hi),
        "rule": "top_dim",
        "bootstrap": None,
    }
    if samples is not None:
        out["mi_mass_interval"] = {"low": mass_lo.tolist(), "high": mass_hi.tolist()}
        out["best_unit_nmi_interval"] = {"low": best_lo.tolist(), "high": best_hi.tolist()}
        out["bootstrap"] = {"resamples": len(mi_samples), "level": INTERVAL_LEVEL, "seed": int(seed)}
    return out
