"""Disentanglement metrics for codes of models trained on factor-labelled data (dSprites-style sprites).

All metrics take ``codes``, a float array ``(N, D)`` of latent posterior means, and ``factors``, an integer array
``(N, K)`` of ground-truth factor indices (for the sprites data ``K = 5``: shape 3, scale 6, orientation 40, pos_x 32,
pos_y 32 values, see ``pyro_vlae.data.SPRITES_FACTORS``). Every result is a dict of plain floats, lists and ``None``
(for quantities that are undefined, e.g. for a constant factor), ready for :func:`json.dumps`.

* :func:`mig` -- Mutual Information Gap (Chen et al. 2018).
* :func:`mig_sup` -- MIG-sup (Li et al. 2020).
* :func:`dci` -- disentanglement, completeness, informativeness (Eastwood & Williams 2018).
* :func:`sap` -- Separated Attribute Predictability (Kumar et al. 2018).
* :func:`evaluate_all` -- all four over all latents, per layer (group of code dims), and the factor-by-layer
  assignment matrix.

The estimator choices are listed in :data:`ESTIMATOR_NOTES`, which is appended to this docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .estimators import (
    entropy,
    lda_fit_predict,
    mutual_info_matrix,
    normalized_entropy,
    parse_groups,
    prepare,
    sap_score_matrices,
    split_indices,
    top2_gap,
)

__all__ = ["DEFAULT_MAX_SAMPLES", "ESTIMATOR_NOTES", "MIN_SAMPLES", "dci", "evaluate_all", "mig", "mig_sup", "sap"]

DEFAULT_MAX_SAMPLES = 10_000
MIN_SAMPLES = 20

ESTIMATOR_NOTES = """
Estimator notes
---------------
Factors. All factors are discrete indices; each column is re-encoded to ``0..C_k-1`` (any integer labels work, and
integral floats are accepted). There is no special handling of continuous factors: discretise them first. A constant
factor (one value) carries no information; it gets ``None`` in every per-factor list and is left out of all averages.
Orientation in dSprites is circular and partly symmetric per shape, so no code can reach a perfect score on it.

Samples. Every function first draws at most ``max_samples`` (default 10,000) rows without replacement with
``numpy.random.default_rng([seed, 0])``; ``max_samples=None`` uses all rows. At least 20 rows are required.
:func:`dci` and :func:`sap` then split the rows at random (``default_rng([seed, 1])``) into ``round(train_frac * N)``
training and the rest test rows (default ``train_frac=0.8``). The separate seed streams make ``evaluate_all`` give
exactly the numbers of the individual functions called with the same arguments.

Mutual information (MIG, MIG-sup, assignment matrix). Each code dim is discretised into ``num_bins`` (default 20)
bins; ``binning="equal_width"`` (default, as in Chen et al. and disentanglement_lib) splits ``[min, max]`` of the dim
into equal-width bins, ``binning="quantile"`` uses the empirical quantiles (edges at data points, ties kept in one
bin). Then ``I(c_j; v_k)`` is the plug-in estimate from the joint histogram and ``H(v_k)`` the plug-in factor entropy,
both in nats. Equal-width bins make the MI invariant to per-dim affine maps (including sign flips), quantile bins to
any strictly increasing map; one outlier squeezes the other values of a dim into few equal-width bins, which quantile
bins avoid. With ``B`` bins a factor with ``C > B`` values can reach at most about
``log B / log C`` normalised MI (0.81 for 40 values and 20 bins), so a perfect code scores MIG below 1 with the
default bins; use ``num_bins >= max C`` to remove that cap, at the price of a larger plug-in bias
(about ``(B-1)(C-1) / (2 N)`` nats for an independent dim). A constant code dim falls into one bin and has zero MI.

MIG. ``MIG = mean_k (I_(1)k - I_(2)k) / H(v_k)`` with ``I_(1)k >= I_(2)k`` the two largest ``I(c_j; v_k)`` over code
dims (``I_(2)k = 0`` when ``D = 1``).

MIG-sup. With ``n_jk = I(c_j; v_k) / H(v_k)``, each code dim scores ``n_j(1) - n_j(2)``, the gap between its two
largest normalised MIs over factors (the second is 0 when ``K = 1``), and ``MIG-sup`` is the mean over all ``D`` code
dims, as in Li et al. (2020). Dims with no information score about 0 (plug-in bias only) and pull the mean down, so
``mig_sup_active`` also averages over the active dims only, those with ``max_k n_jk > active_threshold``
(default 0.1); it is ``None`` when no dim is active.

