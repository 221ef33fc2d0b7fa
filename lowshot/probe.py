"""The MSN linear probe: rows centred and L2-normalised, multinomial logistic regression, no intercept.

Objective (MSN ``logistic_eval.py``: cyanure's mean log-loss with ``lambd / n``, i.e.)::

    sum_i  -log softmax(W x_i)[y_i]  +  (lam / 2) * ||W||^2        (scikit-learn: C = 1 / lam)

Solved by a full-batch L-BFGS in torch (``backend="torch"``, the default: analytic gradient, buffers reused, float32
matrix products on all cores with float64 sums) or by scikit-learn's lbfgs (``backend="sklearn"``, the reference).
scikit-learn's default ``tol=1e-4`` can stop at iteration 0 on many-class few-shot problems and return an all-zero
model; both backends here use tight tolerances. ``benchmarks/probe_speed.py`` compares the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import BACKENDS, DEFAULT_LAMBDA
from .errors import BadInputError

LAMBDA_GRID = tuple(float(f"{v:.6g}") for v in 10.0 ** np.arange(-4.0, 0.01, 0.5))  # 1e-4 … 1, for lam="auto"
MAX_FOLDS = 5
# torch backend: stop once the optimality gap is certified below this fraction of the objective (the gradient
# bound of _lbfgs: f - f* <= ||grad||^2 / (2 lam/n)). The old rule (relative decrease < 1e-7 twice) stopped up to
# 1.2e-6 short on a Zen4 CPU; a certificate holds on any CPU, up to float32 rounding of the gradient.
TORCH_TOL = 1e-7
# Cross-validation fits only rank the lambda grid. The certificate is conservative (on the 1,000-class 5-shot
# problem the true gap was ~10x below the bound), so a certified 1e-4 leaves about the ~1e-5 true gap that the old
# rule (decrease < 1e-6) left; the final fit uses TORCH_TOL.
CV_TOL = 1e-4
# Where float32 rounding of the gradient keeps the certificate out of reach (nearly separable data, tiny lam), stop
# after STALL_ITERATIONS iterations in a row each lowering the objective by less than STALL x tol of it.
STALL = 1e-2
STALL_ITERATIONS = 3
NOISE_FLOOR = 1e-10  # below this relative change the objective's own float32 rounding decides (any tol)
# Far from the optimum, on CPUs with bf16 units, the products run in bfloat16 until the certified gap is below this
# (relative); float32 then finishes. On the 1,000-class 5-shot problem: 35 of 76 evaluations in bf16, the same
# iterations as float32 throughout (1e-3: 67 of 103). bf16 products: ~3x (Zen4) to ~12x (AMX) float32's rate.
LOW_PRECISION_UNTIL = 1e-2
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
            coef, n_iter, _, self.gap_bound_ = _fit_torch(xt, torch.as_tensor(codes), self.lam, self.max_iter,
                                                          tol, coef_init)
            # reported in float64, as for sklearn: float32 logits put ~1e-6 of rounding into the value itself on
            # nearly separable problems (large logits, small loss), more than the certified gap
            self.objective_ = objective(coef, xt, codes, self.lam)
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
    """Mean log-loss + reg/2 ||W||^2 and its gradient (softmax - one-hot)^T X / n + reg W.

    One evaluation is two matrix products and one fused softmax over the (n, classes) logits, each into a reused
    buffer; the one-hot part of the gradient, -Y^T X / n, is a constant computed once. ``low`` runs both products
    in bfloat16 (float32 accumulation; the softmax and every sum stay float32/float64): several times the
    throughput on CPUs with bf16 units, at ~1e-3 relative error in the logits -- for far from the optimum only."""

    def __init__(self, x: torch.Tensor, codes: torch.Tensor, reg: float, n_classes: int):
        self.x, self.n, self.reg = x, x.shape[0], reg
        self.codes = codes.view(-1, 1)
        # -Y^T X / n: the one-hot labels' share of every gradient
        self.minus_class_sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, codes, x).mul_(-1.0 / self.n)
        self.logits = torch.empty(self.n, n_classes, dtype=x.dtype)
        self.probs = torch.empty_like(self.logits)
        self.x_low: torch.Tensor | None = None
        self.grad_low = torch.empty(n_classes, x.shape[1], dtype=torch.bfloat16)
        self.minus_ones = torch.full((self.n, 1), -1.0)
        self.evaluations = 0

    def __call__(self, w: torch.Tensor, grad: torch.Tensor, *, low: bool = False) -> float:
        """The objective at ``w`` (float64 sums); its gradient goes into ``grad``."""
        self.evaluations += 1
        if low:
            if self.x_low is None:
                self.x_low = self.x.to(torch.bfloat16)
            self.logits.copy_(torch.mm(self.x_low, w.to(torch.bfloat16).T))
        else:
            torch.mm(self.x, w.T, out=self.logits)
        p = torch.ops.aten._softmax.out(self.logits, 1, False, out=self.probs)
        picked = p.gather(1, self.codes)
        data = -picked.log().sum(dtype=torch.float64)
        if not torch.isfinite(data):  # a label's probability underflowed: its log-loss from the logits instead
            z = self.logits
            data = (torch.logsumexp(z, dim=1, keepdim=True) - z.gather(1, self.codes)).sum(dtype=torch.float64)
        if low:  # one-hot subtracted before rounding to bf16, so the product carries no cancellation
            p.scatter_add_(1, self.codes, self.minus_ones)
            torch.mm(p.T.to(torch.bfloat16), self.x_low, out=self.grad_low)
            torch.add(self.grad_low, w, alpha=self.reg * self.n, out=grad).mul_(1.0 / self.n)
        else:
            torch.add(self.minus_class_sums, w, alpha=self.reg, out=grad)
            grad.addmm_(p.T, self.x, alpha=1.0 / self.n)
        norm2 = torch.linalg.vector_norm(w, dtype=torch.float64) ** 2
        return float(data) / self.n + 0.5 * self.reg * float(norm2)



def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.view(-1), b.view(-1)))


class _History:
    """The last ``LBFGS_HISTORY`` curvature pairs (s, y) as rows of one matrix, with their inner products kept up
    to date, for the compact form of the L-BFGS inverse Hessian (Byrd, Nocedal & Schnabel 1994, eq. 3.13): one
    product with the pair matrix and one with its transpose per direction, instead of the two-loop recursion's
    4m vector passes."""

    def __init__(self, size: int, memory: int):
        self.rows = torch.zeros(2 * memory, size)  # s_0 .. s_{m-1}, then y_0 .. y_{m-1} (ring order)
        self.gram = np.zeros((2 * memory, 2 * memory))  # rows @ rows^T, float64
        self.order: list[int] = []  # slots, oldest first
        self.memory = memory

    def clear(self) -> None:
        self.order = []

    def push(self, w_new: torch.Tensor, w: torch.Tensor, g_new: torch.Tensor, g: torch.Tensor) -> float:
        """Store s = w_new - w, y = g_new - g (over the oldest pair when full); returns s.y."""
        m = self.memory
        free = [k for k in range(m) if k not in self.order]
        slot = free[0] if free else self.order.pop(0)
        torch.sub(w_new.view(-1), w.view(-1), out=self.rows[slot])
        torch.sub(g_new.view(-1), g.view(-1), out=self.rows[m + slot])
        both = (self.rows @ self.rows[[slot, m + slot]].T).double().numpy()  # (2m, 2)
        self.gram[:, slot], self.gram[:, m + slot] = both[:, 0], both[:, 1]
        self.gram[slot, :], self.gram[m + slot, :] = both[:, 0], both[:, 1]
        sy = float(self.gram[slot, m + slot])
        if sy > 1e-10 * float(self.gram[m + slot, m + slot]):
            self.order.append(slot)
        return sy

    def direction(self, g: torch.Tensor, out: torch.Tensor) -> None:
        """out = -H g, H the L-BFGS inverse Hessian of the stored pairs with H0 = (s.y / y.y) I (newest pair)."""
        if not self.order:
            torch.neg(g, out=out)
            return
        m, idx = self.memory, self.order
        s_i, y_i = np.array(idx), np.array(idx) + m
        sy = self.gram[np.ix_(s_i, y_i)]  # s_i . y_j
        yy = self.gram[np.ix_(y_i, y_i)]
        gamma = sy[-1, -1] / yy[-1, -1]
        proj = (self.rows @ g.view(-1)).double().numpy()
        a, b = proj[s_i], proj[y_i]
        r = np.triu(sy)
        u = np.linalg.solve(r, a)
        top = np.linalg.solve(r.T, (np.diag(np.diag(sy)) + gamma * yy) @ u - gamma * b)
        coef = np.zeros(2 * m)
        coef[s_i], coef[y_i] = -top, gamma * u  # -H g = -gamma g - S top + gamma Y u
        torch.mv(self.rows.T, torch.from_numpy(coef).float(), out=out.view(-1))
        out.add_(g, alpha=-gamma)


def _lbfgs(loss: _SoftmaxLoss, w: torch.Tensor, *, max_iter: int, tol: float, low_until: float = 0.0
           ) -> tuple[torch.Tensor, float, int, float]:
    """Minimise ``loss`` from ``w`` by L-BFGS (compact form, ``LBFGS_HISTORY`` pairs) with a backtracking Armijo
    line search that tries the unit quasi-Newton step first. Returns (w, objective, iterations, certified bound on
    the relative gap at w).

    Stops when the optimality gap is *certified* below ``tol`` relative: the objective is ``reg``-strongly convex,
    so f(w) - f* <= ||grad f(w)||^2 / (2 reg) -- for this loss that bound is also exactly the Fenchel duality gap
    of the dual point the gradient defines. Also stops when no step lowers the objective (float32's floor).

    ``low_until`` > 0: products in bfloat16 while the certified gap is above ``low_until`` relative (far from the
    optimum, where bf16 rounding is far below the progress per step), then float32 to the end, from the
    history gathered so far."""
    grad, w_new, g_new, d = (torch.empty_like(w) for _ in range(4))
    low = low_until > 0
    f = loss(w, grad, low=low)
    history = _History(w.numel(), LBFGS_HISTORY)
    n_iter = quiet = 0
    while n_iter < max_iter:
        gap = _dot(grad, grad) / (2.0 * loss.reg)
        if low and gap <= low_until * abs(f):
            low = False
            f = loss(w, grad)  # re-evaluate at float32 before trusting the certificate; bf16's pairs go (keeping
            history.clear()  # them cost 1.5x the evaluations after the switch on the 1,000-class problem)
            continue
        if not low and gap <= tol * abs(f):
            break
        n_iter += 1
        history.direction(grad, d)
        slope = _dot(grad, d)
        if slope >= 0:  # lost descent to rounding: restart from steepest descent
            history.clear()
            torch.neg(grad, out=d)
            slope = -_dot(grad, grad)
        if slope == 0:
            break
        step = 1.0 if history.order else 1.0 / max(float(grad.norm()), 1e-12)  # first step: unit length
        for _ in range(MAX_BACKTRACKS):
            torch.add(w, d, alpha=step, out=w_new)
            f_new = loss(w_new, g_new, low=low)
            if f_new <= f + ARMIJO * step * slope:
                break
            curvature = f_new - f - slope * step  # minimiser of the quadratic through f, slope and f_new
            step = min(0.5 * step, max(0.1 * step, -slope * step * step / (2.0 * curvature)))
        else:
            if low:  # bf16 rounding outweighs the progress: finish in float32
                low_until = float("inf")
                continue
            break  # no sufficient decrease even for a tiny step: as close as float32 gets
        history.push(w_new, w, g_new, grad)
        quiet = quiet + 1 if f - f_new <= max(STALL * tol, NOISE_FLOOR) * abs(f) and not low else 0
        w, w_new, grad, g_new, f = w_new, w, g_new, grad, f_new
        if quiet >= STALL_ITERATIONS:
            break  # float32's floor: the gradient's rounding keeps the certificate out of reach
    if low:  # stopped early in bf16 (max_iter): the objective and gradient at float32
        f = loss(w, grad)
    return w, f, n_iter, _dot(grad, grad) / (2.0 * loss.reg) / abs(f)



def _fit_torch(x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int, tol: float,
               coef_init: np.ndarray | None) -> tuple[np.ndarray, int, float, float]:
    n, dim = x.shape
    n_classes = int(y.max()) + 1
    w = torch.zeros(n_classes, dim, dtype=torch.float32)
    if coef_init is not None and coef_init.shape == (n_classes, dim):
        w.copy_(torch.as_tensor(coef_init))
    # The mean loss (objective / n) has the same minimiser and gradients of order one, whatever n is.
    loss = _SoftmaxLoss(x.contiguous(), y, lam / n, n_classes)
    from .backbones import cpu_flags  # LOWSHOT_CPU_FLAGS forces it either way (the tests run both)

    low_until = LOW_PRECISION_UNTIL if cpu_flags() & {"avx512_bf16", "amx_bf16"} else 0.0
    w, f, n_iter, gap_bound = _lbfgs(loss, w, max_iter=max_iter, tol=tol, low_until=low_until)
    return w.numpy().copy(), n_iter, f * n, gap_bound


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
