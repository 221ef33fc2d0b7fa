"""Extraction speed on a GPU, the same ratios as ``extract_speed.py`` prints for CPUs, all in one run:

1. the limit: the model's matmul work alone (12 blocks x qkv/output/fc1/fc2 linears + scaled_dot_product_attention
   at the model's shapes), per dtype (float32, bfloat16 where supported, float16), best dtype;
2. the model alone on device-resident batches: stock transformers float32, stock + autocast, lowshot's
   ``Backbone.embed`` (``--dtype auto``), interleaved, with the cosine of each to stock float32;
3. the data path alone: lowshot's ``Device.stage`` (pinned uint8, non-blocking copy, normalised on the device)
   against normalising on the host and copying float32;
4. the whole ``lowshot extract --device cuda`` process on Imagenette's 224-px photos and on ImageNet-sized JPEGs
   (``extract_speed.large_photos``): marginal rates between two data sizes, as % of model-only.

    HF_HUB_OFFLINE=1 python benchmarks/gpu_speed.py                  # on a CUDA machine: results/gpu_speed.{json,md}
    HF_HUB_OFFLINE=1 python benchmarks/gpu_speed.py --device cpu --layers 2 --process-sizes 64,192 --reps 2 \\
        --out benchmarks/out/gpu-dry-run                              # a dry run of the script itself, on a CPU

Every GPU timing synchronises the device before and after. No number from this script is quoted in the README
until it has been run on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, describe, machine, median, process_sizes, publish  # noqa: E402
from benchmarks.extract_speed import (  # noqa: E402
    VIT_S16,
    image_folder,
    large_photos,
    real_batch,
    run_extract,
    save_vit_s16,
)
from lowshot.features.hostmem import keep_host_memory  # noqa: E402

GPU_BATCH = 256  # images per batch on the GPU (extract --batch-size): enough rows to fill a large GPU's GEMMs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_of(fns: dict, reps: int, device: torch.device) -> dict[str, list[float]]:
    """Warm each callable up once, then ``reps`` interleaved rounds; seconds per call, device synchronised."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def dtypes_for(device: torch.device) -> list[torch.dtype]:
    if device.type != "cuda":
        return [torch.float32, torch.bfloat16]
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])


