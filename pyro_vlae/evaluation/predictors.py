"""The classifiers behind SAP and DCI and the DCI formulas: disentanglement_lib's scikit-learn estimators
(``LinearSVC`` on one code dim for SAP, gradient-boosted trees for DCI) and closed-form LDA for the ``dci_lda`` variant.
scikit-learn is imported on first use.
"""

from __future__ import annotations

import numbers

import numpy as np

from .estimators import nanmean, none_if_nan, normalized_entropy


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


def live_factors(y_tr: np.ndarray) -> list:
    """Indices of the factors with at least two classes in the training rows (the others cannot be classified)."""
    return [k for k in range(y_tr.shape[1]) if np.unique(y_tr[:, k]).size >= 2]


def zscore(x_tr: np.ndarray, x_te: np.ndarray) -> tuple:
    """Both arrays z-scored per column with the training mean and standard deviation (constant columns become 0)."""
    mu, sd = x_tr.mean(axis=0), x_tr.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return (x_tr - mu) / sd, (x_te - mu) / sd


def sap_score_matrix(x_tr, y_tr, x_te, y_te, seed: int, standardize: bool = False) -> np.ndarray:
    """disentanglement_lib's SAP score matrix for discrete factors (``continuous_factors=False``).

    For each code dim ``j`` and factor ``k``, ``sklearn.svm.LinearSVC(C=0.01, class_weight="balanced")`` is fitted on
    the single feature ``x_tr[:, j]`` and scored by its plain accuracy on the test rows.

    :param standardize: z-score each dim with the training statistics first (a variant, not disentanglement_lib's).
    :return: float array ``(D, K)`` of test accuracies; a column is NaN where the factor has fewer than two classes in
        the training rows.
    """
    from sklearn.svm import LinearSVC

    if standardize:
        x_tr, x_te = zscore(x_tr, x_te)
    scores = np.full((x_tr.shape[1], y_tr.shape[1]), np.nan)
    for k in live_factors(y_tr):
        for j in range(x_tr.shape[1]):
            svc = LinearSVC(C=0.01, class_weight="balanced", random_state=seed).fit(x_tr[:, j : j + 1], y_tr[:, k])
            scores[j, k] = np.mean(svc.predict(x_te[:, j : j + 1]) == y_te[:, k])
    return scores


def gbt_importance(x_tr, y_tr, x_te, y_te, seed: int) -> tuple:
    """disentanglement_lib's ``compute_importance_gbt``: one ``GradientBoostingClassifier()`` per factor.

    :return: ``(importance, acc_train, acc_test)``: ``|feature_importances_|`` as columns of a ``(D, K)`` array, and the
        per-factor accuracies ``(K,)``; factors with fewer than two training classes get a zero column and NaN.
    """
    from sklearn.ensemble import GradientBoostingClassifier

    importance = np.zeros((x_tr.shape[1], y_tr.shape[1]))
    acc_tr, acc_te = np.full(y_tr.shape[1], np.nan), np.full(y_tr.shape[1], np.nan)
    for k in live_factors(y_tr):
        model = GradientBoostingClassifier(random_state=seed).fit(x_tr, y_tr[:, k])
        importance[:, k] = np.abs(model.feature_importances_)
        acc_tr[k] = np.mean(model.predict(x_tr) == y_tr[:, k])
        acc_te[k] = np.mean(model.predict(x_te) == y_te[:, k])
    return importance, acc_tr, acc_te


def lda_fit(z_tr: np.ndarray, y_tr: np.ndarray, ridge: float) -> tuple:
    """Linear discriminant analysis with a shared, ridge-regularised covariance, fitted in closed form.

    :param z_tr: standardised training codes ``(n, D)``.
    :param y_tr: training labels ``(n,)``.
    :param ridge: positive value added to the diagonal of the pooled within-class covariance.
    :return: ``(classes, weights, bias)``: the ``P`` classes present in ``y_tr``, the class weights ``(P, D)`` and
        biases ``(P,)``; predict with ``classes[argmax(z @ weights.T + bias)]``.
    """
    if not isinstance(ridge, numbers.Real) or not float(ridge) > 0:
        raise ValueError(f"ridge must be a positive number; got {ridge!r}")
    classes, inv = np.unique(y_tr, return_inverse=True)
    n, d = z_tr.shape
    means, counts = class_means(z_tr, inv, len(classes))
    resid = z_tr - means[inv]
    cov = resid.T @ resid / max(n - len(classes), 1) + float(ridge) * np.eye(d)
    weights = np.linalg.solve(cov, means.T).T
    return classes, weights, -0.5 * np.sum(weights * means, axis=1) + np.log(counts / n)


