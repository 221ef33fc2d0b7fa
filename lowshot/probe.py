"""The MSN linear probe: rows centred and L2-normalised, multinomial logistic regression, no intercept.

Objective (MSN ``logistic_eval.py``: cyanure's mean log-loss with ``lambd / n``, i.e.)::

    sum_i  -log softmax(W x_i)[y_i]  +  (lam / 2) * ||W||^2        (scikit-learn: C = 1 / lam)

Solved by a full-batch L-BFGS in torch (``backend="torch"``, the default: analytic gradient, buffers reused, float32
matrix products on all cores with float64 sums) or by scikit-learn's lbfgs (``backend="sklearn"``, the reference).
scikit-learn's default ``tol=1e-4`` can stop at iteration 0 on many-class few-shot problems and return an all-zero
model; both backends here use tight tolerances. ``benchmarks/probe_speed.py`` compares the two.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import BACKENDS, DEFAULT_LAMBDA
from .errors import BadInputError

LAMBDA_GRID = tuple(float(f"{v:.6g}") for v in 10.0 ** np.arange(-4.0, 0.01, 0.5))  # 1e-4 … 1, for lam="auto"
MAX_FOLDS = 5
# torch backend: stop when two successive iterations each lower the objective by less than this fraction of it.
# 1e-6 stopped ~6e-5 short of the optimum on the 1,000-class 5-shot problem (as far short as scikit-learn at tol
# 1e-6); 1e-7 stopped within 1e-6 of it (benchmarks/probe_speed.py).
TORCH_TOL = 1e-7
# Cross-validation fits only rank the lambda grid: 1e-6 moved 5-fold CV accuracies by at most 0.2 points and took
# half the iterations on the 1,000-class 5-shot problem; the final fit uses TORCH_TOL.
CV_TOL = 1e-6
SKLEARN_TOL = 1e-6  # scikit-learn's gradient tolerance; its default 1e-4 returns a zero model (see above)
LBFGS_HISTORY = 10  # 20 pairs saved no iteration on the 1,000-class problems
ARMIJO = 1e-4  # sufficient-decrease constant of the backtracking line search (Nocedal & Wright, ch. 3)
MAX_BACKTRACKS = 30


def preprocess(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """cyanure ``preprocess(centering=True, normalize=True, columns=False)``: subtract each row's own mean (one
    scalar per sample), then scale each row to unit L2 norm. Returns float32."""
    x = x.to(torch.float32) if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x), dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ScoreClassifier:
    """What the probe and the neighbour classifiers share, scikit-learn style: row preprocessing, labels -> class codes,
    ``predict`` from ``decision_function``, and top-1 ``score``."""

    preprocess: bool

    def _prepare(self, x) -> torch.Tensor:
        return preprocess(x) if self.preprocess else torch.as_tensor(np.asarray(x), dtype=torch.float32)

    def _labels(self, y) -> np.ndarray:
        """Set ``classes_`` and return each label's index into it (at least two classes are needed)."""
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        if len(self.classes_) < 2:
            raise BadInputError(f"{type(self).__name__} needs at least two classes in the training labels")
        return codes

    def decision_function(self, x) -> np.ndarray:
        raise NotImplementedError

    def predict(self, x) -> np.ndarray:
        return self.classes_[self.decision_function(x).argmax(axis=1)]

    def score(self, x, y) -> float:
        """Top-1 accuracy (a fraction)."""
        return float(np.mean(self.predict(x) == np.asarray(y)))


class LogisticProbe(ScoreClassifier):
    """Multinomial logistic regression without intercept, scikit-learn style.

    ``coef_`` has shape (n_classes, dim); ``classes_`` are the labels seen in ``fit``; ``objective_`` is the
    summed log-loss + lam/2 ||W||^2 at the solution; ``n_iter_`` the solver's iterations.

    ``tol`` (None: the backend's default): for ``torch`` the relative decrease of the objective below which two
    successive iterations stop the solver (``TORCH_TOL``); for ``sklearn`` its own ``tol`` (``SKLEARN_TOL``).
    """

    def __init__(self, lam: float = DEFAULT_LAMBDA, *, backend: str = "torch", max_iter: int = 1000,
                 tol: float | None = None, preprocess: bool = True):
        self.lam = lam
        self.backend = backend
        self.max_iter = max_iter
        self.tol = tol
        self.preprocess = preprocess

    def fit(self, x, y, *, coef_init: np.ndarray | None = None) -> LogisticProbe:
        if not self.lam > 0:
            raise BadInputError(f"--lambda {self.lam}: must be positive")
        if self.backend not in BACKENDS:
            raise BadInputError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        xt = self._prepare(x)
        codes = self._labels(y)
        if self.backend == "sklearn":
            tol = SKLEARN_TOL if self.tol is None else self.tol
            coef, n_iter = _fit_sklearn(xt.numpy(), codes, self.lam, self.max_iter, tol)
            self.objective_ = objective(coef, xt, codes, self.lam)
        else:
            tol = TORCH_TOL if self.tol is None else self.tol
            coef, n_iter, self.objective_ = _fit_torch(xt, torch.as_tensor(codes), self.lam, self.max_iter, tol,
                                                       coef_init)
        self.coef_ = coef
        self.n_iter_ = n_iter
        return self

    def decision_function(self, x) -> np.ndarray:
        return (self._prepare(x) @ torch.as_tensor(self.coef_).T).numpy()


