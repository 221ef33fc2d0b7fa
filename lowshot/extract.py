"""Extraction: every image of the train and test splits through the backbone once, into the feature cache.

Resumable (shards), locked per cache key, and a cache hit decodes no image and loads no model.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import __version__, distributed
from .backbones import (
    DEFAULT_MODEL,
    ENGINES,
    Backbone,
    ModelRef,
    load_backbone,
    plan_forward,
    resolve_device,
    resolve_model,
)
from .cache import FeatureCache, Features, ShardStore, now_iso, write_json_atomic
from .config import DEFAULT_MAX_PIXELS
from .datasets import Dataset, Split, open_dataset
from .errors import BadInputError, CacheError, DataError
from .readouts import AUTO as READOUT_AUTO
from .transforms import ImageTransform, named_transform

# Items per resumable shard, whatever the batch size or the number of ranks (so any rerun resumes). Also the unit of
# work split between torchrun ranks; LOWSHOT_SHARD_SIZE overrides it (smaller shards balance small splits better).
SHARD_TARGET = int(os.environ.get("LOWSHOT_SHARD_SIZE", "1024"))

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: called as images finish; the CLI draws it, the library stays silent."""


@dataclass
class SplitFeatures:
    split: str
    features: Features
    cached: bool
    seconds: float = 0.0
    images: int = 0  # images decoded and embedded in this call (0 on a cache hit)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class Extraction:
    """What ``extract_features`` produced: both splits, and how the settings were resolved."""

    model: str
    data: str
    train: SplitFeatures
    test: SplitFeatures
    settings: dict

    def splits(self) -> list[SplitFeatures]:
        return [self.train, self.test]


@dataclass
class Plan:
    """Resolved inputs of an extraction, enough to compute cache keys without loading the model."""

    ref: ModelRef
    dataset: Dataset
    transform: ImageTransform
    settings: dict
    keys: dict[str, str]


def plan_extraction(
    model: str = DEFAULT_MODEL,
    data: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    transform: str = "msn",
    feature: str = READOUT_AUTO,
    device: str = "auto",
    dtype: str = "auto",
    engine: str = "auto",
    cache: FeatureCache,
) -> Plan:
    dataset = open_dataset(data, train_split=train_split, test_split=test_split,
                           image_column=image_column, label_column=label_column)
    memo_path = cache.root / "weight-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    ref = resolve_model(model, revision=revision, hash_memo=memo)
    with contextlib.suppress(OSError):  # the memo only saves re-hashing; a read-only cache is reported elsewhere
        write_json_atomic(memo_path, memo)
    torch_device = resolve_device(device)
    tf = named_transform(transform, ref.folder)
    forward = plan_forward(ref, feature=feature, engine=engine, device=device, dtype=dtype, input_size=tf.crop)
    settings = {"feature": forward.readout.name, "readout": forward.readout.record(),
                "dtype": str(forward.dtype).removeprefix("torch."), "dtype_reason": forward.dtype_reason,
                "device": torch_device.type, "transform": tf.key()}
    keys = {}
    for split in dataset.splits():
        inputs = {"model": ref.identity, "feature": forward.readout.name, "dtype": settings["dtype"],
                  "device": torch_device.type, "transform": tf.key(), "data": split.identity}
        if forward.readout.key():  # readouts computed as before keep their keys (and cached entries)
            inputs["readout"] = forward.readout.key()
        keys[split.name] = cache.key_for(inputs)
    return Plan(ref, dataset, tf, settings, keys)


