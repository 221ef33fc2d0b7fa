"""``--lambda auto`` against the fixed default λ, on real cached features, per labelled subset over the seeds.

Three ways to set λ, side by side on the same subsets (1, 2, 5 images per class and 1% of the labels, 3 seeds):

- ``default``: the protocol's fixed ``DEFAULT_LAMBDA``;
- ``auto``: ``select_lambda`` as ``lowshot probe --lambda auto`` runs it (cross-validation inside the shots only);
- ``auto, argmax``: the same CV fits ranked by plain best CV accuracy (ties to the larger λ) on the grid
  1e-4 … 1, with CV from 2 images per class: ``select_lambda(grid=ARGMAX_GRID, min_shots=2)``, then the maximum of
  its ``scores``. It shows what the one-standard-error rule and the shot threshold buy.

Feature sets (float32, MSN transform, pre-LayerNorm CLS): DeiT-Tiny on Imagenette (``../shared/data``), and the
same architecture with random weights (made by ``examples/make_random_model.py`` into ``benchmarks/out`` if absent),
whose features are weak and where λ matters more. Features come from the lowshot cache (``LOWSHOT_CACHE_DIR``): the
first run encodes the 3,925 val images and the train shots of each model.

    python benchmarks/lambda_auto.py        # writes benchmarks/results/lambda_auto.{json,md}

Test labels only score the fits; every λ is chosen on the training shots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DEIT_TINY, IMAGENETTE, RESULTS, begin, describe, publish  # noqa: E402
from examples.make_random_model import make_random_model  # noqa: E402
from lowshot import extract_features  # noqa: E402
from lowshot.classify.base import preprocess  # noqa: E402
from lowshot.classify.logistic import LAMBDA_GRID, LogisticProbe, select_lambda
from lowshot.config import (
    DEFAULT_LAMBDA,
    ProbeSettings,  # noqa: E402
)
from lowshot.protocol import draw_subsets, locate_rows  # noqa: E402

ARGMAX_GRID = tuple(float(f"{v:.6g}") for v in 10.0 ** np.arange(-4.0, 0.01, 0.5))  # 1e-4 … 1
RANDOM_MODEL = Path(__file__).resolve().parent / "out" / "deit-tiny-random"
RULES = ("default", "auto", "auto, argmax")


def evaluate(model: Path, data: Path, settings: ProbeSettings) -> list[dict]:
    """One row per subset x seed: test top-1 (%) and λ of each rule."""
    run = extract_features(str(model), str(data), dtype="float32", subsets=settings)
    train, test = run.train.features, run.test.features
    x_test, y_test = preprocess(np.asarray(test.features)), np.asarray(test.labels)
    subsets = draw_subsets(train.listing(), settings)
    rows = []
    for subset, where in zip(subsets, locate_rows(train, subsets), strict=True):
        x, y = preprocess(np.asarray(train.features[where])), np.asarray(train.labels)[where]
        auto = select_lambda(x, y, seed=subset.seed)
        wide = select_lambda(x, y, seed=subset.seed, grid=ARGMAX_GRID, min_shots=2)
        argmax = DEFAULT_LAMBDA if wide.scores is None else \
            max(sorted(wide.scores, reverse=True), key=wide.scores.get)  # max() keeps the first: the larger λ
        row = {"subset": subset.name, "seed": subset.seed, "n_train": len(y), "auto_source": auto.source}
        for rule, lam in zip(RULES, (DEFAULT_LAMBDA, auto.lam, argmax), strict=True):
            probe = LogisticProbe(lam, preprocess=False).fit(x, y)
            row[rule] = {"lambda": lam, "top1": round(100 * probe.score(x_test, y_test), 2)}
        rows.append(row)
        print(f"  {subset.name:7s} seed {subset.seed}: " + ", ".join(
            f"{rule} {row[rule]['top1']:.2f} (λ {row[rule]['lambda']:g})" for rule in RULES), flush=True)
    return rows


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (n - 1; None for one seed)."""
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def summarise(rows: list[dict]) -> list[dict]:
    """Per subset: mean ± std over seeds of each rule, and of auto − default paired by seed."""
    out = []
    for name in dict.fromkeys(r["subset"] for r in rows):
        group = [r for r in rows if r["subset"] == name]
        entry = {"subset": name, "seeds": len(group), "auto_sources": sorted({r["auto_source"] for r in group})}
        for rule in RULES:
            mean, std = mean_std([r[rule]["top1"] for r in group])
            entry[rule] = {"mean": round(mean, 2), "std": None if std is None else round(std, 2),
                           "lambdas": [r[rule]["lambda"] for r in group]}
        for rule in RULES[1:]:
            mean, std = mean_std([r[rule]["top1"] - r["default"]["top1"] for r in group])
            entry[f"{rule} - default"] = {"mean": round(mean, 2), "std": None if std is None else round(std, 2)}
        out.append(entry)
    return out


def render(payload: dict) -> str:
    def cell(stat: dict) -> str:
        return f"{stat['mean']:.1f}" + ("" if stat["std"] is None else f" ± {stat['std']:.1f}")

    def lambdas(stat: dict) -> str:
        return "/".join(f"{v:.2g}" for v in stat["lambdas"])

    lines = [f"# `--lambda auto` against the default λ = {DEFAULT_LAMBDA:g}", "",
             f"Machine: {describe(payload['machine'])}.", "",
             "Top-1 (%) on all of Imagenette's val split (3,925 images), mean ± std over 3 seeds; λ per seed. "
             f"`auto`: lowshot's `select_lambda` (grid {LAMBDA_GRID[0]:g} … {LAMBDA_GRID[-1]:g}, centred on "
             "the default; the default below 3 images per class; else among the grid values within one standard "
             "error of the best CV accuracy, the one closest to the default). `auto, argmax`: the best CV accuracy "
             "on the grid 1e-4 … 1, ties to the larger λ, CV from 2 images per class. Δ: minus the default, "
             "paired by seed.", ""]
    header = ["features", "subset", "default", "auto", "λ (auto)", "Δ auto", "auto, argmax", "λ (argmax)",
              "Δ argmax"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, block in payload["feature_sets"].items():
        for s in block["summary"]:
            why = " (default)" if all(src.startswith("default") for src in s["auto_sources"]) else ""
            lines.append("| " + " | ".join([
                name, s["subset"], cell(s["default"]), cell(s["auto"]), lambdas(s["auto"]) + why,
                cell(s["auto - default"]), cell(s["auto, argmax"]), lambdas(s["auto, argmax"]),
                cell(s["auto, argmax - default"])]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=IMAGENETTE)
    parser.add_argument("--seeds", type=int, default=3)
    args, info = begin(parser)
    if not (RANDOM_MODEL / "config.json").exists():
        make_random_model(DEIT_TINY, RANDOM_MODEL)
    settings = ProbeSettings(shots=(1, 2, 5), percents=(1,), seeds=args.seeds)
    payload = {"machine": info, "data": args.data.name, "default_lambda": DEFAULT_LAMBDA, "grid": list(LAMBDA_GRID),
               "argmax_grid": list(ARGMAX_GRID), "feature_sets": {}}
    for name, model in (("DeiT-Tiny", DEIT_TINY), ("DeiT-Tiny, random weights", RANDOM_MODEL)):
        print(name, flush=True)
        rows = evaluate(model, args.data, settings)
        payload["feature_sets"][name] = {"model": model.name, "rows": rows, "summary": summarise(rows)}
    publish("lambda_auto", payload, render(payload), out_dir=args.out or RESULTS)


if __name__ == "__main__":
    main()
