"""Disentanglement metrics on codes whose answers are known, and against disentanglement_lib's formulas.

Factors are uniform random indices with few values (2, 3 and 4), so that the gradient-boosted trees of DCI fit in about
a second on 300 rows. The "perfect" code has one dim per factor, an increasing affine function of the factor index
plus noise far below the spacing of the values; the "shuffled" code is the perfect one with its rows permuted, so it
has the same marginals and no information about the factors. The reference functions ``_dlib_*`` at the end transcribe
disentanglement_lib's ``mig.py``, ``sap_score.py``, ``dci.py`` and ``utils.py`` (codes as ``(D, N)`` arrays, as
there); they share no code with :mod:`pyro_vlae.evaluation`.
"""

import json

import numpy as np
import pytest
import scipy.stats
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.metrics import mutual_info_score
from sklearn.svm import LinearSVC

from pyro_vlae.evaluation.disentangle import ESTIMATOR_NOTES, dci, dci_lda, evaluate_all, mig, mig_sup, sap

CARDS = np.array([2, 3, 4])
NAMES = ("shape", "scale", "position")
N = 300


def _perfect(factors, cards, seed=1):
    u = (factors + 0.5) / cards
    return 2.0 * u - 1.0 + np.random.default_rng(seed).normal(0.0, 0.05 / cards, size=u.shape)


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, c, N) for c in CARDS], axis=1)


@pytest.fixture(scope="module")
def perfect(factors):
    return _perfect(factors, CARDS)


@pytest.fixture(scope="module")
def shuffled(perfect):
    return perfect[np.random.default_rng(2).permutation(N)]


@pytest.fixture(scope="module")
def perfect_dci(perfect, factors):
    return dci(perfect, factors)


def _rotate(code, i, j):
    out = code.copy()
    out[:, [i, j]] = code[:, [i, j]] @ (np.array([[1.0, 1.0], [-1.0, 1.0]]) / np.sqrt(2.0))
    return out


def _split(n, train_frac=0.8, seed=0):
    """The documented split: a permutation from ``default_rng([seed, 1])``, the first ``round(train_frac n)`` train."""
    perm = np.random.default_rng([seed, 1]).permutation(n)
    n_train = int(round(train_frac * n))
    return perm[:n_train], perm[n_train:]


def test_perfect_code_scores_about_one(perfect, factors, perfect_dci):
    assert mig(perfect, factors)["mig"] > 0.95 and mig_sup(perfect, factors)["mig_sup"] > 0.95
    d = perfect_dci
    assert d["disentanglement"] > 0.99 and d["completeness"] > 0.99
    assert d["informativeness"] == 1.0 and d["informativeness_train"] == 1.0 and d["informativeness_normalized"] == 1.0
    imp = np.array(d["importance"])
    np.testing.assert_allclose(imp.sum(axis=0), 1.0, atol=1e-12)  # one tree model's importances per factor
    assert np.all(np.diag(imp) > 0.99)


def test_shuffled_code_scores_about_zero(shuffled, factors):
    assert mig(shuffled, factors)["mig"] < 0.05 and mig_sup(shuffled, factors)["mig_sup"] < 0.05
    assert sap(shuffled, factors)["sap"] < 0.1
    d = dci(shuffled, factors)
    assert d["disentanglement"] < 0.1 and d["completeness"] < 0.1
    acc, chance = np.array(d["informativeness_per_factor"]), np.array(d["chance_per_factor"])
    assert np.all(np.abs(acc - chance) < 0.15)  # 60 test rows
    assert mig_sup(shuffled, factors)["mig_sup_active"] is None


