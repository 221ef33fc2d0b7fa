"""Copy the first N images (by file name) of each class of an ImageFolder dataset: a small, fixed subset for a
quick comparison (e.g. a random-init model, whose extraction on the full set would take minutes).

    python examples/make_subset.py ../shared/data/datasets/imagenette2-224 examples/out/imagenette-20 \
        --train 20 --val 20
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def make_subset(source: str | Path, out: str | Path, *, per_split: dict[str, int]) -> Path:
    source, out = Path(source), Path(out)
    for split, n in per_split.items():
        classes = sorted(p for p in (source / split).iterdir() if p.is_dir())
        if not classes:
            raise SystemExit(f"{source / split}: no class folders")
        for folder in classes:
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(p for p in folder.iterdir() if p.is_file())[:n]:
                if not (target / image.name).exists():
                    shutil.copy2(image, target / image.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=20, help="images per class from train/")
    parser.add_argument("--val", type=int, default=20, help="images per class from val/")
    args = parser.parse_args()
    print(make_subset(args.source, args.out, per_split={"train": args.train, "val": args.val}))


if __name__ == "__main__":
    main()
