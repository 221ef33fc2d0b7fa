"""Evaluate the model you are training: the low-shot protocol on a live model, as often as you like.

    evaluator = lowshot.Evaluator("path/to/data", lowshot.ProbeSettings(shots=(1, 2, 5)))
    for step in range(...):
        ...  # train
        if step % 5000 == 0:
            results = evaluator(model, step=step)

Building an :class:`Evaluator` lists the data, draws the subsets and decodes the images the protocol uses (the
test split and the train images the subsets draw), keeping their crops as uint8 (:mod:`lowshot.features.pixels`).
A call is then one forward pass over exactly those images and the fits of :func:`lowshot.protocol.run_probe` on the
features held in memory: no image is decoded twice. The model runs in ``eval()`` under ``torch.inference_mode()``
on its own device and dtype; its train/eval mode (per submodule), grad flags and device, and the torch, numpy and
Python random states are as they were when the call returns. Inside a ``torch.distributed`` job every rank holds and
encodes its share of the images, rank 0 fits, and every rank returns the same :class:`~lowshot.results.rows.Results`.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from lowshot.config import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PIXELS, ProbeSettings
from lowshot.data.datasets import Split, located, open_dataset
from lowshot.data.subsets import needed_indices, probe_settings, scored_indices
from lowshot.data.transforms import ImageTransform, msn_transform
from lowshot.errors import BadInputError, DataError, LowshotError
from lowshot.features.distributed import Dist, joined
from lowshot.features.pixels import MEMORY_SHARE, WHERE, PixelStore, crop_bytes, memory_available
from lowshot.features.store import FeatureCache, Features
from lowshot.models.live import LiveModel, live_model
from lowshot.models.readouts import AUTO
from lowshot.protocol import run_probe
from lowshot.results.rows import Results

Progress = Callable[[str, int, int], None]
__all__ = ["Evaluator"]


class Evaluator:
    """The protocol ``protocol`` (a :class:`~lowshot.config.ProbeSettings`, or its fields as keywords) on ``data``
    (as ``lowshot probe --data`` takes it; None: the bundled demo sample), ready to score any model object.

    ``transform``: an :class:`~lowshot.data.transforms.ImageTransform` (default: the MSN transform). ``pixels``:
    where the crops are kept, ``"memory"``, ``"disk"`` (memory-mapped under ``cache_dir``'s ``pixels/``, reused by
    later evaluators on the same data) or ``"auto"`` (memory when they take at most half of the memory available).
    ``batch_size``: images per forward pass."""

    def __init__(self, data: str | os.PathLike | None = None, protocol: ProbeSettings | None = None, *,
                 transform: ImageTransform | None = None, pixels: str = "auto", cache_dir: str | os.PathLike | None
                 = None, batch_size: int = DEFAULT_BATCH_SIZE, train_split: str = "train", test_split: str | None
                 = None, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: Progress | None = None, **protocol_fields):
        if pixels not in WHERE:
            raise BadInputError(f"pixels {pixels!r}: expected one of {', '.join(WHERE)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise BadInputError(f"batch_size {batch_size!r}: must be a positive integer")
        self.protocol = probe_settings(protocol, protocol_fields)
        self.transform = transform or msn_transform()
        self.batch_size, self.workers, self.max_pixels = batch_size, workers, max_pixels
        self.cache = FeatureCache(cache_dir)
        self.dist = joined()
        dataset = open_dataset(data, train_split=train_split, test_split=test_split,
                               listing_cache=self.cache.root / "listings")
        self.source = dataset.source
        self.train, self.test = dataset.train, dataset.test
        self._stores = {split.name: PixelStore(split, self.transform, folder=self._folder(split, pixels))
                        for split in (self.train, self.test)}
        self._memo: tuple[tuple, Features, Features] | None = None
        self.features: tuple[Features, Features] | None = None  # the last call's (train, test), in memory
        self.images: dict[str, np.ndarray] = {}  # split -> the readable listing indices a call encodes (all ranks)
        self._prepare(pixels, progress)

    # -- building: the images the protocol uses, decoded once ----------------------------------------------------
    def _folder(self, split: Split, pixels: str) -> Path | None:
        if pixels == "memory":
            return None
        folder = self.cache.root / "pixels" / PixelStore.key(split, self.transform)
        if pixels == "disk":
            return folder
        protocol_images = len(self.test) + len(needed_indices(self.protocol, self.train.listing()))
        available = memory_available()
        fits = available is None or crop_bytes(protocol_images, self.transform) <= MEMORY_SHARE * available
        return None if fits else folder

    def _prepare(self, pixels: str, progress: Progress | None) -> None:
        """Decode this rank's share of the images the protocol uses, passing over unreadable ones (a subset then
        takes the next image of its class, as extraction does) until every rank has what it needs."""
        unreadable: dict[str, set[int]] = {self.train.name: set(), self.test.name: set()}
        while True:
            wanted = self._wanted(self.protocol, unreadable)
            found: dict[str, dict[int, str]] = {}
            for split in (self.train, self.test):
                mine = wanted[split.name][self.dist.rank::self.dist.world_size]
                found[split.name] = self._stores[split.name].fill(mine, workers=self.workers,
                                                                  max_pixels=self.max_pixels, progress=progress)
            new = {name: set(failed) - unreadable[name] for name, failed in _all_ranks(found, self.dist).items()}
            for name, failed in new.items():
                unreadable[name] |= failed
            if not any(new.values()):
                break
        self.unreadable = unreadable
        self.images = wanted

    def _wanted(self, protocol: ProbeSettings, unreadable: dict[str, set[int]]) -> dict[str, np.ndarray]:
        """The readable listing indices ``protocol`` uses, per split, given the items known to be unreadable."""
        train = needed_indices(protocol, self.train.listing(unreadable[self.train.name]))
        test = scored_indices(protocol, self.test.listing(unreadable[self.test.name]))
        test = np.arange(len(self.test)) if test is None else test
        return {self.train.name: np.setdiff1d(train, np.fromiter(unreadable[self.train.name], dtype=np.int64)),
                self.test.name: np.setdiff1d(test, np.fromiter(unreadable[self.test.name], dtype=np.int64))}

    # -- a call ---------------------------------------------------------------------------------------------------
    def __call__(self, model, *, step: int | None = None, readout: str = AUTO, key: str | None = None,
                 name: str | None = None, protocol: ProbeSettings | None = None,
                 data: str | os.PathLike | None = None, progress: Progress | None = None) -> Results:
        """The protocol's :class:`~lowshot.results.rows.Results` for ``model`` (a Hugging Face model instance, any
        ``torch.nn.Module`` or callable ``pixels -> (batch, dim)``, or a :class:`~lowshot.models.live.LiveModel`),
        with ``step`` in its meta. ``key`` names the model's weights (default: a hash of its ``state_dict``; the
        same key as the last call reuses its features). ``protocol`` and ``data``, when given, must be what this
        evaluator holds the images of (another protocol over the same images only changes the fits)."""
        settings = self._check(protocol, data)
        live = live_model(model, transform=self.transform, readout=readout, key=key, name=name)
        if live.transform != self.transform:
            raise BadInputError(f"the model's transform {live.transform.name!r} is not this evaluator's "
                                f"({self.transform.name!r}): the crops it holds were made by its own")
        with preserved(live.module):
            model_key = live.cache_key()
            memo_key = (model_key, repr(live.readout), live.name)
            if model_key is not None and self._memo is not None and self._memo[0] == memo_key:
                train, test = self._memo[1], self._memo[2]
            else:
                forward = live.forward_for_call()
                train, test = (self._features(live, forward, split, model_key, progress)
                               for split in (self.train, self.test))
                self._memo = (memo_key, train, test) if model_key is not None else None
            self.features = (train, test)
            meta = {"step": step, "live_model": {**live.describe(), "key": model_key},
                    "evaluator": {"images": {k: int(len(v)) for k, v in self.images.items()},
                                  "world_size": self.dist.world_size}}
            return self._fit(train, test, settings, meta, progress)

    def _check(self, protocol: ProbeSettings | None, data: str | os.PathLike | None) -> ProbeSettings:
        if data is not None and located(data) != located(self.source):
            raise BadInputError(f"data {data}: this evaluator was built on {self.source} and holds its images; build "
                                "another Evaluator for other data")
        if protocol is None:
            return self.protocol
        lacking = self._lacking(protocol)
        if any(lacking.values()):
            counts = ", ".join(f"{n:,} {name}" for name, n in lacking.items() if n)
            raise BadInputError(f"this evaluator holds the images of its own protocol; the one given needs {counts} "
                                "images it does not hold: build another Evaluator for it")
        return protocol

    def _lacking(self, protocol: ProbeSettings) -> dict[str, int]:
        return {name: len(np.setdiff1d(rows, self.images[name]))
                for name, rows in self._wanted(protocol, self.unreadable).items()}

    def _features(self, live: LiveModel, forward: Callable, split: Split, model_key: str | None,
                  progress: Progress | None) -> Features:
        """This rank's share through the model, gathered from every rank: the split's features in listing order."""
        rows = self.images[split.name]
        mine = rows[self.dist.rank::self.dist.world_size]
        try:
            outcome = ("ok", encode(live, self._stores[split.name], mine, forward=forward,
                                    batch_size=self.batch_size, progress=progress, task=f"forward {split.name}"))
        except LowshotError as exc:
            outcome = ("error", exc)
        gathered = self.dist.gather(outcome)
        errors = [payload for status, payload in gathered if status == "error"]
        if errors:
            raise errors[0]
        features = np.empty((len(rows), max(part.shape[1] for _, part in gathered)), dtype=np.float32)
        for r, (_, part) in enumerate(gathered):
            features[r::self.dist.world_size] = part
        unreadable = self.unreadable[split.name]
        listing = split.listing(unreadable)
        device, dtype = live.placement()
        manifest = {"split": split.name, "data": split.source, "classes": split.classes, "n_listed": len(split),
                    "skipped_rows": {str(i): self._stores[split.name].failed.get(i, "unreadable") for i in unreadable},
                    "readout": live.describe()["readout"],
                    "dtype": str(dtype).removeprefix("torch."), "device": device.type,
                    "transform": self.transform.key(), "model": live.name}
        origin = {"model": live.name, "model_source": "live", "revision": None,
                  "identity": {"state_dict_sha256" if live.key is None else "key": model_key},
                  "data": located(self.source)}
        return Features(f"live-{split.name}-{(model_key or 'unkeyed')[:16]}", features,
                        np.asarray(split.labels)[rows], [split.ids[i] for i in rows.tolist()], list(split.classes),
                        manifest, rows=rows, _listing=listing, origin=origin)

    def _fit(self, train: Features, test: Features, settings: ProbeSettings, meta: dict,
             progress: Progress | None) -> Results:
        """Rank 0 fits; every rank gets its Results (or its one-line error)."""
        outcome = None
        if self.dist.is_main:
            try:
                outcome = ("ok", run_probe(train, test, settings, meta=meta, progress=progress))
            except LowshotError as exc:
                outcome = ("error", exc)
        outcome = self.dist.broadcast(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]


def encode(live: LiveModel, store: PixelStore, indices: np.ndarray, *, batch_size: int,
           forward: Callable | None = None, progress: Progress | None = None, task: str = "forward") -> np.ndarray:
    """float32 features (n, dim) of the crops of ``indices``: normalised on the model's device, in its dtype, one
    forward per batch; a wrong shape, non-finite values or a raising model are one line each."""
    device, dtype = live.placement()
    forward = forward or live.forward_for_call()
    parts = []
    for lo in range(0, len(indices), batch_size):
        crops = torch.from_numpy(store.take(indices[lo:lo + batch_size]))
        pixels = live.transform.normalize(crops.to(device)).to(dtype)
        try:
            out = forward(pixels)
        except Exception as exc:  # noqa: BLE001 - any failure of the caller's model is reported as that model's
            raise BadInputError(f"{live.name} failed on a batch of {len(crops)} images "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
                                ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(crops):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BadInputError(f"{live.name} returned {shape} for {len(crops)} images; expected (batch, dim): one "
                                "feature vector per image")
        out = out.float().cpu().numpy()
        if parts and out.shape[1] != parts[0].shape[1]:
            raise BadInputError(f"{live.name} returned {out.shape[1]} features per image after {parts[0].shape[1]}")
        if not np.isfinite(out).all():
            raise DataError(f"{live.name} produced non-finite features for {int((~np.isfinite(out).all(1)).sum())} "
                            f"of {len(out)} images (dtype {str(dtype).removeprefix('torch.')})")
        parts.append(out)
        if progress:
            progress(task, min(lo + batch_size, len(indices)), len(indices))
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


@contextlib.contextmanager
def preserved(module: torch.nn.Module | None) -> Iterator[None]:
    """Run the block with ``module`` in eval mode under ``torch.inference_mode()``; afterwards every submodule's
    train/eval mode, every parameter's ``requires_grad`` and device, and the torch (CPU and CUDA), numpy and Python
    random states are what they were."""
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    params = [(p, p.requires_grad, p.device) for p in module.parameters()] if module is not None else []
    try:
        if module is not None:
            module.eval()
        with torch.inference_mode():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, grad, device in params:
            if p.device != device:
                p.data = p.data.to(device)
            p.requires_grad_(grad)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


def _all_ranks(found: dict[str, dict[int, str]], dist: Dist) -> dict[str, set[int]]:
    """The unreadable images every rank found, per split."""
    merged: dict[str, set[int]] = {}
    for per_rank in dist.gather(found):
        for name, failed in per_rank.items():
            merged.setdefault(name, set()).update(failed)
    return merged
