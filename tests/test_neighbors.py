import numpy as np
import pytest

from lowshot.classify.base import preprocess
from lowshot.classify.neighbors import KNNClassifier, NearestClassMean, leave_one_out_k
from lowshot.errors import BadInputError

from .test_probe import blobs


@pytest.mark.parametrize("make", [KNNClassifier, NearestClassMean])
def test_neighbors_classify_separable_blobs_well_and_are_sklearn_shaped(make):
    x, y = blobs(n_classes=5, per_class=10, dim=32, spread=0.5)
    x_test, y_test = blobs(n_classes=5, per_class=20, dim=32, spread=0.5, seed=0)
    model = make().fit(x, y + 3)
    assert list(model.classes_) == [3, 4, 5, 6, 7]
    assert model.score(x_test, y_test + 3) > 0.95  # chance is 0.2
    assert model.decision_function(x_test).shape == (100, 5)
    with pytest.raises(BadInputError):
        make().fit(x[:10], np.zeros(10))  # one class


def test_knn_with_one_image_per_class_uses_k_equal_1_and_recovers_its_training_points():
    x, y = blobs(n_classes=8, per_class=1, dim=16)
    knn = KNNClassifier().fit(x, y)
    assert knn.k_ == 1 and knn.loo_scores_ is None
    assert knn.score(x, y) == 1.0


def test_knn_k_is_chosen_by_leave_one_out_on_training_labels_only():
    rng = np.random.default_rng(1)
    x, y = blobs(n_classes=3, per_class=30, dim=8, spread=1.5, seed=1)
    noisy = y.copy()
    flip = rng.choice(len(y), size=15, replace=False)
    noisy[flip] = (noisy[flip] + 1) % 3  # label noise: single neighbours lie, a vote of many does not
    knn = KNNClassifier().fit(x, noisy)
    assert knn.k_ > 1 and set(knn.loo_scores_) == {1, 3, 5, 10, 20}
    assert knn.k_ == max(knn.loo_scores_, key=lambda k: (knn.loo_scores_[k], -k))
    assert (knn.k_, knn.loo_scores_) == leave_one_out_k(preprocess(x), noisy)  # a function of the train data alone
    k_before = knn.k_
    for seed in (2, 3):  # scoring on test sets never changes k
        x_test, y_test = blobs(n_classes=3, per_class=10, dim=8, spread=1.5, seed=seed)
        knn.score(x_test, y_test)
    assert knn.k_ == k_before


def test_knn_fixed_k_and_bad_k():
    x, y = blobs(n_classes=3, per_class=4)
    assert KNNClassifier(k=100).fit(x, y).k_ == 12  # capped at the training size
    with pytest.raises(BadInputError, match="k 0"):
        KNNClassifier(k=0).fit(x, y)


def test_knn_vote_ties_go_to_the_more_similar_class():
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    knn = KNNClassifier(k=2, preprocess=False).fit(x, [0, 1, 2])
    query = np.array([[0.2, 0.9, 0.0]])  # classes 1 and 0 each get one vote; class 1 is more similar
    assert knn.predict(query)[0] == 1


def test_ncm_uses_the_normalised_class_means():
    x = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    ncm = NearestClassMean(preprocess=False).fit(x, [0, 0, 1, 1])
    np.testing.assert_allclose(np.linalg.norm(ncm.means_.numpy(), axis=1), 1.0, atol=1e-6)
    assert list(ncm.predict(np.array([[1.0, 0.1], [-0.1, 1.0]]))) == [0, 1]


def test_knn_bad_k_grid_is_refused_in_fit_not_in_the_constructor():
    x, y = blobs(n_classes=3, per_class=4)
    knn = KNNClassifier(k_grid=(0, 3))  # hyper-parameters are stored as given (scikit-learn's clone needs that)
    assert knn.k_grid == (0, 3)
    with pytest.raises(BadInputError, match="k_grid"):
        knn.fit(x, y)
    assert KNNClassifier(k_grid=[3]).fit(x, y).k_ == 3  # any sequence of positive integers
