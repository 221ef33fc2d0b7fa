"""The three classifiers are scikit-learn estimators: ``check_estimator`` passes, and ``clone``, ``Pipeline``,
``GridSearchCV`` and ``cross_val_score`` work on them, giving the numbers a fit by hand gives.

Real data: scikit-learn's bundled digits (8 x 8 handwritten digits, 64 features), 10 training images per class.
``fixtures/digits_estimators.npz`` pins each classifier's fit on it (the probe's coefficients, every classifier's
test predictions, the k leave-one-out chose): write it again with :func:`record` only when a change is meant to
move those numbers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from lowshot.classify.base import EstimatorInputError, preprocess
from lowshot.classify.logistic import LogisticProbe
from lowshot.classify.neighbors import KNNClassifier, NearestClassMean
from lowshot.classify.solver import TORCH_TOL
from lowshot.errors import BadInputError
from lowshot.protocol import run_probe

from .synthetic import pair

FIXTURE = Path(__file__).parent / "fixtures" / "digits_estimators.npz"
ESTIMATORS = [LogisticProbe, KNNClassifier, NearestClassMean]


def digits(per_class: int = 10):
    """The first ``per_class`` digits of each class to train on; every 4th of the rest to test on (425)."""
    x, y = load_digits(return_X_y=True)
    first = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(y)), first)[::4]
    return x[first], y[first], x[rest], y[rest]


def record(path: Path = FIXTURE) -> None:
    """Write the pinned fits (``python -c "from tests.test_sklearn_api import record; record()"``)."""
    x, y, x_test, _ = digits()
    probe, knn = LogisticProbe().fit(x, y), KNNClassifier().fit(x, y)
    np.savez_compressed(path, logistic_coef=probe.coef_, logistic_predicted=probe.predict(x_test).astype(np.int8),
                        knn_k=knn.k_, knn_predicted=knn.predict(x_test).astype(np.int8),
                        ncm_predicted=NearestClassMean().fit(x, y).predict(x_test).astype(np.int8))


def checks_failed(estimator) -> set[str]:
    results = check_estimator(estimator, on_fail=None)
    assert len(results) >= 50  # the checks ran (not skipped as a whole)
    return {r["check_name"] for r in results if r["status"] == "failed"}


@pytest.mark.parametrize("make", ESTIMATORS)
def test_check_estimator_passes_every_check_without_row_preprocessing(make):
    assert checks_failed(make(preprocess=False)) == set()


@pytest.mark.parametrize("make", ESTIMATORS)
def test_check_estimator_with_row_preprocessing_fails_only_the_two_feature_accuracy_check(make):
    # check_classifiers_train fits 2-feature blobs: centring a row on its own mean leaves one number (x1 - x2)
    # and the sign of the other, too little for its accuracy bar. Every other check passes.
    assert checks_failed(make()) == {"check_classifiers_train"}


def test_fits_on_real_digits_give_the_pinned_numbers():
    x, y, x_test, _ = digits()
    pinned = np.load(FIXTURE)
    probe = LogisticProbe().fit(x, y)
    # Both solutions are certified within TORCH_TOL of the optimum's objective, which is lam-strongly convex:
    # ||W - W*||^2 <= 2 x gap / lam, so two of them are at most twice that apart (whatever the CPU's rounding).
    bound = 2 * math.sqrt(2 * TORCH_TOL * probe.objective_ / probe.lam)
    assert np.linalg.norm(probe.coef_ - pinned["logistic_coef"]) <= bound
    knn = KNNClassifier().fit(x, y)
    assert knn.k_ == int(pinned["knn_k"])
    for model, name in ((probe, "logistic"), (knn, "knn"), (NearestClassMean().fit(x, y), "ncm")):
        # float32 scores may move a near-tie by an image across CPUs (of 425)
        assert np.sum(model.predict(x_test) != pinned[f"{name}_predicted"]) <= 1, name


@pytest.mark.parametrize("make", ESTIMATORS)
def test_clone_copies_hyper_parameters_and_no_fitted_state(make):
    x, y, x_test, _ = digits()
    fitted = make(preprocess=False).fit(x, y)
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params() and copy.get_params()["preprocess"] is False
    with pytest.raises(NotFittedError):
        copy.predict(x_test)
    assert np.array_equal(copy.fit(x, y).predict(x_test), fitted.predict(x_test))


def test_pipeline_scales_then_probes_as_the_two_steps_by_hand():
    x, y, x_test, y_test = digits()
    pipeline = make_pipeline(StandardScaler(), LogisticProbe(lam=0.01)).fit(x, y)
    scaler = StandardScaler().fit(x)
    by_hand = LogisticProbe(lam=0.01).fit(scaler.transform(x), y)
    assert np.array_equal(pipeline.predict(x_test), by_hand.predict(scaler.transform(x_test)))
    assert pipeline.score(x_test, y_test) == by_hand.score(scaler.transform(x_test), y_test) > 0.7


def test_grid_search_over_lambda_refits_the_best_on_all_training_data():
    x, y, x_test, _ = digits()
    folds = StratifiedKFold(3, shuffle=True, random_state=0)
    search = GridSearchCV(LogisticProbe(), {"lam": [1e-4, 0.0025, 0.1, 10.0]}, cv=folds).fit(x, y)
    best = search.best_params_["lam"]
    assert search.cv_results_["mean_test_score"].max() == search.best_score_
    assert np.array_equal(search.predict(x_test), LogisticProbe(lam=best).fit(x, y).predict(x_test))
    assert search.cv_results_["mean_test_score"][-1] < search.best_score_  # lam = 10 underfits


@pytest.mark.parametrize("make", ESTIMATORS)
def test_cross_val_score_is_the_fold_by_fold_accuracy(make):
    x, y, _, _ = digits()
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = cross_val_score(make(), x, y, cv=folds)
    by_hand = [make().fit(x[train], y[train]).score(x[test], y[test]) for train, test in folds.split(x, y)]
    assert scores.tolist() == by_hand and min(scores) > 0.5  # chance is 0.1


@pytest.mark.parametrize("make", ESTIMATORS)
def test_string_labels_and_two_class_scores_follow_scikit_learn(make):
    x, y, x_test, _ = digits()
    keep = y < 2
    names = np.array(["zero", "one"])[y[keep]]
    model = make().fit(x[keep], names)
    assert model.classes_.tolist() == ["one", "zero"] and model.n_features_in_ == 64
    decision = model.decision_function(x_test)
    assert decision.shape == (len(x_test),)  # two classes: one score, for classes_[1]
    assert np.array_equal(model.predict(x_test), model.classes_[(decision > 0).astype(int)])
    scores = model.class_scores(x_test)  # the protocol's view: a column per class
    assert scores.shape == (len(x_test), 2)
    np.testing.assert_array_equal(decision, scores[:, 1].astype(np.float64) - scores[:, 0])


def test_probe_probabilities_are_the_softmax_of_its_scores():
    x, y, x_test, _ = digits()
    probe = LogisticProbe().fit(x, y)
    proba = probe.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    assert np.array_equal(probe.classes_[proba.argmax(axis=1)], probe.predict(x_test))
    assert not hasattr(KNNClassifier(), "predict_proba")  # votes are not probabilities


def test_protocol_runs_on_a_two_class_dataset():
    # decision_function is 1-D for two classes; the protocol ranks classes from class_scores' columns
    results = run_probe(*pair(classes=2, per_class=6, test_per_class=5, signal=3.0), shots=(1, 2), percents=(),
                        seeds=1, classifiers=("logistic", "knn", "ncm"))
    assert len(results.rows) == 6 and all(r["top1"] > 50 for r in results.rows)


@pytest.mark.parametrize("make", ESTIMATORS)
def test_bad_data_is_a_lowshot_error_that_names_the_problem(make):
    x, y, x_test, _ = digits()
    bad = x.copy()
    bad[3, 5] = np.nan
    with pytest.raises(BadInputError, match="Input X contains NaN") as error:
        make().fit(bad, y)
    assert str(error.value) == "Input X contains NaN."  # not scikit-learn's advice on other estimators
    with pytest.raises(ValueError, match="cannot fit one class"):  # also a ValueError, as scikit-learn expects
        make().fit(x[:5], np.zeros(5))
    model = make().fit(x, y)
    with pytest.raises(EstimatorInputError, match="X has 10 features, but .* is expecting 64"):
        model.predict(x_test[:, :10])
    with pytest.raises(TypeError, match="Sparse data was passed"):
        from scipy import sparse

        make().fit(sparse.csr_matrix(x), y)


def test_warm_start_is_a_fit_parameter_on_prepared_rows():
    # the protocol's call: rows prepared once, preprocess=False, coef_init from a nearby solution
    x, y, _, _ = digits()
    rows = preprocess(x)
    cold = LogisticProbe(preprocess=False).fit(rows, y)
    warm = LogisticProbe(preprocess=False).fit(rows, y, coef_init=cold.coef_)
    assert warm.n_iter_ < cold.n_iter_ / 4 and warm.objective_ <= cold.objective_ * (1 + 1e-6)
    assert np.array_equal(LogisticProbe().fit(x, y).coef_, cold.coef_)  # the same rows as preprocess=True's
