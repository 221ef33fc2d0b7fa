"""Bootstrap confidence intervals on test accuracy: resample the test images, not the training shots.

The interval says how much the number would move on another test set of the same size drawn from the same
distribution; the ± std over seeds says how much it moves with another draw of the labelled shots. Both matter
and neither contains the other, so lowshot reports them side by side.
"""

from __future__ import annotations

import math

import numpy as np

from lowshot.config import DEFAULT_N_BOOT  # noqa: F401 (declared with the probe settings; re-exported)

CI_LEVEL = 0.95
_CHUNK_ELEMENTS = 1 << 22  # replicates are drawn in chunks of at most this many indices (32 MB of int64)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n − 1) over seeds. The std of a single value is None, not 0: a spread
    over one seed is undefined, and a 0 would claim the number does not move with another draw of the shots."""
    if not values:
        raise ValueError("no values to summarise")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def bootstrap_ci(correct: np.ndarray, *, n_boot: int = DEFAULT_N_BOOT, level: float = CI_LEVEL,
                 seed: int | list[int] = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of top-1 (%) from per-image correctness.

    ``correct`` is (n_test,) or (n_seeds, n_test) of 0/1: each replicate draws n_test test images with
    replacement (the same draw for every seed, a paired bootstrap) and takes the mean accuracy over seeds and
    images. ``seed`` seeds a numpy ``Generator`` (an int or a list of ints for ``SeedSequence``), so an
    interval is reproducible bit for bit."""
    if n_boot < 1:
        raise ValueError(f"n_boot {n_boot}: need at least one bootstrap replicate")
    if not 0 < level < 1:
        raise ValueError(f"level {level}: must be in (0, 1)")
    per_image = np.atleast_2d(np.asarray(correct, dtype=np.float64)).mean(axis=0)
    if len(per_image) == 0:
        raise ValueError("no test images to resample")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    return _percentile_interval(_resampled_means(per_image, n_boot, rng), level)


