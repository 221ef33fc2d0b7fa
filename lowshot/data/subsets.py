"""Labelled subsets of the train split: k images per class, a percentage of the labels, or published split files.

Sampling is nested and deterministic: for a seed, each class's images (sorted by id) are shuffled once by a
generator seeded with ``(seed, crc32(class name))``, and every subset takes a prefix of that order. So the 1-shot
set is inside the 2-shot set, inside the 5-shot set, inside the 1% set when it is larger -- and the draw depends
only on the seed, the class names and the item ids, never on the order of the features or the machine.

:func:`draw_subsets` draws every subset of a protocol from the train split's *listing* (ids, labels, class
names), never from features, so :func:`needed_indices` says which train images a run uses, and
:func:`scored_indices` which test images, before a pixel is decoded: extraction encodes only those.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import numpy as np

from lowshot.config import ProbeSettings
from lowshot.errors import SplitError


@dataclass(frozen=True)
class Subset:
    """One labelled training subset: ``indices`` into the train features."""

    name: str  # row label: "5-shot", "1%", or a split file's label
    seed: int
    indices: np.ndarray
    shots: int | None = None
    percent: float | None = None
    source: str | None = None  # split file path
    missing: int = 0  # listed names absent from the data


@dataclass(frozen=True)
class Listing:
    """A split as the draws see it: every listed item (readable or not yet known), its label, the class names.

    ``unreadable`` holds the indices of items known to fail decoding: a draw skips them and takes the next image of
    the class's order instead, so a draw made before an image was ever decoded and one made after decoding the
    whole split agree (see :func:`k_shot`)."""

    ids: Sequence[str]
    labels: np.ndarray
    classes: Sequence[str]
    unreadable: frozenset[int] = frozenset()

    def __len__(self) -> int:
        return len(self.ids)


def class_orders(ids: Sequence[str], labels: np.ndarray, classes: Sequence[str], seed: int) -> list[np.ndarray]:
    """For each class, its item indices in the seed's shuffled order (members sorted by id, then permuted by a
    generator seeded with ``(seed, crc32(class name))``)."""
    labels = np.asarray(labels)
    id_array = np.asarray(ids, dtype=object)
    by_label = np.argsort(labels, kind="stable")  # one pass over the split, not one per class
    bounds = np.searchsorted(labels[by_label], np.arange(len(classes) + 1))
    orders = []
    for label, name in enumerate(classes):
        members = by_label[bounds[label]:bounds[label + 1]]
        members = members[np.argsort(id_array[members], kind="stable")]
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))
        orders.append(members[rng.permutation(len(members))])
    return orders


def readable_orders(orders: list[np.ndarray], unreadable: frozenset[int] | set[int], *,
                    listing: Listing | None = None) -> list[np.ndarray]:
    """``orders`` without the items known to be unreadable (each subset then takes the next image of the order).
    With ``listing``, a class none of whose images could be read is an error that says so: no number of shots
    would help it."""
    if not unreadable:
        return orders
    bad = np.fromiter(unreadable, dtype=np.int64)
    readable = [o[~np.isin(o, bad)] for o in orders]
    lost = [c for c, (o, r) in enumerate(zip(orders, readable, strict=True)) if len(o) and not len(r)]
    if lost and listing is not None:
        c = lost[0]
        also = f"; {len(lost) - 1} more class(es) likewise" if len(lost) > 1 else ""
        raise SplitError(f"class {listing.classes[c]}: none of its {len(orders[c])} train images could be read "
                         f"(e.g. {listing.ids[int(np.min(orders[c]))]!r}){also}; fix or remove them (lowshot "
                         "extract --strict stops at the first one and says why)")
    return readable


def k_shot(orders: list[np.ndarray], classes: Sequence[str], k: int, *, allow_fewer: bool = False) -> np.ndarray:
    """The first ``k`` of each class's order (fewer only if ``allow_fewer``; a class with none is an error)."""
    short = [(classes[c], len(o)) for c, o in enumerate(orders) if len(o) < k]
    if short and not allow_fewer:
        names = ", ".join(f"{name} ({n})" for name, n in short[:5]) + (" …" if len(short) > 5 else "")
        raise SplitError(f"{k}-shot: {len(short)} class(es) have fewer than {k} train images: {names}; "
                         "lower --shots or pass --allow-fewer to use all images of such classes")
    empty = [classes[c] for c, o in enumerate(orders) if len(o) == 0]
    if empty:
        raise SplitError(f"class {empty[0]} has no train images")
    return np.sort(np.concatenate([o[:k] for o in orders]))


