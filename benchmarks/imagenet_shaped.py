"""The whole default protocol on an ImageNet-shaped folder, from an empty cache, timed end to end.

    HF_HUB_OFFLINE=1 python benchmarks/imagenet_shaped.py [--tree ../bench-tree] [--keep-tree] [--plan-only]

Builds an ImageFolder with ImageNet-1k's shape -- 1,000 classes, 1,281,167 train and 50,000 val entries -- out of hard
links to the Imagenette photos in ../shared/data (so it costs directory entries, not disk), then:

1. times listing + fingerprinting the train split: without a listing memo, with an empty memo (what a first run
   does), and with the memo when nothing changed;
2. runs ``lowshot probe --model <DeiT-Tiny> --data <tree>`` (default protocol: 1, 2, 5 shots and 1% x 3 seeds,
   lambda 0.0025) from an empty cache as one subprocess, and reports its wall time, the images it encoded and
   their rate (from its own report), the probe's fit time, and its peak memory;
3. runs the same command again (everything cached) and times it;
4. projects the time a full extraction (every train + val image) would take at the measured rate.

``--plan-only`` stops after step 1 and counts the images the default protocol needs (no model, no decoding):
benchmarks/results/imagenet_shaped_plan.{json,md}.

Class c's images are links to the photos of Imagenette class c mod 10, so top-1 means nothing here (10 groups of
100 look-alike classes): this measures time and counts, not accuracy. Writes
benchmarks/results/imagenet_shaped.{json,md} and deletes the tree (unless --keep-tree).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import DEIT_TINY, IMAGENETTE, REPO, describe, machine, publish  # noqa: E402

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 train images
IMAGENET_VAL = 50_000  # ILSVRC-2012 val images
IMAGENET_CLASSES = 1_000
EXTRACTED = re.compile(r"^(\w+): .*extracted ([\d,]+) images in ([\d.]+) s \(([\d.]+) img/s\)", re.M)


def wnid(c: int) -> str:
    return f"n{90_000_000 + c:08d}"  # not a real WordNet id: these classes are stand-ins


def build_tree(root: Path, *, classes: int, train: int, val: int) -> float:
    """Hard links (or copies when the file system has none) of the Imagenette photos, ImageNet-shaped."""
    started = time.perf_counter()
    sources = {split: [sorted((IMAGENETTE / split / c).iterdir()) for c in sorted(os.listdir(IMAGENETTE / split))]
               for split in ("train", "val")}
    for split, total in (("train", train), ("val", val)):
        per_class, extra = divmod(total, classes)
        for c in range(classes):
            folder = root / split / wnid(c)
            folder.mkdir(parents=True, exist_ok=True)
            photos = sources[split][c % len(sources[split])]
            for j in range(per_class + (1 if c < extra else 0)):
                os.link(photos[(j + c // len(sources[split])) % len(photos)], folder / f"{wnid(c)}_{j}.JPEG")
    (root / ".complete").write_text(json.dumps({"classes": classes, "train": train, "val": val}))
    return time.perf_counter() - started


def time_listing(tree: Path, memo: Path) -> dict:
    """Seconds to list + fingerprint the train split: no memo, first run with a memo, memo and nothing changed."""
    from lowshot.data.datasets import image_folder

    shutil.rmtree(memo, ignore_errors=True)
    out = {}
    for label, cache in (("no_memo", None), ("memo_first_run", memo), ("memo_unchanged", memo)):
        started = time.perf_counter()
        split = image_folder(tree / "train", name="train", listing_cache=cache)
        out[label] = round(time.perf_counter() - started, 2)
        out["files"] = len(split)
        if label == "memo_first_run":
            time.sleep(2.5)  # past the racy-directory window, as any later run would be
    return out


def run_probe_command(tree: Path, cache: Path, model: Path, output: Path, log: Path,
                      limit_minutes: float | None = None) -> dict:
    """Run the whole command; with ``limit_minutes``, interrupt it (Ctrl-C: finished shards are kept) when it runs
    longer, and measure what it encoded from its shard files instead."""
    cmd = [sys.executable, "-m", "lowshot", "probe", "--model", str(model), "--data", str(tree),
           "--cache-dir", str(cache), "--output", str(output), "--format", "markdown"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    started = time.perf_counter()
    loads = []
    with open(log, "w") as handle:
        # a job started in the background (nohup … &) inherits SIGINT ignored; restore it so Ctrl-C stops the child
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = started + limit_minutes * 60 if limit_minutes else None
        while proc.poll() is None:
            time.sleep(5)
            loads.append(os.getloadavg()[0])
            if deadline is not None and time.perf_counter() > deadline:
                proc.send_signal(signal.SIGINT)
                proc.wait(120)
    seconds = time.perf_counter() - started
    text = log.read_text()
    interrupted = deadline is not None and proc.returncode != 0 and "interrupted" in text
    if proc.returncode != 0 and not interrupted:
        raise SystemExit(f"lowshot probe failed ({proc.returncode}); see {log}:\n{text[-2000:]}")
    encoded = {m.group(1): {"images": int(m.group(2).replace(",", "")), "seconds": float(m.group(3)),
                            "img_per_s": float(m.group(4))} for m in EXTRACTED.finditer(text)}
    out = {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "encoded": encoded,
           "interrupted": interrupted, "load_average_mean": round(sum(loads) / max(1, len(loads)), 2),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    if interrupted:
        out["shards"] = shard_rate(cache)
    return out


def shard_rate(cache: Path) -> dict:
    """Images in the finished shards of an interrupted run, and the steady rate between the first and last shard."""
    shards = sorted((p.stat().st_mtime, len(json.loads(p.read_text())["rows"]))
                    for p in cache.glob("partial/*/shard-*.json"))
    images = sum(n for _, n in shards)
    if len(shards) < 2:
        return {"finished_shards": len(shards), "images": images, "img_per_s": None}
    span = shards[-1][0] - shards[0][0]
    return {"finished_shards": len(shards), "images": images, "steady_seconds": round(span, 1),
            "img_per_s": round(sum(n for _, n in shards[1:]) / span, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO.parent / "bench-tree")
    parser.add_argument("--model", type=Path, default=DEIT_TINY)
    parser.add_argument("--classes", type=int, default=IMAGENET_CLASSES)
    parser.add_argument("--train", type=int, default=IMAGENET_TRAIN)
    parser.add_argument("--val", type=int, default=IMAGENET_VAL)
    parser.add_argument("--keep-tree", action="store_true", help="keep the hard-link tree (and cache) afterwards")
    parser.add_argument("--name", default=None, help="results file name (benchmarks/results/NAME.*)")
    parser.add_argument("--plan-only", action="store_true", help="list and count the needed images; encode nothing")
    parser.add_argument("--limit-minutes", type=float, default=None,
                        help="interrupt the first run after this long and report the rate it measured instead")
    parser.add_argument("--report-stopped-run", action="store_true",
                        help="report the shards of a first run that was stopped from outside (its cache is kept in "
                             "TREE/work): steady rate and projections; runs nothing")
    args = parser.parse_args()
    args.name = args.name or ("imagenet_shaped_plan" if args.plan_only else "imagenet_shaped")
    info = machine()
    print(describe(info), flush=True)
    tree, work = args.tree / "data", args.tree / ("work-plan" if args.plan_only else "work")
    if args.report_stopped_run:
        return report_stopped_run(args, info, tree, work)
    shape = {"classes": args.classes, "train": args.train, "val": args.val}
    try:
        if (tree / ".complete").is_file() and json.loads((tree / ".complete").read_text()) == shape:
            built = None
        else:
            shutil.rmtree(args.tree, ignore_errors=True)
            built = round(build_tree(tree, **shape), 1)
        print(f"tree: {tree} ({'reused' if built is None else f'built in {built} s'})", flush=True)
        listing = time_listing(tree, work / "listing-memo")
        print(f"listing the train split: {listing}", flush=True)
        if args.plan_only:
            return plan_only(args, info, tree, work, shape, built, listing)
        shutil.rmtree(work / "cache", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        first = run_probe_command(tree, work / "cache", args.model, work / "results.json", work / "first.log",
                                  args.limit_minutes)
        print(f"first run: {first}", flush=True)
        if first["interrupted"]:
            return interrupted_report(args, info, tree, work, shape, built, listing, first)
        results = json.loads((work / "results.json").read_text())
        again = run_probe_command(tree, work / "cache", args.model, work / "results2.json", work / "again.log")
        print(f"second run: {again}", flush=True)
        from lowshot.features.store import FeatureCache

        entries = {m["split"]: {"held": m["n"], "listed": m["n_listed"], "size_bytes": m["size_bytes"]}
                   for m in FeatureCache(work / "cache").manifests()}
    finally:
        if not args.keep_tree:
            shutil.rmtree(args.tree, ignore_errors=True)
    fit_seconds = round(sum(r["seconds"] for r in results["rows"]), 1)
    train_rate = first["encoded"]["train"]["img_per_s"]
    encoded = sum(e["images"] for e in first["encoded"].values())
    full = args.train + args.val
    payload = {"machine": info, "shape": shape, "tree_build_seconds": built, "listing_seconds": listing,
               "first_run": first, "second_run": again, "probe_fit_seconds": fit_seconds, "entries": entries,
               "images_encoded": encoded, "full_extraction_images": full,
               "full_extraction_projected_seconds": round(full / train_rate, 0),
               "summary": results["summary"]}
    enc = first["encoded"]
    md = "\n".join([
        "# ImageNet-shaped end-to-end run (`benchmarks/imagenet_shaped.py`)", "",
        f"Machine: {describe(info)}.", "",
        f"Tree: {args.classes:,} classes, {args.train:,} train + {args.val:,} val hard links to Imagenette photos "
        f"(built in {built} s).", "",
        "| step | value |", "| --- | --- |",
        f"| list + fingerprint the train split ({listing['files']:,} files), no listing memo | "
        f"{listing['no_memo']} s |",
        f"| same, first run writing the memo | {listing['memo_first_run']} s |",
        f"| same, memo and nothing changed | {listing['memo_unchanged']} s |",
        f"| `lowshot probe --model deit-tiny --data <tree>`, empty cache, whole command | **{first['seconds']:,} s "
        f"({first['seconds'] / 60:.1f} min)** |",
        f"| images encoded: train | {enc['train']['images']:,} of {args.train:,} in {enc['train']['seconds']:,} s "
        f"({enc['train']['img_per_s']} img/s) |",
        f"| images encoded: val | {enc['val']['images']:,} of {args.val:,} in {enc['val']['seconds']:,} s "
        f"({enc['val']['img_per_s']} img/s) |",
        f"| probe fits (12 fits, 1,000 classes) | {fit_seconds} s |",
        f"| peak RSS of the command | {first['peak_rss_mb']:,} MB |",
        f"| same command again (all cached) | {again['seconds']} s |",
        f"| full extraction ({full:,} images) at the measured train rate, projected | "
        f"{full / train_rate / 3600:.1f} h |",
        "", "Top-1 is meaningless on this tree (classes are links to 10 Imagenette classes); the run measures time."])
    publish(args.name, payload, md)


def interrupted_report(args, info: dict, tree: Path, work: Path, shape: dict, built: float | None, listing: dict,
                       first: dict) -> None:
    """The run did not finish within --limit-minutes: what it encoded, at what steady rate, and projections."""
    rate = first["shards"]["img_per_s"]
    projection, projected_rows = project(args, tree, work / "cache", rate)
    payload = {"machine": info, "shape": shape, "tree_build_seconds": built, "listing_seconds": listing,
               "first_run": first, **projection}
    md = "\n".join([
        "# ImageNet-shaped run, interrupted (`benchmarks/imagenet_shaped.py --limit-minutes "
        f"{args.limit_minutes:g}`)", "",
        f"Machine: {describe(info)}; mean load average during the run {first['load_average_mean']}.", "",
        "| step | value |", "| --- | --- |",
        f"| list + fingerprint the train split ({listing['files']:,} files), no listing memo | "
        f"{listing['no_memo']} s |",
        f"| same, first run writing the memo | {listing['memo_first_run']} s |",
        f"| same, memo and nothing changed | {listing['memo_unchanged']} s |",
        f"| `lowshot probe --model deit-tiny --data <tree>` from an empty cache, stopped after | "
        f"{first['seconds'] / 60:.1f} min |",
        f"| train images encoded by then (finished shards) | {first['shards']['images']:,} |",
        *projected_rows])
    publish(args.name, payload, md)


def project(args, tree: Path, cache: Path, rate: float) -> tuple[dict, list[str]]:
    """What the default protocol encodes on the tree, and the time that and a full extraction take at ``rate``
    (img/s): payload entries and the markdown rows that report them."""
    from lowshot.config import ProbeSettings
    from lowshot.data.datasets import open_dataset
    from lowshot.data.subsets import Listing
    from lowshot.protocol import needed_indices

    train = open_dataset(tree, listing_cache=cache / "listings").train
    needed = len(needed_indices(ProbeSettings(), Listing(train.ids, train.labels, train.classes))) + args.val
    full = args.train + args.val
    minutes = round(needed / rate / 60, 1) if rate else None
    hours = round(full / rate / 3600, 1) if rate else None
    payload = {"protocol_images": needed, "full_extraction_images": full,
               "protocol_encode_projected_minutes": minutes, "full_extraction_projected_hours": hours}
    rows = [f"| steady encoding rate (first to last shard) | {rate} img/s |",
            f"| images the default protocol encodes (union of its subsets + all val) | {needed:,} of {full:,} |",
            f"| their encoding at that rate, projected | {minutes} min |",
            f"| a full extraction ({full:,} images) at that rate, projected | {hours} h |"]
    return payload, rows


def report_stopped_run(args, info: dict, tree: Path, work: Path) -> None:
    """A first run stopped from outside (e.g. its parent died): measure its finished shards, as --limit-minutes
    would have, from the time its partial entry was created to its last shard."""
    cache = work / "cache"
    started = min(p.stat().st_mtime for p in cache.glob("partial/*/meta.json"))
    shards = shard_rate(cache)
    last = max(p.stat().st_mtime for p in cache.glob("partial/*/shard-*.json"))
    projection, projected_rows = project(args, tree, cache, shards["img_per_s"])
    payload = {"machine": info, "shards": shards, "encoding_minutes": round((last - started) / 60, 1),
               **projection}
    md = "\n".join([
        "# ImageNet-shaped run, stopped (`benchmarks/imagenet_shaped.py --report-stopped-run`)", "",
        f"Machine at report time: {describe(info)}.", "",
        "| step | value |", "| --- | --- |",
        f"| `lowshot probe --model deit-tiny --data <tree>` from an empty cache: encoding ran for | "
        f"{payload['encoding_minutes']} min |",
        f"| train images encoded (finished shards) | {shards['images']:,} |",
        *projected_rows])
    publish(args.name, payload, md)


def plan_only(args, info: dict, tree: Path, work: Path, shape: dict, built: float | None, listing: dict) -> None:
    """Count the images the default protocol encodes (the union of its subsets + the test split), timed."""
    from lowshot.config import ProbeSettings
    from lowshot.data.datasets import open_dataset
    from lowshot.data.subsets import Listing
    from lowshot.protocol import needed_indices

    started = time.perf_counter()
    dataset = open_dataset(tree, listing_cache=work / "listing-memo")
    listed = time.perf_counter() - started
    train = dataset.train
    started = time.perf_counter()
    needed = needed_indices(ProbeSettings(), Listing(train.ids, train.labels, train.classes))
    planned = time.perf_counter() - started
    payload = {"machine": info, "shape": shape, "tree_build_seconds": built, "listing_seconds": listing,
               "open_dataset_seconds": round(listed, 2), "plan_seconds": round(planned, 2),
               "train_needed": int(len(needed)), "test": len(dataset.test),
               "encoded": int(len(needed)) + len(dataset.test), "full": len(train) + len(dataset.test)}
    md = "\n".join([
        "# ImageNet-shaped tree: what the default protocol encodes (`benchmarks/imagenet_shaped.py --plan-only`)", "",
        f"Machine: {describe(info)}.", "",
        "| step | value |", "| --- | --- |",
        f"| list + fingerprint the train split ({listing['files']:,} files), no listing memo | "
        f"{listing['no_memo']} s |",
        f"| same, first run writing the memo | {listing['memo_first_run']} s |",
        f"| same, memo and nothing changed | {listing['memo_unchanged']} s |",
        f"| open train + val with the memo | {payload['open_dataset_seconds']} s |",
        f"| draw the default protocol's subsets (1, 2, 5 shots + 1% x 3 seeds) | {payload['plan_seconds']} s |",
        f"| train images the protocol uses | {payload['train_needed']:,} of {len(train):,} |",
        f"| images to encode (+ all {len(dataset.test):,} val) | {payload['encoded']:,} of {payload['full']:,} "
        f"({100 * payload['encoded'] / payload['full']:.1f}%) |"])
    publish(args.name, payload, md)


if __name__ == "__main__":
    main()
