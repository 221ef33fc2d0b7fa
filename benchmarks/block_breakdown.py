"""Where one fast-engine block spends its time: each stage timed alone, side by side with the whole block, in one run.

ViT-S/16 (the facebook/vit-msn-small architecture, random weights), the block the engine runs 11 of 12 times, on
the token sequence of real photos at the engine's own forward batch and dtype (``--dtype auto``: bfloat16 with a
float32 residual stream where the CPU has bf16 units). Stages: the two LayerNorms (float32 in, compute dtype out),
the four GEMMs alone, attention (SDPA), and the work fused onto or added after the GEMMs (GELU; the residual adds).
"Between the stages" is the whole block minus the sum of its stages timed alone: the cost of running them in
sequence (caches, thread wake-ups, Python). The matmul limit of ``extract_speed.py`` counts only GEMMs and SDPA.

    HF_HUB_OFFLINE=1 python benchmarks/block_breakdown.py   # writes benchmarks/results/block_breakdown.{json,md}
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

from benchmarks._common import RESULTS, begin, describe, median, publish  # noqa: E402
from benchmarks.extract_speed import real_batch, save_vit_s16  # noqa: E402
from lowshot.backbones import load_backbone  # noqa: E402

KINDS = {"norm1": "elementwise", "qkv": "GEMM", "attention": "attention", "output": "GEMM",
         "output residual add": "elementwise", "norm2": "elementwise", "fc1": "GEMM", "fc1 GELU": "elementwise",
         "fc2": "GEMM", "fc2 residual add": "elementwise"}


def stages(fast, h: torch.Tensor) -> tuple[dict, callable, bool]:
    """The stage callables of block 0 on the residual stream ``h`` (restored before each timing), the block, and
    whether the residual adds are fused into the GEMMs (then timed with them, and listed at 0)."""
    block, n, tokens = fast.blocks[0], h.shape[0], h.shape[1]
    with torch.inference_mode():
        y = block.norm1(h)
        qkv = block.qkv(y).view(n, tokens, 3, block.heads, block.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, -1)
        y2 = block.norm2(h)
        f1 = block.fc1(y2, fast.gelu)
        gemm = {"output": block.out(a), "fc2": block.fc2(f1)}
    fused = h.dtype == a.dtype  # residual in the compute dtype: oneDNN adds it inside the GEMM (_Linear.add)
    fns = {
        "norm1": lambda: block.norm1(h),
        "qkv": lambda: block.qkv(y),
        "attention": lambda: F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, -1),
        "output": (lambda: block.out.add(a, h)) if fused else lambda: block.out(a),
        "output residual add": (lambda: None) if fused else lambda: h.add_(gemm["output"]),
        "norm2": lambda: block.norm2(h),
        "fc1": lambda: block.fc1(y2),
        "fc1 with GELU": lambda: block.fc1(y2, fast.gelu),  # minus "fc1": the fused GELU
        "fc2": (lambda: block.fc2.add(f1, h)) if fused else lambda: block.fc2(f1),
        "fc2 residual add": (lambda: None) if fused else lambda: h.add_(gemm["fc2"]),
    }
    return fns, lambda: block(h, fast.gelu), fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="interleaved repetitions of each stage")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    args, info = begin(parser)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowshot-block-") as tmp:
        backbone = load_backbone(str(save_vit_s16(Path(tmp) / "vit-s16")), device="cpu", dtype=args.dtype)
    if backbone.fast is None:
        raise SystemExit(f"the fast engine is not used here ({backbone.engine_reason})")
    fast, n = backbone.fast, backbone.forward_batch
    with torch.inference_mode():
        h = fast.embed_tokens(real_batch()[:n])
    saved = h.clone()
    fns, whole, fused = stages(fast, h)
    fns["whole block"] = whole
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            h.copy_(saved)
            fn()
        for _ in range(args.reps):
            for name, fn in fns.items():
                h.copy_(saved)  # the adds and the block update the stream in place
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * median(t) for name, t in times.items()}
    if fused:
        ms["output residual add"] = ms["fc2 residual add"] = 0.0
    ms["fc1 GELU"] = max(0.0, ms["fc1 with GELU"] - ms["fc1"])  # a difference of medians
    parts = {name: ms[name] for name in KINDS}
    by_kind: dict[str, float] = {}
    for name, kind in KINDS.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + parts[name]
    by_kind["between the stages"] = ms["whole block"] - sum(parts.values())
    payload = {"machine": info, "forward_batch": n, "tokens": int(h.shape[1]), "dtype": str(fast.dtype),
               "stream_dtype": str(h.dtype), "engine": backbone.engine, "residual_adds_fused": fused,
               "median_ms": ms, "by_kind_ms": by_kind,
               "reps": args.reps, "seconds_total": time.perf_counter() - started,
               "command": "HF_HUB_OFFLINE=1 python benchmarks/block_breakdown.py " + " ".join(sys.argv[1:])}
    publish("block_breakdown", payload, render(payload), out_dir=args.out or RESULTS)


def render(p: dict) -> str:
    ms, whole = p["median_ms"], p["median_ms"]["whole block"]
    lines = [
        "# One fast-engine block, stage by stage (ViT-S/16 widths, random weights, real photos' tokens)",
        "",
        f"Machine: {describe(p['machine'])}.  ",
        f"Command: `{p['command']}` ({p['seconds_total']:.0f} s in all); {p['forward_batch']} images x "
        f"{p['tokens']} tokens per forward, compute {p['dtype'].removeprefix('torch.')}, residual stream "
        f"{p['stream_dtype'].removeprefix('torch.')}; medians of {p['reps']} interleaved repetitions.",
        "",
        "| stage | kind | ms | share of the block |",
        "| --- | --- | --- | --- |",
    ]
    for name, kind in KINDS.items():
        note = " (fused into the GEMM)" if p.get("residual_adds_fused") and "residual add" in name else ""
        note = " (fc1 with GELU minus fc1)" if name == "fc1 GELU" else note
        lines.append(f"| {name}{note} | {kind} | {ms[name]:.3f} | {100 * ms[name] / whole:.0f}% |")
    lines += [f"| **whole block** | | **{whole:.3f}** | 100% |", "", "| kind | ms | share |", "| --- | --- | --- |"]
    for kind, value in p["by_kind_ms"].items():
        lines.append(f"| {kind} | {value:.3f} | {100 * value / whole:.0f}% |")
    lines += ["", "GEMM and attention are what the matmul limit of `extract_speed.py` counts; the rest is outside it."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
