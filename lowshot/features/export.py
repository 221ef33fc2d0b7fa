"""Features out: one split's ids, labels, class names and float32 features, in a file other tools read.

The features come from the cache (extracted first when missing, with the same settings and cache key as
``lowshot extract``), so an export never recomputes what is cached and never differs from what ``probe`` sees.

- ``.npz`` (numpy): ``ids`` (str), ``labels`` (int64), ``classes`` (str, ``classes[labels[i]]`` is item i's class
  name), ``features`` (float32, N x D), ``meta`` (a JSON string: model, data, split, readout, dtype, cache key).
- ``.parquet`` (pyarrow, installed with ``datasets``): one row per image, columns ``id``, ``label``, ``class``,
  ``feature`` (a fixed-size list of float32); the same ``meta`` JSON in the schema metadata (key ``lowshot``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowshot.config import ExtractSettings
from lowshot.errors import MissingDependencyError
from lowshot.features.store import Features
from lowshot.io import check_writable, output_format, save_with

EXPORT_SUFFIXES = {".npz": "npz", ".parquet": "parquet"}  # lowshot export --output


@dataclass(frozen=True)
class Exported:
    """What :func:`export_features` wrote."""

    path: Path
    split: str
    n: int
    dim: int
    cached: bool  # the features were in the cache already (nothing decoded)


def export_features(model: str, data: str | os.PathLike | None, settings: ExtractSettings | None = None, *,
                    split: str | None = None, output: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    progress=None, **options) -> Exported:
    """Extract (or reuse) every image of one split of ``data`` with ``model`` and write it to ``output`` (.npz or
    .parquet). ``settings`` (or its fields as keywords: readout as ``feature``, transform, dtype, ...) are those of
    :func:`lowshot.extract_features`; the split is ``split``, else the settings' ``test_split``."""
    from lowshot.features.extract import extract_features

    fmt = output_format(output, EXPORT_SUFFIXES)  # checked before any work, as every --output
    if fmt == "parquet":
        _pyarrow()
    output = check_writable(output)
    if settings is not None and options:
        raise TypeError(f"give an ExtractSettings or its fields, not both ({', '.join(options)})")
    settings = settings if settings is not None else ExtractSettings(**options)
    split = split or settings.test_split or "val"
    # The split is both sides of the extraction: one cache entry, every image, not recorded as a probe run.
    settings = dataclasses.replace(settings, train_split=split, test_split=split)
    run = extract_features(model, data, settings, all_images=True, cache_dir=cache_dir, progress=progress)
    part = run.test
    origin = part.features.origin or {}  # the model and data of this call, by absolute path (or hub id)
    meta = {"model": origin.get("model", run.model), "data": origin.get("data", run.data), "split": part.split,
            "key": part.features.key,
            **{k: run.settings.get(k) for k in ("feature", "readout", "dtype", "device", "transform", "engine")}}
    writer = _write_npz if fmt == "npz" else _write_parquet
    save_with(output, "wb", lambda handle: writer(handle, part.features, meta))  # atomic: never half a file
    return Exported(output, part.split, len(part.features), part.features.dim, part.cached)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--output .parquet needs pyarrow: pip install pyarrow (or use .npz)") from None
    return pyarrow


def _write_npz(handle, features: Features, meta: dict) -> None:
    np.savez(handle, ids=np.asarray(features.ids, dtype=str), labels=np.asarray(features.labels, dtype=np.int64),
             classes=np.asarray(features.classes, dtype=str),
             features=np.ascontiguousarray(features.features, dtype=np.float32),
             meta=np.asarray(json.dumps(meta, sort_keys=True)))


def _write_parquet(handle, features: Features, meta: dict) -> None:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    matrix = np.ascontiguousarray(features.features, dtype=np.float32)
    labels = np.asarray(features.labels, dtype=np.int64)
    table = pa.table({
        "id": pa.array(features.ids, type=pa.string()),
        "label": pa.array(labels),
        "class": pa.array([features.classes[i] for i in labels], type=pa.string()),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1]),
    }).replace_schema_metadata({"lowshot": json.dumps(meta, sort_keys=True)})
    pq.write_table(table, handle)


def load_export(path: str | os.PathLike) -> dict:
    """Read an export back: ``{"ids", "labels", "classes", "features", "meta"}`` (what the README shows)."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path) as f:
            return {"ids": f["ids"].tolist(), "labels": f["labels"], "classes": f["classes"].tolist(),
                    "features": f["features"], "meta": json.loads(str(f["meta"]))}
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    labels = table["label"].to_numpy()
    names = table["class"].to_pylist()
    classes = [name for _, name in sorted({int(lab): name for lab, name in zip(labels, names, strict=True)}.items())]
    dim = table.schema.field("feature").type.list_size
    features = table["feature"].combine_chunks().flatten().to_numpy().reshape(-1, dim)
    return {"ids": table["id"].to_pylist(), "labels": labels, "classes": classes, "features": features,
            "meta": json.loads(table.schema.metadata[b"lowshot"])}
