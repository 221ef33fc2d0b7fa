"""Content-addressed feature store.

Layout under the cache root (``LOWSHOT_CACHE_DIR``, else the platform's user cache dir)::

    entries/<key>/            the features of a split held so far: features.npy (float32, N x D), labels.npy,
                              rows.npy (each row's index in the split's listing), listing.json (every listed id
                              and label), manifest.json (incl. unreadable images, checksums)
    partial/<key>/            images being encoded: shard-<digest of its rows>.npy + .json, resumable
    locks/<key>.lock          one extraction per key at a time (other processes wait)
    runs/<id>.json            which train/test entries one ``lowshot extract`` produced (for ``lowshot probe``)

The key is the sha256 of everything that changes the features (weights and config hashes, transform, resolved
readout, dtype, device type, data identity, cache format). An entry grows by image: a request that needs images the
entry lacks encodes only those into shards, then a new version of the entry (old rows + new rows, in listing order,
streamed) replaces the old one by directory renames, so a reader sees the old entry or the new one, never a part.

:meth:`FeatureCache.ensure` is that whole choreography behind one call: given which rows a request needs and how
to compute missing ones, it takes the key's lock (other processes wait, then reuse what it wrote), hands out the
rows that neither the entry nor a finished shard holds (a run killed with ``kill -9`` resumes from its shards),
grows the entry and swaps it in. The caller only computes rows into the shards it is handed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
from filelock import FileLock, Timeout

from lowshot.data.subsets import Listing
from lowshot.errors import CacheError
from lowshot.io import digest, file_sha256, now_iso, save_npy_atomic, write_json_atomic

if TYPE_CHECKING:
    from lowshot.features.distributed import Dist

# Bump when the on-disk layout or the meaning of a key input changes: the key changes with it, so entries of another
# format are never read as this one (they are rebuilt). 3: an entry holds any subset of its split (rows.npy); the
# readout is keyed by its whole resolved spec.
CACHE_FORMAT = 3
# Rows per resumable shard, whatever the batch size or the number of ranks (so any rerun resumes); also the unit of
# work split between torchrun ranks. LOWSHOT_SHARD_SIZE overrides it (smaller shards balance small splits better).
SHARD_SIZE = int(os.environ.get("LOWSHOT_SHARD_SIZE", "1024"))
MERGE_BLOCK = 65_536  # rows gathered per block when an entry grows (64k x 384 float32 = 96 MB at most)
ENV_CACHE_DIR = "LOWSHOT_CACHE_DIR"


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lowshot"))


@dataclass
class Features:
    """Features of one split: ``features[i]`` is item ``ids[i]`` with label ``labels[i]`` (memory-mapped, read-only).

    An entry may hold only some of its split's images: ``rows[i]`` is row i's index in the split's listing (None:
    the rows are the whole listing, in order), and :meth:`listing` gives every listed item, which is what subsets
    are drawn from.

    ``origin`` says what the request that returned these features named (``extract.model_origin``: the model as
    one finds it again, the data, the weights' identity). An entry is keyed by content, so its manifest keeps the
    names of whichever run wrote it; results record the origin of the call instead (None: loaded by key, and the
    manifest's record stands in)."""

    key: str
    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    classes: list[str]
    manifest: dict
    rows: np.ndarray | None = None
    listing_path: Path | None = None
    _listing: Listing | None = field(default=None, repr=False, compare=False)
    origin: dict | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def listing(self) -> Listing:
        """Every item of the split (read from the entry on first use), with the ones known to be unreadable."""
        if self._listing is None:
            if self.listing_path is None:
                self._listing = Listing(self.ids, np.asarray(self.labels), self.classes)
            else:
                ids, labels = read_listing(self.listing_path)
                self._listing = Listing(ids, labels, self.classes,
                                        frozenset(int(i) for i in self.manifest.get("skipped_rows", {})))
        return self._listing

    def positions(self) -> np.ndarray:
        """For each listed item, its row here, or -1 when this entry does not hold it."""
        if self.rows is None:
            return np.arange(len(self), dtype=np.int64)
        position = np.full(int(self.manifest.get("n_listed", len(self.listing()))), -1, dtype=np.int64)
        position[self.rows] = np.arange(len(self.rows))
        return position

    @property
    def complete(self) -> bool:
        """True when every listed item is here or known to be unreadable."""
        if self.rows is None:
            return True
        return len(self) + len(self.manifest.get("skipped_rows", {})) == int(self.manifest["n_listed"])


Need = Callable[[Listing], "np.ndarray | None"]
"""Which listing indices a request uses (None: all of them), given the listing with the items known to be unreadable
(a subset passes over those to the next image of its class, so the answer can change as an entry learns of more)."""


@dataclass(frozen=True)
class Work:
    """The rows one process computes in one round of :meth:`FeatureCache.ensure`. Each array of ``shards`` holds
    listing indices and becomes one shard through :meth:`write`, called as soon as the shard is done (what a killed
    run keeps). Of the rows the request misses (``total``), finished shards already cover ``done``; ``ranks``
    processes share the round, each computing every ``ranks``-th shard."""

    shards: list[np.ndarray]
    done: int
    total: int
    ranks: int
    store: ShardStore = field(repr=False)

    def write(self, rows: np.ndarray, features: np.ndarray, failed: dict[int, str]) -> None:
        """Finish one shard: ``features`` has a row per item of ``rows``; ``failed`` maps unreadable rows to why."""
        self.store.write(rows, features, failed)


class Compute(Protocol):
    """How :meth:`FeatureCache.ensure` gets missing rows: ``dim`` is their width (asked only once rows are missing,
    so reading it may load a model); calling it writes every shard of a :class:`Work` and returns how many rows it
    computed (unreadable items are written as failed, not counted)."""

    @property
    def dim(self) -> int: ...

    def __call__(self, work: Work) -> int: ...


@dataclass
class Ensured:
    """What :meth:`FeatureCache.ensure` leaves: the entry, and what this call did to it."""

    features: Features
    needed: int  # rows the request uses (known-unreadable items passed over)
    computed: int  # rows computed by this call, over all ranks (0: the entry held them all)
    grown: bool  # this call wrote a new version (False: nothing was missing, perhaps after waiting for another run)


def write_listing(path: Path, ids: list[str], labels: np.ndarray) -> None:
    write_json_atomic(path, {"ids": list(ids), "labels": np.asarray(labels, dtype=np.int64).tolist()}, indent=None)


def read_listing(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        data = json.loads(path.read_text())
        return data["ids"], np.asarray(data["labels"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise CacheError(f"cache listing {path} is damaged ({exc}); run 'lowshot cache verify'") from exc


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
        """The entry for ``key``, or None (also for entries of another format, which are never read as this one)."""
        folder = self.entry_dir(key)
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            if self._recover(key):
                return self.load(key)
            return None
        if manifest.get("cache_format") != CACHE_FORMAT:
            return None
        try:
            features = np.load(folder / "features.npy", mmap_mode="r")
            labels = np.load(folder / "labels.npy")
            rows = np.load(folder / "rows.npy")
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache entry {key} is damaged ({exc}); run 'lowshot cache verify'") from exc
        if features.ndim != 2 or not len(features) == len(labels) == len(rows) == manifest.get("n"):
            raise CacheError(f"cache entry {key} is damaged (array shapes disagree); run 'lowshot cache verify'")
        listed_ids, listed_labels = read_listing(folder / "listing.json")
        if len(listed_ids) != manifest.get("n_listed") or (len(rows) and int(rows.max()) >= len(listed_ids)):
            raise CacheError(f"cache entry {key} is damaged (listing and rows disagree); run 'lowshot cache verify'")
        classes = list(manifest["classes"])
        unreadable = frozenset(int(i) for i in manifest.get("skipped_rows", {}))
        listing = Listing(listed_ids, listed_labels, classes, unreadable)
        return Features(key, features, labels, [listed_ids[i] for i in rows.tolist()], classes, manifest, rows=rows,
                        listing_path=folder / "listing.json", _listing=listing)

    def _recover(self, key: str) -> bool:
        """A process killed between the two renames of :meth:`grow` leaves the previous version under a hidden
        name and none under the key: put it back (cached work is never lost)."""
        for old in sorted(self.entry_dir(key).parent.glob(f".{key}.old-*")):
            try:
                os.rename(old, self.entry_dir(key))
                return True
            except OSError:
                continue
        return False

    # -- growing an entry ------------------------------------------------------------------------------------------
    def ensure(self, key: str, need: Need, *, listing: Listing, compute: Compute, manifest: Callable[[], dict],
               dist: Dist | None = None, shard_size: int | None = None) -> Ensured:
        """Make sure entry ``key`` holds the rows ``need`` picks from ``listing`` (the split: every id and label, in
        order), computing only the missing ones with ``compute``, and return the entry.

        One process per key computes (the others wait on the lock, then reuse its rows); missing rows are handed out
        in shards of ``shard_size`` (default ``SHARD_SIZE``), skipping those a finished shard already holds (an
        interrupted run resumes); the new version (old rows + new rows, in listing order) replaces the old one
        atomically, described by
        ``manifest()`` plus the store's own record (counts, unreadable items, checksums, dates). When rows turn out
        unreadable, ``need`` is asked again and any rows it now reaches for are computed in a further round. With
        ``dist`` (torchrun ranks) rank 0 decides, every rank computes its share, rank 0 writes the entry."""
        if dist is None:
            from lowshot.features.distributed import Dist

            dist = Dist()
        found = self.load(key)
        missing = dist.broadcast(_missing(need, listing, found) if dist.is_main else None)
        if len(missing) == 0:  # rank 0 decides, so every rank takes the same path
            found = found if found is not None else self.load(key)
            return Ensured(found, _needed(need, listing, found), computed=0, grown=False)
        dim = compute.dim  # before the lock: a model that does not load fails here, on every rank, holding nothing
        computed, grown = 0, False
        with nullcontext() if dist.active else self.lock(key):  # ranks cannot share a file lock: rank 0 takes it
            if dist.is_main:
                found = self.load(key)  # another process may have grown it while we waited
            while True:
                step = None
                if dist.is_main:
                    missing = _missing(need, listing, found)
                    store = ShardStore(self.partial_dir(key), dim=dim) if len(missing) else None
                    step = (missing, missing if store is None else np.setdiff1d(missing, store.covered()))
                missing, todo = dist.broadcast(step)
                if len(missing) == 0:
                    break
                if not dist.is_main:
                    store = ShardStore(self.partial_dir(key), dim=dim)  # rank 0 wrote meta.json: nothing reset
                size = shard_size or SHARD_SIZE
                shards = [todo[lo:lo + size] for lo in range(0, len(todo), size)]
                work = Work(shards[dist.rank::dist.world_size], done=len(missing) - len(todo), total=len(missing),
                            ranks=dist.world_size, store=store)
                computed += dist.total(compute(work))  # also the barrier: every rank has written its shards
                if dist.is_main:
                    # Ranks hold the file lock only now, so another process may have grown the entry meanwhile; a
                    # single process has held it throughout, and ``found`` is the entry as it is.
                    with self.lock(key) if dist.active else nullcontext():
                        found = self.grow(key, self.load(key) if dist.active else found, store,
                                          ids=list(listing.ids), labels=listing.labels, manifest=manifest())
                    store.discard()
                grown = True
                dist.barrier()
        if not dist.is_main:
            found = self.load(key)
        if found is None:
            raise CacheError(f"rank {dist.rank}: cache entry {key} was not written (see rank 0's error)")
        return Ensured(found, _needed(need, listing, found), computed=computed, grown=grown)

    def kept(self, key: str, need: Need, *, listing: Listing) -> tuple[int, int]:
        """(rows of the request that the entry or a finished shard holds, rows the request needs): what an
        interrupted :meth:`ensure` leaves for a rerun (which computes only the others)."""
        found = self.load(key)
        missing = np.setdiff1d(_missing(need, listing, found), shard_rows(self.partial_dir(key)))
        needed = _needed(need, listing, found)
        return needed - len(missing), needed

    def grow(self, key: str, old: Features | None, store: ShardStore, *, ids: list[str], labels: np.ndarray,
             manifest: dict) -> Features:
        """Write a new version of entry ``key``: the rows of ``old`` plus every finished shard of ``store``, in
        listing order, streamed block by block (memory does not grow with the entry). ``ids``/``labels`` are the
        split's listing; ``manifest`` describes the new version (this adds counts, unreadable items, checksums, the
        first version's creation date and this one's).
        The version replaces the old one by two renames; :meth:`load` undoes a half-done swap."""
        final = self.entry_dir(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{key}."))
        try:
            sources, rows, skipped = _gather(old, store)
            order = np.argsort(rows[:, 0], kind="stable")
            rows = rows[order]
            keep = np.ones(len(rows), dtype=bool)
            keep[1:] = rows[1:, 0] != rows[:-1, 0]  # an image in two sources: its features are the same, keep one
            rows = rows[keep]
            dim = store.dim if old is None else old.dim
            _write_rows(tmp / "features.npy", sources, rows, dim)
            listed = rows[:, 0]
            np.save(tmp / "rows.npy", listed)
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64)[listed])
            if old is not None and old.listing_path is not None and old.listing_path.is_file():
                os.link(old.listing_path, tmp / "listing.json")  # the listing never changes under one key
            else:
                write_listing(tmp / "listing.json", ids, labels)
            held = set(listed.tolist())
            skipped = {int(i): reason for i, reason in skipped.items() if i not in held}
            added = int(len(listed) - (len(old) if old is not None else 0))
            history = list(old.manifest.get("history", [])) if old is not None else []
            now = now_iso()
            manifest = {**manifest, "created": old.manifest.get("created", now) if old is not None else now,
                        "updated": now, "cache_format": CACHE_FORMAT, "key": key, "n": int(len(listed)),
                        "n_listed": len(ids), "dim": dim,
                        "skipped": {ids[i]: reason for i, reason in sorted(skipped.items())},
                        "skipped_rows": {str(i): reason for i, reason in skipped.items()},
                        "history": [*history, {"added": added, "date": now}],
                        "sha256": {name: file_sha256(tmp / name)
                                   for name in ("features.npy", "labels.npy", "rows.npy", "listing.json")}}
            for name in ("features.npy", "labels.npy", "rows.npy"):
                with open(tmp / name, "rb") as handle:
                    os.fsync(handle.fileno())
            write_json_atomic(tmp / "manifest.json", manifest)
            _swap(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(f"cannot write cache entry in {final.parent}: {exc.strerror or exc}; finished shards "
                             "are kept: free space or pick another --cache-dir, then rerun to resume") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        loaded = self.load(key)
        if loaded is None:
            raise CacheError(f"cache entry {key} vanished right after it was written")
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

    def matching(self, key_prefix: str) -> list[Path]:
        """The folders of finished and partial entries whose key starts with ``key_prefix``."""
        return [folder for sub in ("entries", "partial") for folder in (self.root / sub).glob(f"{key_prefix}*")]

    def remove(self, key_prefix: str) -> list[str]:
        """Delete finished and partial entries whose key starts with ``key_prefix``; returns the keys removed."""
        if not key_prefix:
            raise CacheError("give a key (or a prefix of one) to remove; see 'lowshot cache list'")
        removed = []
        for folder in self.matching(key_prefix):
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

    def stale(self) -> list[tuple[str, str]]:
        """Entries of another cache format, (key, note) pairs: not damaged, never read as this format; the next
        extraction that needs one writes a current entry (``cache rm`` frees the old one's space)."""
        return [(folder.name, f"format {manifest.get('cache_format')} (current {CACHE_FORMAT}): not read; "
                 "rebuilt when needed")
                for folder, manifest in self._entries()
                if manifest is not None and manifest.get("cache_format") != CACHE_FORMAT]

    def verify(self) -> list[tuple[str, str]]:
        """Check every finished entry of the current format against the sha256 in its manifest: (key, problem)
        pairs. Entries of another format are not problems (see :meth:`stale`)."""
        problems = []
        for folder, manifest in self._entries():
            if manifest is None:
                problems.append((folder.name, "manifest.json missing or unreadable"))
                continue
            if manifest.get("cache_format") != CACHE_FORMAT:
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
    """Resumable extraction: the images being encoded are written in shards, each holding its rows (listing
    indices), their features and the ones that could not be read. A shard is named by a digest of its rows, so a
    finished shard counts whatever request it was written for: a rerun (any command, any number of ranks)
    encodes only the images no finished shard covers."""

    LAYOUT = 2

    def __init__(self, folder: Path, *, dim: int):
        self.folder, self.dim = folder, dim
        meta = {"layout": self.LAYOUT, "dim": dim}
        meta_path = folder / "meta.json"
        try:
            existing = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        except ValueError:
            existing = None
        try:
            if existing != meta:  # another layout or width (or nothing yet): start this partial entry afresh
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True, exist_ok=True)
                write_json_atomic(meta_path, meta)
            for stale in folder.glob(".*.tmp"):  # left by a process killed mid-write; never read as a shard
                stale.unlink(missing_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot write to the cache in {folder.parent} ({exc.strerror or exc})") from exc

    def names(self) -> list[str]:
        """Finished shards (the ``.json`` is written last and marks a shard done)."""
        return finished_shards(self.folder)

    def read(self, name: str) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """(rows, features memory-mapped, unreadable rows -> reason) of a finished shard."""
        info = json.loads((self.folder / f"{name}.json").read_text())
        features = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return (np.asarray(info["rows"], dtype=np.int64), features,
                {int(k): v for k, v in info["failed"].items()})

    def covered(self) -> np.ndarray:
        """Listing indices of every item in a finished shard (read or found unreadable)."""
        return shard_rows(self.folder)

    def write(self, rows: np.ndarray, features: np.ndarray, failed: dict[int, str]) -> None:
        """``features`` has one row per item of ``rows`` (rows of ``failed`` items are ignored)."""
        rows = np.asarray(rows, dtype=np.int64)
        if features.shape != (len(rows), self.dim):
            raise CacheError(f"shard of {len(rows)} images: expected {(len(rows), self.dim)} features, got "
                             f"{features.shape}")
        name = f"shard-{hashlib.sha256(rows.tobytes()).hexdigest()[:20]}"
        array, info = self.folder / f"{name}.npy", self.folder / f"{name}.json"
        try:
            save_npy_atomic(array, np.ascontiguousarray(features, dtype=np.float32))
            write_json_atomic(info, {"rows": rows.tolist(), "failed": {str(k): v for k, v in failed.items()}},
                              indent=None)  # written last: marks done
        except OSError as exc:
            array.unlink(missing_ok=True)
            raise CacheError(f"cannot write a shard to {self.folder} ({exc.strerror or exc}); finished shards are "
                             "kept: free space or pick another --cache-dir, then rerun to resume") from exc

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def finished_shards(folder: Path) -> list[str]:
    """Names of the finished shards in a partial entry's folder (the ``.json`` is written last and marks one done)."""
    return sorted(p.stem for p in folder.glob("shard-*.json") if p.with_suffix(".npy").is_file())


def shard_rows(folder: Path) -> np.ndarray:
    """Listing indices of every item in a finished shard of ``folder`` (read or found unreadable), read without
    opening a :class:`ShardStore` (which resets a folder of another layout): what an interrupted run keeps."""
    rows = [np.asarray(json.loads((folder / f"{name}.json").read_text())["rows"], dtype=np.int64)
            for name in finished_shards(folder)]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64)


def _known(listing: Listing, found: Features | None) -> Listing:
    """``listing`` with the items ``found`` knows to be unreadable."""
    unreadable = found.listing().unreadable if found is not None else frozenset()
    return Listing(listing.ids, listing.labels, listing.classes, unreadable)


def _needed(need: Need, listing: Listing, found: Features | None) -> int:
    wanted = need(_known(listing, found))
    return len(listing) if wanted is None else len(wanted)


def _missing(need: Need, listing: Listing, found: Features | None) -> np.ndarray:
    """Listing indices ``need`` picks that ``found`` neither holds nor knows to be unreadable (sorted)."""
    wanted = need(_known(listing, found))
    wanted = np.arange(len(listing), dtype=np.int64) if wanted is None else np.asarray(wanted, dtype=np.int64)
    if found is None:
        return wanted
    unreadable = found.listing().unreadable
    known = np.fromiter(unreadable, dtype=np.int64, count=len(unreadable))
    held = found.rows if found.rows is not None else np.arange(len(found))
    return np.setdiff1d(wanted, np.concatenate([held, known]))


def _gather(old: Features | None, store: ShardStore) -> tuple[list[np.ndarray], np.ndarray, dict[int, str]]:
    """Sources of a new entry version: the old rows, then each finished shard. Returns the source arrays, one
    (listing index, source, row in source) triple per readable image, and the unreadable images (index -> reason)."""
    sources: list[np.ndarray] = []
    triples: list[np.ndarray] = []
    skipped: dict[int, str] = {}
    if old is not None:
        old_rows = old.rows if old.rows is not None else np.arange(len(old))
        sources.append(old.features)
        triples.append(np.stack([old_rows, np.zeros_like(old_rows), np.arange(len(old_rows))], axis=1))
        skipped.update({int(i): r for i, r in old.manifest.get("skipped_rows", {}).items()})
    for name in store.names():
        rows, features, failed = store.read(name)
        skipped.update(failed)
        ok = np.flatnonzero(~np.isin(rows, np.fromiter(failed, dtype=np.int64, count=len(failed))))
        source = len(sources)
        sources.append(features)
        triples.append(np.stack([rows[ok], np.full(len(ok), source), ok], axis=1))
    merged = np.concatenate(triples) if triples else np.zeros((0, 3), dtype=np.int64)
    return sources, merged.astype(np.int64), skipped


def _write_rows(path: Path, sources: list[np.ndarray], rows: np.ndarray, dim: int) -> None:
    """Write ``rows`` ((listing index, source, row) triples, in order) as one float32 ``.npy``, a block at a time."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                                      "fortran_order": False, "shape": (len(rows), dim)})
        for lo in range(0, len(rows), MERGE_BLOCK):
            block = rows[lo:lo + MERGE_BLOCK]
            out = np.empty((len(block), dim), dtype="<f4")
            for source in np.unique(block[:, 1]):
                take = block[:, 1] == source
                out[take] = sources[int(source)][block[take, 2]]
            handle.write(out.tobytes())


def _swap(new: Path, final: Path) -> None:
    """Put folder ``new`` in place of ``final``: the old version is renamed aside first and deleted last."""
    if not final.exists():
        os.rename(new, final)
        return
    aside = final.parent / f".{final.name}.old-{os.getpid()}-{time.time_ns()}"
    os.rename(final, aside)
    os.rename(new, final)
    shutil.rmtree(aside, ignore_errors=True)

