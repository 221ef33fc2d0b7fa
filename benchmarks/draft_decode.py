"""What the opt-in draft decode (``--transform msn-draft``) changes, against the reference full decode (``msn``).

libjpeg can decode a big JPEG at 1/2, 1/4 or 1/8 scale; ``msn-draft`` lets it do so (never below the 256-px resize
target) before the bilinear Resize(256). It only applies to JPEGs whose shorter side is at least 512 px, so this
benchmark makes such photos: the first images of each Imagenette class, upscaled (Lanczos) to a shorter side drawn
uniformly from 512-1024 px (seeded) and saved as JPEG quality 90, in a temporary folder. Then, with the real
DeiT-Tiny in float32:

- decode + transform throughput of both transforms (interleaved repetitions, one thread);
- per-image cosine between the two transforms' features;
- the probe's top-1 (1/2/5 shots x 3 seeds, λ 0.0025) on each, and how many test predictions differ.

    python benchmarks/draft_decode.py          # writes benchmarks/results/draft_decode.{json,md}
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DEIT_TINY, IMAGENETTE, describe, machine, median, publish  # noqa: E402


def make_big_photos(root: Path, *, train: int, val: int, seed: int = 0) -> Path:
    """ImageFolder of upscaled Imagenette photos, shorter side uniform in [512, 1024] px, JPEG quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for folder in sorted(p for p in (IMAGENETTE / split).iterdir() if p.is_dir()):
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(folder.glob("*.JPEG"))[:n]:
                with Image.open(f) as image:
                    rgb = image.convert("RGB")
                short = int(rng.integers(512, 1025))
                aspect = float(rng.choice([1.0, 4 / 3, 3 / 2]))  # the photo is square; give it a photo's shape
                size = (round(short * aspect), short) if rng.random() < 0.7 else (short, round(short * aspect))
                rgb.resize(size, Image.Resampling.LANCZOS).save(root / split / folder.name / f.name, quality=90)
    return root


def decode_rate(paths: list[Path], names: list[str], reps: int) -> dict[str, float]:
    """Images per second of decode + transform for each named transform, repetitions interleaved."""
    from PIL import Image

    from lowshot.data.transforms import named_transform

    transforms = {name: named_transform(name, DEIT_TINY) for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(reps):
        for name, tf in transforms.items():
            start = time.perf_counter()
            for path in paths:
                with Image.open(path) as image:
                    tf(image)
            seconds[name].append(time.perf_counter() - start)
    return {name: len(paths) / median(s) for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import torch

    import lowshot

    info = machine()
    work = Path(tempfile.mkdtemp(prefix="lowshot-draft-"))
    try:
        data = make_big_photos(work / "big", train=args.train_per_class, val=args.val_per_class)
        paths = sorted((data / "val").glob("*/*.JPEG"))
        torch.set_num_threads(1)
        rates = decode_rate(paths, ["msn", "msn-draft"], args.reps)
        torch.set_num_threads(info["torch_threads"])
        runs, results = {}, {}
        for name in ("msn", "msn-draft"):
            runs[name] = lowshot.extract_features(str(DEIT_TINY), str(data), cache_dir=work / "cache",
                                                  device="cpu", dtype="float32", transform=name)
            results[name] = lowshot.run_probe(runs[name].train.features, runs[name].test.features,
                                              shots=(1, 2, 5), percents=(), seeds=3)
        cos = []
        for split in ("train", "test"):
            a = np.asarray(getattr(runs["msn"], split).features.features, dtype=np.float64)
            b = np.asarray(getattr(runs["msn-draft"], split).features.features, dtype=np.float64)
            cos.append((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
        cos = np.concatenate(cos)
        top1 = {name: {s["subset"]: (s["mean"], s["std"]) for s in r.summary} for name, r in results.items()}
        rows = {name: {(row["subset"], row["seed"]): row["top1"] for row in r.rows} for name, r in results.items()}
        changed = sum(abs(rows["msn"][k] - rows["msn-draft"][k]) > 1e-9 for k in rows["msn"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n_test, n_train = len(paths), 10 * args.train_per_class
    payload = {"machine": info, "images": {"train": n_train, "val": n_test, "shorter_side_px": [512, 1024]},
               "decode_img_per_s_one_thread": rates, "cosine": {"min": float(cos.min()), "mean": float(cos.mean()),
                                                                "p01": float(np.percentile(cos, 1))},
               "top1": top1, "probe_cells_that_differ": changed, "probe_cells": len(rows["msn"])}
    lines = [f"Draft decode vs full decode: {n_train} train + {n_test} val Imagenette photos upscaled to a shorter "
             f"side of 512-1024 px (JPEG q90), DeiT-Tiny float32. {describe(info)}.", "",
             "| transform | decode + transform (img/s, 1 thread) | 1-shot | 2-shot | 5-shot |",
             "| --- | --- | --- | --- | --- |"]
    for name in ("msn", "msn-draft"):
        cells = [f"{top1[name][k][0]:.1f} ± {top1[name][k][1]:.1f}" for k in ("1-shot", "2-shot", "5-shot")]
        lines.append(f"| `{name}` | {rates[name]:.0f} | " + " | ".join(cells) + " |")
    lines += ["", f"Per-image cosine of the features, draft vs full decode: mean {cos.mean():.5f}, 1st percentile "
              f"{np.percentile(cos, 1):.5f}, min {cos.min():.5f}. Probe cells (subset x seed) whose top-1 differs: "
              f"{changed} of {len(rows['msn'])}. Decode speed-up of the draft: "
              f"{rates['msn-draft'] / rates['msn']:.2f}x."]
    publish("draft_decode", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
