"""Buffers over glibc's largest mmap threshold (32 MB), fresh against kept, side by side in one run:

1. staging: 64 real photos' uint8 crops normalised into a fresh float32 batch (38.5 MB) against ``Device.stage``,
   which normalises into a buffer it keeps;
2. cross-validation: ``select_lambda`` on a 1%-sized problem (12,811 rows x 384 dims, 1,000 classes; 45 fits)
   as it runs (the logit buffers views of one kept block, ``objective_`` computed only when read) against the
   previous behaviour (four fresh logit buffers per fit, and the float64 objective computed after every fit).

    HF_HUB_OFFLINE=1 python benchmarks/page_faults.py      # writes benchmarks/results/page_faults.{json,md}

Both run under the CLI's allocator settings (``keep_host_memory``), which cannot keep blocks over 32 MB. Page
faults are the process's minor faults (``getrusage``) over each timed call; repetitions interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import IMAGENETTE, RESULTS, begin, describe, median, publish  # noqa: E402
from benchmarks.probe_speed import CLASSES, Generator  # noqa: E402
from lowshot import probe as probe_module  # noqa: E402
from lowshot.devices import Device  # noqa: E402
from lowshot.transforms import msn_transform  # noqa: E402


def measured(fn) -> tuple[float, int]:
    """(seconds, minor page faults) of one call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def staging(reps: int) -> dict:
    tf = msn_transform()
    files = sorted((IMAGENETTE / "val").glob("*/*.JPEG"))[::60][:64]
    from PIL import Image

    crops = []
    for f in files:
        with Image.open(f) as image:
            crops.append(tf(image))
    device = Device.for_device("cpu")
    cases = {"fresh float32 batch": lambda: tf.normalize(device.host_batch(crops)),
             "Device.stage (kept buffer)": lambda: device.stage(crops, tf)}
    for fn in cases.values():
        fn()
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            runs[name].append(measured(fn))
    return {name: {"ms": [1000 * s for s, _ in r], "faults": [f for _, f in r]} for name, r in runs.items()}


@contextlib.contextmanager
def previous_behaviour():
    """Four fresh logit buffers per fit, and the float64 objective computed after every fit (as before)."""
    kept, fit = probe_module._logit_buffers, probe_module.LogisticProbe.fit

    def fresh(n, n_classes, count):
        return [torch.empty(n, n_classes) for _ in range(count)]

    def eager(self, *args, **kwargs):
        fitted = fit(self, *args, **kwargs)
        fitted.objective_  # noqa: B018 (read: computed now, as fit used to)
        return fitted

    probe_module._logit_buffers, probe_module.LogisticProbe.fit = fresh, eager
    try:
        yield
    finally:
        probe_module._logit_buffers, probe_module.LogisticProbe.fit = kept, fit


def cross_validation(reps: int) -> dict:
    y = np.repeat(np.arange(CLASSES), 13)[:12811]
    x = Generator(0).draw(y)
    runs: dict[str, list[tuple[float, int]]] = {"previous (fresh buffers, eager objective)": [],
                                                 "lowshot (kept buffers, lazy objective)": []}
    for _ in range(reps):
        with previous_behaviour():
            runs["previous (fresh buffers, eager objective)"].append(measured(lambda: probe_module.select_lambda(x, y)))
        runs["lowshot (kept buffers, lazy objective)"].append(measured(lambda: probe_module.select_lambda(x, y)))
    return {name: {"seconds": [s for s, _ in r], "faults": [f for _, f in r]} for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    args, info = begin(parser)
    started = time.perf_counter()
    stage = staging(max(5, args.reps))
    cv = cross_validation(args.reps)
    payload = {"machine": info, "staging": stage, "cross_validation": cv,
               "seconds_total": time.perf_counter() - started,
               "command": "HF_HUB_OFFLINE=1 python benchmarks/page_faults.py " + " ".join(sys.argv[1:])}
    publish("page_faults", payload, render(payload), out_dir=args.out or RESULTS)


def render(p: dict) -> str:
    def spread(values, fmt):
        return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    lines = ["# Buffers over 32 MB: fresh against kept", "", f"Machine: {describe(p['machine'])}.  ",
             f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all). Median (range) of interleaved "
             "repetitions.", "", "## Staging 64 photos (normalised float32 batch: 38.5 MB)", "",
             "| path | ms | page faults |", "| --- | --- | --- |"]
    for name, r in p["staging"].items():
        lines.append(f"| {name} | {spread(r['ms'], '{:.1f}')} | {spread(r['faults'], '{:,.0f}')} |")
    lines += ["", "## select_lambda, 12,811 rows x 1,000 classes (45 fits)", "", "| solver buffers | seconds | "
              "page faults |", "| --- | --- | --- |"]
    for name, r in p["cross_validation"].items():
        lines.append(f"| {name} | {spread(r['seconds'], '{:.1f}')} | {spread(r['faults'], '{:,.0f}')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
