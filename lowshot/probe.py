"""The MSN linear probe: rows centred and L2-normalised, multinomial logistic regression, no intercept.

Objective (MSN ``logistic_eval.py``: cyanure's mean log-loss with ``lambd / n``, i.e.)::

    sum_i  -log softmax(W x_i)[y_i]  +  (lam / 2) * ||W||^2        (scikit-learn: C = 1 / lam)

Solved by full-batch L-BFGS in torch (``backend="torch"``, the default) or by scikit-learn's lbfgs
(``backend="sklearn"``, the reference). scikit-learn's default ``tol=1e-4`` can stop at iteration 0 on many-class
few-shot problems and return an all-zero model; both backends here use tight tolerances.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .config import DEFAULT_LAMBDA
from .errors import BadInputError

LAMBDA_GRID = tuple(float(f"{v:.6g}") for v in 10.0 ** np.arange(-4.0, 0.01, 0.5))  # 1e-4 … 1, for lam="auto"
MAX_FOLDS = 5
BACKENDS = ("torch", "sklearn")


def preprocess(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """cyanure ``preprocess(centering=True, normalize=True, columns=False)``: subtract each row's own mean (one
    scalar per sample), then scale each row to unit L2 norm. Returns float32."""
    x = x.to(torch.float32) if isinstance(x, torch.Tensor) else torch.tensor(np.asarray(x), dtype=torch.float32)
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class LogisticProbe:
    """Multinomial logistic regression without intercept, scikit-learn style.

    ``coef_`` has shape (n_classes, dim); ``classes_`` are the labels seen in ``fit``; ``objective_`` is the
    summed log-loss + lam/2 ||W||^2 at the solution; ``n_iter_`` the solver's iterations.
    """

    def __init__(self, lam: float = DEFAULT_LAMBDA, *, backend: str = "torch", max_iter: int = 1000,
                 tol: float = 1e-6, preprocess: bool = True):
        self.lam = lam
        self.backend = backend
        self.max_iter = max_iter
        self.tol = tol
        self.preprocess = preprocess

    def _prepare(self, x) -> torch.Tensor:
        return preprocess(x) if self.preprocess else torch.as_tensor(np.asarray(x), dtype=torch.float32)

    def fit(self, x, y, *, coef_init: np.ndarray | None = None) -> LogisticProbe:
        if not self.lam > 0:
            raise BadInputError(f"--lambda {self.lam}: must be positive")
        if self.backend not in BACKENDS:
            raise BadInputError(f"backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        xt = self._prepare(x)
        y = np.asarray(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise BadInputError("the probe needs at least two classes in the training labels")
        if self.backend == "sklearn":
            coef, n_iter = _fit_sklearn(xt.numpy(), codes, self.lam, self.max_iter, self.tol)
        else:
            coef, n_iter = _fit_torch(xt, torch.as_tensor(codes), self.lam, self.max_iter, self.tol, coef_init)
        self.coef_ = coef
        self.n_iter_ = n_iter
        self.objective_ = objective(coef, xt, codes, self.lam)
        return self

    def decision_function(self, x) -> np.ndarray:
        return (self._prepare(x) @ torch.as_tensor(self.coef_).T).numpy()

    def predict(self, x) -> np.ndarray:
        return self.classes_[self.decision_function(x).argmax(axis=1)]

    def score(self, x, y) -> float:
        """Top-1 accuracy (a fraction)."""
        return float(np.mean(self.predict(x) == np.asarray(y)))


def objective(coef: np.ndarray, x: torch.Tensor, codes: np.ndarray, lam: float) -> float:
    """Summed log-loss + lam/2 ||W||^2, in float64 (for comparing solvers)."""
    w = torch.as_tensor(coef, dtype=torch.float64)
    logits = x.to(torch.float64) @ w.T
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(codes), reduction="sum")
    return float(loss + 0.5 * lam * (w * w).sum())


def _fit_torch(x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int, tol: float,
               coef_init: np.ndarray | None) -> tuple[np.ndarray, int]:
    n, dim = x.shape
    n_classes = int(y.max()) + 1
    w = torch.zeros(n_classes, dim, dtype=torch.float32)
    if coef_init is not None and coef_init.shape == (n_classes, dim):
        w.copy_(torch.as_tensor(coef_init))
    w.requires_grad_(True)
    # The mean loss (objective / n) has the same minimiser and gradients of order one, whatever n is.
    reg = lam / n
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(x @ w.T, y) + 0.5 * reg * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    return w.detach().numpy().copy(), int(n_iter)


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


def select_lambda(x, y, *, grid: Sequence[float] = LAMBDA_GRID, backend: str = "torch", seed: int = 0,
                  default: float = DEFAULT_LAMBDA) -> tuple[float, dict[float, float] | None]:
    """Choose lam by stratified cross-validation on the labelled training subset only (never the test labels).

    Folds: min(5, smallest class count). With a class of one image (1-shot) CV is impossible and ``default`` is
    returned with ``None`` scores. The highest mean CV accuracy wins; ties go to the larger lam."""
    xt = preprocess(x)
    codes = np.unique(np.asarray(y), return_inverse=True)[1]
    n_folds = min(MAX_FOLDS, int(np.bincount(codes).min()))
    if n_folds < 2:
        return default, None
    folds = stratified_folds(codes, n_folds, seed)
    scores = {lam: 0.0 for lam in grid}
    for held in folds:
        train = np.setdiff1d(np.arange(len(codes)), held)
        warm = None
        for lam in sorted(grid, reverse=True):  # strong to weak regularisation, each warm-started from the last
            probe = LogisticProbe(lam, backend=backend, preprocess=False)
            probe.fit(xt[train], codes[train], coef_init=warm)
            warm = probe.coef_ if len(probe.classes_) == codes.max() + 1 else None
            scores[lam] += probe.score(xt[held], codes[held]) / n_folds
    best = max(sorted(grid, reverse=True), key=lambda lam: scores[lam])  # max() keeps the first (largest) on ties
    return best, scores
