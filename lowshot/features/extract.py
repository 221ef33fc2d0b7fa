"""Extraction: the images a protocol uses through the backbone once, into the feature cache.

The whole test split, and of the train split only the images the labelled subsets draw (or all of it, ``--all``).
This module plans (the cache keys, which images each split needs) and computes (decode + forward); the feature
store (:meth:`FeatureCache.ensure`) does the rest: it finds what is missing, locks the key, hands out resumable
shards (split between torchrun ranks) and grows the entry, so what is already cached is never encoded again and a
request the cache covers decodes no image and loads no model. The device and the forward plan (readout, engine,
dtype) are resolved once per extraction, for the cache key, and the model is loaded with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
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

from lowshot import __version__
from lowshot.config import ExtractSettings, ProbeSettings
from lowshot.data.datasets import Dataset, Split, located, open_dataset
from lowshot.data.subsets import needed_indices, scored_indices
from lowshot.data.transforms import ImageTransform, named_transform
from lowshot.errors import BadInputError, CacheError, DataError, LowshotError
from lowshot.features import distributed
from lowshot.features.store import FeatureCache, Features, Need, Work
from lowshot.io import now_iso, write_json_atomic
from lowshot.models.backbones import (
    DEFAULT_MODEL,
    Backbone,
    ForwardPlan,
    ModelRef,
    load_backbone,
    plan_forward,
    resolve_device,
    resolve_model,
)
from lowshot.models.devices import Device

# Chunks decoded ahead of the model. On an accelerator decoding overlaps the device's work; on the CPU decode
# threads and the model's threads share the same cores, and overlapping them costs (threads preempted mid-GEMM),
# so the CPU decodes the next chunk only once the model is done with this one. LOWSHOT_DECODE_AHEAD_CPU sets it,
# for measurements (benchmarks/extract_speed.py).
DECODE_AHEAD = 2
DECODE_AHEAD_CPU = int(os.environ.get("LOWSHOT_DECODE_AHEAD_CPU", "0"))

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``: called as images finish; the CLI draws it, the library stays silent."""


class ExtractionInterrupted(KeyboardInterrupt):
    """Ctrl-C during an extraction; the message says how many images of each split the cache keeps (finished
    shards and the entry) and that rerunning the same command resumes from them."""


@dataclass
class SplitFeatures:
    split: str
    features: Features
    cached: bool
    seconds: float = 0.0
    images: int = 0  # images decoded and embedded in this call (0 on a cache hit)
    skipped: dict[str, str] = field(default_factory=dict)
    needed: int = 0  # images of the split this request uses (the whole split for the test split and --all)


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
    options: ExtractSettings
    # Resolved once by plan_extraction: the device (its type is in the key; the model runs there) and the forward plan
    # (readout, engine, dtype: in the key; the model is loaded with it).
    device: torch.device
    forward: ForwardPlan

    @functools.cached_property
    def origin(self) -> dict:
        """What this request names, as one finds it again: a model folder or MSN checkpoint by its absolute path, a
        hub model by its id and the revision it resolved to; the data likewise; and the weights' identity (sha256
        of each weight file and of the config). Results record this (``Features.origin``), never the names in a
        cache entry's manifest, which are those of whichever run wrote the entry."""
        source = self.ref.info.get("source")
        hub = source == "hub"
        return {"model": self.ref.name if hub else str(self.ref.folder), "model_source": source,
                "revision": self.ref.info.get("revision") if hub else None, "identity": self.ref.identity,
                "data": located(self.dataset.source)}


