"""The logistic probe's solvers: a full-batch L-BFGS in torch, and scikit-learn's lbfgs as the reference.

The torch solver minimises the mean log-loss + reg/2 ||W||^2 (reg = lam / n, the same minimiser as the summed
objective) preconditioned by the features' second moment, with a line search on the logits that costs one matrix
product per iteration, float32 products on all cores with float64 sums, and stops on a certified optimality gap.
It runs on the thread that flushes denormal floats to zero (``lowshot/classify/flushed.py``): a fit's softmax makes
them. scikit-learn's default ``tol=1e-4`` can stop at iteration 0 on many-class few-shot problems and return an
all-zero model, so both solvers use tight tolerances. ``benchmarks/probe_speed.py`` compares the two.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from lowshot.classify.flushed import check_cancelled

# torch backend: stop once the optimality gap is certified below this fraction of the objective (the gradient
# bound of lbfgs: f - f* <= ||grad||^2 / (2 lam/n)); a certificate holds on any CPU, up to float32 rounding of the
# gradient.
TORCH_TOL = 1e-7
# Where float32 rounding of the gradient keeps the certificate out of reach (nearly separable data, tiny lam), stop
# after STALL_ITERATIONS iterations in a row each lowering the objective by less than STALL x tol of it.
STALL = 1e-2
STALL_ITERATIONS = 3
NOISE_FLOOR = 1e-10  # below this relative change the objective's own float32 rounding decides (any tol)
SKLEARN_TOL = 1e-6  # scikit-learn's gradient tolerance; its default 1e-4 can return an all-zero model
WHITEN = True  # precondition by the features' second moment (see _Whitening)
# eps = WHITEN_EPS_SCALE x reg x K, i.e. beta = 1 / (100 K): the softmax's curvature falls well below its 1/K at
# W = 0 as the fit proceeds, and a scale of 100 took the fewest iterations among 1 to 1,000 on 1,000-class problems.
WHITEN_EPS_SCALE = 100.0
LBFGS_HISTORY = 10  # curvature pairs kept
# The line search's sufficient decrease allows this much relative rounding in the objective (Hager & Zhang's
# "approximate Armijo" condition, 2005): float32 logits over a few thousand rows give f to ~5e-9 relative, and
# near the optimum the decrease a step predicts is smaller than that, so the exact condition would turn good unit
# steps down on noise.
OBJECTIVE_NOISE = 1e-8
ARMIJO = 1e-4  # sufficient-decrease constant of the backtracking line search (Nocedal & Wright, ch. 3)
MAX_BACKTRACKS = 30


def objective(coef: np.ndarray, x: torch.Tensor, codes: np.ndarray, lam: float) -> float:
    """Summed log-loss + lam/2 ||W||^2, in float64 (for comparing solvers)."""
    w = torch.as_tensor(coef, dtype=torch.float64)
    logits = x.to(torch.float64) @ w.T
    loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(codes), reduction="sum")
    return float(loss + 0.5 * lam * (w * w).sum())


class _SoftmaxLoss:
    """Mean log-loss + reg/2 sum_j r_j ||W_:,j||^2 and its gradient (softmax - one-hot)^T X / n + reg r W, with a
    line search that costs one product per iteration.

    :meth:`evaluate` is one full evaluation: two matrix products and one fused softmax over the (n, classes) logits,
    each into a reused buffer; the one-hot part of the gradient, -Y^T X / n, is a constant computed once.
    The line search (:meth:`along`, :meth:`value_at`, :meth:`accept`) works on logits instead of weights: the
    logits are linear in W, so with Z = X W^T kept from the last point and Z1 = X (W + D)^T computed once per
    direction, any step t has logits (1 - t) Z + t Z1 and a penalty quadratic in t. A trial step costs a softmax,
    not a product, and the gradient product runs once, at the accepted step: an iteration costs what one evaluation
    does however many steps the search tries.

    Products and softmax run in float32, sums in float64, on every CPU, so the probe's numbers do not depend on
    the CPU's bf16 units. The previous solver's bfloat16 phase far from the optimum lost to the whitened float32
    solve even on an AMX CPU (1,000-class 5-shot: 2.2 s against 1.9 s), and on ill-conditioned problems it stalled
    at 1,000 iterations 0.2% above the optimum (rounding W to bfloat16 swallowed steps much smaller than W)."""

    def __init__(self, x: torch.Tensor, codes: torch.Tensor, reg: float, n_classes: int,
                 reg_weights: torch.Tensor | None = None, *, kept_buffers: bool = False):
        """``kept_buffers``: the four (n, classes) logit buffers are views of this thread's kept block (see
        :func:`_logit_buffers`); only one such loss may be in use at a time per thread (``_fit_torch``'s)."""
        self.x, self.n, self.reg = x, x.shape[0], reg
        # the per-coordinate penalty weights r (the whitened problem's; None: r = 1)
        self.reg_weights = None if reg_weights is None else reg_weights.to(x.dtype).view(1, -1)
        r = torch.ones(x.shape[1]) if reg_weights is None else reg_weights
        self.r64, self.inv_r64 = r.double(), 1.0 / r.double()
        self.weighted = torch.empty(n_classes, x.shape[1], dtype=x.dtype)
        self.codes = codes.view(-1, 1)
        # -Y^T X / n: the one-hot labels' share of every gradient
        self.minus_class_sums = torch.zeros(n_classes, x.shape[1]).index_add_(0, codes, x).mul_(-1.0 / self.n)
        buffers = _logit_buffers(self.n, n_classes, 4) if kept_buffers and x.dtype == torch.float32 else \
            [torch.empty(self.n, n_classes, dtype=x.dtype) for _ in range(4)]
        # the logits at the current point, at the current point + the direction, at a step in between, and the
        # softmax of the last logits valued
        self.logits, self.ends, self.trial, self.probs = buffers
        # row blocks valued in turn (see _value), ending after an eighth and after half of the rows
        ends = sorted({max(1, self.n // 8), max(1, self.n // 2), self.n})
        self.blocks = [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        self.last = self.logits
        self.moved = torch.empty(n_classes, x.shape[1], dtype=x.dtype)  # w + d
        self.scratch = torch.empty_like(self.moved)  # products for _rdot
        self.penalty = self.cross = self.curvature = 0.0  # <w,w>_r, <w,d>_r, <d,d>_r
        self.trial_penalty = 0.0  # <w + t d, w + t d>_r at the step last valued
        self.products = 0  # matrix products so far (tests count them)

    def _weighted(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.reg_weights is None else torch.mul(w, self.reg_weights, out=self.weighted)

    def _rdot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """<a, b>_r = sum_j r_j <a_:,j, b_:,j>: float32 column sums (torch sums in cascade, to a few float32 ulps
        of the column's magnitude; summing them in float64 took 16x as long), weighted in float64."""
        return float(torch.dot(torch.mul(a, b, out=self.scratch).sum(dim=0).double(), self.r64))

    def _value(self, logits: torch.Tensor, penalty: float, limit: float = math.inf, step: float | None = None
               ) -> float:
        """The objective at ``logits`` (with this penalty); their softmax stays in ``probs``.

        Every row's log-loss is >= 0, so the rows valued so far bound the objective from below: once that bound
        passes ``limit`` (the line search's sufficient-decrease threshold) the rest is skipped and the bound is
        returned, a value above ``limit`` as the whole sum would be. Blocks end after an eighth and after half of
        the rows, so a trial 8x (2x) above the limit costs an eighth (half) of a softmax: early in a fit the unit
        quasi-Newton step can put the objective 20x above where it starts.

        ``step``: ``logits`` are lerp(self.logits, self.ends, step), formed here block by block (into ``logits``),
        each block still in cache for its softmax."""
        self.last = logits
        total, base = 0.0, 0.5 * self.reg * penalty
        for rows in self.blocks:
            if step is not None:
                torch.lerp(self.logits[rows], self.ends[rows], step, out=logits[rows])
            block = logits[rows]
            p = torch.ops.aten._softmax.out(block, 1, False, out=self.probs[rows])
            losses = p.gather(1, self.codes[rows]).log_().neg_()
            data = losses.sum(dtype=torch.float64)
            if not torch.isfinite(data):  # a label's probability underflowed: those rows' log-loss from their logits
                bad = torch.isinf(losses).view(-1).nonzero().view(-1)
                losses[bad] = (torch.logsumexp(block[bad], dim=1, keepdim=True)
                               - block[bad].gather(1, self.codes[rows][bad]))
                data = losses.sum(dtype=torch.float64)
            total += float(data)
            if total / self.n + base > limit:
                break
        return total / self.n + base

    def _gradient(self, w: torch.Tensor, grad: torch.Tensor) -> None:
        """The gradient at ``w`` from the last softmax (which must be w's) into ``grad``."""
        self.products += 1
        torch.add(self.minus_class_sums, self._weighted(w), alpha=self.reg, out=grad)
        grad.addmm_(self.probs.T, self.x, alpha=1.0 / self.n)

    def evaluate(self, w: torch.Tensor, grad: torch.Tensor) -> float:
        """The objective at ``w`` (float64 sums); its gradient goes into ``grad``; ``w`` becomes the point the
        next line search starts from."""
        self.products += 1
        torch.mm(self.x, w.T, out=self.logits)
        self.penalty = self._rdot(w, w)
        f = self._value(self.logits, self.penalty)
        self._gradient(w, grad)
        return f

    def along(self, w: torch.Tensor, d: torch.Tensor) -> None:
        """Start a line search from ``w`` (the last point evaluated or accepted) along ``d``."""
        self.products += 1
        torch.mm(self.x, torch.add(w, d, out=self.moved).T, out=self.ends)
        self.cross, self.curvature = self._rdot(w, d), self._rdot(d, d)

    def value_at(self, step: float, limit: float = math.inf) -> float:
        """The objective at w + step d (0 < step <= 1): one softmax, or less where it is above ``limit`` (then
        only a lower bound above ``limit`` is returned; see :meth:`_value`)."""
        self.trial_penalty = self.penalty + 2.0 * step * self.cross + step * step * self.curvature
        if step == 1.0:
            return self._value(self.ends, self.trial_penalty, limit)
        return self._value(self.trial, self.trial_penalty, limit, step=step)

    def accept(self, w_new: torch.Tensor, g_new: torch.Tensor, f_new: float) -> float:
        """Move to ``w_new`` = w + step d, the step last valued at ``f_new``; its gradient goes into ``g_new``.
        Returns the objective there. Its penalty is <w,w> + 2 step <w,d> + step^2 <d,d>, not recomputed from
        ``w_new``: the two differ by w_new's rounding to float32, about 1e-10 of the penalty per iteration."""
        self._gradient(w_new, g_new)
        self.penalty = self.trial_penalty
        if self.last is self.ends:
            self.logits, self.ends = self.ends, self.logits
        else:
            self.logits, self.trial = self.trial, self.logits
        return f_new

    def gap_bound(self, grad: torch.Tensor) -> float:
        """f(w) - f* <= ||grad_W||^2 / (2 reg), the gradient taken in the original coordinates W (for the
        whitened problem, grad_W's squared norm is sum_j ||grad_:,j||^2 / r_j)."""
        squares = (grad * grad).sum(dim=0).double()  # float32 column sums: a bound needs no more digits
        return float(torch.dot(squares, self.inv_r64)) / (2.0 * self.reg)


_WORKSPACE = threading.local()


def _logit_buffers(n: int, n_classes: int, count: int) -> list[torch.Tensor]:
    """``count`` float32 (n, n_classes) tensors (whatever torch's default dtype), views of one block this thread
    keeps across fits and grows to the largest fit so far. Above glibc's largest mmap threshold (32 MB: 8,389 rows
    x 1,000 classes) every fresh buffer is a fresh mapping, zero-filled page by page, which cross-validation's many
    fits of the same size would pay again and again. Kept for the thread's life: 4 x n x classes floats of its
    largest fit (205 MB for ImageNet's 1% subset)."""
    size = n * n_classes
    block = getattr(_WORKSPACE, "block", None)
    if block is None or block.numel() < count * size:
        _WORKSPACE.block = None  # let the old block go before the bigger one is allocated
        block = _WORKSPACE.block = torch.empty(count * size, dtype=torch.float32)
    return [block[i * size:(i + 1) * size].view(n, n_classes) for i in range(count)]


class _Whitening:
    """The change of variables that preconditions the probe by the features' second moment C = X^T X / n.

    With C = Q diag(c) Q^T and d_j = c_j + eps, the problem in U = W Q D^(1/2) has features x' = D^(-1/2) Q^T x
    and the penalty reg/2 sum_j ||u_:,j||^2 / d_j (= reg/2 ||W||^2: the same problem, the same minimiser). Its
    Hessian is then about beta x'x'^T + reg D^-1 = (beta c_j + reg) / (c_j + eps) per coordinate, the same for every
    j when eps = reg / beta (beta ~ p(1 - p), the softmax's curvature: see WHITEN_EPS_SCALE). The features' spectrum
    (one direction holding a third of the energy, then a power law) no longer sets the conditioning. Costs one
    d x d eigendecomposition and one n x d x d product per fit; the penalty and the gap bound stay diagonal."""

    def __init__(self, x: torch.Tensor, reg: float, n_classes: int):
        second = (x.T.double() @ x.double()) / x.shape[0]
        c, self.q = torch.linalg.eigh(second)
        eps = reg * n_classes * WHITEN_EPS_SCALE  # reg / beta
        self.curvature = reg / eps  # beta: the whitened problem's Hessian is about beta x I
        self.d = (c.clamp_min(0.0) + eps).float()
        self.q = self.q.float()
        self.x = (x @ self.q).mul_(self.d.rsqrt())

    @property
    def reg_weights(self) -> torch.Tensor:
        return 1.0 / self.d

    def to_u(self, w: torch.Tensor) -> torch.Tensor:
        return (w @ self.q).mul_(self.d.sqrt())

    def to_w(self, u: torch.Tensor) -> torch.Tensor:
        return (u * self.d.rsqrt()) @ self.q.T



def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.view(-1), b.view(-1)))


class _History:
    """The last ``LBFGS_HISTORY`` curvature pairs (s, y) as rows of one matrix, for the compact form of the L-BFGS
    inverse Hessian (Byrd, Nocedal & Schnabel 1994, eq. 3.13), which needs the pairs' inner products s_i.y_j (i no
    newer than j) and y_i.y_j. Each iteration reads the pair matrix twice, as matrix-vector products: once to
    project the new gradient on every row, once to form the direction. The new pair's inner products with the
    stored rows come from two projections of the gradient (y = g_new - g, so r.y = r.g_new - r.g): the previous
    iteration's and the new one. (Stacking s, y and g_new for one matrix-matrix product instead is slower: BLAS
    runs such a tall, thin product far below the memory's bandwidth.)"""

    def __init__(self, size: int, memory: int):
        self.rows = torch.zeros(2 * memory, size)  # s_0 .. s_{m-1}, then y_0 .. y_{m-1} (ring order)
        self.sy = np.zeros((memory, memory))  # s_i . y_j; only i pushed no later than j is kept up to date
        self.yy = np.zeros((memory, memory))
        self.order: list[int] = []  # slots, oldest first
        self.memory = memory
        self.projected: tuple[torch.Tensor, np.ndarray] | None = None  # (gradient, rows @ gradient)

    def clear(self) -> None:
        self.order = []

    def _projection(self, g: torch.Tensor) -> np.ndarray:
        """rows @ g (float64), reused when ``g`` is the gradient the last push projected."""
        if self.projected is None or self.projected[0] is not g:
            self.projected = (g, (self.rows @ g.view(-1)).double().numpy())
        return self.projected[1]

    def push(self, w_new: torch.Tensor, w: torch.Tensor, g_new: torch.Tensor, g: torch.Tensor) -> float:
        """Store s = w_new - w, y = g_new - g (over the oldest pair when full); returns s.y. Projects ``g_new`` on
        every row, for the next :meth:`direction`."""
        m = self.memory
        free = [k for k in range(m) if k not in self.order]
        slot = free[0] if free else self.order.pop(0)
        before = self._projection(g)  # the rows' projections on g while the slot still holds its old pair
        s, y = self.rows[slot], self.rows[m + slot]
        torch.sub(w_new.view(-1), w.view(-1), out=s)
        torch.sub(g_new.view(-1), g.view(-1), out=y)
        self.projected = None
        after = self._projection(g_new)
        self.sy[:, slot] = after[:m] - before[:m]
        self.yy[:, slot] = self.yy[slot, :] = after[m:] - before[m:]
        sy = self.sy[slot, slot] = _dot(s, y)
        yy = self.yy[slot, slot] = _dot(y, y)
        if sy > 1e-10 * yy:
            self.order.append(slot)
        return sy

    def direction(self, g: torch.Tensor, out: torch.Tensor) -> None:
        """out = -H g, H the L-BFGS inverse Hessian of the stored pairs with H0 = (s.y / y.y) I (newest pair)."""
        if not self.order:
            torch.neg(g, out=out)
            return
        m, idx = self.memory, self.order
        sy = self.sy[np.ix_(idx, idx)]  # age order: s_i . y_j valid for i <= j
        yy = self.yy[np.ix_(idx, idx)]
        gamma = sy[-1, -1] / yy[-1, -1]
        proj = self._projection(g)
        a, b = proj[idx], proj[np.array(idx) + m]
        r = np.triu(sy)
        u = np.linalg.solve(r, a)
        top = np.linalg.solve(r.T, (np.diag(np.diag(sy)) + gamma * yy) @ u - gamma * b)
        coef = np.zeros(2 * m)
        coef[idx], coef[np.array(idx) + m] = -top, gamma * u  # -H g = -gamma g - S top + gamma Y u
        torch.addmv(g.view(-1), self.rows.T, torch.from_numpy(coef).float(), beta=-gamma, out=out.view(-1))


def _lbfgs(loss: _SoftmaxLoss, w: torch.Tensor, *, max_iter: int, tol: float, curvature: float | None = None
           ) -> tuple[torch.Tensor, float, int, float]:
    """Minimise ``loss`` from ``w`` by L-BFGS (compact form, ``LBFGS_HISTORY`` pairs) with a backtracking Armijo
    line search on the logits (see :class:`_SoftmaxLoss`) that tries the unit quasi-Newton step first. Returns
    (w, objective, iterations, certified bound on the relative gap at w).

    Stops when the optimality gap is *certified* below ``tol`` relative: the objective is ``reg``-strongly convex,
    so f(w) - f* <= ||grad f(w)||^2 / (2 reg) -- for this loss that bound is also exactly the Fenchel duality gap
    of the dual point the gradient defines. Also stops when no step lowers the objective (float32's floor).

    ``curvature``: the Hessian the problem's preconditioning assumes (about curvature x I); a step without
    curvature pairs is at most its inverse times the gradient (else of unit length)."""
    grad, w_new, g_new, d = (torch.empty_like(w) for _ in range(4))
    f = loss.evaluate(w, grad)
    history = _History(w.numel(), LBFGS_HISTORY)
    n_iter = quiet = 0
    while n_iter < max_iter and loss.gap_bound(grad) > tol * abs(f):
        check_cancelled()  # the caller was interrupted (Ctrl-C): leave now, not after up to max_iter iterations
        n_iter += 1
        history.direction(grad, d)
        slope = _dot(grad, d)
        if slope >= 0:  # lost descent to rounding: restart from steepest descent
            history.clear()
            torch.neg(grad, out=d)
            slope = -_dot(grad, grad)
        if slope == 0:
            break
        if not history.order:  # no curvature pairs yet: a step of unit length, or shorter as the assumed curvature
            scale = 1.0 / max(float(d.norm()), 1e-12)  # says near the optimum (a warm start)
            scale = min(scale, 1.0 / curvature) if curvature else scale
            d.mul_(scale)
            slope *= scale
        loss.along(w, d)
        step = 1.0
        for _ in range(MAX_BACKTRACKS):
            limit = f + ARMIJO * step * slope + OBJECTIVE_NOISE * abs(f)
            f_new = loss.value_at(step, limit)
            if f_new <= limit:
                break
            # minimiser of the quadratic through f, slope and f_new (a lower bound, if the trial was cut short:
            # a longer next step than the whole value would give, in [0.1, 0.5] x this one all the same)
            excess = f_new - f - slope * step
            step = min(0.5 * step, max(0.1 * step, -slope * step * step / (2.0 * excess)))
        else:
            break  # no sufficient decrease even for a tiny step: as close as float32 gets
        torch.add(w, d, alpha=step, out=w_new)
        f_new = loss.accept(w_new, g_new, f_new)
        history.push(w_new, w, g_new, grad)
        quiet = quiet + 1 if f - f_new <= max(STALL * tol, NOISE_FLOOR) * abs(f) else 0
        w, w_new, grad, g_new, f = w_new, w, g_new, grad, f_new
        if quiet >= STALL_ITERATIONS:
            break  # float32's floor: the gradient's rounding keeps the certificate out of reach
    return w, f, n_iter, loss.gap_bound(grad) / abs(f)


def fit_torch(x: torch.Tensor, y: torch.Tensor, lam: float, max_iter: int, tol: float,
               coef_init: np.ndarray | None) -> tuple[np.ndarray, int, float, float]:
    n, dim = x.shape
    n_classes = int(y.max()) + 1
    w = torch.zeros(n_classes, dim, dtype=torch.float32)
    if coef_init is not None and coef_init.shape == (n_classes, dim):
        w.copy_(torch.as_tensor(coef_init))
    # The mean loss (objective / n) has the same minimiser and gradients of order one, whatever n is.
    reg = lam / n
    white = _Whitening(x, reg, n_classes) if WHITEN else None
    if white is not None:
        loss = _SoftmaxLoss(white.x, y, reg, n_classes, reg_weights=white.reg_weights, kept_buffers=True)
        w = white.to_u(w)
    else:
        loss = _SoftmaxLoss(x.contiguous(), y, reg, n_classes, kept_buffers=True)
    w, f, n_iter, gap_bound = _lbfgs(loss, w, max_iter=max_iter, tol=tol,
                                     curvature=None if white is None else white.curvature)
    if white is not None:
        w = white.to_w(w)
    return w.numpy().copy(), n_iter, f * n, gap_bound


def fit_sklearn(x: np.ndarray, codes: np.ndarray, lam: float, max_iter: int, tol: float) -> tuple[np.ndarray, int]:
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

