"""The MSN linear probe: rows centred and L2-normalised, multinomial logistic regression, no intercept, and the
choice of lambda by cross-validation inside the labelled subset (``lam="auto"``).

Objective (MSN ``logistic_eval.py``: cyanure's mean log-loss with ``lambd / n``, i.e.)::

    sum_i  -log softmax(W x_i)[y_i]  +  (lam / 2) * ||W||^2        (scikit-learn: C = 1 / lam)

solved by :mod:`lowshot.classify.solver` (``backend="torch"``, the default, or ``"sklearn"``, the reference).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from lowshot.classify.base import EstimatorInputError, ScoreClassifier, preprocess
from lowshot.classify.flushed import run_flushed
from lowshot.classify.solver import SKLEARN_TOL, TORCH_TOL, fit_sklearn, fit_torch, objective
from lowshot.config import BACKENDS, DEFAULT_LAMBDA

# lam="auto": nine values half a decade apart, centred on the protocol's default (DEFAULT_LAMBDA x 10^-2 … 10^2)
LAMBDA_GRID = tuple(float(f"{DEFAULT_LAMBDA * 10.0 ** (k / 2):.6g}") for k in range(-4, 5))
MAX_FOLDS = 5
# Cross-validation is trusted from this many images per class: with two, each training fold holds one image per
# class (a 1-shot problem, not the subset's) and the CV accuracy is two held-out images per class, so its ranking
# of the grid is noise; the default is used and the row says why.
MIN_CV_SHOTS = 3
# The one-standard-error rule: a value is as good as the best when its CV accuracy is below the best's by at most
# this many standard errors of the paired difference (see select_lambda).
CV_STANDARD_ERRORS = 1.0
# Cross-validation fits only rank the lambda grid: a certified 1e-4 gap is enough for that (the certificate is
# conservative); the final fit uses TORCH_TOL.
CV_TOL = 1e-4


class LogisticProbe(ScoreClassifier):
    """Multinomial logistic regression without intercept, a scikit-learn classifier.

    ``coef_`` has shape (n_classes, dim); ``classes_`` are the labels seen in ``fit``; ``objective_`` is the
    summed log-loss + lam/2 ||W||^2 at the solution, in float64, computed when first read (the probe keeps its
    training features for it: cross-validation's fits never read it, and at ImageNet's 1% subset each such value
    is an n x 1,000 float64 product and ~200 MB of fresh buffers); ``n_iter_`` the solver's iterations.
    ``fit(x, y, coef_init=W)`` starts the torch solver from W (classes x dim), e.g. a nearby lam's solution.

    ``tol`` (None: the backend's default): for ``torch`` the relative optimality gap the solver certifies before
    it stops (``TORCH_TOL``; ``gap_bound_`` is the bound reached: objective_ <= (1 + gap_bound_) x the optimum, up
    to float32 rounding of the gradient); for ``sklearn`` its own ``tol`` (``SKLEARN_TOL``).
    """

    def __init__(self, lam: float = DEFAULT_LAMBDA, *, backend: str = "torch", max_iter: int = 1000,
                 tol: float | None = None, preprocess: bool = True):
        self.lam = lam
        self.backend = backend
        self.max_iter = max_iter
        self.tol = tol
        self.preprocess = preprocess

    def fit(self, x, y, *, coef_init: np.ndarray | None = None) -> LogisticProbe:
        if not (isinstance(self.lam, numbers.Real) and self.lam > 0):
            raise EstimatorInputError(f"--lambda {self.lam}: must be positive")
        if self.backend not in BACKENDS:
            raise EstimatorInputError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        xt, codes = self._fit_rows(x, y)
        if self.backend == "sklearn":
            tol = SKLEARN_TOL if self.tol is None else self.tol
            coef, n_iter = fit_sklearn(xt.numpy(), codes, self.lam, self.max_iter, tol)
        else:
            tol = TORCH_TOL if self.tol is None else self.tol
            # on the thread that flushes denormals to zero (lowshot/classify/flushed.py): a fit's softmax makes them
            coef, n_iter, _, self.gap_bound_ = run_flushed(fit_torch, xt, torch.as_tensor(codes), self.lam,
                                                           self.max_iter, tol, coef_init)
        self.coef_ = coef
        self.n_iter_ = n_iter
        self._objective = None
        self._training = (xt, codes)
        return self

    @property
    def objective_(self) -> float:
        """The objective at ``coef_`` in float64, as for scikit-learn's solution (float32 logits put ~1e-6 of
        rounding into the value itself on nearly separable problems, more than the certified gap)."""
        check_is_fitted(self)
        if self._objective is None:
            xt, codes = self._training
            self._objective = objective(self.coef_, xt, codes, self.lam)
        return self._objective

    def _scores(self, rows: torch.Tensor) -> np.ndarray:
        return (rows @ torch.as_tensor(self.coef_).T).numpy()

    def predict_proba(self, x) -> np.ndarray:
        """The model's class probabilities: the softmax of ``class_scores``, in float64 (rows sum to 1)."""
        return torch.softmax(torch.as_tensor(self.class_scores(x), dtype=torch.float64), dim=1).numpy()