def test_sap_known_values():
    """On binary factors one dim classifies perfectly and a dim without information scores about 1/2."""
    rng = np.random.default_rng(5)
    f = rng.integers(0, 2, size=(2000, 3))
    code = _perfect(f, 2)
    res = sap(code, f)
    acc = np.array(res["score_matrix"])
    assert np.all(np.diag(acc) == 1.0)
    assert np.all(np.abs(acc[~np.eye(3, dtype=bool)] - 0.5) < 0.06)  # 400 test rows
    assert res["sap"] == pytest.approx(0.5, abs=0.06)
    assert sap(code[:, [0, 0, 1, 1, 2, 2]], f)["sap"] == 0.0  # each factor in two identical dims: no gap
    assert mig(code[:, [0, 0, 1, 1, 2, 2]], f)["mig"] == 0.0
    assert sap(code[rng.permutation(2000)], f)["sap"] < 0.05
    assert sap(code[:, :1], f[:, :1])["sap"] == 1.0  # one dim: the gap to the (absent) second is the accuracy


def test_permuted_and_rescaled_code_scores_the_same(perfect, factors, perfect_dci):
    perm = np.array([2, 0, 1])
    scale, shift = np.array([-2.0, 0.5, 30.0]), np.array([5.0, -1.0, 100.0])
    moved = perfect[:, perm] * scale + shift
    np.testing.assert_allclose(
        np.array(mig(moved, factors)["mi_matrix"]), np.array(mig(perfect, factors)["mi_matrix"])[perm], atol=1e-12
    )
    d = dci(moved, factors)
    for key in ("disentanglement", "completeness", "informativeness"):
        assert d[key] == pytest.approx(perfect_dci[key], abs=1e-9), key
    np.testing.assert_allclose(np.array(d["importance"]), np.array(perfect_dci["importance"])[perm], atol=1e-9)
    # SAP: the classifiers' penalty acts on raw weights, so only permutations and sign flips leave it unchanged
    base = np.array(sap(perfect, factors)["score_matrix"])
    flipped = np.array(sap(perfect[:, perm] * np.sign(scale), factors)["score_matrix"])
    np.testing.assert_array_equal(flipped, base[perm])
    assert sap(perfect * 0.01, factors)["sap"] < sap(perfect, factors)["sap"] - 0.1
    std = sap(perfect, factors, standardize=True)
    assert sap(moved, factors, standardize=True)["sap"] == pytest.approx(std["sap"], abs=1e-9)


def test_entangled_code_scores_lower(perfect, factors, perfect_dci):
    rotated = _rotate(perfect, 1, 2)
    assert mig(rotated, factors)["mig"] < mig(perfect, factors)["mig"] - 0.3
    d = dci(rotated, factors)
    assert d["disentanglement"] < perfect_dci["disentanglement"] - 0.1
    assert d["completeness"] < perfect_dci["completeness"] - 0.1
    assert d["informativeness"] > 0.95  # a rotation loses no information


def test_agrees_with_disentanglement_lib_formulas():
    """Fixed codes that carry some information about each factor, spread over the dims."""
    rng = np.random.default_rng(7)
    n, seed = 300, 3
    f = np.stack([rng.integers(0, c, n) for c in CARDS], axis=1)
    codes = f @ (3.0 * np.eye(3, 4) + rng.normal(size=(3, 4))) + rng.normal(size=(n, 4))
    tr, te = _split(n, seed=seed)
    mus, ys = codes.T, f.T

    assert mig(codes, f)["mig"] == pytest.approx(_dlib_mig(mus, ys), abs=1e-12)
    res = sap(codes, f, seed=seed)
    ref_sap, ref_matrix = _dlib_sap(mus[:, tr], ys[:, tr], mus[:, te], ys[:, te])
    np.testing.assert_array_equal(np.array(res["score_matrix"]), ref_matrix)
    assert res["sap"] == pytest.approx(ref_sap, abs=1e-12)
    d = dci(codes, f, seed=seed)
    ref = _dlib_dci(mus[:, tr], ys[:, tr], mus[:, te], ys[:, te], seed)
    np.testing.assert_allclose(np.array(d["importance"]), ref["importance"], atol=1e-12)
    for key in ("disentanglement", "completeness"):
        assert d[key] == pytest.approx(ref[key], abs=1e-12), key
    assert d["informativeness"] == pytest.approx(ref["informativeness_test"], abs=1e-12)
    assert d["informativeness_train"] == pytest.approx(ref["informativeness_train"], abs=1e-12)
    assert 0.1 < d["disentanglement"] < 0.9 and 0.1 < res["sap"]  # a case that tests the formulas, not a corner


