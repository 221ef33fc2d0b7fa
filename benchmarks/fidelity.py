"""Fidelity of lowshot's forward on a real model and real photos: DeiT-Tiny on Imagenette.

Features of the stock transformers forward in float32 are the reference; against them, per image, the cosine of
lowshot's default forward (``--dtype auto``: the fast engine, float32 on a CPU without native bf16) and of the fast
engine in bfloat16; then the probe's top-1 (1/2/5 shots x 3 seeds, lambda 0.0025) on each set of features.

    python benchmarks/fidelity.py            # writes benchmarks/results/fidelity.{json,md}
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, describe, machine, publish  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEIT_TINY = SHARED / "models" / "deit-tiny-patch16-224"
IMAGENETTE = SHARED / "datasets" / "imagenette2-224"


def load_pixels(split: str, per_class: int) -> tuple[torch.Tensor, np.ndarray, list[str], list[str]]:
    from PIL import Image

    from lowshot.transforms import msn_transform

    tf = msn_transform()
    classes = sorted(p.name for p in (IMAGENETTE / split).iterdir() if p.is_dir())
    crops, labels, ids = [], [], []
    for label, name in enumerate(classes):
        for f in sorted((IMAGENETTE / split / name).glob("*.JPEG"))[:per_class]:
            with Image.open(f) as image:
                crops.append(tf(image))
            labels.append(label)
            ids.append(f"{name}/{f.name}")
    return tf.normalize(torch.from_numpy(np.stack(crops))), np.asarray(labels), ids, classes


def main() -> None:
    from lowshot.backbones import load_backbone
    from lowshot.cache import Features
    from lowshot.protocol import run_probe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    info = machine()
    print(describe(info), flush=True)
    started = time.perf_counter()
    data = {split: load_pixels(split, n) for split, n in (("train", args.train_per_class),
                                                          ("val", args.test_per_class))}
    variants = {"stock float32 (reference)": {"engine": "stock", "dtype": "float32"},
                "lowshot --dtype auto": {"engine": "auto", "dtype": "auto"},
                "lowshot fast bfloat16": {"engine": "fast", "dtype": "bfloat16"}}
    out = {}
    reference = None
    for name, options in variants.items():
        backbone = load_backbone(str(DEIT_TINY), device="cpu", **options)
        start = time.perf_counter()
        feats = {split: torch.cat([backbone.embed(chunk) for chunk in pixels.split(64)])
                 for split, (pixels, _, _, _) in data.items()}
        seconds = time.perf_counter() - start
        if reference is None:
            reference = feats
        cos = torch.cat([torch.nn.functional.cosine_similarity(feats[s], reference[s]) for s in feats])
        features = {s: Features(s, feats[s].numpy(), data[s][1], data[s][2], data[s][3], {}) for s in feats}
        results = run_probe(features["train"], features["val"], shots=(1, 2, 5), percents=(), seeds=3)
        out[name] = {"engine": backbone.engine, "dtype": str(backbone.dtype).removeprefix("torch."),
                     "seconds": seconds, "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                     "top1": {s["subset"]: s["mean"] for s in results.summary},
                     "top1_rows": [r["top1"] for r in results.rows]}
        print(name, out[name]["cosine_min"], out[name]["top1"], flush=True)
    ref_rows = out["stock float32 (reference)"]["top1_rows"]
    for r in out.values():
        r["top1_max_abs_diff_per_fit"] = max(abs(a - b) for a, b in zip(r["top1_rows"], ref_rows, strict=True))
    payload = {"machine": info, "variants": out, "n_train": len(data["train"][1]), "n_test": len(data["val"][1]),
               "seconds_total": time.perf_counter() - started,
               "command": "python benchmarks/fidelity.py " + " ".join(sys.argv[1:])}
    publish("fidelity", payload, render(payload), out_dir=args.out)


def render(p: dict) -> str:
    lines = [
        "# Fidelity: DeiT-Tiny on Imagenette photos, against the stock transformers forward in float32",
        "",
        f"Machine: {describe(p['machine'])}.  ",
        f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all); {p['n_train']} train and {p['n_test']} "
        "test photos; probe: lambda 0.0025, 3 seeds.",
        "",
        "| forward | engine | dtype | min cosine per image | 1-shot | 2-shot | 5-shot | max top-1 change of a fit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in p["variants"].items():
        t = r["top1"]
        lines.append(f"| {name} | {r['engine']} | {r['dtype']} | {r['cosine_min']:.7f} | {t['1-shot']:.2f} | "
                     f"{t['2-shot']:.2f} | {t['5-shot']:.2f} | {r['top1_max_abs_diff_per_fit']:.2f} points |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