def matmul_limit(device: torch.device, batch: int, layers: int, reps: int) -> dict:
    """Images/s if a forward did nothing but its matmuls, per dtype (TF32 off for the float32 row)."""
    d, heads, ff = VIT_S16["hidden_size"], VIT_S16["num_attention_heads"], VIT_S16["intermediate_size"]
    tokens = (224 // 16) ** 2 + 1
    rows = batch * tokens
    shapes = {"qkv": (d, 3 * d), "output": (d, d), "fc1": (d, ff), "fc2": (ff, d)}
    out = {}
    for dtype in dtypes_for(device):
        gen = torch.Generator(device="cpu").manual_seed(0)
        fns = {}
        for name, (k, n) in shapes.items():
            x = torch.randn(rows, k, generator=gen).to(device, dtype)
            w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device, dtype)
            fns[name] = lambda x=x, w=w: F.linear(x, w)
        q, k_, v = (torch.randn(batch, heads, tokens, d // heads, generator=gen).to(device, dtype) for _ in range(3))
        fns["attention"] = lambda q=q, k_=k_, v=v: F.scaled_dot_product_attention(q, k_, v)
        with torch.inference_mode():
            times = best_of(fns, reps, device)
        block = sum(min(t) for t in times.values())
        out[str(dtype).removeprefix("torch.")] = {"block_seconds": block, "images_per_s": batch / (layers * block),
                                                  "ops_seconds": {k: min(t) for k, t in times.items()}}
    best = max(out, key=lambda k: out[k]["images_per_s"])
    return {**out, "best_dtype": best, "images_per_s": out[best]["images_per_s"]}


def model_rates(model_dir: Path, device: torch.device, batch: int, reps: int) -> dict:
    from transformers import ViTMSNModel

    from lowshot.models.backbones import load_backbone

    pixels = real_batch(batch).to(device)
    stock = ViTMSNModel.from_pretrained(model_dir).eval().to(device)
    ours = load_backbone(str(model_dir), device=str(device), dtype="auto")
    autocast_dtype = ours.dtype if ours.dtype != torch.float32 else torch.bfloat16

    def stock_fp32():
        return stock(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 0]

    def stock_autocast():
        with torch.autocast(device.type, dtype=autocast_dtype):
            return stock(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 0].float()

    with torch.inference_mode():
        reference = stock_fp32().float().cpu()
        cosines = {"stock_autocast": F.cosine_similarity(stock_autocast().cpu(), reference).min().item(),
                   "lowshot": F.cosine_similarity(ours.embed(pixels), reference).min().item()}
        times = best_of({"stock_fp32": stock_fp32, "stock_autocast": stock_autocast,
                         "lowshot": lambda: ours.embed(pixels)}, reps, device)
    rates = {name: {"images_per_s": batch / min(t), "median_images_per_s": batch / median(t)}
             for name, t in times.items()}
    return {"rates": rates, "cosine_min_to_stock_fp32": cosines, "autocast_dtype": str(autocast_dtype),
            "lowshot": {"engine": ours.engine, "dtype": str(ours.dtype).removeprefix("torch."),
                        "dtype_reason": ours.dtype_reason, "forward_batch": ours.forward_batch}}


def data_path(device: torch.device, batch: int, reps: int) -> dict:
    """Decoded uint8 crops -> normalised batch on the device: lowshot's staging against host normalisation."""
    from lowshot.data.transforms import msn_transform
    from lowshot.models.devices import Device

    tf = msn_transform()
    crops = list(np.random.default_rng(0).integers(0, 256, size=(batch, 224, 224, 3), dtype=np.uint8))
    staged = Device.for_device(device)
    times = best_of({"lowshot_stage": lambda: staged.stage(crops, tf),
                     "host_normalise_then_copy": lambda: tf.normalize(torch.from_numpy(np.stack(crops))).to(device)},
                    reps, device)
    return {name: batch / min(t) for name, t in times.items()}


def process_rates(model_dir: Path, tmp: Path, device: torch.device, sizes: tuple[int, int], batch: int) -> dict:
    """Marginal images/s of the whole ``lowshot extract`` process, 224-px photos and ImageNet-sized ones."""
    pool = large_photos(tmp / "large-pool")
    out = {}
    for label, source, transform in (("imagenette-224", None, "msn"), ("imagenet-sized", pool, "msn"),
                                     ("imagenet-sized-draft", pool, "msn-draft")):
        seconds = {}
        for n in sizes:
            kwargs = {"source": source} if source is not None else {}
            data = image_folder(tmp / f"{label}-{n}", n - n // 4, n // 4, **kwargs)
            seconds[n] = run_extract(model_dir, data, tmp / f"cache-{label}-{n}", transform=transform,
                                     extra=["--device", str(device), "--batch-size", str(batch)])["seconds"]
        n1, n2 = sizes
        out[label] = {"seconds": {str(n): t for n, t in seconds.items()},
                      "marginal_images_per_s": (n2 - n1) / (seconds[n2] - seconds[n1])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a dry run of the script")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per timing")
    parser.add_argument("--batch", type=int, default=GPU_BATCH, help="images per batch")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12 = ViT-S/16)")
    parser.add_argument("--process-sizes", type=process_sizes, default="2048,8192",
                        help="two data sizes for the marginal rates")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder [benchmarks/results]")
    args = parser.parse_args()
    keep_host_memory()  # as the CLI does: model-only and the whole process under the same allocator
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_speed: no CUDA device here (pass --device cpu for a dry run of the script)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in every row
    from lowshot.models.devices import capabilities

    info = {**machine(), "device": capabilities(device)}
    print(describe(info), "| device:", info["device"], flush=True)
    started = time.perf_counter()
    sizes = args.process_sizes
    with tempfile.TemporaryDirectory(prefix="lowshot-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = save_vit_s16(tmp / "vit-s16", layers=args.layers)
        limit = matmul_limit(device, args.batch, args.layers, args.reps)
        print(f"limit: {limit['images_per_s']:.0f} img/s ({limit['best_dtype']})", flush=True)
        model = model_rates(model_dir, device, args.batch, args.reps)
        print(f"model: { {k: round(v['images_per_s']) for k, v in model['rates'].items()} }", flush=True)
        staging = data_path(device, args.batch, args.reps)
        print(f"data path: {staging}", flush=True)
        process = process_rates(model_dir, tmp, device, sizes, args.batch)
        print(f"process: { {k: round(v['marginal_images_per_s']) for k, v in process.items()} }", flush=True)
    ours = model["rates"]["lowshot"]["images_per_s"]
    summary = {"model_pct_of_limit": 100 * ours / limit["images_per_s"],
               "lowshot_vs_stock_fp32": ours / model["rates"]["stock_fp32"]["images_per_s"],
               "lowshot_vs_stock_autocast": ours / model["rates"]["stock_autocast"]["images_per_s"],
               **{f"process_{k}_pct_of_model": 100 * v["marginal_images_per_s"] / ours for k, v in process.items()}}
    payload = {"machine": info, "limit": limit, "model": model, "data_path": staging, "process": process,
               "summary": summary, "seconds_total": time.perf_counter() - started,
               "command": "HF_HUB_OFFLINE=1 python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:])}
    publish("gpu_speed", payload, render(payload), out_dir=args.out)


def render(p: dict) -> str:
    lim, model, s = p["limit"], p["model"], p["summary"]
    rates, cos = model["rates"], model["cosine_min_to_stock_fp32"]
    lines = [
        f"# Extraction speed on {p['machine']['device']['name']}: ViT-S/16 architecture, random weights",
        "",
        f"Machine: {describe(p['machine'])}; device: {p['machine']['device']}.  ",
        f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all).",
        "",
        "| | img/s | ratio |",
        "| --- | --- | --- |",
        *[f"| the limit, {k} (matmuls + SDPA alone) | {lim[k]['images_per_s']:.0f} | |"
          for k in lim if isinstance(lim[k], dict)],
        f"| stock transformers float32 | {rates['stock_fp32']['images_per_s']:.0f} | |",
        f"| stock + {model['autocast_dtype'].removeprefix('torch.')} autocast | "
        f"{rates['stock_autocast']['images_per_s']:.0f} | cosine to stock fp32 {cos['stock_autocast']:.6f} |",
        f"| **lowshot, model only** ({model['lowshot']['engine']}, {model['lowshot']['dtype']}) | "
        f"**{rates['lowshot']['images_per_s']:.0f}** | **{s['model_pct_of_limit']:.0f}% of the limit**, "
        f"{s['lowshot_vs_stock_fp32']:.2f}x stock fp32, {s['lowshot_vs_stock_autocast']:.2f}x autocast; cosine "
        f"{cos['lowshot']:.6f} |",
    ]
    for label, r in p["process"].items():
        lines.append(f"| whole `lowshot extract`, {label} (marginal) | {r['marginal_images_per_s']:.0f} | "
                     f"**{s[f'process_{label}_pct_of_model']:.0f}% of model-only** |")
    d = p["data_path"]
    lines += ["", f"Data path alone (uint8 crops to a normalised batch on the device): lowshot's staging "
                  f"{d['lowshot_stage']:.0f} img/s, host normalisation + float32 copy "
                  f"{d['host_normalise_then_copy']:.0f} img/s."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