def lda_importance(x_tr, y_tr, x_te, y_te, ridge: float) -> tuple:
    """Like :func:`gbt_importance`, with closed-form LDA on the standardised codes in place of the trees.

    The importance of dim ``j`` is ``mean_c |w_cj - mean_c' w_c'j|`` (logits are defined up to a shift shared by the
    classes), normalised per factor to sum to 1 as ``feature_importances_`` are.
    """
    z_tr, z_te = zscore(x_tr, x_te)
    importance = np.zeros((x_tr.shape[1], y_tr.shape[1]))
    acc_tr, acc_te = np.full(y_tr.shape[1], np.nan), np.full(y_tr.shape[1], np.nan)
    for k in live_factors(y_tr):
        classes, w, b = lda_fit(z_tr, y_tr[:, k], ridge)
        acc_tr[k] = np.mean(classes[np.argmax(z_tr @ w.T + b, axis=1)] == y_tr[:, k])
        acc_te[k] = np.mean(classes[np.argmax(z_te @ w.T + b, axis=1)] == y_te[:, k])
        imp = np.abs(w - w.mean(axis=0)).mean(axis=0)
        importance[:, k] = imp / imp.sum() if imp.sum() > 0 else 0.0
    return importance, acc_tr, acc_te


def dci_from_importance(importance: np.ndarray) -> tuple:
    """disentanglement_lib's disentanglement and completeness of an importance matrix ``R`` of shape ``(D, K)``.

    ``D_j = 1 - H_K(R_j. + 1e-11)``, ``disentanglement = sum_j D_j sum_k R_jk / sum R``; ``C_k = 1 - H_D(R_.k +
    1e-11)``, ``completeness = sum_k C_k sum_j R_jk / sum R`` (uniform weights when ``R`` is all zero). ``H_B`` is the
    entropy in base ``B`` of the normalised vector; with ``K = 1`` (or ``D = 1``) the entropy term is taken as 0, where
    disentanglement_lib's base-1 entropy is undefined.

    :return: ``(disentanglement, per_dim (D,), completeness, per_factor (K,))``.
    """
    r = np.asarray(importance, dtype=np.float64)
    per_dim = np.array([1.0 - normalized_entropy(row, 1e-11) for row in r])
    per_factor = np.array([1.0 - normalized_entropy(col, 1e-11) for col in r.T])
    w = r if r.sum() > 0 else np.ones_like(r)
    return (
        float(np.sum(per_dim * w.sum(axis=1) / w.sum())),
        per_dim,
        float(np.sum(per_factor * w.sum(axis=0) / w.sum())),
        per_factor,
    )


def dci_result(x: np.ndarray, y: np.ndarray, split: tuple, estimator: str, seed: int, ridge: float) -> dict:
    """Fit the per-factor classifiers (``"gbt"`` or ``"lda"``) on the training rows and score DCI.

    :param x: codes ``(N, D)``.
    :param y: factors re-encoded to ``0..C_k-1``, ``(N, K)``.
    :param split: ``(train_idx, test_idx)``.
    :return: the result dict of :func:`pyro_vlae.evaluation.disentangle.dci`.
    :raises ValueError: when no factor has two classes in the training rows, or on a bad ``ridge``.
    """
    tr, te = split
    live = live_factors(y[tr])
    if not live:
        raise ValueError("every factor is constant in the training rows; use more samples or a larger train_frac")
    if estimator == "gbt":
        importance, acc_tr, acc_te = gbt_importance(x[tr], y[tr], x[te], y[te], seed)
    else:
        importance, acc_tr, acc_te = lda_importance(x[tr], y[tr], x[te], y[te], ridge)
    d, d_j, c, c_live = dci_from_importance(importance[:, live])
    c_k = np.full(y.shape[1], np.nan)
    c_k[live] = c_live
    chance = np.full(y.shape[1], np.nan)
    chance[live] = [np.bincount(y[te, k]).max() / len(te) for k in live]
    norm = [(a - ch) / (1.0 - ch) if ch < 1 else np.nan for a, ch in zip(acc_te, chance)]
    return {
        "disentanglement": d,
        "completeness": c,
        "informativeness": nanmean(acc_te),
        "informativeness_train": nanmean(acc_tr),
        "informativeness_normalized": nanmean(norm),
        "importance": importance.tolist(),
        "disentanglement_per_dim": d_j.tolist(),
        "completeness_per_factor": none_if_nan(c_k),
        "informativeness_per_factor": none_if_nan(acc_te),
        "chance_per_factor": none_if_nan(chance),
        "estimator": estimator,
    }