def plan_extraction(model: str, data: str | os.PathLike | None, settings: ExtractSettings, *,
                    cache: FeatureCache) -> Plan:
    """List the data (through the cache's listing memo), hash the model and compute each split's cache key."""
    dataset = open_dataset(data, train_split=settings.train_split, test_split=settings.test_split,
                           image_column=settings.image_column, label_column=settings.label_column,
                           listing_cache=cache.root / "listings")
    memo_path = cache.root / "weight-hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    ref = resolve_model(model, revision=settings.revision, hash_memo=memo)
    with contextlib.suppress(OSError):  # the memo only saves re-hashing; a read-only cache is reported elsewhere
        write_json_atomic(memo_path, memo)
    torch_device = resolve_device(settings.device)
    tf = named_transform(settings.transform, ref.folder)
    # The readout resolved for this model and input size, the engine, and the dtype (auto: reduced precision only on
    # the fast engine): all decided before any weight is loaded, as the key needs them.
    forward = plan_forward(ref, readout=settings.readout, engine=settings.engine, device=torch_device,
                           dtype=settings.dtype, input_size=tf.crop)
    resolved = {"readout": forward.readout.record(),
                "dtype": str(forward.dtype).removeprefix("torch."), "dtype_reason": forward.dtype_reason,
                "device": torch_device.type, "transform": tf.key()}
    keys = {split.name: cache.key_for({"model": ref.identity, "readout": forward.readout.key(),
                                       "dtype": resolved["dtype"], "device": torch_device.type,
                                       "transform": tf.key(), "data": split.identity})
            for split in dataset.splits()}
    return Plan(ref, dataset, tf, resolved, keys, settings, torch_device, forward)


def extract_features(
    model: str = DEFAULT_MODEL,
    data: str | os.PathLike | None = None,
    settings: ExtractSettings | None = None,
    *,
    subsets: ProbeSettings | None = None,
    all_images: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    **options,
) -> Extraction:
    """Encode what the protocol needs with ``model`` into the cache: the whole test split, and the train images
    that the labelled subsets of ``subsets`` draw (default: the MSN protocol), or the whole train split with
    ``all_images=True``. Images already in the cache are never encoded again: the entry grows by what is missing.

    ``settings`` is an :class:`~lowshot.config.ExtractSettings`, or its fields as keyword arguments. A request the
    cache already covers decodes no image and loads no model. Unreadable images, and images over
    ``max_pixels``, are skipped and reported (``strict=True`` makes them an error); a subset passes over them to
    the next image of its class. Interrupted runs resume from their finished shards. ``engine`` (auto, fast,
    stock) picks the forward; it is recorded, not part of the cache key (tests/test_fast_engine.py)."""
    settings = _extract_settings(settings, options)
    probe = subsets if subsets is not None else ProbeSettings()
    cache = FeatureCache(cache_dir)
    cache.ensure_writable()
    dist, device = distributed.setup(settings.device)
    try:
        plan = plan_extraction(model, data, dataclasses.replace(settings, device=device), cache=cache)
        needs: dict[str, Need] = {plan.dataset.train.name: (lambda listing: None) if all_images
                                  else (lambda listing: needed_indices(probe, listing)),
                                  plan.dataset.test.name: lambda listing: scored_indices(probe, listing)}
        state: dict[str, Backbone] = {}

        def backbone() -> Backbone:
            if "model" not in state:
                state["model"] = load_backbone(plan.ref, device=plan.device, forward=plan.forward,
                                               input_size=plan.transform.crop)
            return state["model"]

        try:
            results = {split.name: _ensure_split(split, needs[split.name], plan, cache, dist, backbone,
                                                 progress=progress if dist.is_main else None)
                       for split in plan.dataset.splits()}
        except KeyboardInterrupt as exc:
            if not dist.is_main:
                raise
            raise ExtractionInterrupted(_kept(plan, cache, needs)) from exc
        train, test = results[plan.dataset.train.name], results[plan.dataset.test.name]
        for part in (train, test):
            part.features.origin = plan.origin
        if "model" in state:
            engine_used = {"engine": state["model"].engine, "engine_reason": state["model"].engine_reason}
        else:  # all cache hits: say which engine computed the stored features
            engine_used = {"engine": train.features.manifest.get("engine", "stock"), "engine_reason": "cached"}
        resolved = {**plan.settings, **engine_used, "world_size": dist.world_size}
        if dist.is_main and train.split != test.split:  # one split on both sides (an export) is no probe run
            cache.record_run({"model": plan.origin["model"], "data": plan.origin["data"], "origin": plan.origin,
                              "train_key": train.features.key, "test_key": test.features.key,
                              "train_split": train.split, "test_split": test.split, "settings": resolved,
                              "extract_settings": settings.to_dict(), "created": now_iso()})
        dist.barrier()  # ranks leave together: none tears its process group down while rank 0 still writes
        return Extraction(model, plan.dataset.source, train, test, resolved)
    finally:
        dist.close()