def extract_features(
    model: str = DEFAULT_MODEL,
    data: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    train_split: str = "train",
    test_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    transform: str = "msn",
    feature: str = READOUT_AUTO,
    batch_size: int = 64,
    device: str = "auto",
    dtype: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    strict: bool = False,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: str = "auto",
    progress: Progress | None = None,
) -> Extraction:
    """Extract CLS features of the train and test splits of ``data`` with ``model`` into the cache.

    Each split is looked up first: a cache hit loads the stored features without decoding an image or loading
    the model. Unreadable images, and images over ``max_pixels``, are skipped and reported (``strict=True``
    makes them an error). Interrupted runs resume from the last finished shard. ``engine`` (auto, fast, stock)
    picks the forward (see ``load_backbone``); it is recorded, not part of the cache key: both compute the same
    features up to float rounding (tests/test_fast_engine.py).
    """
    if batch_size < 1:
        raise BadInputError(f"--batch-size {batch_size}: must be at least 1")
    if max_pixels < 1:
        raise BadInputError(f"--max-pixels {max_pixels}: must be positive")
    if engine not in ENGINES:  # checked up front: a cache hit never reaches load_backbone's own check
        raise BadInputError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    cache = FeatureCache(cache_dir)
    cache.ensure_writable()
    dist, device = distributed.setup(device)
    try:
        plan = plan_extraction(model, data, revision=revision, train_split=train_split, test_split=test_split,
                               image_column=image_column, label_column=label_column, transform=transform,
                               feature=feature, device=device, dtype=dtype, engine=engine, cache=cache)
        results: dict[str, SplitFeatures] = {}
        backbone: Backbone | None = None
        options = {"batch_size": batch_size, "strict": strict, "workers": workers, "max_pixels": max_pixels,
                   "progress": progress if dist.is_main else None}
        for split in plan.dataset.splits():
            key = plan.keys[split.name]
            found = cache.load(key)
            if dist.broadcast(found is None):  # rank 0 decides, so every rank takes the same path
                if backbone is None:
                    backbone = load_backbone(plan.ref, device=device, dtype=dtype, feature=feature,
                                             engine=engine, input_size=plan.transform.crop)
                if dist.active:
                    results[split.name] = _extract_split_distributed(backbone, split, plan, key, cache, dist,
                                                                     **options)
                    continue
                with cache.lock(key):
                    found = cache.load(key)  # another process may have finished it while we waited
                    if found is None:
                        results[split.name] = _extract_split(backbone, split, plan, key, cache, **options)
                        continue
            if found is None:
                found = cache.load(key)
            results[split.name] = SplitFeatures(split.name, found, cached=True,
                                                skipped=found.manifest.get("skipped", {}))
        train, test = results[plan.dataset.train.name], results[plan.dataset.test.name]
        if backbone is not None:
            engine_used = {"engine": backbone.engine, "engine_reason": backbone.engine_reason}
        else:  # all cache hits: say which engine computed the stored features
            engine_used = {"engine": train.features.manifest.get("engine", "stock"), "engine_reason": "cached"}
        settings = {**plan.settings, **engine_used, "world_size": dist.world_size}
        if dist.is_main and train.split != test.split:  # one split on both sides (an export) is no probe run
            cache.record_run({"model": model, "data": plan.dataset.source, "train_key": train.features.key,
                              "test_key": test.features.key, "train_split": train.split, "test_split": test.split,
                              "settings": settings, "created": now_iso()})
        return Extraction(model, plan.dataset.source, train, test, settings)
    finally:
        dist.close()


