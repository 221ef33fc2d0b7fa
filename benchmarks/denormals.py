"""Denormal floats in the probe: the caller's thread against the flushed thread (``lowshot/flushed.py``), in one run.

1. The gradient product (probabilities^T x features: 1,000 classes x 5,000 rows x 384) with none, some and most of
   the probabilities denormal (below float32's smallest normal, 1.2e-38), on the caller's thread (denormals kept)
   and on the flushed thread (FTZ/DAZ: read and written as zero).
2. Whole probe fits on the synthetic ViT-like problem of ``probe_speed.py`` (1,000 classes, 1 and 5 shots, 384
   dims) at lambda 0.0025 (MSN's README) and 0.00025 (MSN ``logistic_eval.py``'s default): the solver called on
   the caller's thread, as before the flushed thread, against ``LogisticProbe.fit`` as it runs now; interleaved.
   The share of denormal probabilities is the largest any of the fit's gradients saw on the caller's thread.

    python benchmarks/denormals.py        # writes benchmarks/results/denormals.{json,md}
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, begin, describe, median, publish  # noqa: E402
from benchmarks.probe_speed import CLASSES, DIM, Generator  # noqa: E402
from lowshot import probe as probe_module  # noqa: E402
from lowshot.flushed import flushes, run_flushed  # noqa: E402
from lowshot.probe import TORCH_TOL, objective, preprocess  # noqa: E402

SMALLEST_NORMAL = float(torch.finfo(torch.float32).tiny)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gradient_products(reps: int) -> list[dict]:
    rows, gen = 5000, torch.Generator().manual_seed(0)
    x = torch.randn(rows, DIM, generator=gen)
    out = torch.empty(CLASSES, DIM)
    results = []
    for lead in (20.0, 80.0, 95.0):  # how far each row's first logit stands above the others
        logits = torch.randn(rows, CLASSES, generator=gen) * 3
        logits[:, 0] += lead
        probs = torch.softmax(logits, dim=1)
        share = float(((probs > 0) & (probs < SMALLEST_NORMAL)).float().mean())
        cases = {"caller's thread": lambda p=probs: timed(lambda: torch.mm(p.T, x, out=out)),
                 "flushed thread": lambda p=probs: run_flushed(timed, lambda: torch.mm(p.T, x, out=out))}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(reps):
            for name, fn in cases.items():
                times[name].append(fn())
        results.append({"denormal_share": share,
                        **{name: {"median_ms": 1e3 * median(t), "best_ms": 1e3 * min(t)} for name, t in times.items()}})
        print(f"product, {100 * share:.1f}% denormal: " + ", ".join(
            f"{name} {1e3 * median(t):.1f} ms" for name, t in times.items()), flush=True)
    return results


@contextlib.contextmanager
def denormal_share(record: list[float]):
    """Record the largest share of denormal probabilities any gradient of the fits saw."""
    inner = probe_module._SoftmaxLoss._gradient

    def gradient(self, w, grad):
        p = self.probs
        record.append(float(((p > 0) & (p < SMALLEST_NORMAL)).float().mean()))
        return inner(self, w, grad)

    probe_module._SoftmaxLoss._gradient = gradient
    try:
        yield
    finally:
        probe_module._SoftmaxLoss._gradient = inner


def fits(reps: int) -> list[dict]:
    gen = Generator(0)
    results = []
    for shots in (1, 5):
        y = np.repeat(np.arange(CLASSES), shots)
        x = gen.draw(y)
        xt, codes = preprocess(x), torch.as_tensor(y)
        for lam in (0.0025, 0.00025):
            task = (probe_module._fit_torch, xt, codes, lam, 1000, TORCH_TOL, None)
            shares: list[float] = []
            with denormal_share(shares):  # on the caller's thread: the flushed one makes none
                task[0](*task[1:])
            cases = {"caller's thread": lambda task=task: task[0](*task[1:]),
                     "flushed thread": lambda task=task: run_flushed(*task)}
            times: dict[str, list[float]] = {name: [] for name in cases}
            found: dict[str, tuple] = {}
            cases["flushed thread"]()  # warm-up: the flushed thread's logit buffers grown to this size too
            for _ in range(reps):
                for name, fn in cases.items():
                    start = time.perf_counter()
                    coef, n_iter, _, bound = fn()
                    times[name].append(time.perf_counter() - start)
                    found[name] = (n_iter, objective(coef, xt, y, lam), bound)
            row = {"shots": shots, "lambda": lam, "denormal_share_max": max(shares)}
            for name, t in times.items():
                n_iter, obj, bound = found[name]
                row[name] = {"median_s": median(t), "best_s": min(t), "iterations": n_iter, "objective": obj,
                             "gap_bound": bound}
            row["speedup_median"] = row["caller's thread"]["median_s"] / row["flushed thread"]["median_s"]
            results.append(row)
            print(f"{shots}-shot lambda {lam:g}: {100 * max(shares):.1f}% denormal at most; " + ", ".join(
                f"{name} {row[name]['median_s']:.2f} s" for name in cases), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    args, info = begin(parser)
    if not flushes():
        raise SystemExit("torch cannot flush denormals on this CPU: nothing to compare")
    started = time.perf_counter()
    payload = {"machine": info, "products": gradient_products(max(5, args.reps)), "fits": fits(args.reps),
               "reps": args.reps, "seconds_total": 0.0,
               "command": "python benchmarks/denormals.py " + " ".join(sys.argv[1:])}
    payload["seconds_total"] = time.perf_counter() - started
    publish("denormals", payload, render(payload), out_dir=args.out or RESULTS)


def render(p: dict) -> str:
    caller, flushed = "caller's thread", "flushed thread"
    lines = [
        "# Denormal floats in the probe: the caller's thread against the flushed thread",
        "",
        f"Machine: {describe(p['machine'])}.  ",
        f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all); medians of interleaved repetitions.",
        "",
        f"## The gradient product ({CLASSES:,} classes x 5,000 rows x {DIM})",
        "",
        "| probabilities denormal | caller's thread (ms) | flushed thread (ms) |",
        "| --- | --- | --- |",
    ]
    for r in p["products"]:
        lines.append(f"| {100 * r['denormal_share']:.1f}% | {r[caller]['median_ms']:.1f} | "
                     f"{r[flushed]['median_ms']:.1f} |")
    lines += [
        "",
        f"## Probe fits (synthetic ViT-like features, {CLASSES:,} classes, {DIM} dims)",
        "",
        "| shots | lambda | denormal at most (caller's thread) | caller's thread: s (iterations) | "
        "flushed thread: s (iterations) | "
        "speed-up | objective: caller's; flushed |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in p["fits"]:
        lines.append(f"| {r['shots']} | {r['lambda']:g} | {100 * r['denormal_share_max']:.1f}% | "
                     f"{r[caller]['median_s']:.2f} ({r[caller]['iterations']}) | "
                     f"{r[flushed]['median_s']:.2f} ({r[flushed]['iterations']}) | {r['speedup_median']:.2f}x | "
                     f"{r[caller]['objective']:.7f}; {r[flushed]['objective']:.7f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
