"""Bootstrap confidence intervals on test accuracy: resample the test images, not the training shots.

The interval says how much the number would move on another test set of the same size drawn from the same
distribution; the ± std over seeds says how much it moves with another draw of the labelled shots. Both matter
and neither contains the other, so lowshot reports them side by side.
"""

from __future__ import annotations

import numpy as np

from .config import DEFAULT_N_BOOT  # noqa: F401 (declared with the probe settings; re-exported)

CI_LEVEL = 0.95
_CHUNK_ELEMENTS = 1 << 22  # replicates are drawn in chunks of at most this many indices (32 MB of int64)


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
    n = len(per_image)
    if n == 0:
        raise ValueError("no test images to resample")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    stats = np.empty(n_boot)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        stats[start:stop] = per_image[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = 100.0 * (1 - level) / 2
    low, high = np.percentile(100.0 * stats, [tail, 100.0 - tail])
    return round(float(low), 4), round(float(high), 4)
