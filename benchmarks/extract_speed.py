"""Extraction speed of ViT-S/16 (the facebook/vit-msn-small architecture, random weights), all in one run:

1. the limit: the model's matmul work alone -- 12 blocks x (qkv, output, fc1, fc2 linears +
   scaled_dot_product_attention) at the model's shapes, batch 64, each op at the best of the plain and the
   oneDNN-prepacked kernel, per dtype;
2. the model alone: stock transformers fp32, stock + bf16 autocast, lowshot's ``Backbone.embed`` (``--dtype auto``),
   on the same 64 real photos, repetitions interleaved, with the cosine of each to stock fp32;
3. lowshot's forward batch sweep (the evidence for ``CPU_ROWS_PER_FORWARD``);
4. the whole ``lowshot extract`` process (JPEG decode, resize, cache writes) on two data sizes after a warm-up run:
   the marginal rate between them and the start-up time (import, model load);
5. peak RSS of ``lowshot extract`` on two data sizes up to 10,000 images (``--rss-sizes``).

    HF_HUB_OFFLINE=1 python benchmarks/extract_speed.py            # writes benchmarks/results/extract_speed.{json,md}

The shared 2-core machines are noisy: every speed is a best-of (and median) over interleaved repetitions and every
claim a ratio measured in this run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import IMAGENETTE, REPO, RESULTS, begin, describe, median, process_sizes, publish  # noqa: E402

BATCH = 64
VIT_S16 = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
           "image_size": 224, "patch_size": 16, "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-6}


def save_vit_s16(path: Path, *, layers: int = 12) -> Path:
    from transformers import ViTMSNConfig, ViTMSNModel

    torch.manual_seed(0)
    model = ViTMSNModel(ViTMSNConfig(**{**VIT_S16, "num_hidden_layers": layers}))
    with torch.no_grad():  # ViTMSN initialises CLS and positions to zero; give them the scale trained ones have
        model.embeddings.cls_token.normal_(0.0, 0.02)
        model.embeddings.position_embeddings.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return path


def best_of(fns: dict, reps: int) -> dict[str, list[float]]:
    """Run each callable once to warm up, then ``reps`` interleaved rounds; seconds per call."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