def objective(coef: np.ndarray, x: torch.Tensor, codes: np.ndarray, lam: float) -> float:
    """Summed log-loss + lam/2 ||W||^2, in float64 (for comparing solvers)."""
    w = torch.as_tensor(coef, dtype=torch.float64)
    logits = x.to(torch.float64) @ w.T
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(codes), reduction="sum")
    return float(loss + 0.5 * lam * (w * w).sum())


class _SoftmaxLoss:
    """Mean log-loss + reg/2 ||W||^2 and its gradient (softmax - one-hot)^T X / n + reg W, computed in place in
    one reused (n, classes) buffer: two matrix products and a few passes over the logits per evaluation."""

    def __init__(self, x: torch.Tensor, codes: torch.Tensor, reg: float, n_classes: int):
        self.x, self.n, self.reg = x, x.shape[0], reg
        self.codes = codes.view(-1, 1)
        self.rows = torch.arange(self.n)
        self.logits = torch.empty(self.n, n_classes, dtype=x.dtype)
        self.evaluations = 0

    def __call__(self, w: torch.Tensor, grad: torch.Tensor) -> float:
        """The objective at ``w`` (float64 sums); its gradient goes into ``grad``."""
        self.evaluations += 1
        z = torch.mm(self.x, w.T, out=self.logits)
        picked = z.gather(1, self.codes).sum(dtype=torch.float64)
        top = z.amax(dim=1, keepdim=True)
        z.sub_(top).exp_()
        total = z.sum(dim=1, keepdim=True)
        data = top.sum(dtype=torch.float64) + total.log().sum(dtype=torch.float64) - picked
        z.div_(total)  # softmax
        z[self.rows, self.codes.view(-1)] -= 1.0  # minus the one-hot labels
        torch.addmm(w, z.T, self.x, beta=self.reg, alpha=1.0 / self.n, out=grad)
        norm2 = torch.linalg.vector_norm(w, dtype=torch.float64) ** 2
        return float(data) / self.n + 0.5 * self.reg * float(norm2)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.view(-1), b.view(-1)))


def _lbfgs(loss: _SoftmaxLoss, w: torch.Tensor, *, max_iter: int, tol: float) -> tuple[torch.Tensor, float, int]:
    """Minimise ``loss`` from ``w``: L-BFGS two-loop recursion (``LBFGS_HISTORY`` pairs) with a backtracking
    Armijo line search that tries the unit quasi-Newton step first (the objective is strictly convex, so every
    accepted step gives a positive curvature pair). Returns (w, objective, iterations)."""
    grad, w_new, g_new = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)
    f = loss(w, grad)
    pairs: deque[tuple[torch.Tensor, torch.Tensor, float]] = deque(maxlen=LBFGS_HISTORY)
    quiet, n_iter = 0, 0
    while n_iter < max_iter:
        n_iter += 1
        d = grad.neg()
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * _dot(s, d)
            alphas.append(alpha)
            d.add_(y, alpha=-alpha)
        if pairs:
            s, y, _ = pairs[-1]
            d.mul_(_dot(s, y) / _dot(y, y))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas), strict=True):
            d.add_(s, alpha=alpha - rho * _dot(y, d))
        slope = _dot(grad, d)
        if slope >= 0:  # lost descent to rounding: restart from steepest descent
            pairs.clear()
            d, slope = grad.neg(), -_dot(grad, grad)
        if slope == 0:
            break  # zero gradient: at the optimum
        step = 1.0 if pairs else 1.0 / max(float(grad.norm()), 1e-12)  # first step: unit length
        for _ in range(MAX_BACKTRACKS):
            torch.add(w, d, alpha=step, out=w_new)
            f_new = loss(w_new, g_new)
            if f_new <= f + ARMIJO * step * slope:
                break
            curvature = f_new - f - slope * step  # minimiser of the quadratic through f, slope and f_new
            step = min(0.5 * step, max(0.1 * step, -slope * step * step / (2.0 * curvature)))
        else:
            break  # no sufficient decrease even for a tiny step: as close as float32 gets
        s, y = w_new - w, g_new - grad
        sy = _dot(s, y)
        if sy > 1e-10 * _dot(y, y):
            pairs.append((s, y, 1.0 / sy))
        decrease = f - f_new
        w, w_new, grad, g_new, f = w_new, w, g_new, grad, f_new
        quiet = quiet + 1 if decrease <= tol * abs(f) else 0
        if quiet >= 2:
            break
    return w, f, n_iter


