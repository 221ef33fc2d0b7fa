"""Probe speed, all in one run:

1. the 1,000-class x 5-shot x 384-dim problem (lambda 0.0025, rows centred and L2-normalised): scikit-learn lbfgs
   (tol 1e-6) against lowshot's torch solver, repetitions interleaved: time, objective (float64), relative gap to
   scikit-learn and to the optimum, test accuracy;
2. the whole protocol on cached features -- 1/2/5 shots x 3 seeds + 1%, ``--lambda auto`` -- on an ImageNet-sized
   problem (1,000 classes, 1,281,100 train features of which 12,811 are the 1% labels, 50,000 test features,
   dim 384), read through the feature cache (memory-mapped);
3. loading 50,000 x 384 cached features.

    python benchmarks/probe_speed.py            # writes benchmarks/results/probe_speed.{json,md}

The features are synthetic: Gaussian classes whose spectrum after preprocessing matches real ViT features (one
dominant direction holding about a third of the energy, then a power-law decay, as DeiT-Tiny's features of
Imagenette), at a separation that gives about 60% 5-shot accuracy. Timings depend on the problem's conditioning;
the comparison is always on the same problem in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, begin, describe, median, publish  # noqa: E402
from lowshot.classify import solver  # noqa: E402
from lowshot.classify.base import preprocess
from lowshot.classify.flushed import run_flushed  # noqa: E402
from lowshot.classify.logistic import LogisticProbe  # noqa: E402
from lowshot.classify.solver import _SoftmaxLoss, objective

LAMBDA = 0.0025  # MSN README, 5 images per class
DIM, CLASSES = 384, 1000
SEPARATION = 0.45  # class-centre scale: ~60% top-1 at 5 shots
SPECTRUM_DECAY = 0.47  # singular values ~ i^-0.47: eigenvalues ~ i^-0.94, as DeiT-Tiny's Imagenette features
# ImageNet-1k: 1,281,167 train images; 1% = 12,811. Here 811 classes of 1,300 and 189 of 1,200 images: 1,281,100
# images whose stratified 1% (round half up per class) is exactly 13 x 811 + 12 x 189 = 12,811.
CLASS_SIZES = (1300,) * 811 + (1200,) * 189
TEST_PER_CLASS = 50  # 50,000 test features, as the ImageNet val split


class Generator:
    """Synthetic features: x = (centre[y] + noise) @ mix^T + offset, deterministic in ``seed``."""

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        spectrum = (1.0 + np.arange(DIM)) ** -SPECTRUM_DECAY
        self.mix = (np.linalg.qr(rng.normal(size=(DIM, DIM)))[0] * spectrum).astype(np.float32)
        self.centres = (rng.normal(size=(CLASSES, DIM)) * SEPARATION).astype(np.float32)
        offset = rng.normal(size=DIM)
        self.offset = (offset * np.linalg.norm(spectrum) / np.linalg.norm(offset)).astype(np.float32)
        self.rng = rng

    def draw(self, labels: np.ndarray) -> np.ndarray:
        z = self.centres[labels] + self.rng.standard_normal(size=(len(labels), DIM), dtype=np.float32)
        return z @ self.mix.T + self.offset


@contextlib.contextmanager
def whitening(on: bool):
    """Run lowshot's solver with or without its preconditioner (``lowshot.classify.logistic.WHITEN``)."""
    saved = solver.WHITEN
    solver.WHITEN = on
    try:
        yield
    finally:
        solver.WHITEN = saved


@contextlib.contextmanager
def solver_clock(record: list[float]):
    """Append the seconds spent inside the L-BFGS loop of each fit to ``record`` (fixed per-fit costs excluded)."""
    inner = solver._lbfgs

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)

    solver._lbfgs = timed
    try:
        yield
    finally:
        solver._lbfgs = inner


def evaluation_seconds(xt: torch.Tensor, y: np.ndarray, coef: np.ndarray, reps: int) -> float:
    """One loss + gradient evaluation (its two products and the softmax) timed alone at the solution, float32, best
    of ``reps``; on the thread the fits run on (``lowshot/classify/flushed.py``)."""
    return run_flushed(_evaluation_seconds, xt, y, coef, reps)