DCI. The classifier per factor is linear discriminant analysis (LDA, Gaussian classes with a shared covariance) fitted
in closed form with numpy on the training rows, after standardising each code dim with the training mean and standard
deviation (constant dims become 0): ``w_c = (S + ridge I)^-1 mu_c``, ``b_c = -w_c . mu_c / 2 + log pi_c`` with ``S`` the
pooled within-class covariance, ``mu_c`` the class means, ``pi_c`` the class frequencies and ``ridge`` (default
``1e-6``). It is deterministic (no optimiser, no tuning) and the decision rule of a linear classifier, like the
multinomial logistic regression it stands in for; logistic regression was tried and its accuracy on ordinal factors with
many values (40 orientations along one dim) depended strongly on the L2 strength and iteration budget. The importance of
dim ``j`` for factor ``k`` is ``R_jk = mean_c |w_cj - mean_c' w_c'j|`` (the class-centred weights; logits are defined up
to a shift shared by all classes), and each column of ``R`` is normalised to sum to 1, as the importances of one
gradient-boosted-tree model are in disentanglement_lib. Then ``D_j = 1 - H_K(P_j.)`` with ``P_jk = R_jk / sum_k R_jk``
and ``H_K`` the entropy in base ``K``; ``disentanglement = sum_j rho_j D_j`` with ``rho_j = sum_k R_jk / sum_jk R_jk``;
``C_k = 1 - H_D(R_.k)``, ``completeness = mean_k C_k`` (with one factor, or one code dim, the entropy term is taken as
0). A dim or factor with zero importance mass scores 0 and weighs nothing. Informativeness is the mean test accuracy of
the per-factor classifiers; ``chance`` is the accuracy of the best constant prediction on the test rows (the frequency
of the most frequent test class), and ``informativeness_normalized = mean_k (acc_k - chance_k) / (1 - chance_k)`` (0 at
chance, 1 perfect).

SAP. For each code dim ``j`` and factor ``k`` a 1-D nearest-class-mean classifier (class means of ``c_j`` on the
training rows, ties to the lowest class index) is scored by its balanced accuracy on the test rows (mean recall over
the classes present there). Raw balanced accuracy has chance level ``1 / C``, which would cap the gap of a perfect
code at ``1 - 1/C`` and make SAP depend on factor cardinality, so the scores are adjusted for chance,
``s = (bacc - 1/C) / (1 - 1/C)`` with ``C`` the number of classes present in the test rows (1 perfect, 0 chance,
negative below chance; a factor with fewer than 2 test classes gets ``None``). ``SAP = mean_k (s_(1)k - s_(2)k)``
over code dims (``s_(2)k = 0`` when ``D = 1``); ``sap_raw`` is the same with unadjusted balanced accuracies.

Layers. ``evaluate_all`` runs the four metrics on each group of code dims separately (the per-dim MI and SAP scores are
shared, DCI is refitted on the group) and builds two ``(L, K)`` assignment matrices: ``mi_mass[l, k] = sum_{j in l}
I(c_j; v_k) / sum_j I(c_j; v_k)`` (the main one; each column sums to 1 over layers when the groups cover all dims) and
``importance_mass[l, k] = sum_{j in l} R_jk`` from the DCI fit on all dims; each factor is assigned to the layer with
the largest ``mi_mass``. ``best_unit_nmi[l, k] = max_{j in l} n_jk`` says how well the best single dim of the layer
captures the factor.
"""

__doc__ = (__doc__ or "") + ESTIMATOR_NOTES


def _none_if_nan(values) -> list:
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def _nanmean(values) -> float:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


def _mig_from_mi(mi: np.ndarray, h: np.ndarray) -> dict:
    """MIG from an MI matrix ``(D, K)`` and factor entropies ``(K,)`` (0 for constant factors)."""
    per_factor = [top2_gap(mi[:, k]) / h[k] if h[k] > 0 else np.nan for k in range(mi.shape[1])]
    return {"mig": _nanmean(per_factor), "per_factor": _none_if_nan(per_factor), "mi_matrix": mi.tolist()}


def _normalized_mi(mi: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``I(c_j; v_k) / H(v_k)`` clipped to ``[0, 1]`` against rounding; 0 for constant factors."""
    return np.clip(np.where(h > 0, mi / np.where(h > 0, h, 1.0), 0.0), 0.0, 1.0)


def _mig_sup_from_mi(mi: np.ndarray, h: np.ndarray, active_threshold: float) -> dict:
    nmi = _normalized_mi(mi, h)
    per_dim = np.array([top2_gap(row) for row in nmi[:, h > 0]])
    active = nmi.max(axis=1) > active_threshold
    return {
        "mig_sup": float(per_dim.mean()),
        "mig_sup_active": float(per_dim[active].mean()) if active.any() else None,
        "per_dim": per_dim.tolist(),
        "active_dims": np.flatnonzero(active).tolist(),
        "normalized_mi_matrix": nmi.tolist(),
    }


