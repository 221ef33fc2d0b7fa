"""The protocol: a model and a dataset -> result rows (:func:`evaluate`), and its second half on features already
extracted (:func:`run_probe`: which subsets, seeds and lambdas -> result rows).

The labelled subsets are drawn from the train split's *listing* (``lowshot.data.subsets.draw_subsets``), so extraction
encodes only the images a protocol uses (``lowshot.features.extract``), and :func:`run_probe` finds their rows in a
feature entry that may hold only them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowshot import __version__
from lowshot.classify.base import ScoreClassifier, preprocess
from lowshot.classify.logistic import LAMBDA_GRID, LogisticProbe, select_lambda
from lowshot.classify.neighbors import KNN_K_GRID, KNNClassifier, NearestClassMean
from lowshot.config import CLASSIFIERS, DEFAULT_LAMBDA, DEFAULT_MODEL, ExtractSettings, ProbeSettings
from lowshot.data.subsets import Subset, draw_subsets, needed_indices, probe_settings, scored_indices
from lowshot.errors import DataError, MissingFeaturesError
from lowshot.features.extract import Extraction, extract_features
from lowshot.features.store import Features
from lowshot.io import digest, now_iso
from lowshot.results.rows import Predictions, Results, interval_key, row_key
from lowshot.results.stats import CI_LEVEL, METRICS, bootstrap_ci, metric_value, true_class_rank

Progress = Callable[[str, int, int], None]
__all__ = ["CLASSIFIERS", "ProbeSettings", "draw_subsets", "needed_indices", "evaluate", "run_probe", "build_meta"]


def evaluate(model: str = DEFAULT_MODEL, data: str | os.PathLike | None = None, *,
             extract: ExtractSettings | None = None, probe: ProbeSettings | None = None,
             cache_dir: str | os.PathLike | None = None, progress: Progress | None = None, meta: dict | None = None,
             extracted: Callable[[Extraction], None] | None = None) -> Results:
    """The whole protocol for one model: encode the images ``probe``'s subsets and the test split need that the
    cache lacks (:func:`~lowshot.features.extract.extract_features` with ``extract``), then :func:`run_probe`.
    ``lowshot probe --model`` and ``lowshot bench`` both run it. ``extracted`` is called with the extraction before
    the fits start (what was cached, what was encoded: a front end reports it there); ``meta`` as for
    :func:`build_meta`."""
    probe = probe if probe is not None else ProbeSettings()
    run = extract_features(model, data, extract, subsets=probe, cache_dir=cache_dir, progress=progress)
    if extracted is not None:
        extracted(run)
    return run_probe(run.train.features, run.test.features, probe, meta=meta, progress=progress)


def scored_test(test: Features, settings: ProbeSettings) -> Features:
    """The test features the run scores: ``test`` itself for the protocol (which needs the whole split held), or
    with ``settings.limit`` the rows of :func:`scored_indices` (an entry of a full run holds them too)."""
    wanted = scored_indices(settings, test.listing())
    if wanted is None:
        if not test.complete:
            raise DataError(f"the test features hold {len(test):,} of the {len(test.listing()):,} test images; the "
                            "protocol scores the whole test split (extract it first, or probe with the --limit it "
                            "was extracted with)")
        return test
    rows = test.positions()[wanted]
    if (rows < 0).any():
        raise DataError(f"the test features hold {int((rows >= 0).sum()):,} of the {len(wanted):,} test images "
                        f"--limit {settings.limit} scores (extract them first, with the same --limit)")
    return dataclasses.replace(test, features=np.asarray(test.features[rows]), labels=np.asarray(test.labels)[rows],
                               ids=[test.ids[r] for r in rows], rows=rows if test.rows is None else test.rows[rows])


# -- the classifiers: one fit function each, in a registry ------------------------------------------------------
@dataclass
class FitContext:
    """What a classifier's fit may use besides its subset: the settings, the class count, and the warm starts of
    the logistic probe (the last solution of each seed: nested subsets start from it)."""

    settings: ProbeSettings
    n_classes: int
    warm: dict[int, np.ndarray]


def fit_logistic(x, y, subset: Subset, ctx: FitContext) -> tuple[ScoreClassifier, dict]:
    """The MSN probe at a fixed lambda, or ``lam="auto"``: CV inside the subset, then a fit from the folds' mean."""
    lam, start_from = ctx.settings.lam, ctx.warm.get(subset.seed)
    if lam == "auto":
        choice = select_lambda(x, y, backend=ctx.settings.backend, seed=subset.seed)
        chosen, source = choice.lam, choice.source
        mean = choice.coefs.get(chosen)
        if mean is not None and mean.shape[0] == ctx.n_classes:
            start_from = mean  # the folds' mean solution: about half the iterations
    else:
        chosen, source = float(lam), "fixed"
    model = LogisticProbe(chosen, backend=ctx.settings.backend, preprocess=False).fit(x, y, coef_init=start_from)
    if len(model.classes_) == ctx.n_classes:
        ctx.warm[subset.seed] = model.coef_
    return model, {"lambda": chosen, "lambda_source": source, "n_iter": model.n_iter_}


