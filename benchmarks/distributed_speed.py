"""Speed-up of `torchrun --nproc-per-node N -m lowshot extract` over one process, measured in one run.

    python benchmarks/distributed_speed.py [--images 1200] [--procs 2] [--model DIR] [--repeats 2]

Builds an ImageFolder of real Imagenette photos (symlinks), then alternates single-process and torchrun
extractions into fresh caches (best of --repeats each), and writes benchmarks/results/distributed_speed.{json,md}.
Each run is a whole `lowshot extract` command (start-up included), so the ratio is what a user sees.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def build_data(root: Path, n_images: int) -> None:
    source = SHARED / "datasets" / "imagenette2-224"
    classes = sorted(p.name for p in (source / "train").iterdir())
    per_class = max(1, n_images // len(classes))
    for split, n in (("train", per_class), ("val", 2)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((source / split / cls).glob("*.JPEG"))[:n]:
                os.symlink(f, root / split / cls / f.name)


def timed(cmd: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=str(SHARED / "models" / "deit-tiny-patch16-224"))
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LOWSHOT_SHARD_SIZE": "64"}
    work = Path(tempfile.mkdtemp(prefix="lowshot-dist-"))
    try:
        build_data(work / "data", args.images)
        n = sum(1 for _ in (work / "data").glob("*/*/*.JPEG"))
        base = [sys.executable, "-m", "lowshot", "extract", "--all", "--model", args.model, "--data",
                str(work / "data"), "--device", "cpu", "--batch-size", "32"]  # --all: every image, as n counts
        dist = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.procs),
                "--log-dir", str(work / "torchrun-logs"),  # else torchrun leaves /tmp/torchelastic_* behind
                "-m", "lowshot", "extract", *base[4:]]
        times: dict[str, list[float]] = {"1 process": [], f"{args.procs} processes": []}
        for i in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
            times["1 process"].append(timed([*base, "--cache-dir", str(work / f"c1-{i}")], env))
            times[f"{args.procs} processes"].append(timed([*dist, "--cache-dir", str(work / f"c2-{i}")], env))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    single = best["1 process"]
    rows = [{"setup": k, "seconds": round(v, 2), "img_per_s": round(n / v, 1), "speedup": round(single / v, 3)}
            for k, v in best.items()]
    report = {"images": n, "model": args.model, "cpu": cpu_model(), "cores": os.cpu_count(),
              "repeats": args.repeats, "all_seconds": times, "rows": rows}
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"`python benchmarks/distributed_speed.py --images {args.images} --procs {args.procs}` — {n} images, "
             f"{Path(args.model).name}, {report['cpu']}, {report['cores']} cores (whole commands, best of "
             f"{args.repeats})", "", "| setup | seconds | img/s | speed-up |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['setup']} | {r['seconds']} | {r['img_per_s']} | {r['speedup']}x |" for r in rows]
    (out / "distributed_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
