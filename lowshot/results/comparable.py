"""Which settings make two results comparable: the protocol (test set, readout, transform, lambda, seeds, ...) must
match, or a comparison is refused unless forced; the environment (model, dtype, device, solver) is expected to
differ and is only noted.
"""

from __future__ import annotations

import json
from pathlib import Path

from lowshot.results.rows import Results, name_of, readout_of, settings_of


def protocol(results: Results) -> dict[str, object]:
    """The settings that must match for two results to be compared (None where an older file lacks one)."""
    m = results.meta
    probe, settings = m.get("probe") or {}, settings_of(m)
    return {
        "test split": m.get("test_split"), "test images": m.get("n_test"), "classes": m.get("n_classes"),
        "train pool": m.get("n_train_pool"), "test set": m.get("test_fingerprint"),
        "train set": m.get("train_fingerprint"), "readout": readout_of(m), "transform": m.get("transform"),
        "preprocessing": probe.get("preprocess"), "objective": probe.get("objective"), "lambda": settings.get("lam"),
        "lambda grid": probe.get("lambda_grid"), "seeds": settings.get("seeds"),
        "allow fewer": settings.get("allow_fewer"),
        "split files": [Path(p).name for p in settings.get("split_files") or []] or None,
        "k-NN": m.get("knn"), "NCM": m.get("ncm"), "limit": settings.get("limit"),
    }


def environment(results: Results) -> dict[str, object]:
    """Settings that may differ between compared results (they are noted, not refused)."""
    m = results.meta
    return {"model": m.get("model"), "data": name_of(m.get("data")), "dtype": m.get("dtype"),
            "device": m.get("device"), "solver": settings_of(m).get("backend"),
            "lowshot": m.get("lowshot_version")}


def protocol_differences(reference: Results, other: Results) -> list[str]:
    """``"lambda: 0.0025 vs auto"`` for each protocol setting that both files record and that differs."""
    return _differences(protocol(reference), protocol(other))


def environment_notes(reference: Results, other: Results) -> list[str]:
    a, b = environment(reference), environment(other)
    a.pop("model"), b.pop("model")
    return _differences(a, b)


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in a:
        x, y = a[key], b.get(key)
        if x is None or y is None or x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):  # name the setting inside, e.g. transform.resize
            out += _differences({**dict.fromkeys(y), **x}, y, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {_short(x)} vs {_short(y)}")
    return out



def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= 60 else text[:57] + "…"