def fit_knn(x, y, subset: Subset, ctx: FitContext) -> tuple[ScoreClassifier, dict]:
    model = KNNClassifier(preprocess=False).fit(x, y)
    return model, {"lambda": None, "k": model.k_,
                   "k_source": "leave-one-out" if model.loo_scores_ is not None else "1 (one image per class)"}


def fit_ncm(x, y, subset: Subset, ctx: FitContext) -> tuple[ScoreClassifier, dict]:
    return NearestClassMean(preprocess=False).fit(x, y), {"lambda": None}


FITS: dict[str, Callable[..., tuple[ScoreClassifier, dict]]] = {"logistic": fit_logistic, "knn": fit_knn,
                                                                "ncm": fit_ncm}
assert tuple(FITS) == CLASSIFIERS  # one registry: config.CLASSIFIERS validates, FITS runs


# -- the run ----------------------------------------------------------------------------------------------------------
def run_probe(train: Features, test: Features, settings: ProbeSettings | None = None, *, meta: dict | None = None,
              progress: Progress | None = None, **options) -> Results:
    """Fit the MSN probe (and any neighbour classifiers in ``settings.classifiers``: ``knn``, ``ncm``) on every
    subset and score it on the whole test split.

    ``settings`` is a :class:`~lowshot.config.ProbeSettings`, or its fields as keyword arguments (``shots=(1, 2)``,
    ``lam="auto"``, ...). ``lam="auto"``: :func:`~lowshot.classify.logistic.select_lambda` inside each labelled
    subset (subsets with fewer than ``MIN_CV_SHOTS`` images in a class use ``DEFAULT_LAMBDA``, and their rows say
    so). ``ci=True`` adds a percentile bootstrap 95% interval over test images to every row and summary entry.
    ``train`` may hold only some of its split's images: those the subsets use must be there (else
    :class:`~lowshot.errors.MissingFeaturesError`, before any fit)."""
    settings = probe_settings(settings, options)
    _check_compatible(train, test)
    test = scored_test(test, settings)
    subsets = draw_subsets(train.listing(), settings)
    rows_of = locate_rows(train, subsets)
    x_test, y_test = preprocess(np.asarray(test.features)), np.asarray(test.labels)
    ctx = FitContext(settings, len(train.classes), {})
    rows, correct, kept = [], {}, []
    total = len(subsets) * len(settings.classifiers)
    task = f"probe ({total} fits)"
    for i, (subset, where) in enumerate(zip(subsets, rows_of, strict=True)):
        # row-wise preprocessing of the subset's rows only: the pool may be a memory-mapped ImageNet train split
        x, y = preprocess(np.asarray(train.features[where])), np.asarray(train.labels)[where]
        for j, classifier in enumerate(settings.classifiers):
            if progress:
                progress(task, i * len(settings.classifiers) + j, total)
            row, predicted, rank = score_subset(classifier, x, y, x_test, y_test, subset, ctx)
            correct.setdefault(interval_key(classifier, subset.name), []).append(rank == 0)
            kept.append((row_key(row), predicted, rank))  # per-image predictions: paired comparisons later
            rows.append(row)
    if progress:
        progress(task, total, total)
    predictions = Predictions(y_test, np.stack([p for _, p, _ in kept]), np.stack([r for _, _, r in kept]),
                              [k for k, _, _ in kept], order_fingerprint(test)) if kept else None
    return Results(build_meta(train, test, settings, meta), rows, summary_intervals(correct, settings), predictions)