def stratified_folds(codes: np.ndarray, n_folds: int, seed: int = 0) -> list[np.ndarray]:
    """Assign each class's items round-robin to ``n_folds`` folds in a seeded order; returns held-out indices."""
    rng = np.random.Generator(np.random.PCG64(seed))
    fold_of = np.empty(len(codes), dtype=np.int64)
    for c in np.unique(codes):
        members = np.flatnonzero(codes == c)
        members = members[rng.permutation(len(members))]
        fold_of[members] = (np.arange(len(members)) + rng.integers(n_folds)) % n_folds
    return [np.flatnonzero(fold_of == f) for f in range(n_folds)]


@dataclass(frozen=True)
class LambdaChoice:
    """What :func:`select_lambda` found: the chosen ``lam``; ``source``, how (``cv``, or ``default (…)`` with the
    reason CV was not used); the CV accuracy of each grid value (None without CV); and each value's solution
    averaged over the folds (a warm start for the final fit)."""

    lam: float
    scores: dict[float, float] | None
    coefs: dict[float, np.ndarray] = field(default_factory=dict)
    source: str = "cv"


def select_lambda(x, y, *, grid: Sequence[float] = LAMBDA_GRID, backend: str = "torch", seed: int = 0,
                  default: float = DEFAULT_LAMBDA, tol: float | None = None, min_shots: int = MIN_CV_SHOTS,
                  standard_errors: float = CV_STANDARD_ERRORS) -> LambdaChoice:
    """Choose lam by stratified cross-validation on the labelled training subset only (never the test labels).

    Folds: min(5, smallest class count). With fewer than ``min_shots`` images in some class (1-shot: CV is
    impossible; 2-shot: see MIN_CV_SHOTS) ``default`` is returned, with ``None`` scores and the reason in
    ``source``. Otherwise every held-out image's prediction is kept, and the value chosen is, among those whose
    CV accuracy is within ``standard_errors`` standard errors of the best (:func:`within_standard_errors`), the
    one closest to ``default`` in log lam: on a few dozen held-out images the grid's accuracies differ by an
    image or two, and taking the maximum then picks an extreme lam by chance. Each fold fits the grid from strong
    to weak regularisation, warm-started along the path; ``tol`` defaults to ``CV_TOL``."""
    xt = preprocess(x)
    codes = np.unique(np.asarray(y), return_inverse=True)[1]
    smallest = int(np.bincount(codes).min())
    if smallest < 2:
        return LambdaChoice(default, None, source="default (CV needs 2+ images per class)")
    if smallest < min_shots:
        return LambdaChoice(default, None, source=f"default ({smallest} images per class, too few for CV)")
    n_folds = min(MAX_FOLDS, smallest)
    folds = stratified_folds(codes, n_folds, seed)
    correct = {lam: np.zeros(len(codes), dtype=bool) for lam in grid}
    coefs: dict[float, np.ndarray] = {}
    path = sorted(grid, reverse=True)  # strong to weak regularisation, each fit warm-started from the path so far
    for held in folds:
        train = np.setdiff1d(np.arange(len(codes)), held)
        x_train, y_train = xt[train], codes[train]
        solutions: list[np.ndarray] = []
        for i, lam in enumerate(path):
            probe = LogisticProbe(lam, backend=backend, preprocess=False,
                                  tol=tol if tol is not None or backend != "torch" else CV_TOL)
            probe.fit(x_train, y_train, coef_init=_extrapolate(path[:i], solutions, lam))
            solutions = solutions + [probe.coef_] if len(probe.classes_) == codes.max() + 1 else []
            correct[lam][held] = probe.predict(xt[held]) == codes[held]
            if solutions:
                coefs[lam] = coefs.get(lam, 0.0) + probe.coef_ / n_folds
    eligible = within_standard_errors(correct, standard_errors)
    # the closest to the default in decades, rounded so that values half a decade either side tie: the larger wins
    chosen = min(sorted(eligible, reverse=True), key=lambda lam: round(abs(math.log10(lam / default)), 6))
    return LambdaChoice(chosen, {lam: float(c.mean()) for lam, c in correct.items()}, coefs)


def within_standard_errors(correct: dict[float, np.ndarray], standard_errors: float = CV_STANDARD_ERRORS
                           ) -> list[float]:
    """The grid values as good as the best on the CV evidence: ``correct[lam]`` says which held-out images lam's
    fits predicted right; lam is kept when the best's accuracy exceeds its own by at most ``standard_errors``
    standard errors of the per-image difference (paired: every value is scored on the same images, and most
    predictions agree, so a difference of one image is within one standard error, and of a few is not)."""
    accuracy = {lam: float(np.mean(c)) for lam, c in correct.items()}
    best = correct[max(accuracy, key=accuracy.get)].astype(np.float64)
    kept = []
    for lam, c in correct.items():
        diff = best - c
        error = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
        if diff.mean() <= standard_errors * error + 1e-12:
            kept.append(lam)
    return kept


def _extrapolate(lams: Sequence[float], solutions: list[np.ndarray], lam: float) -> np.ndarray | None:
    """Warm start for ``lam`` from the solutions at the previous ``lams`` of the path: the secant through the
    last two in log(lam) (the path is smooth in log lam), or the last one."""
    if not solutions:
        return None
    if len(solutions) < 2:
        return solutions[-1]
    ratio = np.log(lam / lams[-1]) / np.log(lams[-1] / lams[-2])
    return solutions[-1] + ratio * (solutions[-1] - solutions[-2])

