"""Disentanglement metrics on synthetic codes whose answers are known.

Factors are uniform random indices with the sprites cardinalities (3, 6, 40, 32, 32). The "perfect" code has one dim
per factor, an increasing affine function of the factor index plus noise far below the spacing of the values. With the
default 20 equal-width bins a factor with C > 20 values keeps at most about log(20)/log(C) of its entropy (0.81 for 40
values), so the perfect MIG is about 0.88, not 1; with 64 bins it is above 0.95. SAP uses chance-adjusted balanced
accuracies, so its value does not depend on factor cardinality and a perfect code scores close to 1.
"""

import json

import numpy as np
import pytest

from pyro_vlae.evaluation.disentangle import ESTIMATOR_NOTES, dci, evaluate_all, mig, mig_sup, sap

CARDS = np.array([3, 6, 40, 32, 32])
NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
N = 5000


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, c, N) for c in CARDS], axis=1)


@pytest.fixture(scope="module")
def perfect(factors):
    rng = np.random.default_rng(1)
    u = (factors + 0.5) / CARDS
    return 2.0 * u - 1.0 + rng.normal(0.0, 0.05 / CARDS, size=u.shape)


@pytest.fixture(scope="module")
def random_code():
    return np.random.default_rng(2).normal(size=(N, 5))


def _rotate(code, i, j):
    out = code.copy()
    out[:, [i, j]] = code[:, [i, j]] @ (np.array([[1.0, 1.0], [-1.0, 1.0]]) / np.sqrt(2.0))
    return out


def _scores(codes, factors, **kw):
    d = dci(codes, factors)
    return {
        "mig": mig(codes, factors, **kw)["mig"],
        "mig_sup": mig_sup(codes, factors, **kw)["mig_sup"],
        "dci_d": d["disentanglement"],
        "dci_c": d["completeness"],
        "dci_i": d["informativeness"],
        "dci_i_norm": d["informativeness_normalized"],
        "sap": sap(codes, factors)["sap"],
    }


@pytest.fixture(scope="module")
def perfect_scores(perfect, factors):
    return _scores(perfect, factors)


def test_perfect_code_scores_high(perfect, factors, perfect_scores):
    s = perfect_scores
    assert 0.85 < s["mig"] <= 1.0 and 0.85 < s["mig_sup"] <= 1.0
    assert s["dci_d"] > 0.95 and s["dci_c"] > 0.95
    assert s["dci_i"] > 0.99 and s["dci_i_norm"] > 0.99
    assert s["sap"] > 0.9
    per_factor = mig(perfect, factors)["per_factor"]
    assert min(per_factor[:2]) > 0.95  # few values: nothing lost to binning
    cap = np.log(20) / np.log(CARDS[2:])  # many values: at most log(bins)/log(C) is kept
    assert np.all(np.array(per_factor[2:]) < cap + 0.02) and np.all(np.array(per_factor[2:]) > cap - 0.05)
    assert mig(perfect, factors, num_bins=64)["mig"] > 0.95
    assert mig_sup(perfect, factors, num_bins=64)["mig_sup"] > 0.95
    imp = np.array(dci(perfect, factors)["importance"])
    assert np.all(np.argmax(imp, axis=0) == np.arange(5)) and np.all(np.diag(imp) > 0.95)


def test_random_code_scores_about_zero(random_code, factors):
    s = _scores(random_code, factors)
    assert abs(s["mig"]) < 0.05 and abs(s["mig_sup"]) < 0.05
    assert s["dci_d"] < 0.1 and s["dci_c"] < 0.1
    assert abs(s["dci_i_norm"]) < 0.05 and abs(s["sap"]) < 0.05
    d = dci(random_code, factors)
    acc, chance = np.array(d["informativeness_per_factor"]), np.array(d["chance_per_factor"])
    assert np.all(np.abs(acc - chance) < 0.05)
    assert mig_sup(random_code, factors)["active_dims"] == []
    assert mig_sup(random_code, factors)["mig_sup_active"] is None


def test_permuted_flipped_rescaled_code_scores_the_same(perfect, factors, perfect_scores):
    perm = np.array([3, 0, 4, 2, 1])
    scale = np.array([-2.0, 0.5, -1.0, 30.0, -0.01])
    shift = np.array([5.0, -1.0, 0.0, 100.0, 0.3])
    moved = perfect[:, perm] * scale + shift
    s = _scores(moved, factors)
    for key, value in perfect_scores.items():
        assert s[key] == pytest.approx(value, abs=1e-9), key
    np.testing.assert_allclose(
        np.array(mig(moved, factors)["mi_matrix"]), np.array(mig(perfect, factors)["mi_matrix"])[perm], atol=1e-12
    )
    np.testing.assert_allclose(
        np.array(dci(moved, factors)["importance"]), np.array(dci(perfect, factors)["importance"])[perm], atol=1e-9
    )


def test_quantile_bins_invariant_to_increasing_maps(perfect, factors):
    warped = np.exp(3.0 * perfect) + perfect**3
    for fn in (mig, mig_sup):
        key = fn.__name__
        base = fn(perfect, factors, binning="quantile")[key]
        assert fn(warped, factors, binning="quantile")[key] == pytest.approx(base, abs=1e-12)
    assert dci(warped, factors)["informativeness"] > 0.99  # LDA still separates monotone (non-affine) codes