# -- 1. the limit -------------------------------------------------------------------------------------------------
def matmul_limit(reps: int) -> dict:
    """Images/s if a batch-64 forward did nothing but its matmuls, each at the best kernel, per dtype."""
    d, heads, ff, layers = VIT_S16["hidden_size"], VIT_S16["num_attention_heads"], VIT_S16["intermediate_size"], 12
    tokens = (224 // 16) ** 2 + 1
    rows = BATCH * tokens
    shapes = {"qkv": (d, 3 * d), "output": (d, d), "fc1": (d, ff), "fc2": (ff, d)}
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        fns, flops = {}, {}
        for name, (k, n) in shapes.items():
            x = torch.randn(rows, k, generator=gen).to(dtype)
            w = torch.randn(n, k, generator=gen).to(dtype) * k ** -0.5
            b = torch.randn(n, generator=gen).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
            fns[f"{name}/plain"] = lambda x=x, w=w, b=b: F.linear(x, w, b)
            fns[f"{name}/prepacked"] = lambda x=x, p=packed, b=b: torch.ops.mkldnn._linear_pointwise(
                x, p, b, "none", [], "")
            flops[name] = 2 * rows * k * n
        q, k_, v = (torch.randn(BATCH, heads, tokens, d // heads, generator=gen).to(dtype) for _ in range(3))
        fns["attention/sdpa"] = lambda q=q, k_=k_, v=v: F.scaled_dot_product_attention(q, k_, v)
        flops["attention"] = 4 * BATCH * heads * tokens * tokens * (d // heads)
        with torch.inference_mode():
            times = best_of(fns, reps if dtype == torch.float32 else max(2, reps // 2))
        ops = {}
        for name in flops:
            kernels = {key.split("/")[1]: min(v) for key, v in times.items() if key.split("/")[0] == name}
            kernel = min(kernels, key=kernels.get)
            ops[name] = {"seconds": kernels[kernel], "kernel": kernel, "gflops": flops[name] / kernels[kernel] / 1e9,
                         **{f"seconds_{k}": v for k, v in kernels.items()}}
        gemm = sum(ops[n]["seconds"] for n in shapes)
        block = gemm + ops["attention"]["seconds"]
        out[str(dtype).removeprefix("torch.")] = {
            "ops": ops, "block_seconds": block, "images_per_s": BATCH / (layers * block),
            "gemm_only_images_per_s": BATCH / (layers * gemm)}
    best = max(out, key=lambda k: out[k]["images_per_s"])
    out["best_dtype"] = best
    out["images_per_s"] = out[best]["images_per_s"]
    return out


# -- 2./3. the model alone ----------------------------------------------------------------------------------------
def real_batch(n: int = BATCH) -> torch.Tensor:
    from lowshot.data.transforms import msn_transform

    files = sorted((IMAGENETTE / "val").glob("*/*.JPEG"))
    return msn_transform().load(files[:: max(1, len(files) // n)][:n])


def model_rates(model_dir: Path, reps: int, dtype: str = "auto") -> dict:
    from transformers import ViTMSNModel

    from lowshot.models.backbones import load_backbone

    pixels = real_batch()
    stock = ViTMSNModel.from_pretrained(model_dir).eval()
    ours = load_backbone(str(model_dir), device="cpu", dtype=dtype)

    def stock_fp32():
        return stock(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 0]

    def stock_autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return stock(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 0].float()

    with torch.inference_mode():
        reference = stock_fp32()
        cosines = {"stock_bf16_autocast": F.cosine_similarity(stock_autocast(), reference).min().item(),
                   "lowshot": F.cosine_similarity(ours.embed(pixels), reference).min().item()}
        fast_times = best_of({"stock_fp32": stock_fp32, "lowshot": lambda: ours.embed(pixels)}, reps)
        slow_times = best_of({"stock_bf16_autocast": stock_autocast}, max(1, reps // 3))
        sweep = {}
        chosen = ours.forward_batch
        for fb in (8, 16, 32, 64):
            ours.forward_batch = fb
            sweep[fb] = lambda: ours.embed(pixels)
        sweep_times = best_of(sweep, max(2, reps // 2))
        ours.forward_batch = chosen
    rates = {}
    for name, times in {**fast_times, **slow_times}.items():
        rates[name] = {"images_per_s": BATCH / min(times), "median_images_per_s": BATCH / median(times),
                       "repetitions": len(times)}
    return {"rates": rates, "cosine_min_to_stock_fp32": cosines,
            "lowshot": {"engine": ours.engine, "dtype": str(ours.dtype).removeprefix("torch."),
                        "dtype_reason": ours.dtype_reason, "forward_batch": chosen},
            "forward_batch_sweep": {str(fb): BATCH / min(t) for fb, t in sweep_times.items()}}


# -- 4./5. the whole process --------------------------------------------------------------------------------------
def image_folder(root: Path, n_train: int, n_val: int, *, source: Path = IMAGENETTE) -> Path:
    """An ImageFolder of symlinks to ``source``'s train photos (repeated under new names when more are asked for)."""
    by_class = [sorted(folder.glob("*.JPEG")) for folder in sorted((source / "train").iterdir())]
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):  # class after class, so that both splits hold the same classes
            files = by_class[i % len(by_class)]
            src = files[(i // len(by_class) + (0 if split == "train" else len(files) // 2)) % len(files)]
            dst = root / split / src.parent.name / f"{i:06d}_{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    return root


# ``lowshot extract`` as a user runs it, reporting at exit its own peak RSS: VmHWM of the process after exec
# (getrusage's ru_maxrss would include the benchmark process it was forked from).
CHILD = ("import atexit, sys\n"
         "def hwm():\n"
         "    kb = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')]\n"
         "    sys.stderr.write(f'@@VmHWM {kb[0] if kb else -1}\\n')\n"
         "atexit.register(hwm)\n"
         "from lowshot.cli import main\n"
         "sys.argv = ['lowshot', *sys.argv[1:]]\n"
         "main()\n")


def run_extract(model_dir: Path, data: Path, cache: Path, *, transform: str = "msn", dtype: str = "auto",
                extra: list[str] | None = None) -> dict:
    """``lowshot extract --all`` (every image, as the rates assume) in a fresh process: wall time (import, model
    load, decode, model, cache) and peak RSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", CHILD, "extract", "--all", "--model", str(model_dir), "--data", str(data),
           "--cache-dir", str(cache), "--transform", transform, "--dtype", dtype, *(extra or [])]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"lowshot extract failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lines = proc.stderr.strip().splitlines()
    hwm = [int(line.split()[1]) for line in lines if line.startswith("@@VmHWM")]
    return {"seconds": seconds, "peak_rss_mb": hwm[-1] / 1024 if hwm else None,
            "log": [line for line in lines if not line.startswith("@@")][:4]}


def marginal(seconds: dict[int, list[float]]) -> dict:
    """The marginal rate between the two sizes from the best run of each (as the model-only rates are best-of),
    and from each repetition's pair (how much it moves)."""
    (n1, t1), (n2, t2) = seconds.items()
    return {"marginal_images_per_s": (n2 - n1) / (min(t2) - min(t1)),
            "marginal_per_repetition": [(n2 - n1) / (b - a) for a, b in zip(t1, t2, strict=True)],
            "seconds": {str(n): t for n, t in seconds.items()}}


def whole_process(model_dir: Path, tmp: Path, sizes: tuple[int, int], reps: int, dtype: str = "auto") -> dict:
    warm = image_folder(tmp / "warm", 8, 8)
    run_extract(model_dir, warm, tmp / "cache-warm", dtype=dtype)  # page cache, .pyc files, the weight-hash memo
    tiny = run_extract(model_dir, image_folder(tmp / "tiny", 1, 1), tmp / "cache-tiny", dtype=dtype)
    folders = {n: image_folder(tmp / f"n{n}", n - n // 4, n // 4) for n in sizes}
    seconds: dict[int, list[float]] = {n: [] for n in sizes}
    last = {}
    for rep in range(reps):  # sizes interleaved; every run starts from an empty cache
        for n in sizes:
            last = run_extract(model_dir, folders[n], tmp / f"cache-{n}-{rep}", dtype=dtype)
            seconds[n].append(last["seconds"])
    out = marginal(seconds)
    return {"sizes": list(sizes), **out,
            "startup_seconds_intercept": min(seconds[sizes[0]]) - sizes[0] / out["marginal_images_per_s"],
            "startup_seconds_two_images": tiny["seconds"], "log": last["log"]}


# -- 4b. real-size photos ------------------------------------------------------------------------------------------
# Shorter sides (px, share) like ImageNet's photos: most are 500x375 or 375x500, the mean is about 400x350, and a
# tail is larger (PROTOCOL.md); Imagenette's 224-px copies are upscaled to these sizes (Lanczos), 70% landscape.
LARGE_SHORT_SIDES = ((350, 0.15), (375, 0.40), (450, 0.15), (500, 0.15), (640, 0.10), (800, 0.05))
LARGE_ASPECT = 4 / 3
LARGE_PER_CLASS = 64  # unique photos per class; bigger folders repeat them under new names


def large_photos(root: Path, *, per_class: int = LARGE_PER_CLASS, seed: int = 0) -> Path:
    """``root/train/<class>/`` of JPEGs (quality 90) made from the Imagenette photos at ImageNet-like sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sides, shares = zip(*LARGE_SHORT_SIDES, strict=True)
    for folder in sorted((IMAGENETTE / "train").iterdir()):
        (root / "train" / folder.name).mkdir(parents=True, exist_ok=True)
        for f in sorted(folder.glob("*.JPEG"))[:per_class]:
            with Image.open(f) as image:
                rgb = image.convert("RGB")
            short = int(rng.choice(sides, p=shares))
            size = (round(short * LARGE_ASPECT), short) if rng.random() < 0.7 else (short, round(short * LARGE_ASPECT))
            rgb.resize(size, Image.Resampling.LANCZOS).save(root / "train" / folder.name / f.name, quality=90)
    return root


def decode_rates(source: Path, reps: int) -> dict[str, dict[str, float]]:
    """Decode + transform rates (images/s) for both MSN transforms, interleaved: on one thread, and on a pool of
    the extraction's own decode threads (``default_workers``) fed 64-photo chunks, each chunk finished before the
    next as the CPU extraction loop does."""
    from PIL import Image

    from lowshot.data.transforms import msn_transform
    from lowshot.features.extract import default_workers

    files = sorted(source.glob("train/*/*.JPEG"))[::4]
    names = ("msn", "msn-draft")
    one: dict[str, list[float]] = {name: [] for name in names}
    pooled: dict[str, list[float]] = {name: [] for name in names}
    cores = default_workers()

    def decode(tf, f: Path) -> None:
        with Image.open(f) as image:
            tf(image)

    with ThreadPoolExecutor(max_workers=cores) as pool:
        for _ in range(reps):
            for name in names:
                tf = msn_transform(draft=name == "msn-draft")
                start = time.perf_counter()
                for f in files:
                    decode(tf, f)
                one[name].append(len(files) / (time.perf_counter() - start))
                start = time.perf_counter()
                for lo in range(0, len(files), 64):
                    for future in [pool.submit(decode, tf, f) for f in files[lo:lo + 64]]:
                        future.result()
                pooled[name].append(len(files) / (time.perf_counter() - start))
    return {"one_thread": {name: max(r) for name, r in one.items()},
            "all_cores": {name: max(r) for name, r in pooled.items()}, "threads": cores}


def large_photo_process(model_dir: Path, tmp: Path, sizes: tuple[int, int], reps: int, dtype: str = "auto"
                        ) -> dict:
    """The whole ``lowshot extract`` process on ImageNet-sized JPEGs: marginal rate with the reference full decode
    (``msn``) and the opt-in draft decode (``msn-draft``), runs interleaved."""
    pool = large_photos(tmp / "large-pool")
    folders = {n: image_folder(tmp / f"large{n}", n - n // 4, n // 4, source=pool) for n in sizes}
    seconds: dict[str, dict[int, list[float]]] = {name: {n: [] for n in sizes} for name in ("msn", "msn-draft")}
    for rep in range(reps):  # transforms and sizes interleaved
        for n in sizes:
            for name in seconds:
                seconds[name][n].append(run_extract(model_dir, folders[n], tmp / f"cache-large-{name}-{n}-{rep}",
                                                    transform=name, dtype=dtype)["seconds"])
    out = {"short_sides": [list(x) for x in LARGE_SHORT_SIDES], "unique_photos": len(list(pool.glob("*/*/*"))),
           "decode": decode_rates(pool, max(2, reps))}
    for name, runs in seconds.items():
        out[name] = marginal(runs)
    return out


def peak_rss(tmp: Path, sizes: tuple[int, ...]) -> dict:
    """Peak RSS of ``lowshot extract`` with a 2-layer ViT-S-width model (same features, dims and pipeline)."""
    model_dir = save_vit_s16(tmp / "vit-s16-2layers", layers=2)
    out = {}
    for n in sizes:
        data = image_folder(tmp / f"rss{n}", n - n // 5, n // 5)
        out[str(n)] = run_extract(model_dir, data, tmp / f"rss-cache-{n}")
    return {str(n): {"peak_rss_mb": r["peak_rss_mb"], "seconds": r["seconds"]} for n, r in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4, help="interleaved repetitions per timing")
    parser.add_argument("--process-sizes", type=process_sizes, default="320,1280",
                        help="two data sizes for the marginal rate")
    parser.add_argument("--process-reps", type=int, default=2,
                        help="interleaved repetitions of each whole-process run (the best of each size counts)")
    parser.add_argument("--rss-sizes", default="2000,10000", help="data sizes for peak RSS ('' skips)")
    parser.add_argument("--no-large-photos", dest="large_photos", action="store_false",
                        help="skip the whole-process run on ImageNet-sized JPEGs")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="lowshot's --dtype for the model-only and whole-process runs (not auto: results go to "
                             "extract_speed_<dtype>, compared with that dtype's limit) [auto]")
    args, info = begin(parser)  # host memory kept as the CLI keeps it: model-only and the whole process alike
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowshot-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = save_vit_s16(tmp / "vit-s16")
        limit = matmul_limit(args.reps)
        print(f"limit: {limit['images_per_s']:.1f} img/s ({limit['best_dtype']})", flush=True)
        model = model_rates(model_dir, args.reps, args.dtype)
        print(f"model: {model['rates']}", flush=True)
        sizes = args.process_sizes
        process = whole_process(model_dir, tmp, sizes, args.process_reps, args.dtype)
        print(f"process: {process['marginal_images_per_s']:.1f} img/s marginal", flush=True)
        large = large_photo_process(model_dir, tmp, sizes, args.process_reps, args.dtype) if args.large_photos else None
        if large:
            print(f"large photos: {large['msn']['marginal_images_per_s']:.1f} img/s marginal (msn), "
                  f"{large['msn-draft']['marginal_images_per_s']:.1f} (msn-draft)", flush=True)
        rss = peak_rss(tmp, tuple(int(s) for s in args.rss_sizes.split(",") if s)) if args.rss_sizes else {}
    rates = model["rates"]
    lowshot_rate = rates["lowshot"]["images_per_s"]
    # auto is compared with the machine's best dtype; a pinned dtype with that dtype's own limit
    limit_rate = limit["images_per_s"] if args.dtype == "auto" else limit[args.dtype]["images_per_s"]
    summary = {
        "dtype_option": args.dtype,
        "limit_images_per_s": limit_rate,
        "lowshot_model_images_per_s": lowshot_rate,
        "lowshot_model_pct_of_limit": 100 * lowshot_rate / limit_rate,
        "lowshot_vs_stock_fp32": lowshot_rate / rates["stock_fp32"]["images_per_s"],
        "lowshot_vs_stock_bf16_autocast": lowshot_rate / rates["stock_bf16_autocast"]["images_per_s"],
        "process_marginal_pct_of_model": 100 * process["marginal_images_per_s"] / lowshot_rate,
        **({f"large_{name}_pct_of_model": 100 * large[name]["marginal_images_per_s"] / lowshot_rate
            for name in ("msn", "msn-draft")} if large else {}),
        **(decode_ceilings(large["decode"], lowshot_rate) if large else {}),
        "startup_seconds": process["startup_seconds_two_images"],
        "cosine_min_lowshot_to_stock_fp32": model["cosine_min_to_stock_fp32"]["lowshot"],
    }
    payload = {"machine": info, "limit": limit, "model": model, "process": process, "large_photos": large,
               "peak_rss": rss,
               "summary": summary, "seconds_total": time.perf_counter() - started,
               "command": "HF_HUB_OFFLINE=1 python benchmarks/extract_speed.py " + " ".join(sys.argv[1:])}
    name = "extract_speed" if args.dtype == "auto" else f"extract_speed_{args.dtype}"
    publish(name, payload, render(payload), out_dir=args.out or RESULTS)


def decode_ceilings(decode: dict, model_rate: float) -> dict[str, float]:
    """The best whole-process rate, as % of model-only, that decoding leaves on these cores: ``serial`` as the CPU
    loop runs (the model on all cores, then a chunk decoded by the decode threads; per image 1/model +
    1/decode-pooled); ``any``, an estimate for any schedule from core time (the model's cores x 1/model plus one
    thread's 1/decode, shared by the threads: perfect overlap, a decode that scales linearly, or the pooled rate
    where that is higher)."""
    out = {}
    for name in ("msn", "msn-draft"):
        pooled = decode["all_cores"][name]
        spread = max(pooled, decode["one_thread"][name] * decode["threads"])
        out[f"large_{name}_serial_ceiling_pct"] = 100 * pooled / (model_rate + pooled)
        out[f"large_{name}_any_ceiling_pct"] = 100 * spread / (model_rate + spread)
    return out


def render(p: dict) -> str:
    lim, model, proc, s = p["limit"], p["model"], p["process"], p["summary"]
    rates = model["rates"]
    lines = [
        "# Extraction speed: ViT-S/16 (facebook/vit-msn-small architecture, random weights), batch 64",
        "",
        f"Machine: {describe(p['machine'])}.  ",
        f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all).",
        "",
        "## The limit: the model's matmuls alone (12 blocks x qkv/output/fc1/fc2 + SDPA), best kernel per op",
        "",
        "| dtype | qkv | output | fc1 | fc2 | attention | limit (img/s) | GEMM alone (img/s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dtype in ("float32", "bfloat16"):
        ops = lim[dtype]["ops"]
        cells = [f"{ops[n]['gflops']:.0f} GFLOP/s ({ops[n]['kernel']})" for n in ("qkv", "output", "fc1", "fc2",
                                                                                    "attention")]
        lines.append(f"| {dtype} | {' | '.join(cells)} | {lim[dtype]['images_per_s']:.1f} | "
                     f"{lim[dtype]['gemm_only_images_per_s']:.1f} |")
    lines += [
        "",
        f"The limit on this machine: **{lim['images_per_s']:.1f} img/s** ({lim['best_dtype']})"
        + ("." if s.get("dtype_option", "auto") == "auto" else
           f"; this run pins `--dtype {s['dtype_option']}` and is compared with that dtype's limit, "
           f"**{s['limit_images_per_s']:.1f} img/s**."),
        "",
        "## The model alone (64 real photos, best of interleaved repetitions; median in brackets)",
        "",
        "| forward | img/s | % of the limit | vs stock fp32 | min cosine to stock fp32 |",
        "| --- | --- | --- | --- | --- |",
    ]
    names = {"stock_fp32": "stock transformers fp32", "stock_bf16_autocast": "stock + bf16 autocast",
             "lowshot": f"lowshot ({model['lowshot']['engine']} engine, {model['lowshot']['dtype']}, forward "
                        f"batch {model['lowshot']['forward_batch']})"}
    cos = model["cosine_min_to_stock_fp32"]
    for key, label in names.items():
        r = rates[key]
        lines.append(f"| {label} | {r['images_per_s']:.1f} ({r['median_images_per_s']:.1f}) | "
                     f"{100 * r['images_per_s'] / s['limit_images_per_s']:.0f}% | "
                     f"{r['images_per_s'] / rates['stock_fp32']['images_per_s']:.2f}x | "
                     f"{'1 (reference)' if key == 'stock_fp32' else f'{cos[key]:.7f}'} |")
    sweep = ", ".join(f"{fb}: {rate:.1f}" for fb, rate in model["forward_batch_sweep"].items())
    lines += [
        "",
        f"`--dtype auto` chose {model['lowshot']['dtype']}: {model['lowshot']['dtype_reason']}.  ",
        f"lowshot forward-batch sweep (images per forward: img/s): {sweep}.",
        "",
        "## The whole `lowshot extract` process (decode, resize, model, cache writes)",
        "",
        f"After a warm-up run, {len(proc['marginal_per_repetition'])} interleaved repetitions from empty caches: "
        f"{proc['sizes'][0]:,} images in {min(proc['seconds'][str(proc['sizes'][0])]):.1f} s (best), "
        f"{proc['sizes'][1]:,} in {min(proc['seconds'][str(proc['sizes'][1])]):.1f} s: marginal rate "
        f"**{proc['marginal_images_per_s']:.1f} img/s = {s['process_marginal_pct_of_model']:.0f}% of the model-only "
        f"rate** (per repetition: {', '.join(f'{r:.1f}' for r in proc['marginal_per_repetition'])} img/s). "
        f"Start-up (a run on 2 images: import, model load, cache): "
        f"**{proc['startup_seconds_two_images']:.1f} s** (intercept of the two runs: "
        f"{proc['startup_seconds_intercept']:.1f} s).",
    ]
    large = p.get("large_photos")
    if large:
        sides = ", ".join(f"{side} px {100 * share:.0f}%" for side, share in large["short_sides"])
        dec = large["decode"]
        lines += [
            "",
            "## The whole process on ImageNet-sized photos",
            "",
            f"{large['unique_photos']} JPEGs (quality 90) upscaled from the Imagenette photos to shorter sides {sides} "
            "(4:3, 70% landscape), repeated under new names for the bigger folder; same model, same sizes.",
            "",
            f"| photos | transform | marginal img/s, best (each repetition) | % of model-only | decode + transform "
            f"img/s, one thread; {dec['threads']} threads | ceiling: serial; any schedule | % of the serial ceiling |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| Imagenette 224 px | msn | {proc['marginal_images_per_s']:.1f} "
            f"({', '.join(f'{r:.1f}' for r in proc['marginal_per_repetition'])}) | "
            f"{s['process_marginal_pct_of_model']:.0f}% | | | |",
        ]
        for name in ("msn", "msn-draft"):
            reps = ", ".join(f"{r:.1f}" for r in large[name]["marginal_per_repetition"])
            serial = s[f"large_{name}_serial_ceiling_pct"]
            lines.append(f"| ImageNet-sized | {name} | {large[name]['marginal_images_per_s']:.1f} ({reps}) | "
                         f"{s[f'large_{name}_pct_of_model']:.0f}% | {dec['one_thread'][name]:.0f}; "
                         f"{dec['all_cores'][name]:.0f} | {serial:.0f}%; {s[f'large_{name}_any_ceiling_pct']:.0f}% | "
                         f"{100 * s[f'large_{name}_pct_of_model'] / serial:.0f}% |")
        lines += [
            "",
            "Ceilings (% of model-only): what decoding leaves of the model-only rate on these cores, from the rates "
            "measured in this run. Serial: as the CPU loop runs, the model on every core, then the next 64-photo "
            "chunk decoded by the decode threads (per image 1/model + 1/decode on those threads). Any schedule: an "
            "estimate from core time alone (the model's cores x 1/model plus one thread's 1/decode, shared by the "
            "threads), what a perfect overlap with a linearly scaling decode could reach.",
        ]
    if p["peak_rss"]:
        rss = ", ".join(f"{int(n):,} images: {r['peak_rss_mb']:.0f} MB" for n, r in p["peak_rss"].items())
        lines += ["", f"Peak RSS of `lowshot extract` (2-layer ViT-S-width model): {rss}."]
    lines += [
        "",
        "## Summary",
        "",
        f"- lowshot model-only: {s['lowshot_model_images_per_s']:.1f} img/s = "
        f"**{s['lowshot_model_pct_of_limit']:.0f}% of the limit** (target 80%), "
        f"{s['lowshot_vs_stock_fp32']:.2f}x stock fp32, {s['lowshot_vs_stock_bf16_autocast']:.2f}x stock bf16 autocast",
        f"- whole process: **{s['process_marginal_pct_of_model']:.0f}% of model-only** (target 85%); start-up "
        f"**{s['startup_seconds']:.1f} s** (target 10 s)",
        *([f"- whole process on ImageNet-sized photos: **{s['large_msn_pct_of_model']:.0f}% of model-only** with the "
           f"full decode (msn), {s['large_msn-draft_pct_of_model']:.0f}% with the draft decode (target 85%); "
           f"the decode's ceiling on these cores {s['large_msn_serial_ceiling_pct']:.0f}% serial, "
           f"{s['large_msn_any_ceiling_pct']:.0f}% for any schedule (msn)"]
          if "large_msn_pct_of_model" in s else []),
        f"- features: min cosine to stock fp32 **{s['cosine_min_lowshot_to_stock_fp32']:.7f}** (target 0.999)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