def _fit_torch(x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int, tol: float,
               coef_init: np.ndarray | None) -> tuple[np.ndarray, int, float]:
    n, dim = x.shape
    n_classes = int(y.max()) + 1
    w = torch.zeros(n_classes, dim, dtype=torch.float32)
    if coef_init is not None and coef_init.shape == (n_classes, dim):
        w.copy_(torch.as_tensor(coef_init))
    # The mean loss (objective / n) has the same minimiser and gradients of order one, whatever n is.
    loss = _SoftmaxLoss(x.contiguous(), y, lam / n, n_classes)
    w, f, n_iter = _lbfgs(loss, w, max_iter=max_iter, tol=tol)
    return w.numpy().copy(), n_iter, f * n


def _fit_sklearn(x: np.ndarray, codes: np.ndarray, lam: float, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0 / lam, fit_intercept=False, tol=tol, max_iter=max_iter, solver="lbfgs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x.astype(np.float64), codes)
    coef = model.coef_.astype(np.float32)
    if coef.shape[0] == 1:  # binary: scikit-learn stores one row; the multinomial form is (-w/2, w/2)
        coef = np.concatenate([-coef / 2, coef / 2])
    return coef, int(np.max(model.n_iter_))


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
    """What :func:`select_lambda` found: the chosen ``lam``, the mean CV accuracy of each grid value (None when CV
    was impossible), and each value's solution averaged over the folds (a warm start for the final fit)."""

    lam: float
    scores: dict[float, float] | None
    coefs: dict[float, np.ndarray] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return "cv" if self.scores is not None else "default (CV needs 2+ images per class)"


def select_lambda(x, y, *, grid: Sequence[float] = LAMBDA_GRID, backend: str = "torch", seed: int = 0,
                  default: float = DEFAULT_LAMBDA, tol: float | None = None) -> LambdaChoice:
    """Choose lam by stratified cross-validation on the labelled training subset only (never the test labels).

    Folds: min(5, smallest class count). With a class of one image (1-shot) CV is impossible and ``default`` is
    returned with ``None`` scores. The highest mean CV accuracy wins; ties go to the larger lam. Each fold fits the
    grid from strong to weak regularisation, warm-started along the path; ``tol`` defaults to ``CV_TOL``."""
    xt = preprocess(x)
    codes = np.unique(np.asarray(y), return_inverse=True)[1]
    n_folds = min(MAX_FOLDS, int(np.bincount(codes).min()))
    if n_folds < 2:
        return LambdaChoice(default, None)
    folds = stratified_folds(codes, n_folds, seed)
    scores = {lam: 0.0 for lam in grid}
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
            scores[lam] += probe.score(xt[held], codes[held]) / n_folds
            if solutions:
                coefs[lam] = coefs.get(lam, 0.0) + probe.coef_ / n_folds
    best = max(sorted(grid, reverse=True), key=lambda lam: scores[lam])  # max() keeps the first (largest) on ties
    return LambdaChoice(best, scores, coefs)


def _extrapolate(lams: Sequence[float], solutions: list[np.ndarray], lam: float) -> np.ndarray | None:
    """Warm start for ``lam`` from the solutions at the previous ``lams`` of the path: the secant through the
    last two in log(lam) (the path is smooth in log lam), or the last one."""
    if not solutions:
        return None
    if len(solutions) < 2:
        return solutions[-1]
    ratio = np.log(lam / lams[-1]) / np.log(lams[-1] / lams[-2])
    return solutions[-1] + ratio * (solutions[-1] - solutions[-2])
