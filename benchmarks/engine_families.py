"""The fast engine beyond ViT: stock transformers forward against lowshot's, per family, in one run.

    HF_HUB_OFFLINE=1 python benchmarks/engine_families.py [--reps 5] [--batch 32]

For each family at ViT-S widths (random weights; DINOv2's layer scales drawn in [0.05, 1] so that folding them
into the weights is exercised): model-only images/s of the stock forward in float32, of lowshot's fast engine in
float32 (the same dtype: the >= 1.2x target) and, where the CPU has bf16 units, of the stock forward wholly in
bfloat16 against the fast engine's mixed bfloat16 (what ``--dtype auto`` runs there); per-image cosine of each
to the stock float32 features on real Imagenette photos (the target: >= 0.99999 in float32). Repetitions
interleaved; ratios are within this run. Writes benchmarks/results/engine_families.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import IMAGENETTE, begin, describe, median, publish  # noqa: E402

SMALL = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536}
DINO = {**SMALL, "patch_size": 14, "image_size": 518, "mlp_ratio": 4}


def families() -> dict[str, callable]:
    import transformers as t

    return {
        "ViT-S/16 (ViTMSN)": lambda: t.ViTMSNModel(t.ViTMSNConfig(**SMALL, image_size=224, patch_size=16)),
        "DINOv2-S/14 (518 px, run at 224)": lambda: t.Dinov2Model(t.Dinov2Config(**DINO)),
        "DINOv2-S/14 with 4 registers": lambda: t.Dinov2WithRegistersModel(
            t.Dinov2WithRegistersConfig(**DINO, num_register_tokens=4)),
        "DINOv2-S/14, SwiGLU MLP (as giant's)": lambda: t.Dinov2Model(t.Dinov2Config(**DINO, use_swiglu_ffn=True)),
        "CLIP vision, S/16 widths (quick-GELU)": lambda: t.CLIPVisionModel(
            t.CLIPVisionConfig(**SMALL, image_size=224, patch_size=16)),
    }


def save(name: str, build, root: Path) -> Path:
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if module_name.endswith("lambda1"):  # trained layer scales are far from DINOv2's init value of 1
                param.uniform_(0.05, 1.0)
            elif module_name.endswith(("cls_token", "position_embeddings", "register_tokens", "class_embedding")):
                param.normal_(0.0, 0.02)
    path = root / "".join(c if c.isalnum() else "-" for c in name)
    model.save_pretrained(path)
    return path


def photos(n: int) -> torch.Tensor:
    from lowshot.transforms import msn_transform

    files = sorted((IMAGENETTE / "val").glob("*/*.JPEG"))
    return msn_transform().load(files[:: max(1, len(files) // n)][:n])


def measure(path: Path, pixels: torch.Tensor, reps: int, bf16: bool) -> dict:
    from lowshot.backbones import load_backbone

    engines = {"stock float32": load_backbone(str(path), device="cpu", dtype="float32", engine="stock"),
               "fast float32": load_backbone(str(path), device="cpu", dtype="float32", engine="fast")}
    if bf16:  # the same dtype both ways: the stock forward wholly in bfloat16 (--dtype bfloat16 --engine stock)
        engines["stock bfloat16 (whole model)"] = load_backbone(str(path), device="cpu", dtype="bfloat16",
                                                                engine="stock")
        engines["fast bfloat16 (mixed)"] = load_backbone(str(path), device="cpu", dtype="bfloat16", engine="fast")
    with torch.inference_mode():
        reference = engines["stock float32"].embed(pixels)
        cosine = {name: F.cosine_similarity(b.embed(pixels), reference).min().item() for name, b in engines.items()}
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(reps):
            for name, backbone in engines.items():
                start = time.perf_counter()
                backbone.embed(pixels)
                times[name].append(time.perf_counter() - start)
    n = len(pixels)
    out = {name: {"images_per_s": n / min(t), "median_images_per_s": n / median(t), "cosine_min": cosine[name]}
           for name, t in times.items()}
    for name in out:
        out[name]["vs_stock_float32"] = out[name]["images_per_s"] / out["stock float32"]["images_per_s"]
        same = "stock bfloat16 (whole model)" if "bfloat16" in name else "stock float32"
        out[name]["vs_stock_same_dtype"] = out[name]["images_per_s"] / out[same]["images_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per engine")
    parser.add_argument("--batch", type=int, default=32, help="photos per forward")
    args, info = begin(parser)  # host memory kept as the CLI keeps it: both engines under the same allocator
    from lowshot.backbones import cpu_flags

    bf16 = bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    pixels = photos(args.batch)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="lowshot-engines-") as tmp:
        for name, build in families().items():
            results[name] = measure(save(name, build, Path(tmp)), pixels, args.reps, bf16)
            print(name, {k: f"{v['vs_stock_float32']:.2f}x cos {v['cosine_min']:.7f}"
                         for k, v in results[name].items()}, flush=True)
    payload = {"machine": info, "families": results, "batch": args.batch, "reps": args.reps,
               "seconds_total": time.perf_counter() - started,
               "command": "python benchmarks/engine_families.py " + " ".join(sys.argv[1:])}
    publish("engine_families", payload, render(payload), **({"out_dir": args.out} if args.out else {}))


def render(p: dict) -> str:
    lines = ["# The fast engine per family", "", f"Machine: {describe(p['machine'])}.  ",
             f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all); {p['batch']} Imagenette photos per "
             f"forward, best of {p['reps']} interleaved repetitions; random weights at ViT-S widths.", "",
             "| family | engine | images/s (best; median) | vs stock float32 | vs stock, same dtype | "
             "min cosine to stock float32 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for family, engines in p["families"].items():
        for engine, r in engines.items():
            lines.append(f"| {family} | {engine} | {r['images_per_s']:.1f}; {r['median_images_per_s']:.1f} | "
                         f"{r['vs_stock_float32']:.2f}x | {r['vs_stock_same_dtype']:.2f}x | {r['cosine_min']:.7f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