def test_dci_lda_variant(perfect, shuffled, factors):
    good, bad = dci_lda(perfect, factors), dci_lda(shuffled, factors)
    assert good["estimator"] == "lda" and good["informativeness"] == 1.0
    assert good["disentanglement"] > 0.95 and good["completeness"] > 0.95
    assert bad["disentanglement"] < 0.2
    assert bad["informativeness_normalized"] < 0.15  # no better than the most frequent class (a guess scores below)
    rotated = dci_lda(_rotate(perfect, 1, 2), factors)  # the same formulas, on LDA's importances
    imp = np.array(rotated["importance"])
    assert rotated["disentanglement"] == pytest.approx(_dlib_disentanglement(imp), abs=1e-12)
    assert rotated["completeness"] == pytest.approx(_dlib_completeness(imp), abs=1e-12)
    assert rotated["disentanglement"] < good["disentanglement"] - 0.1


def test_evaluate_all_layers_and_assignment(perfect, factors, perfect_dci):
    res = evaluate_all(perfect, factors, groups=[("z1", [0]), ("z2", [1, 2])], factor_names=NAMES)
    json.dumps(res, allow_nan=False)
    a = res["assignment"]
    assert a["layers"] == ["z1", "z2"] and a["factors"] == list(NAMES)
    truth = {"shape": "z1", "scale": "z2", "position": "z2"}
    for key in ("assigned_layer", "assigned_layer_by_importance", "assigned_layer_by_top_dim"):
        assert a[key] == truth, key
    true_layer = np.array([0, 1, 1])
    for key in ("mi_mass", "importance_share"):
        mass = np.array(a[key])
        assert mass.shape == (2, 3)
        np.testing.assert_allclose(mass.sum(axis=0), 1.0, atol=1e-9)
        assert np.all(mass[true_layer, np.arange(3)] > 0.95), key
    assert res["layers"]["z1"]["dims"] == [0] and res["layers"]["z2"]["dims"] == [1, 2]
    z1 = res["layers"]["z1"]["dci"]["informativeness_per_factor"]
    assert z1[0] == 1.0 and max(z1[1:]) < 0.6  # z1 alone knows the shape only
    assert res["layers"]["z2"]["dci"]["informativeness_per_factor"][1:] == [1.0, 1.0]
    assert res["layers"]["z2"]["dci"]["importance_share"] == a["importance_share"][1]
    # the overall and per-layer numbers are those of the individual functions on those dims
    assert res["overall"]["summary"]["mig"] == mig(perfect, factors)["mig"]
    assert res["overall"]["summary"]["sap"] == sap(perfect, factors)["sap"]
    assert res["overall"]["dci"] == perfect_dci
    assert res["layers"]["z2"]["summary"]["mig"] == mig(perfect[:, [1, 2]], factors)["mig"]
    assert res["layers"]["z2"]["summary"]["sap"] == sap(perfect[:, [1, 2]], factors)["sap"]


def test_evaluate_all_without_groups_and_subsampling(perfect, factors):
    res = evaluate_all(perfect, factors, max_samples=200, seed=3, dci_estimator="lda")
    assert res["n_samples"] == 200 and res["n_samples_total"] == N
    assert res["layers"] == {} and res["assignment"] is None
    assert res["factor_names"] == [f"factor_{k}" for k in range(3)]
    assert res["settings"]["dci_estimator"] == "lda" and res["overall"]["dci"]["estimator"] == "lda"
    assert res["overall"]["summary"]["dci_informativeness"] == 1.0
    assert res == evaluate_all(perfect, factors, max_samples=200, seed=3, dci_estimator="lda")  # deterministic
    assert list(res["overall"]["summary"]) == [
        "mig", "mig_sup", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap",
    ]  # fmt: skip
    assert "GradientBoostingClassifier" in ESTIMATOR_NOTES and "LinearSVC(C=0.01" in ESTIMATOR_NOTES


