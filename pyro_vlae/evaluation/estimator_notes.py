"""The estimator notes of the disentanglement metrics: how :mod:`~pyro_vlae.evaluation.disentangle` computes MIG,
MIG-sup, SAP and DCI, where it follows disentanglement_lib and where it differs (samples, factors, degenerate cases,
variants, cost), and how the per-layer scores are formed.  The text is :data:`ESTIMATOR_NOTES`, appended to the
docstring of :mod:`~pyro_vlae.evaluation.disentangle`, which re-exports it.
"""

__all__ = ["ESTIMATOR_NOTES"]

ESTIMATOR_NOTES = """
Estimator notes
---------------
Reference. MIG, SAP and DCI are disentanglement_lib's ``evaluation/metrics/mig.py``, ``sap_score.py`` and ``dci.py``
(with ``utils.py``), computed with the same scikit-learn estimators. They differ from it only in where the samples
come from and in degenerate cases (one code dim, one factor, constant factors), as stated below.

Samples. disentanglement_lib draws fresh samples of the ground-truth data for each metric (its unsupervised-study
configs: MIG on ``num_train=10000`` points; SAP and DCI fit on ``num_train=10000`` and score on ``num_test=5000``
other points; ``batch_size=16`` only groups the encoder calls). Here the codes are one fixed set: at most
``max_samples`` (default 10,000) rows are drawn without replacement with ``numpy.random.default_rng([seed, 0])``
(``max_samples=None`` keeps all; at least 20 rows are required). MIG uses all kept rows; SAP and DCI split them at
random (``default_rng([seed, 1])``) into ``round(train_frac * N)`` training rows (default ``train_frac=0.8``) and
the rest as test rows. Passing 15,000 rows with ``max_samples=None, train_frac=2/3`` gives disentanglement_lib's
SAP and DCI sizes (MIG then uses all 15,000 rows, where disentanglement_lib uses 10,000). The separate seed
streams make ``evaluate_all`` give exactly the numbers of the individual functions.

Factors. All factors are discrete indices; each column is re-encoded to ``0..C_k-1`` (any integer labels work, and
integral floats are accepted; the order of the values is kept). Continuous factors must be discretised first
(disentanglement_lib's ``continuous_factors=True`` path of SAP is not implemented). A factor with fewer than two
values (in all rows for MIG, in the training rows for SAP and DCI) carries no information: it gets ``None`` in every
per-factor list and is left out of all averages, where disentanglement_lib would divide by zero or fail to fit.

MIG. Each code dim is cut into ``num_bins`` (default 20) equal-width bins over its ``[min, max]``, as
disentanglement_lib's ``histogram_discretizer`` does (``numpy.digitize`` against the left edges of
``numpy.histogram``). ``I(c_j; v_k)`` is the plug-in mutual information of the joint histogram and ``H(v_k)`` the
plug-in factor entropy, both in nats (``sklearn.metrics.mutual_info_score`` there), and
``MIG = mean_k (I_(1)k - I_(2)k) / H(v_k)`` with ``I_(1)k >= I_(2)k`` the two largest over code dims (``I_(2)k = 0``
when ``D = 1``). Equal-width bins make MIG invariant to per-dim affine maps, sign flips included.
``binning="quantile"`` (a variant, not disentanglement_lib's) puts the edges at empirical quantiles, which makes it
invariant to any strictly increasing map and robust to outliers. With ``B`` bins a factor with ``C > B`` values keeps
at most about ``log B / log C`` of its entropy (0.81 for 40 values and 20 bins), so even a perfect code scores MIG
below 1 on such factors; ``num_bins >= max C`` removes that cap at the price of a larger plug-in bias (about
``(B-1)(C-1) / (2 N)`` nats for an independent dim). A constant code dim falls into one bin and has zero MI.

MIG-sup (Li et al. 2020). With ``n_jk = I(c_j; v_k) / H(v_k)``, each code dim scores ``n_j(1) - n_j(2)``, the gap
between its two largest normalised MIs over factors (the second is 0 when ``K = 1``), and ``MIG-sup`` is the mean over
all ``D`` code dims. Dims with no information score about 0 and pull the mean down, so ``mig_sup_active`` also
averages over the active dims only, those with ``max_k n_jk > active_threshold`` (default 0.1).

SAP. For each code dim ``j`` and factor ``k``, ``sklearn.svm.LinearSVC(C=0.01, class_weight="balanced")``
(one-vs-rest, squared hinge loss, L2 penalty on the weight and, as liblinear does, on the intercept) is fitted on the
single feature ``c_j`` of the training rows and scored by its plain accuracy on the test rows: ``S_jk``.
``SAP = mean_k (S_(1)k - S_(2)k)``, the gap between the two best dims (disentanglement_lib's
``continuous_factors=False`` path; ``S_(2)k = 0`` when ``D = 1``, where disentanglement_lib fails). What follows from
the definition: accuracies are not adjusted for chance, so a dim that knows nothing of a uniform factor with ``C``
values still scores about ``1/C`` and a perfectly disentangled code scores about ``1 - 1/C`` (0.5 on binary factors),
not 1; one linear feature separates only a few classes one-vs-rest, so factors with many values (orientation,
position) score low even on a perfect code; and because the penalty acts on raw weights with ``C = 0.01``, SAP is
invariant to permuting and sign-flipping code dims but not to rescaling or shifting them (a dim of small scale cannot
grow a weight large enough). The penalty is fixed while the loss sums over the training rows, so SAP also depends on
their number: a perfect code of the sprites factors scores 0.17 with 4,000 training rows and 0.24 with
disentanglement_lib's 10,000, so compare with published numbers at their sizes. ``standardize=True`` (a variant, not
disentanglement_lib's) first z-scores each dim with its training mean and standard deviation, which makes SAP invariant
to per-dim affine maps. scikit-learn >= 1.5 picks liblinear's primal solver for this problem (``dual="auto"``) where
older versions, used by disentanglement_lib, ran the dual one; both minimise the same objective and agree up to the
solver tolerance (on that sprites code one test prediction in 1,000 differs, and SAP is the same).

DCI. For each factor, ``sklearn.ensemble.GradientBoostingClassifier()`` with scikit-learn's defaults (100 boosting
stages of depth-3 regression trees, learning rate 0.1, log-loss; one tree per class and stage) is fitted on all code
dims of the training rows, with ``random_state=seed`` (disentanglement_lib leaves it unset; it only breaks ties
between equally good splits). The importance ``R_jk = |feature_importances_|`` (each column sums to 1);
``informativeness`` is the mean test accuracy over factors (``informativeness_train`` on the training rows). With
``H_B`` the entropy in base ``B`` of a vector normalised to sum 1: ``D_j = 1 - H_K(R_j. + 1e-11)``,
``disentanglement = sum_j rho_j D_j`` with ``rho_j = sum_k R_jk / sum_jk R_jk``; ``C_k = 1 - H_D(R_.k + 1e-11)``,
``completeness = sum_k w_k C_k`` with ``w_k = sum_j R_jk / sum_jk R_jk`` (the mean over factors, as each column sums
to 1). The ``1e-11`` makes a dim with no importance count as uniform (``D_j = 0``, weight 0). With one factor (or one
code dim) the entropy term is taken as 0, where disentanglement_lib's base-1 entropy is undefined. ``chance`` is the
frequency of the most frequent test class and ``informativeness_normalized = mean_k (acc_k - chance_k) /
(1 - chance_k)`` (0 at chance, 1 perfect; not in disentanglement_lib). Cost: on the sprites factors (3 + 6 + 40 + 32 +
32 = 113 classes, so 11,300 trees per fit) with 4,000 training rows and 5 code dims one fit took 100 s on a busy CPU
core, and ``evaluate_all`` refits on each layer. :func:`dci_lda` (a variant, not disentanglement_lib's) takes seconds:
the same formulas with importances ``mean_c |w_cj - mean_c' w_c'j|`` (normalised per factor) and accuracies of a
closed-form linear discriminant analysis on the standardised codes (``w_c = (S + ridge I)^-1 mu_c``, pooled
within-class covariance ``S``, class means ``mu_c``, ``ridge`` default ``1e-6``).

Layers. ``evaluate_all`` computes disentanglement_lib's scores on all code dims (``overall``), and per group of
code dims (a layer) only numbers that can vary with the data, over active dims: a dim is active when x explains over
1 % of its variance (``explained_share``, passed by the evaluation; see ``likelihood.explained_share``), or, without
it, when the variance of its values across the kept rows exceeds ``active_variance`` (default 0.01, Burda et al.'s,
which suits unit-scale codes only); equal-width bins ignore scale, so the near-constant posterior means of a
collapsed layer would otherwise look informative. Per layer: MIG and MIG-sup from the rows of the shared per-dim MI
matrix with inactive dims counted as 0; SAP from the rows of the shared SAP score matrix (its classifiers see one dim
each, so this equals a refit); DCI informativeness from the classifiers refitted on the layer's active dims (``None``
without any); and ``importance_share[k]``, the layer's share of factor ``k``'s importance in the DCI fit on all codes.
A layer's own DCI disentanglement and completeness are not computed (earlier versions did): with one or two dims per
layer they are fixed by the estimator, not the data (a single dim has ``D = 0`` and ``C = 1`` whatever it encodes).
``overall`` keeps every dim, as disentanglement_lib does; ``active["mig"]`` is the MIG of the active dims beside it.
The factor -> layer assignment (``best_unit_nmi``, ``mi_mass`` and ``importance_share`` matrices, bootstrap intervals
of the first two over resampled items, and the rules) is described in :mod:`.assignment`.
"""
