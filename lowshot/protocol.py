"""The protocol on cached features: which subsets, seeds and lambdas -> result rows."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .cache import Features, digest, now_iso
from .errors import BadInputError, DataError, SplitError
from .neighbors import KNN_K_GRID, KNNClassifier, NearestClassMean
from .probe import DEFAULT_LAMBDA, LAMBDA_GRID, LogisticProbe, preprocess, select_lambda
from .results import Results, interval_key
from .splits import (
    Subset,
    class_orders,
    k_shot,
    match_split_file,
    percent_subset,
    read_split_file,
    split_file_label,
)
from .stats import CI_LEVEL, DEFAULT_N_BOOT, bootstrap_ci

Progress = Callable[[str, int, int], None]
CLASSIFIERS = ("logistic", "knn", "ncm")  # the MSN probe, then the neighbour classifiers (lowshot.neighbors)


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
    classifiers: Sequence[str] = ("logistic",),
    ci: bool = False,
    n_boot: int = DEFAULT_N_BOOT,
    ci_seed: int = 0,
    meta: dict | None = None,
    progress: Progress | None = None,
) -> Results:
    """Fit the MSN probe (and any neighbour classifiers in ``classifiers``: ``knn``, ``ncm``) on every subset and
    score it on the whole test split.

    ``lam`` is a number, or ``"auto"``: cross-validation inside each labelled subset over ``LAMBDA_GRID``
    (1-shot subsets, where CV is impossible, use ``DEFAULT_LAMBDA``). ``ci=True`` adds a percentile bootstrap
    95% interval over test images (``n_boot`` replicates, seeded by ``ci_seed``) to every row and summary entry."""
    _check_compatible(train, test)
    if lam != "auto" and not (isinstance(lam, int | float) and lam > 0):
        raise BadInputError(f"--lambda {lam!r}: expected a positive number or 'auto'")
    classifiers = list(dict.fromkeys(classifiers))
    unknown = [c for c in classifiers if c not in CLASSIFIERS]
    if unknown or not classifiers:
        raise BadInputError(f"--classifier {','.join(unknown) or '(none)'!r}: expected some of "
                            f"{', '.join(CLASSIFIERS)}")
    if ci and n_boot < 1:
        raise BadInputError(f"--n-boot {n_boot}: need at least one bootstrap replicate")
    subsets = draw_subsets(train, shots=shots, percents=percents, seeds=seeds, split_files=split_files,
                           allow_fewer=allow_fewer)
    x_test = preprocess(np.asarray(test.features))
    y_train, y_test = np.asarray(train.labels), np.asarray(test.labels)
    rows = []
    correct: dict[str, list[np.ndarray]] = {}  # interval_key -> per-seed correctness on the test images
    warm: dict[int, np.ndarray] = {}
    task = f"probe ({len(subsets) * len(classifiers)} fits)"
    for i, subset in enumerate(subsets):
        # row-wise preprocessing of the subset's rows only: the pool may be a memory-mapped ImageNet train split
        x, y = preprocess(np.asarray(train.features[subset.indices])), y_train[subset.indices]
        for j, classifier in enumerate(classifiers):
            if progress:
                progress(task, i * len(classifiers) + j, len(subsets) * len(classifiers))
            started = time.perf_counter()
            row = {"subset": subset.name, "shots": subset.shots, "percent": subset.percent, "seed": subset.seed,
                   "classifier": classifier}
            if classifier == "logistic":
                start_from = warm.get(subset.seed)  # nested subsets of a seed: warm start from the last
                if lam == "auto":
                    cv_coefs: dict[float, np.ndarray] = {}
                    chosen, scores = select_lambda(x, y, backend=backend, seed=subset.seed, coefs=cv_coefs)
                    source = "cv" if scores is not None else "default (CV needs 2+ images per class)"
                    if chosen in cv_coefs and cv_coefs[chosen].shape[0] == len(train.classes):
                        start_from = cv_coefs[chosen]  # the folds' mean solution: about half the iterations
                else:
                    chosen, source = float(lam), "fixed"
                model = LogisticProbe(chosen, backend=backend, preprocess=False)
                model.fit(x, y, coef_init=start_from)
                if len(model.classes_) == len(train.classes):
                    warm[subset.seed] = model.coef_
                fitted = {"lambda": chosen, "lambda_source": source, "n_iter": model.n_iter_}
            elif classifier == "knn":
                model = KNNClassifier(preprocess=False).fit(x, y)
                fitted = {"lambda": None, "k": model.k_,
                          "k_source": "leave-one-out" if model.loo_scores_ is not None else "1 (one image per class)"}
            else:
                model = NearestClassMean(preprocess=False).fit(x, y)
                fitted = {"lambda": None}
            hit = model.predict(x_test) == y_test
            correct.setdefault(interval_key(classifier, subset.name), []).append(hit)
            row.update({"top1": round(100.0 * float(hit.mean()), 4), "n_train": int(len(subset.indices)),
                        "n_test": int(len(y_test)), **fitted})
            if ci:
                low, high = bootstrap_ci(hit, n_boot=n_boot, seed=_ci_seed(ci_seed, classifier, subset.name,
                                                                            subset.seed))
                row.update(ci_low=low, ci_high=high)
            row["seconds"] = round(time.perf_counter() - started, 3)
            if subset.source:
                row.update(split_file=subset.source, missing=subset.missing)
            rows.append(row)
    if progress:
        progress(task, len(subsets) * len(classifiers), len(subsets) * len(classifiers))
    intervals = {}
    if ci:
        for key, hits in correct.items():  # paired over seeds: one resample of the test images for all of them
            low, high = bootstrap_ci(np.stack(hits), n_boot=n_boot, seed=_ci_seed(ci_seed, *key.split("/", 1)))
            intervals[key] = {"ci_low": low, "ci_high": high}
    info = {
        "lowshot_version": __version__, "date": now_iso(),
        "model": train.manifest.get("model"), "data": _dataset_of(train),
        "train_split": train.manifest.get("split"), "test_split": test.manifest.get("split"),
        "n_train_pool": len(train), "n_test": len(test), "n_classes": len(train.classes), "dim": train.dim,
        "feature": train.manifest.get("feature"), "readout": train.manifest.get("readout"),
        "dtype": train.manifest.get("dtype"),
        "device": train.manifest.get("device"), "transform": train.manifest.get("transform"),
        "cache_keys": {"train": train.key, "test": test.key},
        "train_fingerprint": fingerprint(train), "test_fingerprint": fingerprint(test),
        "classifiers": classifiers,
        "probe": {"classifier": "logistic", "backend": backend, "preprocess": "row-centre + L2",
                  "objective": "sum log-loss + lambda/2 ||W||^2, no intercept",
                  "lambda": lam if lam == "auto" else float(lam),
                  "lambda_grid": list(LAMBDA_GRID) if lam == "auto" else None, "lambda_default": DEFAULT_LAMBDA},
        "sampling": {"shots": sorted(set(shots)), "percents": sorted(set(percents)), "seeds": seeds,
                     "split_files": [str(p) for p in split_files], "allow_fewer": allow_fewer},
        **(meta or {}),
    }
    if "knn" in classifiers:
        info["knn"] = {"similarity": "cosine (row-centred + L2)", "vote": "majority, ties by summed similarity",
                       "k": "leave-one-out on the labelled subset; 1 with one image per class",
                       "k_grid": list(KNN_K_GRID)}
    if "ncm" in classifiers:
        info["ncm"] = {"similarity": "cosine to the L2-normalised class mean (row-centred + L2 features)"}
    if ci:
        info["ci"] = {"method": "percentile bootstrap over test images (paired across seeds in the summary)",
                      "level": CI_LEVEL, "n_boot": n_boot, "seed": ci_seed}
    return Results(info, rows, intervals)


def fingerprint(features: Features) -> str:
    """sha256 of a split's item ids and class names: the same images under the same labels give the same value
    on any machine and in any folder (unlike the cache key, which sees paths' sizes and mtimes)."""
    labels = np.asarray(features.labels)
    return digest({"classes": list(features.classes),
                   "items": sorted(f"{features.classes[int(c)]}/{i}" for i, c in zip(features.ids, labels,
                                                                                      strict=True))})[:16]


def _dataset_of(features: Features) -> str | None:
    """The dataset a split came from: an ImageFolder split's manifest names its split folder (``…/data/train``)."""
    data, split = features.manifest.get("data"), features.manifest.get("split")
    if data and split and Path(str(data)).name == split:
        return str(Path(str(data)).parent)
    return data


def _ci_seed(seed: int, classifier: str, split: str, *rest: int) -> list[int]:
    """A bootstrap seed per (classifier, split[, seed]) that does not depend on the order of the rows."""
    return [seed, zlib.crc32(f"{classifier}/{split}".encode()), *rest]


def _check_compatible(train: Features, test: Features) -> None:
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"empty {'train' if len(train) == 0 else 'test'} features")
    if train.classes != test.classes:
        raise DataError("train and test features have different classes; extract both from one dataset")
    if train.dim != test.dim:
        raise DataError(f"train and test features differ in dimension ({train.dim} vs {test.dim})")