def _evaluation_seconds(xt: torch.Tensor, y: np.ndarray, coef: np.ndarray, reps: int) -> float:
    loss = _SoftmaxLoss(xt.contiguous(), torch.as_tensor(y), LAMBDA / len(y), CLASSES)
    w, grad = torch.as_tensor(coef).clone(), torch.empty(CLASSES, DIM)
    times = []
    for _ in range(reps + 1):  # the first one warms up
        start = time.perf_counter()
        loss.evaluate(w, grad)
        times.append(time.perf_counter() - start)
    return min(times[1:])


# (label, backend, preconditioned): lowshot as it runs, and without the features' second-moment preconditioner.
CANDIDATES = (("sklearn", "sklearn", None), ("lowshot", "torch", True), ("lowshot_unwhitened", "torch", False))


def solver_comparison(reps: int) -> dict:
    gen = Generator(0)
    y_train = np.repeat(np.arange(CLASSES), 5)
    y_test = np.repeat(np.arange(CLASSES), 10)
    x_train, x_test = gen.draw(y_train), gen.draw(y_test)
    xt = preprocess(x_train)
    optimum = LogisticProbe(LAMBDA, tol=1e-12, max_iter=5000).fit(x_train, y_train)
    f_star = objective(optimum.coef_, xt, y_train, LAMBDA)
    results: dict[str, dict] = {}
    times: dict[str, list[float]] = {name: [] for name, _, _ in CANDIDATES}
    loops: dict[str, list[float]] = {name: [] for name, _, _ in CANDIDATES}
    evaluations: list[float] = []
    # per repetition: loop seconds per iteration / one evaluation timed just before that fit (paired, so the
    # machine's state is the same for both; their median is the figure reported)
    ratios: dict[str, list[float]] = {name: [] for name, backend, _ in CANDIDATES if backend == "torch"}
    for _ in range(reps):
        for name, backend, whiten in CANDIDATES:
            paired_evaluation = evaluation_seconds(xt, y_train, optimum.coef_, 3) if name in ratios else None
            with whitening(bool(whiten)), solver_clock(loops[name]):
                start = time.perf_counter()
                probe = LogisticProbe(LAMBDA, backend=backend).fit(x_train, y_train)
                times[name].append(time.perf_counter() - start)
            if paired_evaluation is not None:
                evaluations.append(paired_evaluation)
                ratios[name].append(loops[name][-1] / probe.n_iter_ / paired_evaluation)
            results[name] = {"objective": objective(probe.coef_, xt, y_train, LAMBDA), "iterations": probe.n_iter_,
                             "top1": 100 * probe.score(x_test, y_test), "tol": probe.tol,
                             "predictions": probe.predict(x_test)}
    evaluation = min(evaluations)
    reference_predictions = optimum.predict(x_test)
    for name, r in results.items():
        differing = int((r.pop("predictions") != reference_predictions).sum())
        r.update(seconds=min(times[name]), seconds_median=median(times[name]), seconds_all=times[name],
                 gap_to_optimum=(r["objective"] - f_star) / f_star,
                 seconds_per_iteration=min(times[name]) / r["iterations"],
                 predictions_differing_from_optimum=differing, top1_identical_to_optimum=differing == 0)
        if loops[name]:
            r["loop_seconds_per_iteration"] = min(loops[name]) / r["iterations"]
    sk, ours, plain = results["sklearn"], results["lowshot"], results["lowshot_unwhitened"]
    paired = [a / b for a, b in zip(times["sklearn"], times["lowshot"], strict=True)]
    return {"problem": {"classes": CLASSES, "shots": 5, "dim": DIM, "lambda": LAMBDA, "n_test": len(y_test)},
            "optimum": {"objective": f_star, "top1": 100 * optimum.score(x_test, y_test),
                        "iterations": optimum.n_iter_},
            "results": results, "evaluation_seconds": evaluation,
            "iteration_over_evaluation": median(ratios["lowshot"]),
            "iteration_over_evaluation_all": ratios["lowshot"],
            "iteration_over_evaluation_unwhitened": median(ratios["lowshot_unwhitened"]),
            "speedup_best": sk["seconds"] / ours["seconds"], "speedup_median_of_pairs": median(paired),
            "speedup_unwhitened_best": sk["seconds"] / plain["seconds"],
            "gap_lowshot_to_sklearn": (ours["objective"] - sk["objective"]) / sk["objective"],
            "top1_difference": ours["top1"] - sk["top1"]}


