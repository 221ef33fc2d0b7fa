"""How often do lowshot's paired statistics call a difference "significant" when there is none?

Pairs of "models" whose features are pure noise (independent Gaussian draws, so both sit at chance on every test
image) are probed under the same protocol (5 classes, 10 train images per class, 1- and 5-shot x 3 seeds, the
logistic probe), then compared with ``lowshot.results.paired.paired_differences``. A calibrated 95% interval
excludes 0, and a calibrated p-value falls below 0.05, in about 5% of such comparisons.

    python benchmarks/paired_calibration.py                    # 150 pairs x 2 subsets, 200 test images: ~3 min
    python benchmarks/paired_calibration.py --test-per-class 400

Writes benchmarks/results/paired_calibration_n<test images>.json and .md. Not a speed benchmark: the numbers do
not depend on the machine (every draw is seeded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import machine, publish  # noqa: E402


def noise_results(seed: int, *, classes: int, per_class: int, test_per_class: int, n_boot: int):
    from lowshot.features.store import Features
    from lowshot.protocol import run_probe

    def features(split: str, n: int, draw: int) -> Features:
        labels = np.repeat(np.arange(classes), n)
        x = np.random.default_rng(draw).normal(size=(len(labels), 16)).astype(np.float32)
        names = [f"c{c}" for c in range(classes)]
        return Features(f"{split}-{draw}", x, labels, [f"{names[c]}/{split}{i}.jpg" for i, c in enumerate(labels)],
                        names, {"split": split, "readout": {"name": "noise"}})

    return run_probe(features("train", per_class, seed), features("val", test_per_class, seed + 99),
                     shots=(1, 5), percents=(), seeds=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=150)
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--n-boot", type=int, default=500)
    args = parser.parse_args()
    from lowshot.results.paired import paired_differences

    options = {"classes": args.classes, "per_class": args.per_class, "test_per_class": args.test_per_class,
               "n_boot": args.n_boot}
    n = by_interval = by_p = 0
    for k in range(args.pairs):
        a = noise_results(2 * k + 1000, **options)
        b = noise_results(2 * k + 1001, **options)
        for d in paired_differences(a, b, n_boot=args.n_boot):
            n += 1
            by_interval += d.significant
            by_p += d.p_value < 0.05
    result = {"comparisons": n, "interval_excludes_0": by_interval, "p_below_0.05": by_p,
              "rate_interval": round(by_interval / n, 4), "rate_p": round(by_p / n, 4),
              "n_test": args.classes * args.test_per_class, **vars(args)}
    lines = ["| comparisons | n_test | 95% interval excludes 0 | p < 0.05 |", "| --- | --- | --- | --- |",
             f"| {n} | {result['n_test']} | {by_interval} ({100 * by_interval / n:.1f}%) | "
             f"{by_p} ({100 * by_p / n:.1f}%) |"]
    publish(f"paired_calibration_n{result['n_test']}", {"machine": machine(), "result": result},
            "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
