import threading

import numpy as np
import pytest
import torch

from lowshot.classify import logistic, solver
from lowshot.classify.base import preprocess
from lowshot.classify.logistic import (
    LAMBDA_GRID,
    LogisticProbe,
    select_lambda,
    stratified_folds,
    within_standard_errors,
)
from lowshot.classify.solver import TORCH_TOL, _History, _lbfgs, _SoftmaxLoss, objective
from lowshot.config import DEFAULT_LAMBDA
from lowshot.errors import BadInputError


def blobs(n_classes=6, per_class=8, dim=24, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 2
    x = np.concatenate([centres[c] + spread * rng.normal(size=(per_class, dim)) for c in range(n_classes)])
    y = np.repeat(np.arange(n_classes), per_class)
    return x.astype(np.float32), y


def test_preprocess_centres_each_row_and_scales_it_to_unit_norm():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(5, 7))
    p = preprocess(x).numpy()
    np.testing.assert_allclose(p.mean(axis=1), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1, atol=1e-6)
    expected = (x - x.mean(1, keepdims=True)) / np.linalg.norm(x - x.mean(1, keepdims=True), axis=1, keepdims=True)
    np.testing.assert_allclose(p, expected, atol=1e-6)


@pytest.mark.parametrize("lam", [0.0025, 0.1, 1.0])
def test_torch_solver_reaches_the_scikit_learn_objective(lam):
    x, y = blobs()
    ours = LogisticProbe(lam).fit(x, y)
    ref = LogisticProbe(lam, backend="sklearn", tol=1e-10, max_iter=10000).fit(x, y)
    assert ours.coef_.shape == (6, 24)
    # The solver stops once it certifies a relative gap below 1e-7 (TORCH_TOL: ||grad||^2 / (2 lam/n), strong
    # convexity), whatever the CPU's rounding; float32 logits add ~1e-7 to the objective's value. Hence 1e-6.
    assert ours.objective_ <= ref.objective_ * (1 + 1e-6)
    assert ours.objective_ == pytest.approx(objective(ours.coef_, preprocess(x), y, lam), rel=1e-6)  # float64 check
    assert np.mean(ours.predict(x) == ref.predict(x)) > 0.95


def test_torch_and_sklearn_backends_agree_on_a_many_class_few_shot_problem():
    x_all, y_all = blobs(n_classes=100, per_class=10, dim=64, seed=1, spread=2.0)
    first = np.arange(len(y_all)) % 10 < 5  # five of each class to train on, five to test on
    x, y, x_test = x_all[first], y_all[first], x_all[~first]
    ours = LogisticProbe(DEFAULT_LAMBDA).fit(x, y)
    ref = LogisticProbe(DEFAULT_LAMBDA, backend="sklearn", tol=1e-10, max_iter=10000).fit(x, y)
    assert ours.objective_ <= ref.objective_ * (1 + 1e-6)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-2 * np.abs(ref.coef_).max())
    assert np.mean(ours.predict(x_test) == ref.predict(x_test)) > 0.98


def test_warm_start_at_the_optimum_stops_at_once():
    x, y = blobs(n_classes=20, per_class=5, dim=32)
    cold = LogisticProbe(0.1).fit(x, y)
    warm = LogisticProbe(0.1).fit(x, y, coef_init=cold.coef_)
    assert cold.gap_bound_ <= TORCH_TOL  # certified: the warm start needs no step
    assert warm.n_iter_ <= 1 < cold.n_iter_
    assert warm.objective_ <= cold.objective_ * (1 + 1e-7)


