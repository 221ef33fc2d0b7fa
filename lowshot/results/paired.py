"""Paired statistics between two results files on the same test images: the difference per (classifier, subset),
its paired bootstrap interval over test images and the combined McNemar p-value, from the kept per-image
predictions.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lowshot.errors import BadInputError
from lowshot.results.rows import Results, classifier_of, row_key
from lowshot.results.stats import (
    DEFAULT_METRIC,
    DEFAULT_N_BOOT,
    class_weights,
    mcnemar_exact,
    metric_hits,
    paired_bootstrap_ci,
    seed_correlation,
    stouffer,
)

# -- paired differences -------------------------------------------------------------------------------------------
PAIRED_METHOD = ("Δ = row − reference, mean over paired seeds; 95% CI: paired bootstrap over test images (one "
                 "resample for both files and every seed; stratified by class for mean-per-class); p: exact McNemar "
                 "per seed, combined by Stouffer's signed Z corrected for the seeds' correlation (top-1, top-5)")


@dataclass(frozen=True)
class PairedDelta:
    """B − A for one (classifier, subset, metric), from the two files' predictions on the same test images."""

    classifier: str
    subset: str
    metric: str
    delta: float  # points, mean over seeds
    ci_low: float
    ci_high: float
    p_value: float | None  # None for mean-per-class (McNemar tests per-image outcomes, not class-weighted means)
    n_seeds: int
    b_only: int  # images right in B and wrong in A, summed over seeds (McNemar's discordant pairs)
    a_only: int

    @property
    def significant(self) -> bool:
        """The 95% interval excludes 0 (an interval of [0, 0], a file against itself, never is)."""
        return self.ci_low > 0 or self.ci_high < 0


def unpaired_reason(reference: Results, other: Results, names: tuple[str, str] = ("A", "B")) -> str | None:
    """Why the two files cannot be compared image by image (one line), or None when they can."""
    for results, name in zip((reference, other), names, strict=True):
        if results.predictions is None:
            return (f"paired statistics need per-image predictions, and {name} has none (written before lowshot "
                    "kept them); rerun 'lowshot probe' to get them")
    a, b = reference.predictions, other.predictions
    if a.order != b.order or len(a.labels) != len(b.labels) or not np.array_equal(a.labels, b.labels):
        return f"paired statistics need the same test images in the same order, and {names[0]} and {names[1]} differ"
    return None


def paired_differences(reference: Results, other: Results, *, metric: str = DEFAULT_METRIC,
                       n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
                       names: tuple[str, str] = ("A", "B")) -> list[PairedDelta]:
    """Δ = other − reference for every (classifier, subset) both measured with the same seeds, from the kept
    per-image predictions: the paired bootstrap interval and the combined McNemar p-value (``PAIRED_METHOD``).
    Raises BadInputError (one line) when the files cannot be paired."""
    reason = unpaired_reason(reference, other, names)
    if reason:
        raise BadInputError(reason)
    a, b = reference.predictions, other.predictions
    labels = a.labels
    weights = class_weights(labels) if metric == "mean-per-class" else None
    groups: dict[tuple[str, str], list[str]] = {}
    for row in reference.rows:
        groups.setdefault((classifier_of(row), row["subset"]), []).append(row_key(row))
    out = []
    for (classifier, subset), keys in groups.items():
        if not all(k in b.keys for k in keys):
            continue  # not measured with the same seeds in the other file (the gate says so)
        a_hits = np.stack([metric_hits(metric, a.of(k)[1]) for k in keys])
        b_hits = np.stack([metric_hits(metric, b.of(k)[1]) for k in keys])
        diff = b_hits - a_hits
        delta = 100.0 * float(diff.mean(axis=0) @ weights) if weights is not None else 100.0 * float(diff.mean())
        low, high = paired_bootstrap_ci(diff, labels=labels if weights is not None else None, n_boot=n_boot,
                                        seed=[seed, zlib.crc32(f"{classifier}/{subset}/{metric}".encode())])
        tests = [mcnemar_exact(x, y) for x, y in zip(a_hits, b_hits, strict=True)]
        p_value = None if weights is not None else stouffer([t[0] for t in tests],
                                                            [int(np.sign(t[1] - t[2])) for t in tests],
                                                            correlation=seed_correlation(diff))
        out.append(PairedDelta(classifier, subset, metric, round(delta, 4), low, high, p_value, len(keys),
                               sum(t[1] for t in tests), sum(t[2] for t in tests)))
    return out


def pair_up(pairs: Iterable[tuple[Results, Results, tuple[str, str]]], *, metric: str = DEFAULT_METRIC,
            n_boot: int = DEFAULT_N_BOOT) -> tuple[dict[str, list[PairedDelta]], dict[str, str]]:
    """For each (reference, other, (reference's name, other's name)): other's :func:`paired_differences` against
    its reference, or why there are none, keyed by other's name (``Comparison.paired`` and ``.unpaired``)."""
    paired: dict[str, list[PairedDelta]] = {}
    unpaired: dict[str, str] = {}
    for reference, other, names in pairs:
        reason = unpaired_reason(reference, other, names)
        deltas = [] if reason else paired_differences(reference, other, metric=metric, n_boot=n_boot, names=names)
        if deltas:
            paired[names[1]] = deltas
        else:
            unpaired[names[1]] = reason or "no subset measured with the same classifier and seeds in both"
    return paired, unpaired


def format_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "1" if p >= 0.9995 else (f"{p:.3f}" if p >= 0.001 else f"{p:.0e}")