def load_features(
    model: str | None = None,
    data: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> tuple[Features, Features, dict]:
    """(train, test, run record) from the cache: for ``model`` + ``data`` (with the same options as
    ``extract_features``), or the most recent extraction when both are None. Never extracts."""
    from .errors import CacheError

    cache = FeatureCache(cache_dir)
    if model is None and data is None:
        runs = cache.runs()
        for run in runs:
            train, test = cache.load(run["train_key"]), cache.load(run["test_key"])
            if train is not None and test is not None:
                return train, test, run
        raise CacheError(f"no extracted features in {cache.root}; run 'lowshot extract --model … --data …' first")
    from .backbones import DEFAULT_MODEL as default_model

    plan = plan_extraction(model or default_model, data, cache=cache, **options)
    train = cache.load(plan.keys[plan.dataset.train.name])
    test = cache.load(plan.keys[plan.dataset.test.name])
    if train is None or test is None:
        raise CacheError(f"no cached features for model {model or default_model!r} on {plan.dataset.source!r} with "
                         "these settings; run 'lowshot extract' with the same options first")
    run = {"model": model or default_model, "data": plan.dataset.source, "train_key": train.key,
           "test_key": test.key, "train_split": plan.dataset.train.name, "test_split": plan.dataset.test.name,
           "settings": plan.settings}
    return train, test, run


def _decode(split: Split, transform: ImageTransform, index: int, max_pixels: int
            ) -> tuple[np.ndarray | None, str | None]:
    """(uint8 crop, None) or (None, why it could not be read): one bad file never stops the run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
            with split.open(index) as image:
                pixels = image.size[0] * image.size[1]
                if pixels > max_pixels:
                    return None, (f"refused: {image.size[0]}x{image.size[1]} = {pixels:,} pixels is over the "
                                  f"decompression-bomb limit of {max_pixels:,} (raise it with --max-pixels)")
                return transform(image), None
    except Image.DecompressionBombError as exc:
        return None, f"refused: {exc} (raise the limit with --max-pixels)"
    except (OSError, ValueError, SyntaxError, TypeError, EOFError, DataError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _batched_decode(split: Split, transform: ImageTransform, chunks: list[range], workers: int, max_pixels: int
                    ) -> Iterator[list[tuple[np.ndarray | None, str | None]]]:
    """Decode chunk after chunk on a thread pool, keeping two chunks in flight ahead of the model."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowshot-decode") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append([pool.submit(_decode, split, transform, i, max_pixels) for i in chunk])
            if len(pending) > 2:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


def _extract_split(backbone: Backbone, split: Split, plan: Plan, key: str, cache: FeatureCache, *,
                   progress: Progress | None, **options) -> SplitFeatures:
    """Single process: compute every unfinished shard, then assemble the entry."""
    started = time.perf_counter()
    store = ShardStore(cache.partial_dir(key), n_items=len(split), shard_size=SHARD_TARGET, dim=backbone.dim)
    todo = [s for s in range(store.n_shards) if not store.done(s)]
    embedded = _compute_shards(backbone, split, plan, store, todo, progress=progress, **options)
    return _assemble(split, plan, key, cache, store, backbone, embedded, started)


def _extract_split_distributed(backbone: Backbone, split: Split, plan: Plan, key: str, cache: FeatureCache,
                               dist, *, progress: Progress | None, **options) -> SplitFeatures:
    """One rank of several: rank 0 opens the shard store and lists the unfinished shards, each rank computes
    every ``world_size``-th of them, and rank 0 assembles the entry once all have finished."""
    started = time.perf_counter()
    geometry = {"n_items": len(split), "shard_size": SHARD_TARGET, "dim": backbone.dim}
    todo = None
    if dist.is_main:
        store = ShardStore(cache.partial_dir(key), **geometry)
        todo = [s for s in range(store.n_shards) if not store.done(s)]
    todo = dist.broadcast(todo)
    if not dist.is_main:
        store = ShardStore(cache.partial_dir(key), **geometry)  # rank 0 wrote meta.json: nothing is reset
    mine = todo[dist.rank::dist.world_size]
    embedded = _compute_shards(backbone, split, plan, store, mine, progress=progress,
                               progress_scale=dist.world_size, **options)
    embedded = dist.total(embedded)  # also the barrier: every rank has written its shards
    result = None
    if dist.is_main:
        with cache.lock(key):
            result = _assemble(split, plan, key, cache, store, backbone, embedded, started)
    dist.barrier()
    if result is None:
        found = cache.load(key)
        if found is None:
            raise CacheError(f"rank {dist.rank}: rank 0 did not write cache entry {key} (see its error)")
        result = SplitFeatures(split.name, found, cached=False, seconds=time.perf_counter() - started,
                               images=embedded, skipped=found.manifest.get("skipped", {}))
    return result