def test_constant_code_dim_and_constant_factor(perfect, factors):
    codes = np.concatenate([perfect, np.full((N, 1), 0.7)], axis=1)
    facs = np.concatenate([factors, np.full((N, 1), 4)], axis=1)
    groups = {"a": slice(0, 2), "b": np.arange(4) >= 2}  # a slice and a mask
    res = evaluate_all(codes, facs, groups=groups, dci_estimator="lda")
    assert res["layers"]["b"]["dims"] == [2, 3]
    json.dumps(res, allow_nan=False)  # no NaN anywhere
    overall = res["overall"]
    assert overall["mig"]["per_factor"][3] is None and overall["dci"]["completeness_per_factor"][3] is None
    assert overall["sap"]["per_factor"][3] is None and overall["dci"]["informativeness_per_factor"][3] is None
    assert res["assignment"]["assigned_layer"]["factor_3"] is None
    assert overall["mig"]["mi_matrix"][3] == [0.0] * 4
    assert overall["summary"]["mig"] == pytest.approx(mig(perfect, factors)["mig"], abs=1e-12)
    trees = dci(codes[:150], facs[:150])
    json.dumps(trees, allow_nan=False)
    assert trees["completeness_per_factor"][3] is None and trees["chance_per_factor"][3] is None
    assert trees["importance"][3] == [0.0] * 4  # the trees never split on the constant dim
    assert trees["disentanglement"] > 0.99 and trees["informativeness"] == 1.0


def test_single_dim_and_single_factor():
    rng = np.random.default_rng(4)
    f = rng.integers(0, 2, size=(200, 1))
    c = f + rng.normal(0.0, 0.01, size=(200, 1))
    assert mig(c, f)["mig"] == pytest.approx(1.0)
    assert mig_sup(c, f)["mig_sup"] == pytest.approx(1.0)
    d = dci(c, f)
    assert d["disentanglement"] == 1.0 and d["completeness"] == 1.0 and d["informativeness"] == 1.0
    assert sap(c, f)["sap"] == 1.0


def test_accepts_torch_and_float_indices(perfect, factors):
    torch = pytest.importorskip("torch")
    base = mig(perfect, factors)["mig"]
    assert mig(torch.as_tensor(perfect, dtype=torch.float64), torch.as_tensor(factors))["mig"] == base
    assert mig(perfect, factors.astype(float) * 2 - 7)["mig"] == base  # labels are re-encoded


