"""Shared helpers of the benchmarks: the machine's description, timing, and writing JSON + markdown results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # ../shared/data beside the clone (see its PROVENANCE.md)
DEIT_TINY = SHARED / "models" / "deit-tiny-patch16-224"
IMAGENETTE = SHARED / "datasets" / "imagenette2-224"
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def machine() -> dict:
    """CPU model and the flags that decide the kernels, core count, load, library versions."""
    import torch

    info = {"cpu": platform.processor() or "unknown", "cpu_model_number": None, "flags": [],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and info["cpu"] in ("unknown", "x86_64", ""):
                info["cpu"] = value
            elif key == "model" and info["cpu_model_number"] is None:
                info["cpu_model_number"] = int(value)
            elif key == "flags" and not info["flags"]:
                present = set(value.split())
                info["flags"] = [f for f in CPU_FLAGS_OF_INTEREST if f in present]
    except OSError:
        pass
    return info


def begin(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, dict]:
    """Every benchmark's start: ``--out`` added and the command line parsed, host memory kept as the CLI keeps it
    (``keep_host_memory``: the code measured runs under the allocator users get), the machine described."""
    from lowshot.features.hostmem import keep_host_memory

    parser.add_argument("--out", type=Path, default=None, help="results folder [benchmarks/results]")
    args = parser.parse_args()
    keep_host_memory()
    info = machine()
    print(describe(info), flush=True)
    return args, info


def describe(info: dict) -> str:
    return (f"{info['cpu']} (model {info['cpu_model_number']}), {info['cores']} cores, flags: "
            f"{' '.join(info['flags']) or 'none of interest'}; torch {info['torch']}, "
            f"{info['torch_threads']} threads; load average at start {info['load_average_at_start'][0]:.2f}")


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def process_sizes(text: str) -> tuple[int, int]:
    """``--process-sizes`` as two increasing data sizes; each folder puts a quarter of its images in the test
    split, and that split needs one image of each of Imagenette's 10 classes (argparse ``type=``)."""
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 2 or not 40 <= sizes[0] < sizes[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected two increasing sizes of at least 40, e.g. 320,1280")
    return sizes


def portable(text: str) -> str:
    """``text`` with this machine's folders written relative to the repository (``./…``, ``../shared/…``), the
    temporary folder as ``$TMPDIR`` and the home folder as ``~``: results are committed, and a command line or log
    line recorded in one must not name the machine it ran on."""
    roots = [(tempfile.gettempdir(), "$TMPDIR"), (str(REPO), "."), (str(Path.home()), "~")]
    if REPO.parent != Path(REPO.anchor):
        roots.append((str(REPO.parent), ".."))
    for root, name in sorted(roots, key=lambda r: -len(r[0])):  # the most specific folder first
        text = re.sub(r"(?<![\w./-])" + re.escape(root) + r"(?![\w.-])", name, text)
    return text


def write(name: str, payload: dict, markdown: str, *, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """``<name>.json`` and ``<name>.md`` side by side, machine paths made portable."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(portable(json.dumps(payload, indent=1, sort_keys=True, default=str)) + "\n")
    md_path.write_text(portable(markdown.rstrip()) + "\n")
    return json_path, md_path


def publish(name: str, payload: dict, markdown: str, *, out_dir: Path = RESULTS) -> None:
    """Write ``<name>.json`` + ``.md`` and print the markdown and where it went."""
    json_path, md_path = write(name, payload, markdown, out_dir=out_dir)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