def _compute_shards(backbone: Backbone, split: Split, plan: Plan, store: ShardStore, shards: list[int], *,
                    batch_size: int, strict: bool, workers: int | None, max_pixels: int,
                    progress: Progress | None, progress_scale: int = 1) -> int:
    """Embed the items of ``shards`` and write each shard as it finishes; returns the images embedded.
    ``progress_scale``: with N ranks, rank 0 reports its own count x N as the global estimate."""
    task = f"{split.name} ({len(split):,} images)"
    pending = sum(len(range(*store.bounds(s))) for s in range(store.n_shards) if not store.done(s))
    initial = len(split) - pending
    local = 0
    if progress:
        progress(task, initial, len(split))
    workers = workers or max(2, min(8, os.cpu_count() or 2))
    chunks = [range(lo, min(lo + batch_size, hi)) for s in shards for lo, hi in [store.bounds(s)]
              for lo in range(lo, hi, batch_size)]
    decoded = _batched_decode(split, plan.transform, chunks, workers, max_pixels)
    embedded = 0
    for shard in shards:
        start, stop = store.bounds(shard)
        shard_features = np.zeros((stop - start, backbone.dim), dtype=np.float32)
        failed: dict[int, str] = {}
        for lo in range(start, stop, batch_size):
            batch = next(decoded)
            ok = [j for j, (array, _) in enumerate(batch) if array is not None]
            for j, (_, reason) in enumerate(batch):
                if reason is not None:
                    if strict:
                        raise DataError(f"{split.source}/{split.ids[lo + j]}: unreadable image "
                                        f"({reason}); drop --strict to skip and report such files")
                    failed[lo + j] = reason
            if ok:
                pixels = plan.transform.normalize(torch.from_numpy(np.stack([batch[j][0] for j in ok])))
                feats = backbone.embed(pixels).numpy()
                if not np.isfinite(feats).all():
                    bad = [split.ids[lo + ok[j]] for j in np.flatnonzero(~np.isfinite(feats).all(1))[:3]]
                    raise DataError(f"the model produced non-finite features (e.g. for {', '.join(bad)}) with "
                                    f"dtype {plan.settings['dtype']}; try --dtype float32")
                shard_features[np.asarray(ok) + (lo - start)] = feats
                embedded += len(ok)
            local += len(batch)
            if progress:
                progress(task, min(len(split), initial + local * progress_scale), len(split))
        store.write(shard, shard_features, failed)
    if progress:
        progress(task, initial + local if progress_scale == 1 else len(split), len(split))
    return embedded


def _assemble(split: Split, plan: Plan, key: str, cache: FeatureCache, store: ShardStore, backbone: Backbone,
              embedded: int, started: float) -> SplitFeatures:
    """Join the finished shards (streamed), drop unreadable items, commit the entry, discard the shards."""
    failed = store.failed()
    keep = np.ones(len(split), dtype=bool)
    keep[list(failed)] = False
    if not keep.any():
        raise DataError(f"{split.source}: no readable image in split {split.name!r} ({len(failed)} failed)")
    ids = [i for i, k in zip(split.ids, keep, strict=True) if k]
    skipped = {split.ids[i]: reason for i, reason in sorted(failed.items())}
    manifest = {
        "ids": ids, "classes": split.classes, "split": split.name, "data": split.source,
        "data_identity": split.identity, "model": plan.ref.name, "model_identity": plan.ref.identity,
        "model_info": plan.ref.info, **plan.settings, "engine": backbone.engine,
        "forward_batch": backbone.forward_batch, "n": int(keep.sum()), "dim": backbone.dim,
        "skipped": skipped, "created": now_iso(),
        "versions": {"lowshot": __version__, "torch": torch.__version__, "transformers": _version("transformers")},
    }
    assembled = cache.partial_dir(key) / "features.npy"
    store.write_npy(assembled, keep)  # streamed shard by shard: peak memory does not grow with the split
    stored = cache.commit(key, assembled, split.labels[keep], manifest)
    store.discard()
    return SplitFeatures(split.name, stored, cached=False, seconds=time.perf_counter() - started,
                         images=embedded, skipped=skipped)


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
