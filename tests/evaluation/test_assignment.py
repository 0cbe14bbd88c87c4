"""Per-layer numbers that can vary with the data: layers' shares of DCI importance over active dims, and the factor ->
layer assignments, on codes whose answers are known (the cases of issue 24).

Two factors with four uniform values each: ``encoded`` is carried by one dim (its index plus noise far below the
spacing), ``chance`` by nothing, so no classifier beats the majority class on it.
"""

import json
import math

import numpy as np
import pytest

from pyro_vlae.evaluation.assignment import (
    BOOTSTRAP_RESAMPLES,
    CHANCE_Z,
    INTERVAL_LEVEL,
    SPREAD,
    assignment,
    leading_layer,
    predicted_factors,
)
from pyro_vlae.evaluation.disentangle import evaluate_all
from pyro_vlae.evaluation.estimators import binned_mi, bootstrap_mi, discretize

N = 400
NAMES = ("encoded", "chance")
RULES = ("assigned_layer", "assigned_layer_by_importance", "assigned_layer_by_top_dim")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    factors = rng.integers(0, 4, size=(N, 2))
    perfect = factors[:, :1] + rng.normal(0.0, 0.02, size=(N, 1))
    noise = rng.standard_normal((N, 1))
    dead = 1e-3 * (factors[:, 1:] + rng.normal(0.0, 0.02, size=(N, 1)))  # variance ~1e-6: a collapsed layer
    return factors, perfect, noise, dead


def test_one_dim_that_encodes_one_factor(data):
    """disentanglement_lib's all-codes D and C of one perfect dim are 0 and 1 whatever it encodes (each importance
    column sums to 1); the layer's share varies: all of the encoded factor, none of a factor at chance."""
    factors, perfect, _, _ = data
    res = evaluate_all(perfect, factors, groups=[("a", [0])], factor_names=NAMES)
    json.dumps(res, allow_nan=False)
    assert res["overall"]["dci"]["disentanglement"] == pytest.approx(0.0, abs=1e-9)  # unchanged definition
    assert res["overall"]["dci"]["completeness"] == pytest.approx(1.0, abs=1e-9)
    layer = res["layers"]["a"]
    assert "dci_disentanglement" not in layer["summary"] and "dci_completeness" not in layer["summary"]
    assert "disentanglement" not in layer["dci"] and "completeness" not in layer["dci"]
    assert layer["dci"]["importance_share"] == [1.0, None]
    a = res["assignment"]
    assert a["predicted"] == [True, False]
    for rule in RULES:
        assert a[rule] == {"encoded": "a", "chance": None}, rule


def test_a_noise_dim_takes_no_share(data):
    """Adding a noise dim: it takes almost none of the encoded factor's importance, and the importance of the factor
    at chance (which the trees spread over both dims, about half on the noise dim) is credited to no layer."""
    factors, perfect, noise, _ = data
    res = evaluate_all(np.hstack([perfect, noise]), factors, groups=[("a", [0]), ("b", [1])], factor_names=NAMES)
    imp = np.array(res["overall"]["dci"]["importance"])
    assert imp[1, 1] > 0.2  # the trees do split on the noise dim for the factor at chance
    share = res["assignment"]["importance_share"]
    assert share[0][0] > 0.95 and share[1][0] < 0.05
    assert share[0][1] is None and share[1][1] is None
    assert res["layers"]["b"]["dci"]["importance_share"] == [share[1][0], None]
    b = res["layers"]["b"]["dci"]
    assert b["informativeness_per_factor"][0] < b["chance_per_factor"][0] + 0.1  # noise alone is at chance
    for rule in RULES:
        assert res["assignment"][rule] == {"encoded": "a", "chance": None}, rule