def locate_rows(train: Features, subsets: list[Subset]) -> list[np.ndarray]:
    """Each subset's rows in ``train``; raises MissingFeaturesError (counting all of them) if any are not held."""
    position = train.positions()
    rows = [position[s.indices] for s in subsets]
    absent = np.unique(np.concatenate([s.indices[r < 0] for s, r in zip(subsets, rows, strict=True)] or [[]]))
    if len(absent):
        needed = len(np.unique(np.concatenate([s.indices for s in subsets])))
        listed = len(train.listing())
        raise MissingFeaturesError(
            f"features of {len(absent):,} of the {needed:,} train images these subsets use are not in the cache "
            f"(entry {train.key[:12]} holds {len(train):,} of {listed:,})",
            model=origin_of(train)["model"], data=origin_of(train)["data"], missing=len(absent))
    return rows


def score_subset(classifier: str, x, y, x_test, y_test, subset: Subset,
                 ctx: FitContext) -> tuple[dict, np.ndarray, np.ndarray]:
    """Fit one classifier on one subset and score it: (result row with top-1, top-5 and mean-per-class, predicted
    class of every test image, rank of its true class: ``stats.true_class_rank``)."""
    started = time.perf_counter()
    model, fitted = FITS[classifier](x, y, subset, ctx)
    predicted, rank = true_class_rank(model.class_scores(x_test), model.classes_, y_test)
    hit = rank == 0
    row = {"subset": subset.name, "shots": subset.shots, "percent": subset.percent, "seed": subset.seed,
           "classifier": classifier,
           **{field: round(metric_value(metric, rank, y_test), 4) for metric, field in METRICS.items()},
           "n_train": int(len(subset.indices)), "n_test": int(len(y_test)), **fitted}
    if ctx.settings.ci:
        low, high = bootstrap_ci(hit, n_boot=ctx.settings.n_boot,
                                 seed=_ci_seed(ctx.settings.ci_seed, classifier, subset.name, subset.seed))
        row.update(ci_low=low, ci_high=high)
    row["seconds"] = round(time.perf_counter() - started, 3)
    if subset.source:
        row.update(split_file=subset.source, missing=subset.missing)
    return row, predicted, rank


def summary_intervals(correct: dict[str, list[np.ndarray]], settings: ProbeSettings) -> dict[str, dict]:
    """Bootstrap CI per (classifier, subset), paired over seeds: one resample of the test images for all of them."""
    if not settings.ci:
        return {}
    intervals = {}
    for key, hits in correct.items():
        low, high = bootstrap_ci(np.stack(hits), n_boot=settings.n_boot,
                                 seed=_ci_seed(settings.ci_seed, *key.split("/", 1)))
        intervals[key] = {"ci_low": low, "ci_high": high}
    return intervals