def test_objective_is_summed_log_loss_plus_half_lambda_norm_with_sklearn_scaling():
    x, y = blobs()
    lam = 0.3
    probe = LogisticProbe(lam, backend="sklearn", tol=1e-10, max_iter=10000).fit(x, y)
    xt = preprocess(x)
    w = torch.tensor(probe.coef_, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(xt.double() @ w.T, torch.tensor(y), reduction="sum") \
        + 0.5 * lam * (w * w).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-3  # sklearn's optimum (C = 1/lam) is a stationary point of our objective
    assert objective(probe.coef_, xt, y, lam) == pytest.approx(float(loss.detach()), rel=1e-6)


def test_many_class_few_shot_problem_does_not_return_a_zero_model():
    x, y = blobs(n_classes=200, per_class=1, dim=64, seed=3)
    probe = LogisticProbe(DEFAULT_LAMBDA).fit(x, y)
    assert np.abs(probe.coef_).max() > 0.1
    assert probe.score(x, y) == 1.0


def test_probe_has_no_intercept_and_is_sklearn_shaped():
    x, y = blobs()
    probe = LogisticProbe().fit(x, y + 10)
    assert list(probe.classes_) == list(range(10, 16))
    # No intercept: a constant row preprocesses to zero and must score 0 for every class; the scores of the
    # preprocessed rows are exactly linear in them (an intercept would add the same offset to every row).
    np.testing.assert_allclose(probe.decision_function(np.zeros((1, 24)) + 1.0), 0, atol=1e-6)
    raw = LogisticProbe(preprocess=False).fit(preprocess(x), y)
    z = preprocess(x[:5]).numpy()
    np.testing.assert_allclose(raw.decision_function(3.0 * z), 3.0 * raw.decision_function(z), rtol=1e-5, atol=1e-6)
    assert probe.score(x, y + 10) == 1.0  # separable blobs: the training images are all right
    shuffled = np.random.default_rng(0).permutation(y)
    assert probe.score(x, shuffled + 10) == pytest.approx(np.mean(shuffled == y))  # top-1 against other labels
    with pytest.raises(BadInputError):
        LogisticProbe(-1.0).fit(x, y)
    with pytest.raises(BadInputError):
        LogisticProbe(backend="nope").fit(x, y)


def test_lambda_selection_uses_cv_inside_the_shots_and_falls_back_for_one_shot():
    x, y = blobs(per_class=5, spread=3.0)
    choice = select_lambda(x, y, grid=(1e-3, 1e-1, 10.0))
    assert choice.scores is not None and set(choice.scores) == {1e-3, 1e-1, 10.0} and choice.source == "cv"
    assert choice.lam in choice.scores and all(0 <= s <= 1 for s in choice.scores.values())
    one_x, one_y = blobs(per_class=1)
    fallback = select_lambda(one_x, one_y)
    assert (fallback.lam, fallback.scores, fallback.coefs) == (DEFAULT_LAMBDA, None, {})
    assert fallback.source == "default (CV needs 2+ images per class)"


def test_lambda_auto_with_two_shots_uses_the_default_and_says_cv_had_too_few_images():
    # two images per class: each CV training fold is a 1-shot problem, scored on two held-out images per class
    for seed in range(3):
        x, y = blobs(n_classes=10, per_class=2, dim=32, seed=seed, spread=4.0)
        choice = select_lambda(x, y, seed=seed)
        assert (choice.lam, choice.scores) == (DEFAULT_LAMBDA, None)
        assert choice.source == "default (2 images per class, too few for CV)"
    assert select_lambda(x, y, min_shots=2).source == "cv"  # the threshold is a parameter, CV itself still works


def test_lambda_auto_picks_the_default_when_cv_cannot_tell_the_grid_apart_not_the_largest_lambda():
    # well-separated classes: every grid value predicts every held-out image right, so CV has no preference
    x, y = blobs(n_classes=6, per_class=5, dim=24, spread=0.2)
    choice = select_lambda(x, y)
    assert set(choice.scores.values()) == {1.0}
    assert DEFAULT_LAMBDA in LAMBDA_GRID and choice.lam == DEFAULT_LAMBDA and choice.source == "cv"
    assert LAMBDA_GRID[len(LAMBDA_GRID) // 2] == DEFAULT_LAMBDA  # the grid is centred on the default


def test_one_standard_error_rule_ignores_a_one_image_edge_but_not_a_clear_win():
    n = 50
    base = np.ones(n, dtype=bool)
    base[:4] = False  # the default's fits: 46 of 50 held-out images right
    one_better = base.copy()
    one_better[0] = True  # 47: one image better
    clearly = base.copy()
    clearly[:4] = True  # 50: four images better, none worse
    swapped = base.copy()
    swapped[[0, 1]], swapped[[10, 11]] = True, False  # the same count, on other images
    assert sorted(within_standard_errors({DEFAULT_LAMBDA: base, 0.25: one_better, 1e-4: swapped})) == \
        [1e-4, DEFAULT_LAMBDA, 0.25]
    assert within_standard_errors({DEFAULT_LAMBDA: base, 0.25: clearly, 1e-4: swapped}) == [0.25]
    assert within_standard_errors({DEFAULT_LAMBDA: base, 0.25: clearly}, standard_errors=3.0) == [DEFAULT_LAMBDA, 0.25]


def test_stratified_folds_cover_each_item_once_and_balance_classes():
    y = np.repeat(np.arange(4), 5)
    folds = stratified_folds(y, 5, seed=0)
    assert sorted(np.concatenate(folds)) == list(range(20))
    assert all(np.bincount(y[f], minlength=4).tolist() == [1, 1, 1, 1] for f in folds)


def test_lambda_selection_hands_back_each_lambdas_mean_fold_solution():
    x, y = blobs(per_class=5, spread=3.0)
    choice = select_lambda(x, y, grid=(1e-3, 1e-1, 10.0))  # returns the solutions, mutates nothing
    coefs = choice.coefs
    assert set(coefs) == set(choice.scores) and all(c.shape == (6, 24) for c in coefs.values())
    final = LogisticProbe(1e-3).fit(x, y)
    warm = LogisticProbe(1e-3).fit(x, y, coef_init=coefs[1e-3])
    assert warm.n_iter_ < final.n_iter_ and warm.objective_ <= final.objective_ * (1 + 1e-6)


def test_compact_lbfgs_direction_equals_the_two_loop_recursion():
    torch.manual_seed(0)
    dim, memory = 40, 4
    a = torch.randn(dim, dim, dtype=torch.float64)
    hessian = a @ a.T + torch.eye(dim, dtype=torch.float64)
    points = [torch.randn(dim, dtype=torch.float64) for _ in range(8)]
    grads = [(hessian @ p).float() for p in points]  # as in the solver, each push's g is the last push's g_new:
    history, pairs = _History(dim, memory), []  # the new pair's inner products come from reused projections
    for i, (w, w_new) in enumerate(zip(points[:-1], points[1:], strict=True)):  # 7 pairs through 4: the ring wraps
        s, y = w_new - w, hessian @ (w_new - w)
        history.push(w_new.float(), w.float(), grads[i + 1], grads[i])
        pairs = (pairs + [(s, y)])[-memory:]
    grad = torch.randn(dim, dtype=torch.float64)
    out = torch.empty(dim)
    history.direction(grad.float(), out)
    d, alphas = -grad.clone(), []  # Nocedal & Wright, algorithm 7.4
    for s, y in reversed(pairs):
        alphas.append(float(s @ d) / float(s @ y))
        d -= alphas[-1] * y
    d *= float(pairs[-1][0] @ pairs[-1][1]) / float(pairs[-1][1] @ pairs[-1][1])
    for (s, y), alpha in zip(pairs, reversed(alphas), strict=True):
        d += (alpha - float(y @ d) / float(s @ y)) * s
    torch.testing.assert_close(out.double(), d, rtol=1e-5, atol=1e-5 * float(d.norm()))


@pytest.mark.parametrize("lam", [0.0025, 0.3])
def test_certified_gap_bounds_the_true_distance_to_the_optimum(lam):
    x, y = blobs(n_classes=30, per_class=5, dim=48, seed=2, spread=2.0)
    loose = LogisticProbe(lam, tol=1e-3).fit(x, y)  # stops early, with a certificate of at most 1e-3
    ref = LogisticProbe(lam, backend="sklearn", tol=1e-10, max_iter=10000).fit(x, y)
    true_gap = (loose.objective_ - ref.objective_) / ref.objective_
    assert loose.gap_bound_ <= 1e-3
    assert 0 < true_gap <= loose.gap_bound_ + 1e-6  # the bound holds (float32 rounding aside)


def test_the_solver_does_not_depend_on_the_cpus_bf16_units(monkeypatch):
    x, y = blobs(n_classes=40, per_class=5, dim=32, seed=1, spread=2.0)
    fits = []
    for flags in ("", "avx512_bf16 amx_bf16"):
        monkeypatch.setenv("LOWSHOT_CPU_FLAGS", flags)
        fits.append(LogisticProbe(DEFAULT_LAMBDA).fit(x, y))
    np.testing.assert_array_equal(fits[0].coef_, fits[1].coef_)


def skewed(n_classes=50, per_class=5, dim=48, seed=4):
    """Blobs seen through a power-law spectrum, as ViT features are (one direction dominates)."""
    x, y = blobs(n_classes=n_classes, per_class=per_class, dim=dim, seed=seed, spread=2.0)
    rng = np.random.default_rng(seed)
    mix = np.linalg.qr(rng.normal(size=(dim, dim)))[0] * (1.0 + np.arange(dim)) ** -1.0
    return (x @ mix.T + 3.0 * rng.normal(size=dim) / np.sqrt(dim)).astype(np.float32), y


def test_whitening_changes_the_path_not_the_optimum_and_takes_fewer_iterations(monkeypatch):
    x, y = skewed()
    whitened = LogisticProbe(DEFAULT_LAMBDA).fit(x, y)
    monkeypatch.setattr(solver, "WHITEN", False)
    plain = LogisticProbe(DEFAULT_LAMBDA).fit(x, y)
    assert whitened.objective_ == pytest.approx(plain.objective_, rel=1e-6)
    assert whitened.objective_ <= plain.objective_ * (1 + 1e-7)
    assert whitened.n_iter_ < 0.7 * plain.n_iter_  # 53 against 111 (the features' spectrum decays as 1/i)


def test_a_trial_step_costs_a_softmax_not_a_product():
    x, y = skewed()
    xt = preprocess(x)
    loss = _SoftmaxLoss(xt, torch.as_tensor(y), DEFAULT_LAMBDA / len(y), 50)
    w0 = torch.zeros(50, xt.shape[1])
    w, f, n_iter, _ = _lbfgs(loss, w0.clone(), max_iter=200, tol=TORCH_TOL)
    assert n_iter > 5 and loss.products == 2 + 2 * n_iter  # one evaluation, then X d and the gradient per iteration
    # the logits at any step between two points are those of the point in between
    grad, d = torch.empty_like(w), torch.randn_like(w) * 0.1
    loss.evaluate(w, grad)
    loss.along(w, d)
    for step in (1.0, 0.3):
        expected = loss.evaluate(w + step * d, torch.empty_like(w))
        loss.evaluate(w, grad)
        loss.along(w, d)
        assert loss.value_at(step) == pytest.approx(expected, rel=1e-6)


def test_an_overshooting_trial_is_turned_down_on_its_first_block_of_rows():
    x, y = skewed()
    xt = preprocess(x)
    loss = _SoftmaxLoss(xt, torch.as_tensor(y), DEFAULT_LAMBDA / len(y), 50)
    w = torch.zeros(50, xt.shape[1])
    grad = torch.empty_like(w)
    f = loss.evaluate(w, grad)
    loss.along(w, -5000.0 * grad / grad.norm())  # a step far past the minimum along the steepest descent
    for step in (1.0, 0.5):
        full = loss.value_at(step)
        assert full > 8 * f
        bound = loss.value_at(step, limit=f)
        assert f < bound < full  # the first block's rows alone put it above the limit: a lower bound, not the value
        first = loss.blocks[0]
        logits = torch.lerp(loss.logits, loss.ends, step)[first]
        rows = torch.nn.functional.cross_entropy(logits.double(), torch.as_tensor(y)[first], reduction="sum")
        assert bound == pytest.approx(float(rows) / len(y) + 0.5 * loss.reg * loss.trial_penalty, rel=1e-5)
        assert loss.value_at(step, limit=full) == pytest.approx(full, rel=1e-12)  # under its limit: all rows


def test_the_loss_stays_exact_where_a_labels_probability_underflows():
    x, y = blobs(n_classes=5, per_class=4, dim=16, seed=3)
    xt = preprocess(x)
    w = torch.as_tensor(np.random.default_rng(0).normal(size=(5, 16)) * 400, dtype=torch.float32)
    logits = xt @ w.T
    assert (torch.softmax(logits, 1).gather(1, torch.as_tensor(y).view(-1, 1)) == 0).any()  # float32 underflows
    loss = _SoftmaxLoss(xt, torch.as_tensor(y), 0.1 / len(y), 5)
    value = loss.evaluate(w, torch.empty_like(w))
    assert value == pytest.approx(objective(w.numpy(), xt, y, 0.1) / len(y), rel=1e-6)


def test_fits_share_one_kept_block_of_logit_buffers_per_thread_and_leak_nothing_between_fits():
    big = solver._logit_buffers(300, 50, 4)
    small = solver._logit_buffers(100, 50, 4)
    assert small[0].data_ptr() == big[0].data_ptr() and all(b.shape == (100, 50) for b in small)
    assert len({b.data_ptr() for b in big}) == 4  # four distinct views of the block
    other = []
    thread = threading.Thread(target=lambda: other.append(solver._logit_buffers(100, 50, 4)[0].data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != small[0].data_ptr()  # each thread its own block
    # a fit between two fits of the same problem leaves the second identical to the first
    x, y = skewed()
    first = LogisticProbe(DEFAULT_LAMBDA).fit(x, y).coef_
    LogisticProbe(DEFAULT_LAMBDA).fit(*blobs(n_classes=50, per_class=9, dim=48, seed=1))
    assert np.array_equal(LogisticProbe(DEFAULT_LAMBDA).fit(x, y).coef_, first)


def test_the_float64_objective_is_computed_when_read_not_in_cross_validation(monkeypatch):
    calls = []
    real = logistic.objective
    monkeypatch.setattr(logistic, "objective", lambda *a: calls.append(1) or real(*a))
    x, y = blobs(per_class=10)
    select_lambda(x, y)
    assert calls == []  # 45 fits, none of them read it
    fitted = LogisticProbe(DEFAULT_LAMBDA).fit(x, y)
    assert calls == []
    assert fitted.objective_ == pytest.approx(real(fitted.coef_, preprocess(x), y, DEFAULT_LAMBDA), rel=1e-12)
    assert fitted.objective_ and calls == [1]  # once, then kept
