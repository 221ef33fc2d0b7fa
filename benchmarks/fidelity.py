"""Fidelity of lowshot's forward on real photos: every supported family (random weights), and DeiT-Tiny.

Features of the stock transformers forward in float32 are the reference. Per family (ViT-S/16 widths, Swin-T,
ConvNeXt-T; random init, tests/zoo.py): the per-image cosine of what ``--dtype auto`` runs on a CPU with native
bfloat16 (``LOWSHOT_CPU_FLAGS="avx512_bf16 amx_bf16"``: the fast engine's mixed precision where it covers the
model, else the stock engine in float32), and of the stock engine run wholly in bfloat16 (``--dtype bfloat16``,
what ``auto`` used to pick). For the real DeiT-Tiny: lowshot's default forward and the fast engine in bfloat16,
then the probe's top-1 (1/2/5 shots x 3 seeds, lambda 0.0025) on each set of features.

    python benchmarks/fidelity.py            # writes benchmarks/results/fidelity.{json,md}
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DEIT_TINY, IMAGENETTE, RESULTS, describe, machine, publish  # noqa: E402


def load_pixels(split: str, per_class: int) -> tuple[torch.Tensor, np.ndarray, list[str], list[str]]:
    from PIL import Image

    from lowshot.data.transforms import msn_transform

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


BF16_CPU = "avx512_bf16 amx_bf16"  # what --dtype auto sees on an AMX / AVX-512-bf16 machine
FAMILIES = ("vit", "vit-msn", "deit", "vit-patch8", "vit-384", "dinov2", "dinov2-registers", "clip-vision",
            "siglip-vision", "beit", "data2vec-vision", "vit-mae", "swin", "convnext")


def cosines(a: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-image cosine to the reference, plain and centred (both minus the reference's mean feature over the
    images): random-init features share a large common part that makes the plain cosine look better than it is."""
    cos = torch.nn.functional.cosine_similarity(a, reference)
    centre = reference.mean(dim=0, keepdim=True)
    centred = torch.nn.functional.cosine_similarity(a - centre, reference - centre)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
            "centred_cosine_min": float(centred.min()), "centred_cosine_mean": float(centred.mean())}


def family_fidelity(pixels: torch.Tensor, families: tuple[str, ...]) -> dict:
    """Per family: default readout, the engine and dtype --dtype auto picks on a bf16 CPU, and cosines to float32."""
    from lowshot.models.backbones import ENV_CPU_FLAGS, load_backbone
    from tests import zoo

    out = {}
    with tempfile.TemporaryDirectory() as root:
        for name in families:
            path = str(zoo.save(name, Path(root), size="vit-s"))
            start = time.perf_counter()
            reference = load_backbone(path, device="cpu", dtype="float32", engine="stock")
            ref = reference.embed(pixels)
            saved = os.environ.get(ENV_CPU_FLAGS)
            os.environ[ENV_CPU_FLAGS] = BF16_CPU
            try:
                auto = load_backbone(path, device="cpu", dtype="auto")
                auto_feats = auto.embed(pixels)
            finally:
                if saved is None:
                    os.environ.pop(ENV_CPU_FLAGS, None)
                else:
                    os.environ[ENV_CPU_FLAGS] = saved
            whole_bf16 = load_backbone(path, device="cpu", dtype="bfloat16", engine="stock").embed(pixels).float()
            out[name] = {"class": reference.info["class"], "readout": reference.readout_name, "dim": reference.dim,
                         "positions": reference.readout.position_embeddings, "auto_engine": auto.engine,
                         "auto_dtype": str(auto.dtype).removeprefix("torch."), "auto": cosines(auto_feats, ref),
                         "stock_bfloat16": cosines(whole_bf16, ref), "seconds": time.perf_counter() - start}
            print(name, out[name], flush=True)
    return out