@pytest.mark.parametrize(
    ("codes", "factors", "kwargs", "match"),
    [
        (np.zeros(50), np.zeros((50, 1), int), {}, "codes must be a 2-D"),
        (np.zeros((50, 2)), np.zeros(50, int), {}, "factors must be a 2-D"),
        (np.zeros((50, 2)), np.zeros((40, 1), int), {}, "same number of rows"),
        (np.zeros((10, 2)), np.zeros((10, 1), int), {}, "at least 20 samples"),
        (np.zeros((50, 0)), np.zeros((50, 1), int), {}, "at least one code dim"),
        (np.full((50, 2), np.nan), np.arange(50)[:, None] % 2, {}, "finite"),
        (np.full((50, 2), np.inf), np.arange(50)[:, None] % 2, {}, "finite"),
        (np.zeros((50, 2)), np.full((50, 1), 0.5), {}, "integer indices"),
        (np.zeros((50, 2)), np.array([["a"]] * 50), {}, "integer indices"),
        (np.zeros((50, 2)), np.zeros((50, 1), int), {}, "every factor is constant"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"num_bins": 1}, "num_bins"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"binning": "kmeans"}, "binning"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"train_frac": 1.0}, "train_frac"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"train_frac": 0.999}, "empty train or test"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"max_samples": 5}, "max_samples"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"seed": -1}, "seed"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"dci_estimator": "tree"}, "dci_estimator"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"factor_names": ["a", "b"]}, "factor_names"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": [("a", [0]), ("b", [0, 1])]}, "overlaps"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": [("a", [2])]}, "not valid for 2 code dims"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": [("a", [0]), ("a", [1])]}, "used twice"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": [("a", slice(2, 5))]}, "selects no code dims"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": [[0, 1]]}, "pair"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": [("a", [0.5])]}, "neither integer nor boolean"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": [("a", [True])]}, "not valid for 2 code dims"),
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"groups": []}, "groups is empty"),
    ],
)
def test_bad_input_raises(codes, factors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_all(codes, factors, **kwargs)


def test_bad_ridge_and_constant_training_factor():
    codes, f = np.zeros((50, 2)), np.arange(50)[:, None] % 2
    with pytest.raises(ValueError, match="ridge"):
        dci_lda(codes, f, ridge=0.0)
    rare = np.zeros((50, 1), int)
    rare[_split(50)[1][0]] = 1  # the only other value falls in a test row
    with pytest.raises(ValueError, match="constant in the training rows"):
        dci(codes, rare)


@pytest.mark.parametrize("fn", [mig, mig_sup, dci, dci_lda, sap])
def test_each_metric_validates(fn):
    with pytest.raises(ValueError, match="same number of rows"):
        fn(np.zeros((50, 2)), np.zeros((49, 1), int))


# ----------------------------------------------------------- disentanglement_lib's formulas, codes as (D, N) arrays
def _dlib_mig(mus, ys, num_bins=20):
    discretized = np.zeros_like(mus)
    for i in range(mus.shape[0]):
        discretized[i, :] = np.digitize(mus[i, :], np.histogram(mus[i, :], num_bins)[1][:-1])
    m = np.array([[mutual_info_score(y, d) for y in ys] for d in discretized])
    entropy = np.array([mutual_info_score(y, y) for y in ys])
    sorted_m = np.sort(m, axis=0)[::-1]
    return np.mean((sorted_m[0, :] - sorted_m[1, :]) / entropy)


def _dlib_sap(mus, ys, mus_test, ys_test):
    score_matrix = np.zeros([mus.shape[0], ys.shape[0]])
    for i in range(mus.shape[0]):
        for j in range(ys.shape[0]):
            classifier = LinearSVC(C=0.01, class_weight="balanced")
            classifier.fit(mus[i, :][:, np.newaxis], ys[j, :])
            pred = classifier.predict(mus_test[i, :][:, np.newaxis])
            score_matrix[i, j] = np.mean(pred == ys_test[j, :])
    sorted_matrix = np.sort(score_matrix, axis=0)
    return np.mean(sorted_matrix[-1, :] - sorted_matrix[-2, :]), score_matrix


def _dlib_disentanglement(importance_matrix):
    per_code = 1.0 - scipy.stats.entropy(importance_matrix.T + 1e-11, base=importance_matrix.shape[1])
    if importance_matrix.sum() == 0.0:
        importance_matrix = np.ones_like(importance_matrix)
    return np.sum(per_code * importance_matrix.sum(axis=1) / importance_matrix.sum())


def _dlib_completeness(importance_matrix):
    per_factor = 1.0 - scipy.stats.entropy(importance_matrix + 1e-11, base=importance_matrix.shape[0])
    if importance_matrix.sum() == 0.0:
        importance_matrix = np.ones_like(importance_matrix)
    return np.sum(per_factor * importance_matrix.sum(axis=0) / importance_matrix.sum())


def _dlib_dci(x_train, y_train, x_test, y_test, seed):
    importance_matrix = np.zeros([x_train.shape[0], y_train.shape[0]])
    train_acc, test_acc = [], []
    for i in range(y_train.shape[0]):
        model = GradientBoostingClassifier(random_state=seed)  # unset there; fixed here to fit the same trees
        model.fit(x_train.T, y_train[i, :])
        importance_matrix[:, i] = np.abs(model.feature_importances_)
        train_acc.append(np.mean(model.predict(x_train.T) == y_train[i, :]))
        test_acc.append(np.mean(model.predict(x_test.T) == y_test[i, :]))
    return {
        "importance": importance_matrix,
        "informativeness_train": np.mean(train_acc),
        "informativeness_test": np.mean(test_acc),
        "disentanglement": _dlib_disentanglement(importance_matrix),
        "completeness": _dlib_completeness(importance_matrix),
    }