def build_meta(train: Features, test: Features, settings: ProbeSettings, extra: dict | None = None) -> dict:
    """The results' ``meta``: versions, model and data, provenance, features, what each classifier does, and the
    settings, once: ``settings.probe`` and ``settings.extract`` are the settings objects' ``to_dict()`` as they are
    (``rows.settings_of`` reads them). ``extra`` adds or overrides keys (``lowshot bench`` records paths as its
    config gives them, relative to the config file, so committed results hold no machine paths)."""
    lam = settings.lam
    listing = train.listing()
    origin = origin_of(train)
    info = {
        "lowshot_version": __version__, "date": now_iso(),
        "model": origin["model"], "data": origin["data"], "provenance": provenance(origin),
        "train_split": train.manifest.get("split"), "test_split": test.manifest.get("split"),
        "n_train_pool": len(listing) if settings.limit is None else int(np.minimum(
            np.bincount(np.asarray(listing.labels), minlength=len(listing.classes)), settings.limit).sum()),
        "n_test": len(test), "n_classes": len(train.classes), "dim": train.dim,
        "readout": train.manifest.get("readout"),
        "dtype": train.manifest.get("dtype"),
        "device": train.manifest.get("device"), "transform": train.manifest.get("transform"),
        "cache_keys": {"train": train.key, "test": test.key},
        "train_fingerprint": fingerprint(train), "test_fingerprint": fingerprint(test),
        "probe": {"classifier": "logistic", "preprocess": "row-centre + L2",
                  "objective": "sum log-loss + lambda/2 ||W||^2, no intercept",
                  "lambda_grid": list(LAMBDA_GRID) if lam == "auto" else None, "lambda_default": DEFAULT_LAMBDA},
        "settings": {"probe": settings.to_dict(), **({"extract": train.manifest["extract_settings"]}
                                                     if "extract_settings" in train.manifest else {})},
        **(extra or {}),
    }
    if "knn" in settings.classifiers:
        info["knn"] = {"similarity": "cosine (row-centred + L2)", "vote": "majority, ties by summed similarity",
                       "k": "leave-one-out on the labelled subset; 1 with one image per class",
                       "k_grid": list(KNN_K_GRID)}
    if "ncm" in settings.classifiers:
        info["ncm"] = {"similarity": "cosine to the L2-normalised class mean (row-centred + L2 features)"}
    if settings.ci:
        info["ci"] = {"method": "percentile bootstrap over test images (paired across seeds in the summary)",
                      "level": CI_LEVEL}
    return info


def origin_of(features: Features) -> dict:
    """What produced ``features``: the origin of the request that returned them (``extract.Plan.origin``), else
    (an entry loaded by key) the model and data its manifest recorded at its last extraction."""
    if features.origin is not None:
        return features.origin
    manifest, info = features.manifest, features.manifest.get("model_info") or {}
    return {"model": manifest.get("model"), "model_source": info.get("source"), "revision": info.get("revision"),
            "identity": manifest.get("model_identity") or {}, "data": _dataset_of(features)}


def provenance(origin: dict) -> dict:
    """The results' ``provenance``: how the model was found (folder, hub with its revision, MSN checkpoint), the
    sha256 of its weights and config, and the git commit of the lowshot checkout (None when not run from one)."""
    return {"model_source": origin.get("model_source"), "revision": origin.get("revision"),
            **origin.get("identity", {}), "lowshot_commit": lowshot_commit()}


@functools.cache
def lowshot_commit() -> str | None:
    """The commit checked out where lowshot runs from a git clone (its folder's parent holds ``.git``), else None:
    an installed package, no git binary, or any git error (never a failure; once per process)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # not a clone: never the commit of some repository that encloses site-packages
        return None
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = done.stdout.strip()
    return sha if done.returncode == 0 and len(sha) in (40, 64) else None


def order_fingerprint(features: Features) -> str:
    """sha256 of the test ids in feature order: predictions of two files pair image by image only when equal."""
    return digest(list(features.ids))[:16]


def fingerprint(features: Features) -> str:
    """sha256 of a split's listed item ids and class names: the same images under the same labels give the same
    value on any machine, in any folder, and whether the entry holds all of the split's features or some."""
    listing = features.listing()
    labels = np.asarray(listing.labels)
    classes = list(listing.classes)
    return digest({"classes": classes,
                   "items": sorted(f"{classes[int(c)]}/{i}" for i, c in zip(listing.ids, labels, strict=True))})[:16]


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
