"""Write scikit-learn's handwritten digits as an ImageFolder (train/ and val/, one folder per digit), at run time.

The 1,797 8x8 greyscale digits ship inside scikit-learn (``sklearn.datasets.load_digits``: UCI optical
recognition of handwritten digits, 16 grey levels), so nothing is downloaded and no image is committed. Each
class is split 2/3 train, 1/3 val by a seeded shuffle, and every file gets the same modification time, so the
folder is the same on every machine, down to the identity lowshot's feature cache keys it by:

    python examples/make_digits.py examples/out/digits      # 1,198 train + 599 val PNGs, about a second

A second dataset for ``lowshot bench examples/suite.toml`` (Imagenette + digits): small, far from ImageNet
photos, 10 classes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

VAL_FRACTION = 1 / 3
SEED = 0
GREY_LEVELS = 16  # load_digits pixels are 0..16
MTIME = 1_767_225_600  # 2026-01-01 00:00 UTC: a folder made again is the same cache entry


def make_digits(out: str | Path, *, seed: int = SEED, upscale: int = 4) -> Path:
    """Write ``out/{train,val}/<digit>/<index>.png`` (greyscale, ``8 * upscale`` pixels square, nearest
    neighbour so the strokes stay as drawn) and return ``out``. An existing complete folder is left as it is."""
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    if out.is_dir() and sum(1 for _ in out.glob("*/*/*.png")) == len(digits.target):
        return out
    rng = np.random.default_rng(seed)
    for digit in range(10):
        members = np.flatnonzero(digits.target == digit)
        members = members[rng.permutation(len(members))]
        n_val = round(len(members) * VAL_FRACTION)
        for split, chosen in (("val", members[:n_val]), ("train", members[n_val:])):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = np.round(digits.images[index] * (255 / GREY_LEVELS)).astype(np.uint8)
                image = Image.fromarray(255 - pixels, mode="L")  # dark ink on white, like a scanned page
                path = folder / f"{index:04d}.png"
                image.resize((8 * upscale, 8 * upscale), Image.NEAREST).save(path)
                os.utime(path, (MTIME, MTIME))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parent / "out" / "digits"))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    out = make_digits(args.out, seed=args.seed)
    counts = {split: sum(1 for _ in (out / split).glob("*/*.png")) for split in ("train", "val")}
    print(f"{out}: {counts['train']} train + {counts['val']} val images, 10 classes")


if __name__ == "__main__":
    main()