def load_features(
    model: str | None = None,
    data: str | os.PathLike | None = None,
    settings: ExtractSettings | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    **options,
) -> tuple[Features, Features, dict]:
    """(train, test, run record) from the cache: for ``model`` + ``data`` (with the same settings as
    ``extract_features``), or the most recent extraction when both are None. Never extracts; the train entry may
    hold only the images earlier requests needed (``run_probe`` says when some it needs are missing)."""
    cache = FeatureCache(cache_dir)
    if model is None and data is None:
        if settings is not None or options:
            raise BadInputError("extraction settings select features only together with a model and data")
        for run in cache.runs():
            train, test = cache.load(run["train_key"]), cache.load(run["test_key"])
            if train is not None and test is not None:
                train.origin = test.origin = run.get("origin")
                return train, test, run
        raise CacheError(f"no extracted features in {cache.root}; run 'lowshot extract --model … --data …' first")
    settings = _extract_settings(settings, options)
    plan = plan_extraction(model or DEFAULT_MODEL, data, settings, cache=cache)
    train = cache.load(plan.keys[plan.dataset.train.name])
    test = cache.load(plan.keys[plan.dataset.test.name])
    if train is None or test is None:
        raise CacheError(f"no cached features for model {model or DEFAULT_MODEL!r} on {plan.dataset.source!r} with "
                         "these settings; run 'lowshot extract' with the same options first")
    train.origin = test.origin = plan.origin
    run = {"model": plan.origin["model"], "data": plan.origin["data"], "origin": plan.origin, "train_key": train.key,
           "test_key": test.key, "train_split": plan.dataset.train.name, "test_split": plan.dataset.test.name,
           "settings": plan.settings, "extract_settings": settings.to_dict()}
    return train, test, run


def _extract_settings(settings: ExtractSettings | None, options: dict) -> ExtractSettings:
    if settings is not None and options:
        raise TypeError(f"give an ExtractSettings or its fields, not both ({', '.join(options)})")
    return settings if settings is not None else ExtractSettings(**options)


def _ensure_split(split: Split, need: Need, plan: Plan, cache: FeatureCache, dist, backbone: Callable[[], Backbone],
                  *, progress: Progress | None) -> SplitFeatures:
    """The split's entry, holding what ``need`` picks: the store computes only what is missing, with an encoder."""
    started = time.perf_counter()
    done = cache.ensure(plan.keys[split.name], need, listing=split.listing(),
                        compute=_Encoder(split, plan, backbone, progress),
                        manifest=lambda: _manifest(split, plan, backbone()), dist=dist)
    # not grown: the entry held every image (perhaps once another process, which we waited for, encoded them)
    return SplitFeatures(split.name, done.features, cached=not done.grown, seconds=time.perf_counter() - started,
                         images=done.computed, skipped=done.features.manifest.get("skipped", {}), needed=done.needed)


@dataclass
class _Encoder:
    """Computes a split's missing rows for the store (its ``compute``): decode + forward, shard by shard. The model
    is loaded on first use (``backbone``), once for all splits."""

    split: Split
    plan: Plan
    backbone: Callable[[], Backbone]
    progress: Progress | None

    @property
    def dim(self) -> int:
        return self.backbone().dim

    def __call__(self, work: Work) -> int:
        task = f"{self.split.name} ({work.total:,} of {len(self.split):,} images)"
        return _compute_shards(self.backbone(), self.split, self.plan, work, task=task, progress=self.progress)


def _kept(plan: Plan, cache: FeatureCache, needs: dict[str, Need]) -> str:
    """What an interrupted extraction leaves, per split: how many of the images this request needs are in the
    entry or in a finished shard (a rerun encodes only the others)."""
    resume = "rerun the same command to resume"
    try:
        counts = []
        for split in plan.dataset.splits():
            kept, needed = cache.kept(plan.keys[split.name], needs[split.name], listing=split.listing())
            counts.append(f"{split.name} {kept:,} of {needed:,}")
    except (OSError, ValueError, KeyError, LowshotError):
        return f"finished shards are kept in the cache; {resume}"
    return f"images kept in the cache: {', '.join(counts)}; {resume} (it encodes only the rest)"