def _mi_inputs(codes, factors, num_bins, binning, max_samples, seed):
    x, y, cards, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    mi = mutual_info_matrix(x, y, cards, num_bins, binning)
    return mi, np.array([entropy(np.bincount(y[:, k]) / len(y)) for k in range(y.shape[1])])


def mig(codes, factors, *, num_bins: int = 20, binning: str = "equal_width", max_samples=DEFAULT_MAX_SAMPLES, seed=0):
    r"""Mutual Information Gap (Chen et al. 2018).

    .. math:: \mathrm{MIG} = \frac{1}{K} \sum_k \frac{I(c_{j^{(1)}_k}; v_k) - I(c_{j^{(2)}_k}; v_k)}{H(v_k)}

    with :math:`j^{(1)}_k, j^{(2)}_k` the code dims of largest and second largest MI with factor :math:`k`.

    :param codes: float array ``(N, D)`` of latent means.
    :param factors: integer array ``(N, K)`` of factor indices.
    :param num_bins: number of bins per code dim (see :data:`ESTIMATOR_NOTES`).
    :param binning: ``"equal_width"`` or ``"quantile"``.
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :param seed: seed of the subsample.
    :return: ``{"mig": float, "per_factor": [K], "mi_matrix": [D][K]}`` (MI in nats).
    :raises ValueError: on malformed input.
    """
    mi, h = _mi_inputs(codes, factors, num_bins, binning, max_samples, seed)
    return _mig_from_mi(mi, h)


def mig_sup(
    codes,
    factors,
    *,
    num_bins: int = 20,
    binning: str = "equal_width",
    active_threshold: float = 0.1,
    max_samples=DEFAULT_MAX_SAMPLES,
    seed=0,
):
    r"""MIG-sup (Li et al. 2020): for each code dim, the gap between its two largest normalised MIs over factors.

    .. math:: \mathrm{MIG\text{-}sup} = \frac{1}{D} \sum_j \left(n_{j k^{(1)}_j} - n_{j k^{(2)}_j}\right),
        \qquad n_{jk} = I(c_j; v_k) / H(v_k)

    :param codes: float array ``(N, D)`` of latent means.
    :param factors: integer array ``(N, K)`` of factor indices.
    :param num_bins: number of bins per code dim.
    :param binning: ``"equal_width"`` or ``"quantile"``.
    :param active_threshold: a dim is active when its largest normalised MI exceeds this.
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :param seed: seed of the subsample.
    :return: ``{"mig_sup", "mig_sup_active", "per_dim": [D], "active_dims", "normalized_mi_matrix": [D][K]}``.
    :raises ValueError: on malformed input.
    """
    mi, h = _mi_inputs(codes, factors, num_bins, binning, max_samples, seed)
    return _mig_sup_from_mi(mi, h, active_threshold)


def _dci_core(x: np.ndarray, y: np.ndarray, cards: list, train_frac: float, seed, ridge: float) -> dict:
    tr, te = split_indices(len(x), train_frac, seed)
    mu, sd = x[tr].mean(axis=0), x[tr].std(axis=0)
    z = (x - mu) / np.where(sd > 0, sd, 1.0)
    n_dims, n_factors = x.shape[1], y.shape[1]
    importance = np.zeros((n_dims, n_factors))
    acc, chance = [np.nan] * n_factors, [np.nan] * n_factors
    for k in range(n_factors):
        if cards[k] < 2:
            continue
        pred, weights = lda_fit_predict(z[tr], y[tr, k], z[te], ridge)
        acc[k] = float(np.mean(pred == y[te, k]))
        chance[k] = float(np.bincount(y[te, k]).max() / len(te))
        imp = np.abs(weights - weights.mean(axis=0)).mean(axis=0)
        importance[:, k] = imp / imp.sum() if imp.sum() > 0 else 0.0
    live = np.array([c >= 2 for c in cards])
    r = importance[:, live]
    row = r.sum(axis=1)
    d_j = np.array([1.0 - normalized_entropy(r[j]) if row[j] > 0 else 0.0 for j in range(n_dims)])
    rho = row / row.sum() if row.sum() > 0 else row
    c_k = [1.0 - normalized_entropy(importance[:, k]) if importance[:, k].sum() > 0 else 0.0 for k in range(n_factors)]
    c_k = [c if live[k] else np.nan for k, c in enumerate(c_k)]
    norm = [(a - c) / (1.0 - c) if c < 1 else np.nan for a, c in zip(acc, chance)]
    return {
        "disentanglement": float(np.sum(rho * d_j)),
        "completeness": _nanmean(c_k),
        "informativeness": _nanmean(acc),
        "informativeness_normalized": _nanmean(norm),
        "importance": importance.tolist(),
        "disentanglement_per_dim": d_j.tolist(),
        "completeness_per_factor": _none_if_nan(c_k),
        "informativeness_per_factor": _none_if_nan(acc),
        "chance_per_factor": _none_if_nan(chance),
    }