def percent_count(class_size: int, percent: float) -> int:
    """Images taken from a class of ``class_size`` for ``percent``: round half up, at least one."""
    return max(1, min(class_size, math.floor(class_size * percent / 100.0 + 0.5)))


def percent_subset(orders: list[np.ndarray], classes: Sequence[str], percent: float, *,
                   class_sizes: Sequence[int] | None = None) -> np.ndarray:
    """A stratified ``percent`` of the labels: ``percent_count`` images from each class. ``class_sizes`` (default:
    the orders' lengths) are the listed sizes, so the count does not change when an unreadable image is found."""
    empty = [classes[c] for c, o in enumerate(orders) if len(o) == 0]
    if empty:
        raise SplitError(f"class {empty[0]} has no train images")
    sizes = class_sizes if class_sizes is not None else [len(o) for o in orders]
    return np.sort(np.concatenate([o[:percent_count(n, percent)] for o, n in zip(orders, sizes, strict=True)]))


def read_split_file(path: str | Path) -> list[str]:
    """One file name (or relative path) per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise SplitError(f"--split-file {path}: cannot read ({exc.strerror})") from exc
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise SplitError(f"--split-file {path}: no file names in it")
    return names


def match_split_file(names: Sequence[str], ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Indices of the listed names among ``ids`` (matched by relative path, else by file name) and the names
    that are absent. A name that matches several items (same file name in two folders) is an error."""
    by_path = {item: i for i, item in enumerate(ids)}
    by_name: dict[str, list[int]] = {}
    for i, item in enumerate(ids):
        by_name.setdefault(PurePosixPath(item).name, []).append(i)
    found, missing = [], []
    for name in names:
        if name in by_path:
            found.append(by_path[name])
            continue
        hits = by_name.get(PurePosixPath(name).name, [])
        if len(hits) > 1:
            raise SplitError(f"split file entry {name!r} matches {len(hits)} train images; list relative paths")
        (found.append(hits[0]) if hits else missing.append(name))
    return np.unique(np.asarray(found, dtype=np.int64)), missing


def split_file_label(path: str | Path, names: Sequence[str], matched: dict[str, str] | None = None
                     ) -> tuple[str, int | None]:
    """A row label for a split file from its content: every class exactly k times -> ``k-shot``; else the file name
    (``1percent.txt`` -> ``1%``, others their stem). A name's class is its ImageNet-style ``wnid_`` prefix or folder,
    else the class of the train image it matched (``matched``: name -> class), so bare file names count too."""
    matched = matched or {}
    keys = [_class_of(name) or matched.get(name) for name in names]
    counts = Counter(keys) if all(keys) else Counter()
    if counts and len(set(counts.values())) == 1:
        k = next(iter(counts.values()))
        return f"{k}-shot", k
    stem = Path(path).stem
    match = re.fullmatch(r"(\d+(?:\.\d+)?)percent", stem)
    return (f"{match.group(1)}%" if match else stem), None


def _class_of(name: str) -> str | None:
    parts = PurePosixPath(name).parts
    if len(parts) > 1:
        return parts[-2]
    match = re.match(r"(n\d{8})_", parts[-1])
    return match.group(1) if match else None


class Listed(Protocol):
    """Anything that knows its split's listing (a train split's ``Features``)."""

    def listing(self) -> Listing: ...


