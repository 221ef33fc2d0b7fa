"""What every lowshot classifier shares, as a scikit-learn classifier: the MSN row preprocessing, input
validation with errors in words, labels -> class codes, and ``predict``/``decision_function`` from one score per
class. The logistic probe and the neighbour classifiers subclass :class:`ScoreClassifier`, so ``clone``,
``Pipeline``, ``GridSearchCV`` and ``cross_val_score`` take them.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from lowshot.errors import BadInputError


def preprocess(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """cyanure ``preprocess(centering=True, normalize=True, columns=False)``: subtract each row's own mean (one
    scalar per sample), then scale each row to unit L2 norm. Returns float32."""
    x = x.to(torch.float32) if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x), dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class EstimatorInputError(BadInputError, ValueError):
    """Data or a hyper-parameter an estimator cannot use: a lowshot error (one line at the command line) that is
    also the ``ValueError`` scikit-learn's conventions ask of an estimator."""


class ScoreClassifier(ClassifierMixin, BaseEstimator):
    """What the probe and the neighbour classifiers share, as a scikit-learn classifier: input validation, row
    preprocessing, labels -> class codes, and ``predict``/``decision_function`` from one score per class
    (``class_scores``); ``score`` (top-1 accuracy) is scikit-learn's.

    Subclasses compute ``_scores(rows)``, an (n, n_classes) array over ``classes_``, from validated rows."""

    preprocess: bool

    def _fit_rows(self, x, y) -> tuple[torch.Tensor, np.ndarray]:
        """Validate the training data; set ``n_features_in_`` and ``classes_`` (at least two); return the rows,
        prepared, and each label's index into ``classes_``."""
        with _lowshot_errors():
            x, y = validate_data(self, x, y, dtype=np.float32)
            kind = type_of_target(y, input_name="y")
        # check_classification_targets' test and wording, without its warning when most labels are distinct (every
        # 1-shot subset's are)
        if kind not in ("binary", "multiclass"):
            raise EstimatorInputError(f"Unknown label type: {kind}: {type(self).__name__} needs class labels, "
                                      "not continuous values")
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise EstimatorInputError(f"{type(self).__name__} cannot fit one class: the training labels need two "
                                      f"or more (got only {self.classes_[0]!r})")
        return self._prepare(x), codes

    def _test_rows(self, x) -> torch.Tensor:
        check_is_fitted(self)
        with _lowshot_errors():
            x = validate_data(self, x, dtype=np.float32, reset=False)
        return self._prepare(x)

    def _prepare(self, x: np.ndarray) -> torch.Tensor:
        if self.preprocess:
            return preprocess(x)
        return torch.from_numpy(x if x.flags.writeable else x.copy())  # torch refuses read-only memory

    def _scores(self, rows: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def class_scores(self, x) -> np.ndarray:
        """One score per sample and class of ``classes_``, shape (n, n_classes) also for two classes (the
        protocol ranks every class: top-5, the true class's rank)."""
        return self._scores(self._test_rows(x))

    def decision_function(self, x) -> np.ndarray:
        """``class_scores``; with two classes, scikit-learn's 1-D form: class 1's score minus class 0's (in float64,
        exact for float32 scores, so its sign is ``predict``'s choice)."""
        scores = self.class_scores(x)
        if scores.shape[1] == 2:
            return scores[:, 1].astype(np.float64) - scores[:, 0]
        return scores

    def predict(self, x) -> np.ndarray:
        best = self.class_scores(x).argmax(axis=1)
        return self.classes_[best]


@contextmanager
def _lowshot_errors():
    """scikit-learn's validation errors (NaN, wrong shape, one feature count in fit and another later) raised as
    :class:`EstimatorInputError`: a lowshot error the command line reports in words. A first line that is a whole
    sentence is the message ("Input X contains NaN."; the lines after it suggest other scikit-learn estimators);
    otherwise the message is kept whole ("Expected 2D array, got 1D array instead:", the array, what to do)."""
    try:
        yield
    except EstimatorInputError:
        raise
    except ValueError as error:
        first = str(error).strip().split("\n", 1)[0]
        raise EstimatorInputError(first if first.endswith(".") else str(error)) from error

