"""Synthetic cached features for the statistics tests: class centres plus Gaussian noise, or pure noise."""

from __future__ import annotations

import numpy as np

from lowshot.features.store import Features


def make_features(split: str, *, classes: int, per_class: int, dim: int = 16, signal: float = 1.0, seed: int = 0,
                  centres_seed: int = 0) -> Features:
    """``per_class`` rows per class: ``signal`` x a class centre (fixed by ``centres_seed``) + unit noise (``seed``).
    ``signal=0`` is a model that knows nothing: its features are pure noise."""
    centres = np.random.default_rng(centres_seed).normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    x = signal * centres[labels] + np.random.default_rng(seed).normal(size=(len(labels), dim))
    names = [f"c{c}" for c in range(classes)]
    ids = [f"{names[c]}/{split}{i}.jpg" for i, c in enumerate(labels)]
    return Features(f"key-{split}-{seed}", x.astype(np.float32), labels, ids, names,
                    {"split": split, "readout": {"name": "cls-prenorm"}, "data": f"/data/synthetic/{split}"})


def pair(*, classes: int = 4, per_class: int = 12, test_per_class: int = 9, signal: float = 1.0, seed: int = 0):
    """(train, test) features of one synthetic model: same class centres, independent noise per split."""
    return (make_features("train", classes=classes, per_class=per_class, signal=signal, seed=seed),
            make_features("val", classes=classes, per_class=test_per_class, signal=signal, seed=seed + 1000))
