"""Where images come from: ImageFolder splits on disk, or Hugging Face datasets (hub id or ``save_to_disk`` folder).

A :class:`Split` is a list of items (a stable id, an integer label) plus a way to open item ``i`` as a PIL image,
and an ``identity`` that changes whenever the data changes (file list with sizes and mtimes, or the dataset
fingerprint). Folder rule: one sub-folder per class; hidden files and folders (leading ``.``) and files whose
extension is not in :data:`IMAGE_EXTENSIONS` are ignored.

ImageNet's validation set as distributed is one flat folder of ``ILSVRC2012_val_00000001.JPEG`` … and a labels file
(:func:`flat_image_folder`): a test split folder without sub-folders is read that way, its labels taken from
Kaggle's ``LOC_val_solution.csv`` or the devkit's ground truth with its ``meta.mat``. Its ids are the paths the same
images have in the usual ImageFolder tree (``n01751748/ILSVRC2012_val_00000001.JPEG``), so both give one listing.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from lowshot.data.subsets import Listing
from lowshot.errors import DataError, MissingDependencyError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)
TEST_SPLIT_CANDIDATES = ("val", "validation", "test")
DEMO_DATA = Path(__file__).parents[1] / "demo_data" / "imagenette-mini"
# ImageNet's validation labels as distributed. Kaggle's ImageNet Object Localization Challenge: a CSV with the header
# ImageId,PredictionString and rows "ILSVRC2012_val_00000001,n01751748 x y x y …" (the box's wnid first). The ILSVRC
# 2012 devkit (ILSVRC2012_devkit_t12/data/): line n of the ground truth is the ILSVRC2012_ID (1-1000) of image n, and
# meta.mat's synsets map ILSVRC2012_ID to WNID (not in sorted-wnid order: LOC_synset_mapping.txt cannot stand in).
KAGGLE_LABELS = "LOC_val_solution.csv"
DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"
LABEL_SEARCH_PARENTS = 3  # Kaggle unpacks LOC_val_solution.csv three folders above ILSVRC/Data/CLS-LOC/val


@dataclass
class Split:
    """One split of a dataset: ``ids[i]`` (relative path or row number) has label ``labels[i]``."""

    name: str
    ids: list[str]
    labels: np.ndarray
    classes: list[str]
    identity: dict
    source: str
    _root: Path | None = None
    _hf: Any = None
    _image_column: str | None = None
    _extra: dict = field(default_factory=dict)
    _files: list[str] | None = None  # file paths under _root where they differ from the ids (a flat folder)

    def __len__(self) -> int:
        return len(self.ids)

    def listing(self, unreadable: Iterable[int] = ()) -> Listing:
        """The split as the subset draws see it, with the items known to be unreadable."""
        return Listing(self.ids, np.asarray(self.labels), self.classes, frozenset(unreadable))

    def where(self, index: int) -> str:
        """Where item ``index`` is, for a message: its file on disk (a flat folder's too), or a dataset's row."""
        if self._root is not None:
            return str(self._root / (self._files[index] if self._files is not None else self.ids[index]))
        return f"{self.source} row {self.ids[index]}"

    def open(self, index: int) -> Image.Image:
        """Open item ``index`` as a PIL image (not yet decoded for files; raises on unreadable data)."""
        if self._root is not None:  # lazy: draft() can still shrink a big JPEG
            return Image.open(self.where(index))
        value = self._hf[index][self._image_column]
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            return Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
        raise DataError(f"row {index} of {self.source}: column {self._image_column!r} holds no image")


def located(data: str | os.PathLike) -> str:
    """Data as one finds it again: a local path made absolute, a hub id as it is."""
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else str(data)


@dataclass
class Dataset:
    """The splits lowshot needs: ``train`` for the labelled shots and ``test`` for evaluation."""

    source: str
    train: Split
    test: Split

    def splits(self) -> list[Split]:
        return [self.train, self.test]


def open_dataset(
    data: str | os.PathLike | None = None,
    *,
    train_split: str = "train",
    test_split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    listing_cache: Path | None = None,
) -> Dataset:
    """Resolve ``data`` (folder of ImageFolder splits, HF ``save_to_disk`` folder, or HF hub id; ``None`` = the
    bundled demo sample) into train and test splits with the same classes. ``listing_cache``: a folder where
    ImageFolder listings are remembered by directory mtime (see :func:`image_folder`)."""
    data = str(data) if data is not None else str(DEMO_DATA)
    path = Path(data).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
            splits = _hf_splits(path, from_disk=True)
            dataset = _hf_dataset(str(path), splits, train_split, test_split, image_column, label_column)
        else:
            dataset = _folder_dataset(path, train_split, test_split, listing_cache)
    elif "/" in data and not data.startswith((".", "/", "~")) and not path.exists():
        splits = _hf_splits(data, from_disk=False)
        dataset = _hf_dataset(data, splits, train_split, test_split, image_column, label_column)
    else:
        raise DataError(f"--data {data!r}: no such folder (expected a folder with train/ and val/ sub-folders, "
                        "a datasets.save_to_disk folder, or a Hugging Face dataset id like 'user/name')")
    _check_same_classes(dataset)
    return dataset


def _pick_test_split(available: Sequence[str], test_split: str | None, source: str) -> str:
    if test_split is not None:
        if test_split not in available:
            raise DataError(f"{source}: no split {test_split!r}; available: {', '.join(sorted(available)) or 'none'}")
        return test_split
    for name in TEST_SPLIT_CANDIDATES:
        if name in available:
            return name
    raise DataError(f"{source}: no test split (looked for {', '.join(TEST_SPLIT_CANDIDATES)}); available: "
                    f"{', '.join(sorted(available)) or 'none'}; name one with --test-split")


def _folder_dataset(root: Path, train_split: str, test_split: str | None, listing_cache: Path | None) -> Dataset:
    available = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if train_split not in available:
        raise DataError(f"{root}: no split {train_split!r}; available: {', '.join(sorted(available)) or 'none'} "
                        "(expected one sub-folder per split, each with one sub-folder per class)")
    test_name = _pick_test_split(available, test_split, str(root))
    train = image_folder(root / train_split, name=train_split, listing_cache=listing_cache)
    if _is_flat(root / test_name):
        test = flat_image_folder(root / test_name, name=test_name, classes=train.classes, data_root=root,
                                 listing_cache=listing_cache)
    else:
        test = image_folder(root / test_name, name=test_name, listing_cache=listing_cache)
    return Dataset(str(root), train, test)


def image_folder(root: Path, *, name: str, listing_cache: Path | None = None) -> Split:
    """An ImageFolder split: classes are the sorted sub-folder names, items the image files under each.

    The identity hashes every file's relative path, size and mtime. With ``listing_cache`` (a folder), each
    directory's listing is remembered with the directory's mtime, and a directory whose mtime has not changed is
    not listed or stat'ed again (adding, removing or renaming a file changes it; rewriting a file in place does not:
    see the README). A directory modified within ``RACY_SECONDS`` of its listing is always listed again."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (an ImageFolder has one sub-folder per class)")
    memo_path = listing_cache / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]}.json" \
        if listing_cache is not None else None
    memo = _read_memo(memo_path, root)
    fresh: dict[str, list] = {}
    ids: list[str] = []
    labels: list[int] = []
    digest = hashlib.sha256()
    for label, cls in enumerate(classes):
        for lines in _scan(root, cls, memo, fresh):
            digest.update(lines.encode())
            found = [line.split("\0", 1)[0] for line in lines.split("\n") if line]
            ids.extend(found)
            labels.extend([label] * len(found))
    if not ids:
        raise DataError(f"{root}: split {name!r} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if memo_path is not None and fresh != memo:
        _write_memo(memo_path, root, fresh)
    identity = {"kind": "folder", "files": len(ids), "listing_sha256": digest.hexdigest()}
    return Split(name, ids, np.asarray(labels, dtype=np.int64), classes, identity, str(root), _root=root)


def _is_flat(folder: Path) -> bool:
    """A folder with image files and no (visible) sub-folder: ImageNet's validation set as distributed."""
    images = False
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                return False
            images = images or os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
    return images


def flat_image_folder(root: Path, *, name: str, classes: Sequence[str], data_root: Path | None = None,
                      listing_cache: Path | None = None) -> Split:
    """A split whose images lie in one folder, labelled by the file :func:`find_flat_labels` finds (ImageNet's
    validation set as distributed). An item's id is its path in the equivalent ImageFolder tree
    (``<wnid>/<file>``) and the identity hashes the lines that tree's listing would, so both give the same listing
    (and cache entries). An image without a label, or labelled with a class not in ``classes``, is an error."""
    labels_path = find_flat_labels(root, data_root if data_root is not None else root.parent)
    wnids = read_flat_labels(labels_path)
    index = {c: i for i, c in enumerate(classes)}
    base = root.parent  # scanned as base/<root.name>, so the listing memo works as for a class folder
    memo_path = listing_cache / f"{hashlib.sha256(f'flat:{root.resolve()}'.encode()).hexdigest()[:24]}.json" \
        if listing_cache is not None else None
    memo = _read_memo(memo_path, base)
    fresh: dict[str, list] = {}
    members: list[list[tuple[str, str]]] = [[] for _ in classes]  # per class: (line of the tree's listing, file)
    for lines in _scan(base, root.name, memo, fresh):
        for line in filter(None, lines.split("\n")):
            rel, rest = line.split("\0", 1)
            file = rel[len(root.name) + 1:]
            wnid = wnids.get(PurePosixPath(file).stem)
            if wnid is None:
                raise DataError(f"{root / file}: no label in {labels_path} (each image of a flat {name}/ folder "
                                "needs one)")
            if wnid not in index:
                raise DataError(f"{labels_path}: {file} is labelled {wnid}, which is not a class of the train split")
            members[index[wnid]].append((f"{wnid}/{file}\0{rest}\n", file))
    ids: list[str] = []
    files: list[str] = []
    labels: list[int] = []
    digest = hashlib.sha256()
    for label, items in enumerate(members):
        items.sort()
        digest.update("".join(line for line, _ in items).encode())
        ids += [line.split("\0", 1)[0] for line, _ in items]
        files += [file for _, file in items]
        labels += [label] * len(items)
    if not ids:
        raise DataError(f"{root}: split {name!r} has no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    if memo_path is not None and fresh != memo:
        _write_memo(memo_path, base, fresh)
    identity = {"kind": "folder", "files": len(ids), "listing_sha256": digest.hexdigest()}
    return Split(name, ids, np.asarray(labels, dtype=np.int64), list(classes), identity, str(root), _root=root,
                 _files=files)


def find_flat_labels(folder: Path, data_root: Path) -> Path:
    """The labels of a flat image folder: the first of Kaggle's ``LOC_val_solution.csv``, the devkit's ground truth,
    or ``ILSVRC2012_devkit_t12/data/``'s, found in the folder, the data folder, or up to ``LABEL_SEARCH_PARENTS``
    folders above the data folder (where Kaggle's download puts its CSV)."""
    places = [folder, data_root, *list(data_root.resolve().parents)[:LABEL_SEARCH_PARENTS]]
    for place in places:
        for candidate in (place / KAGGLE_LABELS, place / DEVKIT_LABELS, place / DEVKIT_DATA / DEVKIT_LABELS):
            if candidate.is_file():
                return candidate
    raise DataError(f"{folder}: a flat folder of images needs a labels file ({KAGGLE_LABELS} from Kaggle, or the "
                    f"devkit's {DEVKIT_LABELS} with its {DEVKIT_META}) in it, in {data_root} or up to "
                    f"{LABEL_SEARCH_PARENTS} folders above; or give it one sub-folder per class")


def read_flat_labels(path: Path) -> dict[str, str]:
    """File stem (``ILSVRC2012_val_00000001``) -> wnid, from Kaggle's CSV or the devkit's ground truth."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    if path.name == DEVKIT_LABELS:
        return _devkit_labels(path, text)
    rows = csv.reader(io.StringIO(text))
    header = [cell.strip() for cell in next(rows, [])]
    if header[:2] != ["ImageId", "PredictionString"]:
        raise DataError(f"{path}: expected the header ImageId,PredictionString (Kaggle's {KAGGLE_LABELS}), found "
                        f"{','.join(header)[:60]!r}")
    labels = {}
    for number, row in enumerate(rows, 2):
        if not row:
            continue
        boxes = row[1].split() if len(row) > 1 else []
        if not boxes or not row[0].strip():
            raise DataError(f"{path}, line {number}: expected 'ImageId,wnid x y x y …', found {','.join(row)[:60]!r}")
        labels[row[0].strip()] = boxes[0]
    return labels


def _devkit_labels(path: Path, text: str) -> dict[str, str]:
    """Line n of the devkit's ground truth is the ILSVRC2012_ID of ``ILSVRC2012_val_<n, 8 digits>``; the devkit's
    ``meta.mat`` beside it maps ILSVRC2012_ID to WNID."""
    meta = path.parent / DEVKIT_META
    if not meta.is_file():
        raise DataError(f"{path}: the devkit's ground truth needs its {DEVKIT_META} beside it (ILSVRC2012_ID -> wnid; "
                        f"it is in {DEVKIT_DATA}/), or use Kaggle's {KAGGLE_LABELS} instead")
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy comes with scikit-learn
        raise MissingDependencyError("reading the devkit's meta.mat needs scipy: pip install scipy") from exc
    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        wnid_of = {int(i): str(w) for i, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"], strict=True)}
    except Exception as exc:  # noqa: BLE001 - loadmat raises many types; one clear line is what matters
        raise DataError(f"{meta}: not the devkit's meta.mat (synsets with ILSVRC2012_ID and WNID): {exc}") from exc
    labels = {}
    for number, line in enumerate(text.rstrip("\n").split("\n"), 1):
        try:
            labels[f"ILSVRC2012_val_{number:08d}"] = wnid_of[int(line)]
        except (ValueError, KeyError):
            raise DataError(f"{path}, line {number}: {line.strip()[:20]!r} is not an ILSVRC2012_ID of "
                            f"{meta}") from None
    return labels


LISTING_MEMO_VERSION = 1
RACY_SECONDS = 2.0  # like git's racy-clean rule: a directory changed this close to its listing is listed again


def _scan(root: Path, rel: str, memo: dict[str, list], fresh: dict[str, list]) -> Iterator[str]:
    """Per directory under ``root/rel`` (itself first, then its sub-folders in name order, as ``os.walk``), the
    lines ``"<relative path>\0<size>\0<mtime_ns>\n"`` of its image files in name order."""
    path = os.path.join(root, rel)
    mtime = os.stat(path).st_mtime_ns
    cached = memo.get(rel)
    if cached is not None and cached[0] == mtime and cached[3] - mtime > RACY_SECONDS * 1e9:
        lines, subdirs, scanned = cached[1], cached[2], cached[3]
    else:
        scanned = time.time_ns()
        files, subdirs = [], []
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():  # follows symlinks, as os.walk(followlinks=True)
                    subdirs.append(entry.name)
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    st = entry.stat()
                    files.append(f"{rel}/{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n")
        files.sort()
        subdirs.sort()
        lines = "".join(files)
    if "\n" not in "".join(subdirs) and lines.count("\n") == lines.count("\0") // 2:  # no newline in a name
        fresh[rel] = [mtime, lines, subdirs, scanned]
    yield lines
    for sub in subdirs:
        yield from _scan(root, f"{rel}/{sub}", memo, fresh)


def _read_memo(path: Path | None, root: Path) -> dict[str, list]:
    if path is None:
        return {}
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if memo.get("version") != LISTING_MEMO_VERSION or memo.get("root") != str(root.resolve()):
        return {}
    return memo.get("dirs", {})


def _write_memo(path: Path, root: Path, dirs: dict[str, list]) -> None:
    """Best effort: the memo only saves time (a read-only cache just lists again next time)."""
    from lowshot.io import write_json_atomic

    with contextlib.suppress(OSError):
        write_json_atomic(path, {"version": LISTING_MEMO_VERSION, "root": str(root.resolve()), "dirs": dirs},
                          indent=None)


def _hf_splits(data: str | Path, *, from_disk: bool) -> dict:
    try:
        import datasets as hfds
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError("the 'datasets' package is needed for Hugging Face datasets") from exc
    try:
        loaded = hfds.load_from_disk(str(data)) if from_disk else hfds.load_dataset(str(data))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; one clear line is what matters
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        hint = "" if from_disk else " (offline? use a datasets.save_to_disk folder or an image folder instead)"
        raise DataError(f"cannot load dataset {str(data)!r}: {reason}{hint}") from exc
    return dict(loaded) if isinstance(loaded, hfds.DatasetDict) else {"train": loaded}


def _hf_dataset(source, splits, train_split, test_split, image_column, label_column) -> Dataset:
    if train_split not in splits:
        raise DataError(f"{source}: no split {train_split!r}; available: {', '.join(sorted(splits))}")
    test_name = _pick_test_split(list(splits), test_split, source)
    return Dataset(source, _hf_split(source, splits[train_split], train_split, image_column, label_column),
                   _hf_split(source, splits[test_name], test_name, image_column, label_column))


def _hf_split(source: str, ds, name: str, image_column: str | None, label_column: str | None) -> Split:
    import datasets as hfds

    features = ds.features
    image_column = image_column or next((c for c, f in features.items() if isinstance(f, hfds.Image)), None)
    if image_column is None or image_column not in features:
        raise DataError(f"{source} [{name}]: no image column (columns: {', '.join(features)}); use --image-column")
    if label_column is None:
        label_column = next((c for c, f in features.items() if isinstance(f, hfds.ClassLabel)), None)
        label_column = label_column or next((c for c in ("label", "labels") if c in features), None)
    if label_column is None or label_column not in features:
        raise DataError(f"{source} [{name}]: no label column (columns: {', '.join(features)}); use --label-column")
    raw = ds[label_column]
    feature = features[label_column]
    if isinstance(feature, hfds.ClassLabel):
        classes = list(feature.names)
        labels = np.asarray(raw, dtype=np.int64)
    else:
        classes = sorted({str(v) for v in raw})
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[str(v)] for v in raw], dtype=np.int64)
    if len(labels) == 0:
        raise DataError(f"{source}: split {name!r} is empty")
    ids = [str(i) for i in range(len(labels))]
    if "file_name" in features or "path" in features:
        ids = [str(v) for v in ds["file_name" if "file_name" in features else "path"]]
    identity = {"kind": "hf", "fingerprint": getattr(ds, "_fingerprint", None), "rows": len(labels),
                "image_column": image_column, "label_column": label_column}
    return Split(name, ids, labels, classes, identity, source, _hf=ds, _image_column=image_column)


def _check_same_classes(dataset: Dataset) -> None:
    train, test = dataset.train.classes, dataset.test.classes
    if train != test:
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        detail = "; ".join(part for part in (
            f"only in {dataset.train.name}: {', '.join(only_train[:5])}" if only_train else "",
            f"only in {dataset.test.name}: {', '.join(only_test[:5])}" if only_test else "",
        ) if part) or "same names in a different order"
        raise DataError(f"{dataset.source}: train and test classes differ ({detail})")