# -- which images: a plain function of (probe settings, train listing) --------------------------------------------
def draw_subsets(listing: Listing | Listed, settings: ProbeSettings | None = None, **options) -> list[Subset]:
    """Every labelled subset of the run, as indices into the train listing: per seed the k-shot and percent subsets
    (nested), then the split files (files with the same content label are seeds of one row). Images known to be
    unreadable are passed over: each subset takes the next image of its class's order instead."""
    settings = probe_settings(settings, options)
    if not isinstance(listing, Listing):  # a train split's features: their listing
        listing = listing.listing()
    subsets = []
    for seed in range(settings.seeds):
        if not settings.shots and not settings.percents:
            break
        full = class_orders(listing.ids, listing.labels, listing.classes, seed)
        orders = readable_orders(full, listing.unreadable, listing=listing)
        if settings.limit is not None:  # quick mode: the pool is each class's first `limit` readable images
            full, orders = [o[:settings.limit] for o in full], [o[:settings.limit] for o in orders]
        for k in settings.shots:
            subsets.append(Subset(f"{k}-shot", seed, k_shot(orders, listing.classes, k,
                                                            allow_fewer=settings.allow_fewer), shots=k))
        for p in settings.percents:
            subsets.append(Subset(f"{p:g}%", seed, percent_subset(orders, listing.classes, p,
                                                                  class_sizes=[len(o) for o in full]), percent=p))
    seen: dict[str, int] = {}
    for path in settings.split_files:
        names = read_split_file(path)
        indices, missing = match_split_file(names, listing.ids)
        if len(indices) == 0:
            raise SplitError(f"--split-file {path}: none of its {len(names)} names is in the train split "
                             f"(e.g. {names[0]!r}; train ids look like {listing.ids[0]!r})")
        unreadable = [i for i in indices if int(i) in listing.unreadable]  # listed but undecodable: reported
        indices = np.asarray([i for i in indices if int(i) not in listing.unreadable], dtype=np.int64)
        matched = _matched_classes(names, indices, listing)
        label, k = split_file_label(path, names, matched)
        seed = seen.get(label, 0)
        seen[label] = seed + 1
        subsets.append(Subset(label, seed, indices, shots=k, source=str(path),
                              missing=len(missing) + len(unreadable)))
    return subsets


def needed_indices(settings: ProbeSettings, listing: Listing) -> np.ndarray:
    """The train images (sorted listing indices) that the protocol's subsets use: what extraction must encode."""
    subsets = draw_subsets(listing, settings)
    if not subsets:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.concatenate([s.indices for s in subsets]))


def scored_indices(settings: ProbeSettings, listing: Listing) -> np.ndarray | None:
    """The test images a run scores, as sorted listing indices: None (every one) for the protocol; with
    ``settings.limit``, the first ``limit`` readable images of each class in seed 0's order (``class_orders``), so
    the choice depends only on the ids and class names, and an image found unreadable is replaced by the next."""
    if settings.limit is None:
        return None
    orders = readable_orders(class_orders(listing.ids, listing.labels, listing.classes, 0), listing.unreadable)
    return np.sort(np.concatenate([o[:settings.limit] for o in orders]))


def _matched_classes(names: list[str], indices: np.ndarray, listing: Listing) -> dict[str, str]:
    """name -> class of the train image it matched (for labelling files of bare file names by content)."""
    by_name = {Path(str(listing.ids[i])).name: listing.classes[int(listing.labels[i])] for i in indices}
    by_path = {str(listing.ids[i]): listing.classes[int(listing.labels[i])] for i in indices}
    return {n: by_path.get(n) or by_name.get(Path(n).name) for n in names if n in by_path or Path(n).name in by_name}


def probe_settings(settings: ProbeSettings | None, options: dict) -> ProbeSettings:
    """``settings``, or a ProbeSettings made from its fields given as keyword arguments (not both)."""
    if settings is not None and options:
        raise TypeError(f"give a ProbeSettings or its fields, not both ({', '.join(options)})")
    return settings if settings is not None else ProbeSettings(**options)
