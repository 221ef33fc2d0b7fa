"""Decoded, transformed images kept as uint8 crops, so that evaluating a model again decodes nothing.

A :class:`PixelStore` holds the crops of some images of one split (the transform's output before normalisation:
``crop x crop x 3`` uint8, a quarter of float32's bytes; normalising at forward time gives the exact pixels
extraction feeds a model). It lives in memory, or on disk under the cache as memory-mapped parts::

    pixels/<key>/part-<digest of its rows>.npy    the crops, uint8 (n, crop, crop, 3)
    pixels/<key>/part-<digest of its rows>.json   its rows (listing indices), unreadable ones, shape: written last

``key`` names the split's data and the transform, so another process (or another evaluator) on the same images
reuses finished parts. The bytes a fill needs are computed before any decoding: a store that does not fit (the
disk's free space, or the memory available) is one :class:`~lowshot.errors.CacheError` line, and a fill that fails
part-way leaves no file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lowshot.data.datasets import Split
from lowshot.data.transforms import ImageTransform
from lowshot.errors import CacheError
from lowshot.features.extract import batched_decode, default_workers
from lowshot.io import digest, write_json_atomic

WHERE = ("auto", "memory", "disk")
DECODE_CHUNK = 64  # images handed to the decode threads at a time
DISK_MARGIN = 1 << 30  # free space a disk store leaves on its file system (the cache and other writers need some)
MEMORY_SHARE = 0.5  # "auto" keeps crops in memory when they take at most this share of the memory available
Progress = Callable[[str, int, int], None]


def crop_bytes(n: int, transform: ImageTransform) -> int:
    """Bytes of ``n`` uint8 crops of ``transform``."""
    return int(n) * transform.crop * transform.crop * 3


def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), or None where the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_bytes(folder: Path) -> int:
    """Free space on the file system ``folder`` is (or would be) on."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