def _resampled_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` means of ``len(values)`` draws with replacement, drawn in chunks of at most ``_CHUNK_ELEMENTS``
    indices (memory stays bounded for 50,000 test images x 1,000 replicates)."""
    n = len(values)
    stats = np.empty(n_boot)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        stats[start:stop] = values[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return stats


def _percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of replicate fractions, in points."""
    tail = 100.0 * (1 - level) / 2
    low, high = np.percentile(100.0 * stats, [tail, 100.0 - tail])
    return round(float(low), 4), round(float(high), 4)


# -- metrics -------------------------------------------------------------------------------------------------------
# The metric names of --metric, and the results row field that holds each (top-1 stays the MSN protocol's number).
METRICS = {"top1": "top1", "top5": "top5", "mean-per-class": "mean_per_class"}
METRIC_LABELS = {"top1": "top-1", "top5": "top-5", "mean-per-class": "mean per-class"}
DEFAULT_METRIC = "top1"
_RANK_CHUNK = 4096
_SMALLEST_P = 1e-300  # a p-value that underflows to 0 is reported as this, so Stouffer's z stays finite
RANK_CAP = 255  # the rank of the true class is stored as uint8: 255 means "255th or worse" (top-k for k <= 255)


def parse_metrics(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"top1,top5"`` -> ``["top1", "top5"]``; an unknown name is a BadInputError naming the known ones."""
    from lowshot.errors import BadInputError

    names = [m for m in (text.replace(" ", "").split(",") if isinstance(text, str) else text) if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise BadInputError(f"--metric {','.join(unknown) or '(none)'!r}: expected some of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def true_class_rank(scores: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted labels and the rank of each image's true label in its class scores (0: the prediction is right).

    ``scores`` is (n, n_known) over ``classes`` (the labels the classifier saw); ties rank like ``argmax`` (the lower
    class index first), so ``rank == 0`` exactly when ``predict`` is right. A true label the classifier never saw
    (a class absent from the labelled subset) gets ``RANK_CAP``."""
    scores = np.asarray(scores)
    classes = np.asarray(classes)
    labels = np.asarray(labels)
    predicted = classes[scores.argmax(axis=1)]
    column = np.searchsorted(classes, labels)
    seen = (column < len(classes)) & (classes[np.minimum(column, len(classes) - 1)] == labels)
    column = np.where(seen, column, 0)
    rank = np.empty(len(labels), dtype=np.int64)
    index = np.arange(scores.shape[1])[None, :]
    for start in range(0, len(labels), _RANK_CHUNK):  # temporaries bounded by the block, not n x classes
        block, col = scores[start:start + _RANK_CHUNK], column[start:start + _RANK_CHUNK]
        own = block[np.arange(len(block)), col][:, None]
        rank[start:start + len(block)] = (block > own).sum(axis=1) + ((block == own) & (index < col[:, None])).sum(1)
    rank = np.where(seen, np.minimum(rank, RANK_CAP), RANK_CAP)
    return predicted, rank.astype(np.uint8)


def metric_hits(metric: str, rank: np.ndarray) -> np.ndarray:
    """Per-image 0/1 for top-1 and top-5; for mean-per-class the top-1 hits (weighted by class in the means)."""
    return (np.asarray(rank) < (5 if metric == "top5" else 1)).astype(np.float64)


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Weights that turn a per-image mean into the mean over classes of per-class means: 1 / (C * n_c), C the
    classes present in the test labels (balanced accuracy, as scikit-learn's ``balanced_accuracy_score``)."""
    labels = np.asarray(labels)
    present, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / (len(present) * counts[codes])


def metric_value(metric: str, rank: np.ndarray, labels: np.ndarray) -> float:
    """One row's metric in percent, from the rank of the true label of every test image."""
    hits = metric_hits(metric, rank)
    if metric == "mean-per-class":
        return 100.0 * float(np.dot(class_weights(labels), hits))
    return 100.0 * float(hits.mean())


# -- paired differences --------------------------------------------------------------------------------------------
def paired_bootstrap_ci(diff: np.ndarray, *, labels: np.ndarray | None = None, n_boot: int = DEFAULT_N_BOOT,
                        level: float = CI_LEVEL, seed: int | list[int] = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (in points) of a paired difference B - A.

    ``diff`` is (n_seeds, n_test): per seed and image, B's hit minus A's hit. Each replicate resamples the test
    images once for both files and every seed (images are the shared unit: seeds of one image are not independent),
    then averages over seeds. With ``labels`` (mean-per-class) the resampling is stratified by class, so each class
    keeps its size and the statistic stays the mean over classes of per-class means."""
    if n_boot < 1:
        raise ValueError(f"n_boot {n_boot}: need at least one bootstrap replicate")
    per_image = np.atleast_2d(np.asarray(diff, dtype=np.float64)).mean(axis=0)
    if len(per_image) == 0:
        raise ValueError("no test images to resample")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    if labels is None:
        stats = _resampled_means(per_image, n_boot, rng)
    else:
        groups = [np.flatnonzero(np.asarray(labels) == c) for c in np.unique(labels)]
        stats = np.zeros(n_boot)
        for members in groups:
            stats += _resampled_means(per_image[members], n_boot, rng)
        stats /= len(groups)
    return _percentile_interval(stats, level)


def mcnemar_exact(a_hit: np.ndarray, b_hit: np.ndarray) -> tuple[float, int, int]:
    """Exact (binomial) two-sided McNemar test of one seed's paired 0/1 outcomes.

    Returns ``(p, b_only, a_only)``: under "A and B are equally accurate" each discordant image is B-right/A-wrong
    with probability 1/2, so ``p = min(1, 2 * P[Binomial(b_only + a_only, 1/2) <= min(b_only, a_only)])``
    (1 without discordant images)."""
    from scipy.stats import binom

    a, b = np.asarray(a_hit, dtype=bool), np.asarray(b_hit, dtype=bool)
    b_only, a_only = int(np.sum(b & ~a)), int(np.sum(a & ~b))
    n = b_only + a_only
    if n == 0:
        return 1.0, 0, 0
    p = 2.0 * float(binom.cdf(min(b_only, a_only), n, 0.5))
    return min(1.0, max(p, _SMALLEST_P)), b_only, a_only


def stouffer(p_values: list[float], signs: list[int], *, correlation: float = 0.0) -> float:
    """Combine two-sided per-seed p-values into one two-sided p with Stouffer's signed Z: z_s = sign_s *
    Phi^-1(1 - p_s / 2), Z = sum z_s / sqrt(S + S (S - 1) r), r the mean correlation between the seeds' statistics.

    Why Stouffer and not Fisher: the question is directional ("is B better than A?"). Fisher's -2 sum log p ignores
    the sign, so one seed where B wins and one where A loses count as agreeing evidence; signed Z lets seeds that
    disagree cancel. Why the correlation term (Strube, 1985, Psychological Bulletin 97: Stouffer for dependent
    tests): the seeds share the test images (and nested subsets share shots), so their statistics are positively
    correlated, and the independent form (r = 0) called 7-8% of no-difference comparisons significant at 0.05
    (benchmarks/paired_calibration.py)."""
    from scipy.stats import norm

    if not p_values:
        raise ValueError("no p-values to combine")
    s = len(p_values)
    r = min(max(float(correlation), 0.0), 1.0)
    z = sum(sign * float(norm.isf(p / 2.0)) for p, sign in zip(p_values, signs, strict=True))
    return float(min(1.0, max(2.0 * norm.sf(abs(z) / np.sqrt(s + s * (s - 1) * r)), _SMALLEST_P)))


def seed_correlation(diff: np.ndarray) -> float:
    """Mean pairwise correlation, across test images, of the seeds' per-image differences B - A (the rows of
    ``diff``): how much the seeds' McNemar statistics move together. 0 for one seed or constant rows."""
    diff = np.atleast_2d(np.asarray(diff, dtype=np.float64))
    if len(diff) < 2:
        return 0.0
    varying = diff[diff.std(axis=1) > 0]
    if len(varying) < 2:
        return 0.0
    corr = np.corrcoef(varying)
    return float(corr[~np.eye(len(varying), dtype=bool)].mean())