def dci(
    codes, factors, *, train_frac: float = 0.8, seed=0, ridge: float = 1e-6, max_samples=DEFAULT_MAX_SAMPLES
) -> dict:
    r"""DCI disentanglement, completeness and informativeness (Eastwood & Williams 2018), LDA per factor.

    .. math:: D = \sum_j \rho_j \left(1 - H_K(P_{j\cdot})\right), \qquad
        C = \frac{1}{K} \sum_k \left(1 - H_D(R_{\cdot k})\right)

    :param codes: float array ``(N, D)`` of latent means.
    :param factors: integer array ``(N, K)`` of factor indices.
    :param train_frac: fraction of rows used to fit the classifiers, the rest are test rows.
    :param seed: seed of the subsample and of the train/test split.
    :param ridge: added to the diagonal of the pooled within-class covariance of the standardised codes.
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :return: ``{"disentanglement", "completeness", "informativeness", "informativeness_normalized",
        "importance": [D][K], "disentanglement_per_dim", "completeness_per_factor", "informativeness_per_factor",
        "chance_per_factor"}``.
    :raises ValueError: on malformed input.
    """
    x, y, cards, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    return _dci_core(x, y, cards, train_frac, seed, ridge)


def _sap_from_scores(adj: np.ndarray, raw: np.ndarray) -> dict:
    per_factor = [top2_gap(adj[:, k]) if np.all(np.isfinite(adj[:, k])) else np.nan for k in range(adj.shape[1])]
    per_raw = [top2_gap(raw[:, k]) if np.all(np.isfinite(raw[:, k])) else np.nan for k in range(raw.shape[1])]
    return {
        "sap": _nanmean(per_factor),
        "sap_raw": _nanmean(per_raw),
        "per_factor": _none_if_nan(per_factor),
        "score_matrix": [_none_if_nan(row) for row in adj],
    }


def sap(codes, factors, *, train_frac: float = 0.8, seed=0, max_samples=DEFAULT_MAX_SAMPLES) -> dict:
    r"""SAP score (Kumar et al. 2018) for discrete factors, from chance-adjusted balanced accuracies.

    .. math:: \mathrm{SAP} = \frac{1}{K} \sum_k \left(s_{j^{(1)}_k k} - s_{j^{(2)}_k k}\right), \qquad
        s_{jk} = \frac{\mathrm{bacc}_{jk} - 1/C_k}{1 - 1/C_k}

    with :math:`\mathrm{bacc}_{jk}` the test balanced accuracy of a nearest-class-mean classifier on code dim ``j``.

    :param codes: float array ``(N, D)`` of latent means.
    :param factors: integer array ``(N, K)`` of factor indices.
    :param train_frac: fraction of rows used for the class means, the rest are test rows.
    :param seed: seed of the subsample and of the train/test split.
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :return: ``{"sap", "sap_raw", "per_factor": [K], "score_matrix": [D][K]}`` (adjusted scores in the matrix).
    :raises ValueError: on malformed input.
    """
    x, y, cards, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    tr, te = split_indices(len(x), train_frac, seed)
    return _sap_from_scores(*sap_score_matrices(x[tr], y[tr], x[te], y[te], cards))


def _bundle(mi, h, adj, raw, dci_result, active_threshold) -> dict:
    res = {
        "mig": _mig_from_mi(mi, h),
        "mig_sup": _mig_sup_from_mi(mi, h, active_threshold),
        "dci": dci_result,
        "sap": _sap_from_scores(adj, raw),
    }
    res["summary"] = {
        "mig": res["mig"]["mig"],
        "mig_sup": res["mig_sup"]["mig_sup"],
        "dci_disentanglement": dci_result["disentanglement"],
        "dci_completeness": dci_result["completeness"],
        "dci_informativeness": dci_result["informativeness"],
        "sap": res["sap"]["sap"],
    }
    return res