class PixelStore:
    """uint8 crops of images of one split, by listing index; ``folder`` None: in memory, else memory-mapped parts
    there (finished parts found in it are used at once)."""

    def __init__(self, split: Split, transform: ImageTransform, *, folder: Path | None = None):
        self.split, self.transform, self.folder = split, transform, folder
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, crops) pairs
        self.failed: dict[int, str] = {}
        self._where: dict[int, tuple[int, int]] = {}
        if folder is not None:
            for info in sorted(folder.glob("part-*.json")):
                self._open_part(info)

    @staticmethod
    def key(split: Split, transform: ImageTransform) -> str:
        """The folder name of a split's crops under ``pixels/``: its data identity and the transform."""
        return digest({"data": split.identity, "split": split.name, "transform": transform.key()})[:32]

    def known(self) -> np.ndarray:
        """Listing indices held or known to be unreadable (sorted)."""
        return np.asarray(sorted({*self._where, *self.failed}), dtype=np.int64)

    def bytes_held(self) -> int:
        return sum(crops.nbytes for _, crops in self.parts)

    def check_room(self, n: int) -> None:
        """Refuse, in one line and before any decoding, ``n`` more crops that would not fit where they go."""
        need = crop_bytes(n, self.transform)
        if self.folder is not None:
            free = free_bytes(self.folder)
            if need + DISK_MARGIN > free:
                raise CacheError(f"the decoded pixels of {n:,} {self.split.name} images need {need / 2**30:.2f} GiB "
                                 f"in {self.folder} and {free / 2**30:.2f} GiB is free (keeping "
                                 f"{DISK_MARGIN / 2**30:.0f} GiB spare); free space, or give another cache_dir")
        else:
            available = memory_available()
            if available is not None and need > available:
                raise CacheError(f"the decoded pixels of {n:,} {self.split.name} images need {need / 2**30:.2f} GiB "
                                 f"of memory and {available / 2**30:.2f} GiB is available; keep them on disk "
                                 "(pixels='disk')")

    def fill(self, indices: np.ndarray, *, workers: int | None = None, max_pixels: int,
             progress: Progress | None = None) -> dict[int, str]:
        """Decode the images of ``indices`` not held yet into a new part; returns the ones found unreadable now
        (listing index -> why)."""
        todo = np.setdiff1d(np.asarray(indices, dtype=np.int64), self.known())
        if not len(todo):
            return {}
        self.check_room(len(todo))
        shape = (len(todo), self.transform.crop, self.transform.crop, 3)
        name = f"part-{digest(todo.tolist())[:20]}"
        tmp = None
        if self.folder is None:
            crops = np.empty(shape, dtype=np.uint8)
        else:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                tmp = self.folder / f".{name}.{os.getpid()}.tmp"
                crops = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            except OSError as exc:
                raise CacheError(f"cannot write decoded pixels to {self.folder} ({exc.strerror or exc})") from exc
        try:
            failed = self._decode_into(crops, todo, workers=workers, max_pixels=max_pixels, progress=progress)
            if tmp is not None:
                crops.flush()
                del crops
                os.replace(tmp, self.folder / f"{name}.npy")
                write_json_atomic(self.folder / f"{name}.json", {"rows": todo.tolist(), "shape": list(shape),
                                                                 "failed": {str(k): v for k, v in failed.items()}},
                                  indent=None)  # written last: marks the part done
                crops = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        except OSError as exc:
            self._discard(tmp, name)
            raise CacheError(f"cannot write decoded pixels to {self.folder} ({exc.strerror or exc}); free space or "
                             "give another cache_dir") from exc
        except BaseException:
            self._discard(tmp, name)
            raise
        self._add(todo, crops, failed)
        return failed

    def _decode_into(self, crops: np.ndarray, todo: np.ndarray, *, workers: int | None, max_pixels: int,
                     progress: Progress | None) -> dict[int, str]:
        failed: dict[int, str] = {}
        chunks = [todo[lo:lo + DECODE_CHUNK] for lo in range(0, len(todo), DECODE_CHUNK)]
        task = f"decode {self.split.name} ({len(todo):,} images)"
        done = 0
        for chunk, images in zip(chunks, batched_decode(self.split, self.transform, chunks,
                                                          workers or default_workers(), max_pixels, ahead=1),
                                 strict=True):
            for j, (array, reason) in enumerate(images):
                if array is None:
                    failed[int(chunk[j])] = reason or "unreadable"
                else:
                    crops[done + j] = array
            done += len(chunk)
            if progress:
                progress(task, done, len(todo))
        return failed

    def _discard(self, tmp: Path | None, name: str) -> None:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
            (self.folder / f"{name}.npy").unlink(missing_ok=True)
            (self.folder / f"{name}.json").unlink(missing_ok=True)

    def _open_part(self, info: Path) -> None:
        """A finished part from disk; a damaged one is removed (it is decoded again when needed)."""
        try:
            meta = json.loads(info.read_text())
            crops = np.load(info.with_suffix(".npy"), mmap_mode="r")
            rows = np.asarray(meta["rows"], dtype=np.int64)
            if crops.shape != tuple(meta["shape"]) or len(rows) != len(crops) or crops.dtype != np.uint8:
                raise ValueError("shape")
        except (OSError, ValueError, KeyError):
            info.unlink(missing_ok=True)
            info.with_suffix(".npy").unlink(missing_ok=True)
            return
        self._add(rows, crops, {int(k): v for k, v in meta.get("failed", {}).items()})

    def _add(self, rows: np.ndarray, crops: np.ndarray, failed: dict[int, str]) -> None:
        part = len(self.parts)
        self.parts.append((rows, crops))
        self.failed.update(failed)
        for r, index in enumerate(rows.tolist()):
            if index not in failed:
                self._where[index] = (part, r)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The crops of ``indices`` (each held), stacked: (n, crop, crop, 3) uint8."""
        out = np.empty((len(indices), self.transform.crop, self.transform.crop, 3), dtype=np.uint8)
        for i, index in enumerate(np.asarray(indices).tolist()):
            part, row = self._where[index]
            out[i] = self.parts[part][1][row]
        return out