@pytest.mark.parametrize("pair", [(3, 4), (2, 3)])
def test_entangled_code_scores_lower(perfect, factors, perfect_scores, pair):
    s = _scores(_rotate(perfect, *pair), factors)
    assert s["mig"] < perfect_scores["mig"] - 0.2
    assert s["mig_sup"] < perfect_scores["mig_sup"] - 0.2
    assert s["dci_d"] < perfect_scores["dci_d"] - 0.1
    assert s["dci_c"] < perfect_scores["dci_c"] - 0.1
    assert s["sap"] < perfect_scores["sap"] - 0.2
    assert s["dci_i"] > 0.99  # a rotation loses no information
    per_factor = mig(_rotate(perfect, *pair), factors)["per_factor"]
    assert max(per_factor[pair[0]], per_factor[pair[1]]) < 0.05


def test_evaluate_all_layers_and_assignment(perfect, factors):
    codes = perfect[:, [2, 0, 3, 1, 4]]  # layer A = dims 1, 3 (shape, scale); layer B = dims 0, 2, 4
    res = evaluate_all(codes, factors, groups=[("z1", [1, 3]), ("z2", [0, 2, 4])], factor_names=NAMES)
    json.dumps(res, allow_nan=False)
    a = res["assignment"]
    assert a["layers"] == ["z1", "z2"] and a["factors"] == list(NAMES)
    truth = {"shape": "z1", "scale": "z1", "orientation": "z2", "pos_x": "z2", "pos_y": "z2"}
    assert a["assigned_layer"] == truth and a["assigned_layer_by_importance"] == truth
    true_layer = np.array([0, 0, 1, 1, 1])
    for key in ("mi_mass", "importance_mass"):
        mass = np.array(a[key])
        assert mass.shape == (2, 5)
        np.testing.assert_allclose(mass.sum(axis=0), 1.0, atol=1e-9)
        assert np.all(mass[true_layer, np.arange(5)] > 0.95), key
    assert np.array(a["best_unit_nmi"]).shape == (2, 5)
    assert res["layers"]["z1"]["dims"] == [1, 3] and res["layers"]["z2"]["dims"] == [0, 2, 4]
    z1_dci = res["layers"]["z1"]["dci"]
    assert min(z1_dci["informativeness_per_factor"][:2]) > 0.99
    assert max(z1_dci["informativeness_per_factor"][2:]) < 0.1
    # the overall numbers are those of the individual functions
    assert res["overall"]["summary"]["mig"] == mig(codes, factors)["mig"]
    assert res["overall"]["summary"]["dci_disentanglement"] == dci(codes, factors)["disentanglement"]
    assert res["overall"]["summary"]["sap"] == sap(codes, factors)["sap"]
    assert res["layers"]["z2"]["summary"]["mig"] == mig(codes[:, [0, 2, 4]], factors)["mig"]


def test_evaluate_all_without_groups_and_subsampling(perfect, factors):
    res = evaluate_all(perfect, factors, max_samples=1000, seed=3)
    assert res["n_samples"] == 1000 and res["n_samples_total"] == N
    assert res["layers"] == {} and res["assignment"] is None
    assert res["factor_names"] == [f"factor_{k}" for k in range(5)]
    assert res["overall"]["summary"]["dci_informativeness"] > 0.95
    assert res == evaluate_all(perfect, factors, max_samples=1000, seed=3)  # deterministic given the seed
    json.dumps(res, allow_nan=False)
    assert "equal-width" in ESTIMATOR_NOTES and "LDA" in ESTIMATOR_NOTES


def test_constant_code_dim_and_constant_factor(perfect, factors):
    codes = np.concatenate([perfect, np.full((N, 1), 0.7)], axis=1)
    facs = np.concatenate([factors, np.full((N, 1), 4)], axis=1)
    res = evaluate_all(codes, facs, groups={"a": slice(0, 3), "b": np.arange(6) >= 3})  # a slice and a mask
    assert res["layers"]["b"]["dims"] == [3, 4, 5]
    json.dumps(res, allow_nan=False)  # no NaN anywhere
    overall = res["overall"]
    assert overall["mig"]["per_factor"][5] is None and overall["dci"]["completeness_per_factor"][5] is None
    assert overall["sap"]["per_factor"][5] is None and res["assignment"]["assigned_layer"]["factor_5"] is None
    assert overall["mig"]["mi_matrix"][5] == [0.0] * 6
    assert overall["dci"]["importance"][5] == [0.0] * 6
    assert overall["summary"]["mig"] == pytest.approx(mig(perfect, factors)["mig"], abs=1e-12)
    assert overall["summary"]["dci_disentanglement"] > 0.95
    assert overall["summary"]["dci_informativeness"] > 0.99


def test_single_dim_and_single_factor():
    rng = np.random.default_rng(4)
    f = rng.integers(0, 4, size=(200, 1))
    c = f + rng.normal(0.0, 0.01, size=(200, 1))
    assert mig(c, f)["mig"] == pytest.approx(1.0)
    assert mig_sup(c, f)["mig_sup"] == pytest.approx(1.0)
    d = dci(c, f)
    assert d["disentanglement"] == 1.0 and d["completeness"] == 1.0 and d["informativeness"] == 1.0
    assert sap(c, f)["sap"] == pytest.approx(1.0)


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
        (np.zeros((50, 2)), np.arange(50)[:, None] % 2, {"ridge": 0.0}, "ridge"),
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


@pytest.mark.parametrize("fn", [mig, mig_sup, dci, sap])
def test_each_metric_validates(fn):
    with pytest.raises(ValueError, match="same number of rows"):
        fn(np.zeros((50, 2)), np.zeros((49, 1), int))