def test_a_collapsed_layer_gets_no_share_and_no_factor(data):
    """A layer with near-constant posterior means (variance ~1e-6, KL ~ 0) that still orders the items by a factor:
    equal-width bins ignore scale, so counted, it would take that factor's information. Over active dims it gets
    nothing; the all-dims MIG, disentanglement_lib's, still credits it, and stays beside the active-dims MIG."""
    factors, perfect, noise, dead = data
    codes = np.hstack([perfect, noise, dead])
    groups = [("z1", [0, 1]), ("z2", [2])]
    res = evaluate_all(codes, factors, groups=groups, factor_names=NAMES)
    assert res["active"]["dims"] == [0, 1] and res["layers"]["z2"]["active_dims"] == []
    a = res["assignment"]
    assert a["mi_mass"][1] == [0.0, 0.0] and a["best_unit_nmi"][1] == [0.0, 0.0]
    assert a["importance_share"][1] == [0.0, None]
    assert a["predicted"] == [True, False]  # the refit on active dims cannot predict the factor only z2 holds
    for rule in RULES:
        assert a[rule] == {"encoded": "z1", "chance": None}, rule
    z2 = res["layers"]["z2"]
    assert z2["summary"]["mig"] == 0.0 and z2["summary"]["dci_informativeness"] is None
    assert res["overall"]["mig"]["per_factor"][1] > 0.5  # all dims: the dead dim is MIG's top dim
    assert res["active"]["mig"]["per_factor"][1] < 0.1
    # Counting every dim (threshold 0), as before: the collapsed layer takes the factor by every rule.
    old = evaluate_all(codes, factors, groups=groups, factor_names=NAMES, active_variance=0.0)
    assert old["assignment"]["mi_mass"][1][1] > 0.5
    for rule in RULES:
        assert old["assignment"][rule]["chance"] == "z2", rule


def test_a_layer_is_named_only_when_it_clearly_leads():
    """Flat shares, like the Markov HVAE's 0.21-0.30 on shapes3d, name no layer: a plain argmax would name one by
    noise. A layer is named when it leads clearly: a share of at least half and twice the runner-up's; by top dim (the
    headline), a best dim with twice the information of any other layer's (the best dims are not parts of a whole)."""
    layers = [(f"z{i + 1}", np.array([i])) for i in range(4)]  # one dim per layer: shares and best dims coincide
    names = ["flat", "leads", "plurality", "two_way"]
    share = np.array(
        [[0.21, 0.05, 0.44, 0.55], [0.30, 0.70, 0.20, 0.45], [0.24, 0.15, 0.20, 0.0], [0.25, 0.10, 0.16, 0.0]]
    )
    a = assignment(layers, names, share, np.ones(4), share, np.ones(4, dtype=bool), [True] * 4)
    spread = {"flat": SPREAD, "leads": "z2", "plurality": SPREAD, "two_way": SPREAD}
    assert a["assigned_layer_by_mi_mass"] == a["assigned_layer_by_importance"] == spread
    assert a["assigned_layer"] == a["assigned_layer_by_top_dim"] == {**spread, "plurality": "z1"}  # 0.44: 2.2 x 0.20
    with pytest.raises(ValueError, match="spread"):
        assignment([("spread", np.array([0]))], ["f"], share[:1], np.ones(4), share[:1], np.ones(1, bool), [True] * 4)


