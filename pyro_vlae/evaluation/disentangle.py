"""Disentanglement metrics for codes of models trained on factor-labelled data (dSprites-style sprites).

All metrics take ``codes``, a float array ``(N, D)`` of latent posterior means, and ``factors``, an integer array
``(N, K)`` of ground-truth factor indices (for the sprites data ``K = 5``: shape 3, scale 6, orientation 40, pos_x 32,
pos_y 32 values, see ``pyro_vlae.data.SPRITES_FACTORS``). Every result is a dict of plain floats, lists and ``None``
(for quantities that are undefined, e.g. for a constant factor), ready for :func:`json.dumps`.

MIG, SAP and DCI follow the definitions of disentanglement_lib (Locatello et al. 2019), with the scikit-learn
estimators it uses, so their numbers can be compared with published ones:

* :func:`mig` -- Mutual Information Gap (Chen et al. 2018), 20 equal-width bins.
* :func:`sap` -- Separated Attribute Predictability (Kumar et al. 2018), ``LinearSVC`` on one code dim.
* :func:`dci` -- disentanglement, completeness, informativeness (Eastwood & Williams 2018), gradient-boosted trees.
* :func:`mig_sup` -- MIG-sup (Li et al. 2020), from the same mutual information as MIG.
* :func:`dci_lda` -- a variant of DCI with closed-form linear discriminant analysis in place of the trees.
* :func:`evaluate_all` -- MIG, MIG-sup, DCI and SAP over all latents; per layer (group of code dims) the scores
  that can vary with a layer's data, over its active dims, and the factor-by-layer assignment.

The estimator choices are listed in :data:`ESTIMATOR_NOTES` (:mod:`~pyro_vlae.evaluation.estimator_notes`), which is
appended to this docstring.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from . import assignment as A
from .estimator_notes import ESTIMATOR_NOTES
from .estimators import (
    binned_mi,
    bootstrap_mi,
    discretize,
    factor_entropies,
    mig_result,
    mig_sup_result,
    mutual_info_matrix,
    parse_groups,
    prepare,
    sap_result,
    score_bundle,
    split_indices,
)
from .predictors import dci_result, sap_score_matrix

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "ESTIMATOR_NOTES",
    "MIN_SAMPLES",
    "dci",
    "dci_lda",
    "evaluate_all",
    "mig",
    "mig_sup",
    "sap",
]

DEFAULT_MAX_SAMPLES = 10_000
MIN_SAMPLES = 20
DCI_ESTIMATORS = ("gbt", "lda")

__doc__ = (__doc__ or "") + ESTIMATOR_NOTES


def mig(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    num_bins: int = 20,
    binning: str = "equal_width",
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> dict:
    r"""Mutual Information Gap (Chen et al. 2018), as disentanglement_lib's ``compute_mig``.

    .. math:: \mathrm{MIG} = \frac{1}{K} \sum_k \frac{I(c_{j^{(1)}_k}; v_k) - I(c_{j^{(2)}_k}; v_k)}{H(v_k)}

    with :math:`j^{(1)}_k, j^{(2)}_k` the code dims of largest and second largest MI with factor :math:`k`.

    :param codes: float array ``(N, D)`` of latent means.
    :param factors: integer array ``(N, K)`` of factor indices.
    :param num_bins: number of bins per code dim (20 in disentanglement_lib; see :data:`ESTIMATOR_NOTES`).
    :param binning: ``"equal_width"`` (disentanglement_lib's) or ``"quantile"`` (a variant).
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :param seed: seed of the subsample.
    :return: ``{"mig": float, "per_factor": [K], "mi_matrix": [D][K]}`` (MI in nats).
    :raises ValueError: on malformed input.

    >>> import numpy as np
    >>> import pyro_vlae as pv
    >>> factors = np.random.default_rng(0).integers(0, 5, (2000, 2))  # two factors of 5 values each
    >>> round(pv.mig(1.0 * factors, factors)["mig"], 2)  # one code dim per factor
    1.0
    """
    x, y, cards, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    return mig_result(mutual_info_matrix(x, y, cards, num_bins, binning), factor_entropies(y))


def mig_sup(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    num_bins: int = 20,
    binning: str = "equal_width",
    active_threshold: float = 0.1,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
) -> dict:
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
    x, y, cards, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    return mig_sup_result(mutual_info_matrix(x, y, cards, num_bins, binning), factor_entropies(y), active_threshold)


def dci(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    train_frac: float = 0.8,
    seed: int = 0,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> dict:
    r"""DCI (Eastwood & Williams 2018) as disentanglement_lib's ``compute_dci``: gradient-boosted trees per factor.

    .. math:: D = \sum_j \rho_j \left(1 - H_K(R_{j\cdot})\right), \qquad
        C = \sum_k w_k \left(1 - H_D(R_{\cdot k})\right)

    with :math:`R_{jk}` the trees' feature importance of code dim ``j`` for factor ``k``. Slow on factors with many
    values (see :data:`ESTIMATOR_NOTES`); :func:`dci_lda` is a fast variant.

    :param codes: float array ``(N, D)`` of latent means.
    :param factors: integer array ``(N, K)`` of factor indices.
    :param train_frac: fraction of rows used to fit the classifiers, the rest are test rows.
    :param seed: seed of the subsample, the train/test split and the trees.
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :return: ``{"disentanglement", "completeness", "informativeness", "informativeness_train",
        "informativeness_normalized", "importance": [D][K], "disentanglement_per_dim", "completeness_per_factor",
        "informativeness_per_factor", "chance_per_factor", "estimator": "gbt"}``.
    :raises ValueError: on malformed input.

    >>> import numpy as np
    >>> import pyro_vlae as pv
    >>> factors = np.random.default_rng(0).integers(0, 2, (1000, 2))  # two binary factors: 2 x 100 trees
    >>> scores = pv.dci(1.0 * factors, factors)  # one code dim per factor
    >>> round(scores["disentanglement"], 2), round(scores["completeness"], 2), scores["informativeness"]
    (1.0, 1.0, 1.0)
    """
    x, y, _, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    return dci_result(x, y, split_indices(len(x), train_frac, seed), "gbt", seed, 1e-6)


def dci_lda(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    train_frac: float = 0.8,
    seed: int = 0,
    ridge: float = 1e-6,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> dict:
    """DCI with closed-form linear discriminant analysis in place of gradient-boosted trees (a fast variant).

    The formulas and the result keys are those of :func:`dci` (``"estimator": "lda"``); only the importances and
    accuracies come from LDA, so the numbers are not disentanglement_lib's.

    :param ridge: added to the diagonal of the pooled within-class covariance of the standardised codes.
    :raises ValueError: on malformed input.
    """
    x, y, _, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    return dci_result(x, y, split_indices(len(x), train_frac, seed), "lda", seed, ridge)


def sap(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    train_frac: float = 0.8,
    seed: int = 0,
    standardize: bool = False,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
) -> dict:
    r"""SAP score (Kumar et al. 2018) as disentanglement_lib's ``compute_sap`` for discrete factors.

    .. math:: \mathrm{SAP} = \frac{1}{K} \sum_k \left(S_{j^{(1)}_k k} - S_{j^{(2)}_k k}\right)

    with :math:`S_{jk}` the test accuracy of ``LinearSVC(C=0.01, class_weight="balanced")`` fitted on code dim ``j``
    alone, and :math:`j^{(1)}_k, j^{(2)}_k` the two best dims for factor ``k``.

    :param codes: float array ``(N, D)`` of latent means.
    :param factors: integer array ``(N, K)`` of factor indices.
    :param train_frac: fraction of rows used to fit the classifiers, the rest are test rows.
    :param seed: seed of the subsample, the train/test split and the classifiers.
    :param standardize: z-score each code dim with its training mean and standard deviation first, which makes the
        score invariant to per-dim affine maps (a variant; disentanglement_lib fits on the raw codes).
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :return: ``{"sap", "per_factor": [K], "score_matrix": [D][K]}`` (test accuracies in the matrix).
    :raises ValueError: on malformed input.

    >>> import numpy as np
    >>> import pyro_vlae as pv
    >>> factors = np.random.default_rng(0).integers(0, 2, (2000, 2))
    >>> round(pv.sap(1.0 * factors, factors)["sap"], 2)  # a perfect code scores about 1 - 1/C on C values, not 1
    0.49
    """
    x, y, _, _ = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    tr, te = split_indices(len(x), train_frac, seed)
    return sap_result(sap_score_matrix(x[tr], y[tr], x[te], y[te], seed, bool(standardize)))


def evaluate_all(
    codes: np.ndarray,
    factors: np.ndarray,
    *,
    groups: Sequence | Mapping | None = None,
    factor_names: Sequence[str] | None = None,
    num_bins: int = 20,
    binning: str = "equal_width",
    active_threshold: float = 0.1,
    active_variance: float = A.ACTIVE_VARIANCE,
    train_frac: float = 0.8,
    dci_estimator: str = "gbt",
    sap_standardize: bool = False,
    seed: int = 0,
    max_samples: int | None = DEFAULT_MAX_SAMPLES,
    bootstrap_resamples: int = A.BOOTSTRAP_RESAMPLES,
    explained_share: np.ndarray | None = None,
    active_share: float = A.ACTIVE_SHARE,
) -> dict:
    """MIG, MIG-sup, DCI and SAP over all code dims and per layer, plus the factor-by-layer assignment.

    :param codes: float array ``(N, D)`` of latent means (e.g. the layers ``z1..zL`` concatenated).
    :param factors: integer array ``(N, K)`` of factor indices.
    :param groups: ``None``, or a list of ``(name, slice or index list)`` pairs (or a mapping name -> selection)
        giving the code dims of each layer; groups must not overlap.
    :param factor_names: ``K`` names (default ``factor_0``...); e.g. ``pyro_vlae.data.SPRITES_FACTORS``.
    :param num_bins: bins per code dim for the MI estimates.
    :param binning: ``"equal_width"`` (disentanglement_lib's) or ``"quantile"``.
    :param active_threshold: MIG-sup activity threshold on normalised MI.
    :param active_variance: without ``explained_share``, a code dim is active when the variance of its values
        across the kept rows exceeds this (Burda et al.'s active units). Only active dims enter the per-layer
        information, the layers' importance shares and DCI fits, and the assignments; the overall scores use every dim.
    :param train_frac: train fraction for DCI and SAP.
    :param dci_estimator: ``"gbt"`` (:func:`dci`, disentanglement_lib's) or ``"lda"`` (:func:`dci_lda`, fast).
    :param sap_standardize: passed to :func:`sap` as ``standardize``.
    :param seed: seed of the subsample, the split, the classifiers and the bootstrap.
    :param max_samples: rows kept (seeded subsample); ``None`` keeps all.
    :param bootstrap_resamples: resamples of the items for the intervals of the assignment's information (0: none, and
        the rules use point estimates only).
    :param explained_share: ``None`` or ``(D,)``: each dim's share of variance that x explains
        (:func:`~.likelihood.explained_share`); given, a dim is active when its share exceeds ``active_share``.
    :param active_share: the threshold on ``explained_share``.
    :return: JSON-serialisable dict with keys ``n_samples``, ``n_samples_total``, ``n_codes``, ``n_factors``,
        ``factor_names``, ``settings``, ``overall`` (``{"summary", "mig", "mig_sup", "dci", "sap"}`` on all dims, as
        disentanglement_lib), ``active`` (``{"threshold", "criterion", "dims", "variance", "mig"}``, with
        ``"share_threshold"`` and ``"explained_share"`` when given: the active dims and the MIG of the active dims
        alone), ``layers`` (name -> ``{"dims", "active_dims", "summary", "mig", "mig_sup", "dci", "sap"}``, where the
        layer's ``dci`` holds the informativeness of a fit on its active dims and its ``importance_share`` per factor,
        and no D or C; empty without groups) and ``assignment`` (``None`` without groups, else
        :func:`.assignment.assignment`'s dict).
    :raises ValueError: on malformed input, groups, factor names or estimator.

    >>> import numpy as np
    >>> import pyro_vlae as pv
    >>> factors = np.random.default_rng(0).integers(0, 5, (1000, 2))
    >>> codes = np.c_[factors, np.random.default_rng(1).standard_normal((1000, 2))]  # z1 holds both factors, z2 noise
    >>> out = pv.evaluate_all(codes, factors, groups={"z1": [0, 1], "z2": [2, 3]}, dci_estimator="lda")
    >>> out["assignment"]["assigned_layer"]
    {'factor_0': 'z1', 'factor_1': 'z1'}
    """
    x, y, cards, n_total = prepare(codes, factors, max_samples, seed, MIN_SAMPLES)
    n_dims, n_factors = x.shape[1], y.shape[1]
    names = [f"factor_{k}" for k in range(n_factors)] if factor_names is None else [str(n) for n in factor_names]
    if len(names) != n_factors or len(set(names)) != n_factors:
        raise ValueError(f"factor_names must be {n_factors} distinct names; got {list(names)}")
    if dci_estimator not in DCI_ESTIMATORS:
        raise ValueError(f"dci_estimator must be one of {DCI_ESTIMATORS}; got {dci_estimator!r}")
    if isinstance(bootstrap_resamples, bool) or not isinstance(bootstrap_resamples, int) or bootstrap_resamples < 0:
        raise ValueError(f"bootstrap_resamples must be an integer >= 0 (0: no intervals); got {bootstrap_resamples!r}")
    for name, value in (("active_variance", active_variance), ("active_share", active_share)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    share = A.check_share(explained_share, n_dims)
    layers = parse_groups(groups, n_dims) if groups is not None else []
    bins = discretize(x, num_bins, binning)
    mi = binned_mi(bins, y, cards, num_bins)
    h = factor_entropies(y)
    split = split_indices(len(x), train_frac, seed)
    tr, te = split
    scores = sap_score_matrix(x[tr], y[tr], x[te], y[te], seed, bool(sap_standardize))
    overall_dci = dci_result(x, y, split, dci_estimator, seed, 1e-6)
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
            "active_variance": float(active_variance),
            "active_criterion": "mean_variance" if share is None else "explained_share",
            "active_share": None if share is None else float(active_share),
            "train_frac": float(train_frac),
            "seed": int(seed),
            "max_samples": None if max_samples is None else int(max_samples),
            "dci_estimator": dci_estimator,
            "sap_standardize": bool(sap_standardize),
            "bootstrap_resamples": int(bootstrap_resamples),
        },
        "overall": score_bundle(mi, h, scores, overall_dci, active_threshold),
        "layers": {},
        "assignment": None,
    }
    active = A.active_mask(x, active_variance) if share is None else share > float(active_share)
    mi_active = np.where(active[:, None], mi, 0.0)
    result["active"] = {
        "threshold": float(active_variance),
        "criterion": "mean_variance" if share is None else "explained_share",
        "dims": np.flatnonzero(active).tolist(),
        "variance": x.var(axis=0, ddof=1).tolist(),
        "mig": mig_result(mi_active, h),
    }
    if share is not None:
        result["active"].update(share_threshold=float(active_share), explained_share=share.tolist())
    if not layers:
        return result
    fit = A.fit_active(x, y, split, active, overall_dci, dci_estimator, seed)
    predicted = A.predicted_factors(fit, len(te), n_factors)
    importance = np.asarray(fit["importance"]) if fit is not None else np.zeros((n_dims, n_factors))
    shares = A.importance_shares(layers, importance, active, predicted)
    result["active"]["dci"] = fit
    for i, (name, dims) in enumerate(layers):
        live = dims[active[dims]]
        own = dci_result(x[:, live], y, split, dci_estimator, seed, 1e-6) if live.size else None
        result["layers"][name] = {
            "dims": dims.tolist(),
            "active_dims": live.tolist(),
            **score_bundle(mi_active[dims], h, scores[dims], A.layer_dci(own, shares[i], n_factors), active_threshold),
        }
    boot = bootstrap_mi(bins, y, cards, num_bins, bootstrap_resamples, seed) if bootstrap_resamples else None
    result["assignment"] = A.assignment(layers, names, mi, h, shares, active, predicted, boot, seed)
    return result
