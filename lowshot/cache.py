"""Content-addressed feature store.

Layout under the cache root (``LOWSHOT_CACHE_DIR``, else the platform's user cache dir)::

    entries/<key>/            one finished split: features.npy (float32, N x D), labels.npy, manifest.json
    partial/<key>/            an extraction in progress: shard-NNNNNN.npy + .json, resumable
    locks/<key>.lock          one extraction per key at a time (other processes wait)
    runs/<id>.json            which train/test entries one ``lowshot extract`` produced (for ``lowshot probe``)

The key is the sha256 of everything that changes the features (weights and config hashes, transform, feature
layer, dtype, device type, data identity, cache format). Finished entries appear by one atomic directory rename,
so a reader sees either nothing or a whole entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from filelock import FileLock, Timeout

from .errors import CacheError

CACHE_FORMAT = 1  # bump when the on-disk layout or the meaning of a key input changes: old entries are rebuilt
ENV_CACHE_DIR = "LOWSHOT_CACHE_DIR"


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lowshot"))


def digest(obj: object) -> str:
    """Stable sha256 of a JSON-able object (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_atomic(path: Path, mode: str, write: Callable[[IO], None]) -> None:
    """Write through a temp file in the same folder, fsync, then rename: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "w", lambda handle: json.dump(obj, handle, indent=1, sort_keys=True))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    write_atomic(path, "wb", lambda handle: np.save(handle, array))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Features:
    """One cached split: ``features[i]`` is item ``ids[i]`` with label ``labels[i]`` (memory-mapped, read-only)."""

    key: str
    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    classes: list[str]
    manifest: dict

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


class FeatureCache:
    """The feature store. Safe for several processes: writes are atomic and extraction of a key is locked."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    # -- keys and paths ------------------------------------------------------------------------------------------
    @staticmethod
    def key_for(inputs: dict) -> str:
        return digest({"cache_format": CACHE_FORMAT, **inputs})[:32]

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key

    def partial_dir(self, key: str) -> Path:
        return self.root / "partial" / key

    def ensure_writable(self) -> None:
        try:
            for sub in ("entries", "partial", "locks", "runs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = self.root / "locks" / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CacheError(f"cache dir {self.root} is not writable ({exc.strerror}); "
                             f"set --cache-dir or {ENV_CACHE_DIR}") from exc

    @contextmanager
    def lock(self, key: str, *, timeout: float = -1) -> Iterator[None]:
        """Hold the extraction lock for ``key`` (waits for another process by default)."""
        lock = FileLock(str(self.root / "locks" / f"{key}.lock"), timeout=timeout)
        try:
            with lock:
                yield
        except Timeout as exc:
            raise CacheError(f"cache entry {key} is locked by another lowshot process") from exc

    # -- finished entries ----------------------------------------------------------------------------------------
    def load(self, key: str) -> Features | None:
        """The finished entry for ``key``, or None (also for entries of an incompatible format)."""
        folder = self.entry_dir(key)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("cache_format") != CACHE_FORMAT:
            return None
        try:
            features = np.load(folder / "features.npy", mmap_mode="r")
            labels = np.load(folder / "labels.npy")
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache entry {key} is damaged ({exc}); run 'lowshot cache verify'") from exc
        if features.ndim != 2 or len(features) != len(labels) or len(labels) != len(manifest["ids"]):
            raise CacheError(f"cache entry {key} is damaged (array shapes disagree); run 'lowshot cache verify'")
        return Features(key, features, labels, list(manifest["ids"]), list(manifest["classes"]), manifest)

    def commit(self, key: str, features: np.ndarray | Path, labels: np.ndarray, manifest: dict) -> Features:
        """Write a finished entry atomically: build it in a temp folder, then one rename. ``features`` may be a
        finished float32 ``.npy`` file in the cache (see :meth:`ShardStore.write_npy`): it is moved, not read."""
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
        try:
            if isinstance(features, Path):
                os.replace(features, tmp / "features.npy")
            else:
                np.save(tmp / "features.npy", np.ascontiguousarray(features, dtype=np.float32))
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
            manifest = {**manifest, "cache_format": CACHE_FORMAT, "key": key,
                        "sha256": {name: file_sha256(tmp / name) for name in ("features.npy", "labels.npy")}}
            write_json_atomic(tmp / "manifest.json", manifest)
            for name in ("features.npy", "labels.npy"):
                with open(tmp / name, "rb") as handle:
                    os.fsync(handle.fileno())
            if final.exists():  # an older/incompatible entry under the same key: replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(f"cannot write cache entry in {final.parent}: {exc.strerror or exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        loaded = self.load(key)
        assert loaded is not None  # just written
        return loaded

    def _entries(self) -> Iterator[tuple[Path, dict | None]]:
        """(folder, manifest or None when unreadable) of every finished entry, skipping temp folders."""
        for folder in sorted((self.root / "entries").glob("*")):
            if folder.name.startswith("."):
                continue
            try:
                yield folder, json.loads((folder / "manifest.json").read_text())
            except (OSError, ValueError):
                yield folder, None

    def manifests(self) -> list[dict]:
        """Manifests of all finished entries, newest first."""
        found = []
        for folder, manifest in self._entries():
            if manifest is None:
                continue
            manifest["size_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
            found.append(manifest)
        return sorted(found, key=lambda m: m.get("created", ""), reverse=True)

    def remove(self, key_prefix: str) -> list[str]:
        """Delete finished and partial entries whose key starts with ``key_prefix``; returns the keys removed."""
        if not key_prefix:
            raise CacheError("give a key (or a prefix of one) to remove; see 'lowshot cache list'")
        removed = []
        for sub in ("entries", "partial"):
            for folder in (self.root / sub).glob(f"{key_prefix}*"):
                with self.lock(folder.name):
                    shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        for run in (self.root / "runs").glob("*.json"):
            try:
                record = json.loads(run.read_text())
            except (OSError, ValueError):
                continue
            if any(k.startswith(key_prefix) for k in (record.get("train_key", ""), record.get("test_key", ""))):
                run.unlink(missing_ok=True)
        return sorted(set(removed))

    def verify(self) -> list[tuple[str, str]]:
        """Check every finished entry's files against the sha256 in its manifest: (key, problem) pairs."""
        problems = []
        for folder, manifest in self._entries():
            if manifest is None:
                problems.append((folder.name, "manifest.json missing or unreadable"))
                continue
            if manifest.get("cache_format") != CACHE_FORMAT:
                problems.append((folder.name, f"format {manifest.get('cache_format')} (current {CACHE_FORMAT})"))
                continue
            for name, expected in manifest.get("sha256", {}).items():
                path = folder / name
                if not path.is_file():
                    problems.append((folder.name, f"{name} missing"))
                elif file_sha256(path) != expected:
                    problems.append((folder.name, f"{name} checksum mismatch"))
        return problems

    # -- runs: which entries one extraction produced ---------------------------------------------------------------
    def record_run(self, record: dict) -> None:
        record = {**record, "created": record.get("created") or now_iso()}
        write_json_atomic(self.root / "runs" / f"{digest(record)[:16]}.json", record)

    def runs(self) -> list[dict]:
        records = []
        for path in (self.root / "runs").glob("*.json"):
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return sorted(records, key=lambda r: r.get("created", ""), reverse=True)


class ShardStore:
    """Resumable extraction: items are written in fixed-size shards; a finished shard is never recomputed."""

    def __init__(self, folder: Path, *, n_items: int, shard_size: int, dim: int):
        self.folder = folder
        self.n_items, self.shard_size, self.dim = n_items, shard_size, dim
        meta = {"n_items": n_items, "shard_size": shard_size, "dim": dim}
        meta_path = folder / "meta.json"
        try:
            existing = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        except ValueError:
            existing = None
        try:
            if existing != meta:  # different shard geometry (or none yet): start this partial entry afresh
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True, exist_ok=True)
                write_json_atomic(meta_path, meta)
            for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write; never read as a shard
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot write to the cache in {folder.parent} ({exc.strerror or exc})") from exc

    @property
    def n_shards(self) -> int:
        return (self.n_items + self.shard_size - 1) // self.shard_size

    def bounds(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n_items)

    def _paths(self, shard: int) -> tuple[Path, Path]:
        return self.folder / f"shard-{shard:06d}.npy", self.folder / f"shard-{shard:06d}.json"

    def done(self, shard: int) -> bool:
        array, info = self._paths(shard)
        return array.is_file() and info.is_file()

    def write(self, shard: int, features: np.ndarray, failed: dict[int, str]) -> None:
        """``features`` has one row per item of the shard (rows of failed items are ignored)."""
        array, info = self._paths(shard)
        start, stop = self.bounds(shard)
        if features.shape != (stop - start, self.dim):
            raise CacheError(f"shard {shard}: expected {(stop - start, self.dim)} features, got {features.shape}")
        try:
            save_npy_atomic(array, np.ascontiguousarray(features, dtype=np.float32))
            write_json_atomic(info, {"failed": {str(k): v for k, v in failed.items()}})  # written last: marks done
        except OSError as exc:
            array.unlink(missing_ok=True)
            raise CacheError(f"cannot write shard {shard} to {self.folder} ({exc.strerror or exc}); finished "
                             "shards are kept: free space or pick another --cache-dir, then rerun to resume") from exc

    def failed(self) -> dict[int, str]:
        """Items of all shards that could not be read (index -> reason)."""
        failed: dict[int, str] = {}
        for shard in range(self.n_shards):
            info = json.loads(self._paths(shard)[1].read_text())["failed"]
            failed.update({int(k): v for k, v in info.items()})
        return failed

    def write_npy(self, path: Path, keep: np.ndarray) -> None:
        """Write the ``keep`` rows of all shards to one float32 ``.npy`` file, one shard in memory at a time (the
        extraction's memory does not grow with the number of images)."""
        shape = (int(keep.sum()), self.dim)
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                          "fortran_order": False, "shape": shape})
            for shard in range(self.n_shards):
                start, stop = self.bounds(shard)
                rows = np.load(self._paths(shard)[0])[keep[start:stop]]
                handle.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
            handle.flush()
            os.fsync(handle.fileno())

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