def test_a_factor_split_over_two_layers_is_spread():
    """A factor of four values whose high bit sits in one layer and low bit in another: each layer holds half of it
    by every measure, so no rule names a layer; a factor one dim encodes alone still gets that dim's layer."""
    rng = np.random.default_rng(1)
    factors = rng.integers(0, 4, size=(N, 2))
    bits = np.stack([factors[:, 0] // 2, factors[:, 0] % 2, factors[:, 1]], axis=1)
    codes = bits + rng.normal(0.0, 0.02, size=bits.shape)
    res = evaluate_all(codes, factors, groups=[("a", [0]), ("b", [1]), ("c", [2])], factor_names=["split", "one"])
    json.dumps(res, allow_nan=False)
    a = res["assignment"]
    for key in ("mi_mass", "importance_share", "best_unit_nmi"):
        assert 0.35 < a[key][0][0] < 0.65 and 0.35 < a[key][1][0] < 0.65, key
    for rule in RULES:
        assert a[rule] == {"split": SPREAD, "one": "c"}, rule


def test_predicted_factors_margin():
    """Above chance means beating the majority-class rate c by CHANCE_Z binomial standard errors."""
    c, n = 0.25, 400
    edge = c + CHANCE_Z * math.sqrt(c * (1 - c) / n)
    fit = {"informativeness_per_factor": [edge - 1e-9, edge + 1e-9, None], "chance_per_factor": [c, c, None]}
    assert predicted_factors(fit, n, 3) == [False, True, None]
    assert predicted_factors(None, n, 2) == [False, False]


def test_active_variance_is_checked(data):
    factors, perfect, _, _ = data
    with pytest.raises(ValueError, match="active_variance"):
        evaluate_all(perfect, factors, active_variance=-1.0)


def _copies_and_single(n=N, seed=2):
    """One code of a factor copied into three dims of layer ``a``, and an equally good code (its own noise) as the
    single dim of layer ``b``; ``chance`` is carried by nothing."""
    rng = np.random.default_rng(seed)
    factors = rng.integers(0, 4, size=(n, 2))
    code = factors[:, :1] + rng.normal(0.0, 0.02, size=(n, 1))
    other = factors[:, :1] + rng.normal(0.0, 0.02, size=(n, 1))
    return factors, np.hstack([code, code, code, other])


def test_copies_of_one_code_do_not_win_the_headline():
    """Issue 29 item 7: summed over a layer's dims, three copies of one code take 3/4 of the factor's information
    from a layer with an equally good single dim, and the old headline named their layer. The headline rule compares
    layers' best single dims, which copies do not add up: the two layers tie, and the factor is spread."""
    factors, codes = _copies_and_single()
    res = evaluate_all(codes, factors, groups=[("a", [0, 1, 2]), ("b", [3])], factor_names=NAMES, dci_estimator="lda")
    a = res["assignment"]
    assert a["mi_mass"][0][0] == pytest.approx(0.75, abs=0.02)  # the sum still counts the copies
    assert a["best_unit_nmi"][0][0] == pytest.approx(a["best_unit_nmi"][1][0], abs=0.02)
    assert a["assigned_layer"] == {"encoded": SPREAD, "chance": None}
    assert a["assigned_layer_by_top_dim"] == a["assigned_layer"]
    assert a["assigned_layer_by_mi_mass"]["encoded"] == "a"  # the summed rule, kept beside it, is fooled


def test_a_clear_leader_is_still_named_with_its_interval(data):
    """One perfect dim in ``a``, a noise dim in ``b``: ``a``'s interval lies far above ``b``'s, so it is named; the
    intervals come from resampling the test items and hold the point estimate."""
    factors, perfect, noise, _ = data
    res = evaluate_all(np.hstack([perfect, noise]), factors, groups=[("a", [0]), ("b", [1])], factor_names=NAMES)
    a = res["assignment"]
    assert a["assigned_layer"] == {"encoded": "a", "chance": None}
    assert a["bootstrap"] == {"resamples": BOOTSTRAP_RESAMPLES, "level": INTERVAL_LEVEL, "seed": 0}
    for key in ("best_unit_nmi", "mi_mass"):
        lo, hi = np.array(a[f"{key}_interval"]["low"]), np.array(a[f"{key}_interval"]["high"])
        point = np.array(a[key])
        assert lo.shape == hi.shape == point.shape == (2, 2)
        assert np.all(lo <= point + 1e-12) and np.all(point <= hi + 1e-12), key
        assert lo[0, 0] > hi[1, 0] + 0.5, key
    json.dumps(res, allow_nan=False)


def test_overlapping_intervals_give_spread():
    """A layer whose best dim has twice the runner-up's information on the point estimate is named only when its
    interval clears the runner-up's; with the intervals overlapping the factor is spread."""
    layers = [("z1", np.array([0])), ("z2", np.array([1]))]
    mi = np.array([[0.50], [0.20]])
    tight = mi[None] + np.linspace(-0.02, 0.02, 50)[:, None, None]
    wide = mi[None] + np.linspace(-0.2, 0.2, 50)[:, None, None]
    args = (layers, ["f"], mi, np.ones(1), mi / mi.sum(0), np.ones(2, dtype=bool), [True])
    assert assignment(*args, mi_samples=tight)["assigned_layer"] == {"f": "z1"}
    assert assignment(*args, mi_samples=wide)["assigned_layer"] == {"f": SPREAD}
    assert leading_layer(np.array([0.5, 0.2]), None, np.array([0.31, 0.1]), np.array([0.7, 0.3])) == 0
    assert leading_layer(np.array([0.5, 0.2]), None, np.array([0.29, 0.1]), np.array([0.7, 0.3])) is None


def test_weak_codes_on_few_items_are_spread_end_to_end():
    """On 100 items, two noisy codes of a binary factor whose best dims differ 2.25-fold: the intervals overlap, so
    the factor is spread; without intervals (no resamples) the point estimates alone would name ``a``."""
    rng = np.random.default_rng(2)
    n = 100
    factors = rng.integers(0, 2, size=(n, 1))
    codes = np.hstack([factors + rng.normal(0, 0.7, (n, 1)), factors + rng.normal(0, 2.0, (n, 1))])
    kw = {"groups": [("a", [0]), ("b", [1])], "dci_estimator": "lda", "train_frac": 0.5}
    a = evaluate_all(codes, factors, **kw)["assignment"]
    assert a["predicted"] == [True]
    best, lo, hi = (np.array(v)[:, 0] for v in (a["best_unit_nmi"], *a["best_unit_nmi_interval"].values()))
    assert best[0] >= 2 * best[1] and lo[0] <= hi[1]
    assert a["assigned_layer"] == {"factor_0": SPREAD}
    point = evaluate_all(codes, factors, bootstrap_resamples=0, **kw)["assignment"]
    assert point["assigned_layer"] == {"factor_0": "a"} and point["bootstrap"] is None


def test_bootstrap_of_the_mi_matches_a_direct_resample():
    """Each bootstrap draw is the plug-in MI of the items drawn (with their bins from all items): a resample by
    weights equals the MI of the rows repeated by those weights."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 2))
    y = rng.integers(0, 3, size=(50, 1))
    bins = discretize(x, 5)
    draws = bootstrap_mi(bins, y, [3], 5, 3, seed=7)
    counts = np.random.default_rng([7, 2]).multinomial(50, np.full(50, 1 / 50), size=3)
    for r in range(3):
        rows = np.repeat(np.arange(50), counts[r])
        assert np.allclose(draws[r], binned_mi(bins[rows], y[rows], [3], 5))


def test_explained_share_decides_the_active_dims(data):
    """A layer whose code has scale 0.05 (variance 0.004 across items, below Burda et al.'s 0.01) but which x fully
    determines: given the explained shares, it is active and takes the factor it carries; the criterion is recorded."""
    factors, perfect, _, _ = data
    small = 0.05 * (factors[:, 1:] + np.random.default_rng(5).normal(0.0, 0.02, size=(N, 1)))
    codes, groups = np.hstack([perfect, small]), [("z1", [0]), ("z2", [1])]
    old = evaluate_all(codes, factors, groups=groups, factor_names=NAMES, dci_estimator="lda")
    assert old["active"]["dims"] == [0] and old["active"]["criterion"] == "mean_variance"
    res = evaluate_all(codes, factors, groups=groups, factor_names=NAMES, dci_estimator="lda", explained_share=[1, 1])
    assert res["active"]["dims"] == [0, 1] and res["active"]["criterion"] == "explained_share"
    assert res["settings"]["active_criterion"] == "explained_share" and res["active"]["explained_share"] == [1.0, 1.0]
    assert res["assignment"]["assigned_layer"] == {"encoded": "z1", "chance": "z2"}
    with pytest.raises(ValueError, match="explained_share"):
        evaluate_all(codes, factors, explained_share=[1.0])