def main() -> None:
    from lowshot.features.store import Features
    from lowshot.models.backbones import load_backbone
    from lowshot.protocol import run_probe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--family-photos-per-class", type=int, default=3, help="val photos per class, per family")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated zoo names ('' skips)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    info = machine()
    print(describe(info), flush=True)
    started = time.perf_counter()
    families = tuple(f for f in args.families.split(",") if f)
    family_pixels = load_pixels("val", args.family_photos_per_class)[0]
    per_family = family_fidelity(family_pixels, families) if families else {}
    data = {split: load_pixels(split, n) for split, n in (("train", args.train_per_class),
                                                          ("val", args.test_per_class))}
    variants = {"stock float32 (reference)": {"engine": "stock", "dtype": "float32"},
                "lowshot --dtype auto": {"engine": "auto", "dtype": "auto"},
                "lowshot fast bfloat16": {"engine": "fast", "dtype": "bfloat16"},
                "stock bfloat16 (whole model)": {"engine": "stock", "dtype": "bfloat16"}}
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
        centred = torch.cat([torch.nn.functional.cosine_similarity(feats[s] - reference[s].mean(0),
                                                                   reference[s] - reference[s].mean(0)) for s in feats])
        features = {s: Features(s, feats[s].numpy(), data[s][1], data[s][2], data[s][3], {}) for s in feats}
        results = run_probe(features["train"], features["val"], shots=(1, 2, 5), percents=(), seeds=3)
        out[name] = {"engine": backbone.engine, "dtype": str(backbone.dtype).removeprefix("torch."),
                     "seconds": seconds, "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                     "centred_cosine_min": float(centred.min()),
                     "top1": {s["subset"]: s["mean"] for s in results.summary},
                     "top1_rows": [r["top1"] for r in results.rows]}
        print(name, out[name]["cosine_min"], out[name]["top1"], flush=True)
    ref_rows = out["stock float32 (reference)"]["top1_rows"]
    for r in out.values():
        r["top1_max_abs_diff_per_fit"] = max(abs(a - b) for a, b in zip(r["top1_rows"], ref_rows, strict=True))
    payload = {"machine": info, "variants": out, "n_train": len(data["train"][1]), "n_test": len(data["val"][1]),
               "families": per_family, "family_photos": len(family_pixels),
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
        "| forward | engine | dtype | min cosine per image | min centred cosine | 1-shot | 2-shot | 5-shot | "
        "max top-1 change of a fit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in p["variants"].items():
        t = r["top1"]
        lines.append(f"| {name} | {r['engine']} | {r['dtype']} | {r['cosine_min']:.7f} | "
                     f"{r['centred_cosine_min']:.7f} | {t['1-shot']:.2f} | "
                     f"{t['2-shot']:.2f} | {t['5-shot']:.2f} | {r['top1_max_abs_diff_per_fit']:.2f} points |")
    if p.get("families"):
        lines += [
            "",
            f"## Every family (random weights at ViT-S/16 widths, Swin-T, ConvNeXt-T; {p['family_photos']} "
            "Imagenette val photos), against its stock float32 forward",
            "",
            f"`--dtype auto` as chosen on a CPU with native bfloat16 (`LOWSHOT_CPU_FLAGS=\"{BF16_CPU}\"`), and the "
            "stock engine run wholly in bfloat16 (`--dtype bfloat16`).",
            "",
            "Cosines per image, min over the photos; centred: both minus the float32 features' mean over the photos.",
            "",
            "| family | class | default readout | positions at 224 px | `--dtype auto`: engine, dtype | min cosine | "
            "min centred cosine | stock bfloat16: min cosine | stock bfloat16: min centred cosine |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, r in p["families"].items():
            lines.append(f"| {name} | {r['class']} | {r['readout']} | {r['positions']} | {r['auto_engine']}, "
                         f"{r['auto_dtype']} | {r['auto']['cosine_min']:.5f} | {r['auto']['centred_cosine_min']:.5f} | "
                         f"{r['stock_bfloat16']['cosine_min']:.4f} | {r['stock_bfloat16']['centred_cosine_min']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