def _manifest(split: Split, plan: Plan, backbone: Backbone) -> dict:
    """What a new version of the split's entry records (the store adds counts, checksums and dates)."""
    return {
        "classes": split.classes, "split": split.name, "data": split.source, "data_identity": split.identity,
        "model": plan.origin["model"], "model_identity": plan.ref.identity, "model_info": plan.ref.info,
        **plan.settings,
        "extract_settings": plan.options.to_dict(), "engine": backbone.engine,
        "forward_batch": backbone.forward_batch,
        # Pillow decodes and resizes, and its version can move pixels: 13.0 resizes a photo more than twice as tall
        # as wide vertical pass first, 12.x horizontal first (some pixels differ by 1). Recorded, not keyed.
        "versions": {"lowshot": __version__, "torch": torch.__version__, "transformers": _version("transformers"),
                     "pillow": _version("pillow")},
    }


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


def batched_decode(split: Split, transform: ImageTransform, chunks: list[np.ndarray], workers: int,
                    max_pixels: int, *, ahead: int = 2) -> Iterator[list[tuple[np.ndarray | None, str | None]]]:
    """Decode chunk after chunk on a thread pool, keeping ``ahead`` chunks in flight ahead of the model (0: each
    chunk decoded on all workers, then handed over)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowshot-decode") as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append([pool.submit(_decode, split, transform, int(i), max_pixels) for i in chunk])
            if len(pending) > ahead:
                yield [f.result() for f in pending.popleft()]
        while pending:
            yield [f.result() for f in pending.popleft()]


def _compute_shards(backbone: Backbone, split: Split, plan: Plan, work: Work, *, task: str,
                    progress: Progress | None) -> int:
    """Embed the images of ``work.shards`` (arrays of listing indices) and write each shard as it finishes; returns
    the images embedded. Progress counts from ``work.done`` (resumed shards) to ``work.total``; with N ranks,
    rank 0 reports its own count x N as the global estimate."""
    options, shards, done, total, progress_scale = plan.options, work.shards, work.done, work.total, work.ranks
    if progress:
        progress(task, done, total)
    workers = options.workers or default_workers()
    batch = options.batch_size
    chunks = [shard[lo:lo + batch] for shard in shards for lo in range(0, len(shard), batch)]
    decoded = batched_decode(split, plan.transform, chunks, workers, options.max_pixels,
                              ahead=DECODE_AHEAD_CPU if backbone.device.type == "cpu" else DECODE_AHEAD)
    feeder = Device.for_device(backbone.device)  # pinned uint8 batches, normalised on the device, on accelerators
    embedded = local = 0
    for shard in shards:
        shard_features = np.zeros((len(shard), backbone.dim), dtype=np.float32)
        failed: dict[int, str] = {}
        for lo in range(0, len(shard), batch):
            items = shard[lo:lo + batch]
            images = next(decoded)
            ok = [j for j, (array, _) in enumerate(images) if array is not None]
            for j, (_, reason) in enumerate(images):
                if reason is not None:
                    if options.strict:
                        raise DataError(f"{split.where(int(items[j]))}: unreadable image "
                                        f"({reason}); drop --strict to skip and report such files")
                    failed[int(items[j])] = reason
            if ok:
                pixels = feeder.stage([images[j][0] for j in ok], plan.transform)
                feats = backbone.embed(pixels).numpy()
                if not np.isfinite(feats).all():
                    bad = [split.ids[items[ok[j]]] for j in np.flatnonzero(~np.isfinite(feats).all(1))[:3]]
                    raise DataError(f"the model produced non-finite features (e.g. for {', '.join(bad)}) with "
                                    f"dtype {plan.settings['dtype']}; try --dtype float32")
                shard_features[np.asarray(ok) + lo] = feats
                embedded += len(ok)
            local += len(images)
            if progress:
                progress(task, min(total, done + local * progress_scale), total)
        work.write(shard, shard_features, failed)
    if progress:
        progress(task, done + local if progress_scale == 1 else total, total)
    return embedded


def default_workers() -> int:
    """Decode threads when ``workers`` is not set: one per core, at least 2, at most 8."""
    return max(2, min(8, os.cpu_count() or 2))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