def imagenet_sized_features(root: Path):
    """Write the synthetic ImageNet-sized train/test features into a lowshot feature cache and load them back."""
    from lowshot.features.store import FeatureCache, Features, ShardStore

    gen = Generator(1)
    labels = np.repeat(np.arange(CLASSES), CLASS_SIZES)
    path = root / "train-features.npy"
    features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(labels), DIM))
    for lo in range(0, len(labels), 1 << 16):
        features[lo:lo + (1 << 16)] = gen.draw(labels[lo:lo + (1 << 16)])
    features.flush()
    del features
    classes = [f"n{c:08d}" for c in range(CLASSES)]
    ids = [f"{classes[c]}/{classes[c]}_{i}.JPEG" for c, size in enumerate(CLASS_SIZES) for i in range(size)]
    # memory-mapped as FeatureCache.load does (committing 2 GB through the cache would only add a copy and a hash)
    train = Features("train", np.load(path, mmap_mode="r"), labels, ids, classes, {"split": "train"})
    cache = FeatureCache(root / "cache")
    y_test = np.repeat(np.arange(CLASSES), TEST_PER_CLASS)
    test_ids = [f"{classes[c]}/val_{i}.JPEG" for i, c in enumerate(y_test)]
    key = FeatureCache.key_for({"benchmark": "probe_speed", "split": "val"})
    store = ShardStore(cache.partial_dir(key), dim=DIM)  # written as an extraction writes it: shards, then an entry
    store.write(np.arange(len(y_test)), gen.draw(y_test), {})
    test = cache.grow(key, None, store, ids=test_ids, labels=y_test, manifest={"classes": classes, "split": "val"})
    store.discard()
    return cache, train, test


def protocol(root: Path, seeds: int) -> dict:
    from lowshot.protocol import run_probe

    started = time.perf_counter()
    cache, train, test = imagenet_sized_features(root)
    generated = time.perf_counter() - started
    loads = []
    for _ in range(3):
        start = time.perf_counter()
        entry = cache.load(test.key)
        loaded = np.asarray(entry.features).sum()  # touch every page
        loads.append(time.perf_counter() - start)
    assert np.isfinite(loaded)
    start = time.perf_counter()
    test = cache.load(test.key)
    results = run_probe(train, test, shots=(1, 2, 5), percents=(1,), seeds=seeds, lam="auto")
    seconds = time.perf_counter() - start
    splits = {}
    for row in results.rows:
        s = splits.setdefault(row["subset"], {"seconds": 0.0, "fits": 0, "n_train": row["n_train"], "lambdas": []})
        s["seconds"] += row["seconds"]
        s["fits"] += 1
        s["lambdas"].append(row["lambda"])
    return {"seconds": seconds, "seeds": seeds, "generate_seconds": generated, "splits": splits,
            "summary": results.summary, "n_train_pool": len(train), "n_test": len(test),
            "load_50000x384_seconds": min(loads), "load_50000x384_seconds_all": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions of the solver comparison")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the full protocol (0 skips it)")
    args, info = begin(parser)  # host memory kept as the CLI keeps it: a fit's logit buffers reuse the last fit's pages
    started = time.perf_counter()
    torch.manual_seed(0)
    comparison = solver_comparison(args.reps)
    print(f"solver: {comparison['speedup_best']:.2f}x scikit-learn", flush=True)
    full = None
    if args.seeds:
        with tempfile.TemporaryDirectory(prefix="lowshot-probe-bench-") as tmp:
            full = protocol(Path(tmp), args.seeds)
    payload = {"machine": info, "solver": comparison, "protocol": full,
               "seconds_total": time.perf_counter() - started,
               "command": "python benchmarks/probe_speed.py " + " ".join(sys.argv[1:])}
    publish("probe_speed", payload, render(payload), out_dir=args.out or RESULTS)


def _differing(count: int, total: int) -> str:
    return "every test prediction identical" if count == 0 else f"{count} of {total:,} test predictions differ"


