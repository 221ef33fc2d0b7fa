"""The protocol on cached features: which subsets, seeds and lambdas -> result rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .cache import Features, now_iso
from .errors import BadInputError, DataError, SplitError
from .probe import DEFAULT_LAMBDA, LAMBDA_GRID, LogisticProbe, preprocess, select_lambda
from .results import Results
from .splits import (
    Subset,
    class_orders,
    k_shot,
    match_split_file,
    percent_subset,
    read_split_file,
    split_file_label,
)

Progress = Callable[[str, int, int], None]


def draw_subsets(train: Features, *, shots: Sequence[int] = (1, 2, 5), percents: Sequence[float] = (1.0,),
                 seeds: int = 3, split_files: Sequence[str | Path] = (), allow_fewer: bool = False) -> list[Subset]:
    """Every labelled subset of the run: per seed the k-shot and percent subsets (nested), then the split files
    (files with the same content label are seeds of one row)."""
    if seeds < 1:
        raise BadInputError(f"--seeds {seeds}: need at least one seed")
    for k in shots:
        if k < 1:
            raise BadInputError(f"--shots {k}: must be a positive number of images per class")
    for p in percents:
        if not 0 < p <= 100:
            raise BadInputError(f"--percent {p:g}: must be in (0, 100] (use 0 alone to skip it)")
    subsets = []
    for seed in range(seeds):
        orders = class_orders(train.ids, train.labels, train.classes, seed)
        for k in sorted(set(shots)):
            subsets.append(Subset(f"{k}-shot", seed, k_shot(orders, train.classes, k, allow_fewer=allow_fewer),
                                  shots=k))
        for p in sorted(set(percents)):
            subsets.append(Subset(f"{p:g}%", seed, percent_subset(orders, train.classes, p), percent=p))
    seen: dict[str, int] = {}
    for path in split_files:
        names = read_split_file(path)
        indices, missing = match_split_file(names, train.ids)
        if len(indices) == 0:
            raise SplitError(f"--split-file {path}: none of its {len(names)} names is in the train split "
                             f"(e.g. {names[0]!r}; train ids look like {train.ids[0]!r})")
        label, k = split_file_label(path, names)
        seed = seen.get(label, 0)
        seen[label] = seed + 1
        subsets.append(Subset(label, seed, indices, shots=k, source=str(path), missing=len(missing)))
    return subsets


def run_probe(
    train: Features,
    test: Features,
    *,
    shots: Sequence[int] = (1, 2, 5),
    percents: Sequence[float] = (1.0,),
    seeds: int = 3,
    lam: float | str = DEFAULT_LAMBDA,
    split_files: Sequence[str | Path] = (),
    allow_fewer: bool = False,
    backend: str = "torch",
    meta: dict | None = None,
    progress: Progress | None = None,
) -> Results:
    """Fit the MSN probe on every subset and score it on the whole test split.

    ``lam`` is a number, or ``"auto"``: cross-validation inside each labelled subset over ``LAMBDA_GRID``
    (1-shot subsets, where CV is impossible, use ``DEFAULT_LAMBDA``)."""
    _check_compatible(train, test)
    if lam != "auto" and not (isinstance(lam, int | float) and lam > 0):
        raise BadInputError(f"--lambda {lam!r}: expected a positive number or 'auto'")
    subsets = draw_subsets(train, shots=shots, percents=percents, seeds=seeds, split_files=split_files,
                           allow_fewer=allow_fewer)
    x_test = preprocess(np.asarray(test.features))
    y_train, y_test = np.asarray(train.labels), np.asarray(test.labels)
    rows = []
    warm: dict[int, np.ndarray] = {}
    task = f"probe ({len(subsets)} fits)"
    for i, subset in enumerate(subsets):
        if progress:
            progress(task, i, len(subsets))
        started = time.perf_counter()
        # row-wise preprocessing of the subset's rows only: the pool may be a memory-mapped ImageNet train split
        x, y = preprocess(np.asarray(train.features[subset.indices])), y_train[subset.indices]
        start_from = warm.get(subset.seed)  # nested subsets of a seed: warm start from the last
        if lam == "auto":
            cv_coefs: dict[float, np.ndarray] = {}
            chosen, scores = select_lambda(x, y, backend=backend, seed=subset.seed, coefs=cv_coefs)
            source = "cv" if scores is not None else "default (CV needs 2+ images per class)"
            if chosen in cv_coefs and cv_coefs[chosen].shape[0] == len(train.classes):
                start_from = cv_coefs[chosen]  # the folds' mean solution: half the iterations of the last subset's
        else:
            chosen, source = float(lam), "fixed"
        probe = LogisticProbe(chosen, backend=backend, preprocess=False)
        probe.fit(x, y, coef_init=start_from)
        if len(probe.classes_) == len(train.classes):
            warm[subset.seed] = probe.coef_
        row = {"split": subset.split, "shots": subset.shots, "percent": subset.percent, "seed": subset.seed,
               "top1": round(100.0 * probe.score(x_test, y_test), 4), "n_train": int(len(subset.indices)),
               "n_test": int(len(y_test)), "lambda": chosen, "lambda_source": source, "n_iter": probe.n_iter_,
               "seconds": round(time.perf_counter() - started, 3)}
        if subset.source:
            row.update(split_file=subset.source, missing=subset.missing)
        rows.append(row)
    if progress:
        progress(task, len(subsets), len(subsets))
    info = {
        "lowshot_version": __version__, "date": now_iso(),
        "model": train.manifest.get("model"), "data": train.manifest.get("data"),
        "train_split": train.manifest.get("split"), "test_split": test.manifest.get("split"),
        "n_train_pool": len(train), "n_test": len(test), "n_classes": len(train.classes), "dim": train.dim,
        "feature": train.manifest.get("feature"), "dtype": train.manifest.get("dtype"),
        "device": train.manifest.get("device"), "transform": train.manifest.get("transform"),
        "cache_keys": {"train": train.key, "test": test.key},
        "probe": {"classifier": "logistic", "backend": backend, "preprocess": "row-centre + L2",
                  "objective": "sum log-loss + lambda/2 ||W||^2, no intercept",
                  "lambda": lam if lam == "auto" else float(lam),
                  "lambda_grid": list(LAMBDA_GRID) if lam == "auto" else None, "lambda_default": DEFAULT_LAMBDA},
        "sampling": {"shots": sorted(set(shots)), "percents": sorted(set(percents)), "seeds": seeds,
                     "split_files": [str(p) for p in split_files], "allow_fewer": allow_fewer},
        **(meta or {}),
    }
    return Results(info, rows)


def _check_compatible(train: Features, test: Features) -> None:
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"empty {'train' if len(train) == 0 else 'test'} features")
    if train.classes != test.classes:
        raise DataError("train and test features have different classes; extract both from one dataset")
    if train.dim != test.dim:
        raise DataError(f"train and test features differ in dimension ({train.dim} vs {test.dim})")