def evaluate_all(
    codes,
    factors,
    *,
    groups=None,
    factor_names: Sequence[str] | None = None,
    num_bins: int = 20,
    binning: str = "equal_width",
    active_threshold: float = 0.1,
    train_frac: float = 0.8,
    ridge: float = 1e-6,
    seed=0,
    max_samples=DEFAULT_MAX_SAMPLES,
) -> dict:
    """MIG, MIG-sup, DCI and SAP over all code dims and per layer, plus the factor-by-layer assignment.

    :param codes: float array ``(N, D)`` of latent means (e.g. the layers ``z1..zL`` concatenated).
    :param factors: integer array ``(N, K)`` of factor indices.
    :param groups: ``None``, or a list of ``(name, slice or index list)`` pairs (or a mapping name -> selection)
        giving the code dims of each layer; groups must not overlap.
    :param factor_names: ``K`` names (default ``factor_0``...); e.g. ``pyro_vlae.data.SPRITES_FACTORS``.
    :param num_bins: bins per code dim for the MI estimates.
    :param binning: ``"equal_width"`` or ``"quantile"``.
    :param active_threshold: MIG-sup activity threshold on normalised MI.
    :param train_frac: train fraction for DCI and SAP.
    :param ridge: LDA covariance ridge for DCI.
    :param seed: seed of the subsample and split.
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :return: JSON-serialisable dict with keys ``n_samples``, ``n_samples_total``, ``n_codes``, ``n_factors``,
        ``factor_names``, ``settings``, ``overall`` (``{"summary", "mig", "mig_sup", "dci", "sap"}``), ``layers``
        (name -> the same plus ``dims``; empty without groups) and ``assignment`` (``None`` without groups, else
        ``{"layers", "factors", "mi_mass": [L][K], "importance_mass": [L][K], "best_unit_nmi": [L][K],
        "assigned_layer": {factor: layer}, "assigned_layer_by_importance": {factor: layer}}``).
    :raises ValueError: on malformed input, groups or factor names.
    """
    x, y, cards, n_total = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    n_dims, n_factors = x.shape[1], y.shape[1]
    names = [f"factor_{k}" for k in range(n_factors)] if factor_names is None else [str(n) for n in factor_names]
    if len(names) != n_factors or len(set(names)) != n_factors:
        raise ValueError(f"factor_names must be {n_factors} distinct names; got {list(names)}")
    layers = parse_groups(groups, n_dims) if groups is not None else []
    mi = mutual_info_matrix(x, y, cards, num_bins, binning)
    h = np.array([entropy(np.bincount(y[:, k]) / len(y)) for k in range(n_factors)])
    tr, te = split_indices(len(x), train_frac, seed)
    adj, raw = sap_score_matrices(x[tr], y[tr], x[te], y[te], cards)
    overall_dci = _dci_core(x, y, cards, train_frac, seed, ridge)
    result = {
        "n_samples": len(x),
        "n_samples_total": n_total,
        "n_codes": n_dims,
        "n_factors": n_factors,
        "factor_names": names,
        "settings": {
            "num_bins": int(num_bins),
            "binning": binning,
            "active_threshold": float(active_threshold),
            "train_frac": float(train_frac),
            "ridge": float(ridge),
            "seed": int(seed),
            "max_samples": None if max_samples is None else int(max_samples),
            "classifier": "lda",
        },
        "overall": _bundle(mi, h, adj, raw, overall_dci, active_threshold),
        "layers": {},
        "assignment": None,
    }
    if not layers:
        return result
    for name, dims in layers:
        layer_dci = _dci_core(x[:, dims], y, cards, train_frac, seed, ridge)
        result["layers"][name] = {
            "dims": dims.tolist(),
            **_bundle(mi[dims], h, adj[dims], raw[dims], layer_dci, active_threshold),
        }
    total = mi.sum(axis=0)
    imp = np.asarray(overall_dci["importance"])
    nmi = _normalized_mi(mi, h)
    mi_mass = np.array([mi[dims].sum(axis=0) for _, dims in layers]) / np.where(total > 0, total, 1.0)
    imp_mass = np.array([imp[dims].sum(axis=0) for _, dims in layers])
    best = np.array([nmi[dims].max(axis=0) for _, dims in layers])
    layer_names = [name for name, _ in layers]

    def assign(mass):
        return {
            names[k]: (layer_names[int(mass[:, k].argmax())] if mass[:, k].sum() > 0 else None)
            for k in range(n_factors)
        }

    result["assignment"] = {
        "layers": layer_names,
        "factors": names,
        "mi_mass": mi_mass.tolist(),
        "importance_mass": imp_mass.tolist(),
        "best_unit_nmi": best.tolist(),
        "assigned_layer": assign(mi_mass),
        "assigned_layer_by_importance": assign(imp_mass),
    }
    return result