def render(p: dict) -> str:
    c = p["solver"]
    r = c["results"]
    lines = [
        "# Probe speed",
        "",
        f"Machine: {describe(p['machine'])}.  ",
        f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all).",
        "",
        f"## 1,000 classes x 5 shots x 384 dims, lambda {c['problem']['lambda']} (synthetic, realistic spectrum)",
        "",
        "| solver | seconds (best; median) | iterations | objective | gap to optimum | top-1 (%) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    labels = {"sklearn": "scikit-learn lbfgs, tol 1e-6",
              "lowshot": "lowshot L-BFGS (default: whitened, line search on the logits)",
              "lowshot_unwhitened": "lowshot L-BFGS without the whitening preconditioner"}
    for key, label in labels.items():
        x = r[key]
        lines.append(f"| {label} | {x['seconds']:.2f}; {x['seconds_median']:.2f} | {x['iterations']} | "
                     f"{x['objective']:.4f} | {x['gap_to_optimum']:.1e} | {x['top1']:.2f}"
                     f" ({_differing(x['predictions_differing_from_optimum'], c['problem']['n_test'])}) |")
    o = c["optimum"]
    lines += [
        f"| (best found: lowshot, tol 1e-12) | | {o['iterations']} | {o['objective']:.4f} | 0 | "
        f"{o['top1']:.2f} |",
        "",
        f"lowshot is **{c['speedup_best']:.1f}x faster** than scikit-learn (best times; median of paired "
        f"repetitions {c['speedup_median_of_pairs']:.1f}x; without whitening {c['speedup_unwhitened_best']:.1f}x; "
        f"target 3x), its objective **{c['gap_lowshot_to_sklearn']:+.1e}** relative to scikit-learn's, top-1 "
        f"**{c['top1_difference']:+.2f} points** against scikit-learn's and {r['lowshot']['top1'] - o['top1']:+.2f} "
        "against the best solution found. Gaps are to the lowest objective found (float64); in brackets, how many "
        "of the test predictions differ from the best solution's (scores within float32 rounding of a tie flip "
        "between solutions this close). Every product runs in float32 on every CPU.",
        "",
        f"One loss + gradient evaluation timed alone (two products + softmax, 5,000 x 1,000 logits, float32, best "
        f"of 3 just before each fit): **{1000 * c['evaluation_seconds']:.1f} ms** at best. One L-BFGS iteration "
        f"(the solver loop's time over its iterations): **{1000 * r['lowshot']['loop_seconds_per_iteration']:.1f} "
        f"ms** at best; over the evaluation timed just before the same fit **{c['iteration_over_evaluation']:.2f}x** "
        f"(median of the repetitions: {', '.join(f'{v:.2f}' for v in c['iteration_over_evaluation_all'])}; target "
        f"<= 1.3x; without whitening {c['iteration_over_evaluation_unwhitened']:.2f}x); the whole fit over its "
        f"iterations (preprocessing and whitening included): "
        f"{1000 * r['lowshot']['seconds_per_iteration']:.1f} ms.",
    ]
    f = p["protocol"]
    if f:
        lines += [
            "",
            f"## The whole protocol: 1/2/5 shots x {f['seeds']} seeds + 1%, `--lambda auto`",
            "",
            f"{f['n_train_pool']:,} train features (a memory-mapped .npy, as the cache loads them), "
            f"{f['n_test']:,} test, 1,000 classes, dim 384: **{f['seconds']:.0f} s ({f['seconds'] / 60:.1f} min)** "
            f"for {sum(s['fits'] for s in f['splits'].values())} subsets, each choosing lambda by CV over 9 values "
            "(min(5, images per class) folds; 1-shot: the default lambda), then one fit scored on all test features.",
            "",
            "| split | train images | seconds (all seeds) | lambda chosen | top-1 (%) |",
            "| --- | --- | --- | --- | --- |",
        ]
        summary = {s["subset"]: s for s in f["summary"]}
        for name, s in f["splits"].items():
            lines.append(f"| {name} | {s['n_train']:,} | {s['seconds']:.1f} | "
                         f"{', '.join(f'{v:g}' for v in s['lambdas'])} | "
                         f"{summary[name]['mean']:.1f} ± {summary[name]['std']:.1f} |")
        lines += ["", f"Loading 50,000 x 384 cached features (memory-mapped, every page touched): "
                      f"**{1000 * f['load_50000x384_seconds']:.0f} ms**."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
