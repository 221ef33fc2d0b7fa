"""Compare results files (models, checkpoints), gate against a baseline, and render the comparison.

One row per model (x classifier), one column per labelled subset (1-shot, 2-shot, 5-shot, 1%, …), cells ``mean ± std``
over seeds (and the bootstrap CI when the results have one); the best measured value per column is marked.
The published MSN numbers can be added as reference rows, always labelled as published on ImageNet-1k.

Results are only compared under the same protocol (test set, feature, transform, λ, seeds, …): a difference is
refused unless forced. Model, dtype, device and solver are expected to differ and are only noted.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BadInputError, ProtocolMismatchError
from .results import Results, format_ci

# Top-1 (%) on ImageNet-1k, mean over the three published splits (± std where the paper gives it).
# Provenance: MSN paper (Assran et al., ECCV 2022) Tables 1 and 2, as copied into shared/PROTOCOL.md.
PUBLISHED_SOURCE = "MSN paper (Assran et al., ECCV 2022) Tables 1 and 2"
PUBLISHED_TAG = "published, ImageNet-1k"
PUBLISHED: dict[str, dict[str, tuple[float, float | None]]] = {
    "MSN ViT-S/16": {"1-shot": (47.1, 0.1), "2-shot": (55.8, 0.6), "5-shot": (62.8, 0.3), "1%": (67.2, None)},
    "MSN ViT-B/16": {"1-shot": (49.8, None), "2-shot": (58.9, None), "5-shot": (65.5, None)},
    "MSN ViT-B/4": {"1-shot": (54.3, None), "2-shot": (64.6, None), "5-shot": (72.4, None), "1%": (75.7, None)},
    "MSN ViT-L/7": {"1-shot": (57.1, None), "2-shot": (66.4, None), "5-shot": (72.1, None), "1%": (75.1, None)},
    "DINO ViT-S/16": {"1-shot": (38.9, None), "2-shot": (48.9, None), "5-shot": (58.5, None), "1%": (64.5, None)},
    "iBOT ViT-S/16": {"1-shot": (40.4, None), "2-shot": (50.8, None), "5-shot": (59.9, None), "1%": (65.9, None)},
}
DEFAULT_MAX_DROP = 1.0  # points of top-1; below the 1-shot std over seeds on Imagenette, above solver noise
REPORT_FORMATS = ("table", "markdown", "csv", "json")


# -- protocol ------------------------------------------------------------------------------------------------------
def protocol(results: Results) -> dict[str, object]:
    """The settings that must match for two results to be compared (None where an older file lacks one)."""
    m = results.meta
    probe = m.get("probe") or {}
    sampling = m.get("sampling") or {}
    return {
        "test split": m.get("test_split"), "test images": m.get("n_test"), "classes": m.get("n_classes"),
        "train pool": m.get("n_train_pool"), "test set": m.get("test_fingerprint"),
        "train set": m.get("train_fingerprint"), "feature": m.get("feature"), "transform": m.get("transform"),
        "preprocessing": probe.get("preprocess"), "objective": probe.get("objective"), "lambda": probe.get("lambda"),
        "lambda grid": probe.get("lambda_grid"), "seeds": sampling.get("seeds"),
        "allow fewer": sampling.get("allow_fewer"),
        "split files": [Path(p).name for p in sampling.get("split_files") or []] or None,
        "k-NN": m.get("knn"), "NCM": m.get("ncm"),
    }


def environment(results: Results) -> dict[str, object]:
    """Settings that may differ between compared results (they are noted, not refused)."""
    m = results.meta
    return {"model": m.get("model"), "data": _name(m.get("data")), "dtype": m.get("dtype"),
            "device": m.get("device"), "solver": (m.get("probe") or {}).get("backend"),
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


# -- the gate ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubsetCheck:
    classifier: str
    subset: str
    baseline: float
    current: float | None  # None: not measured in the current results

    @property
    def delta(self) -> float | None:
        return None if self.current is None else round(self.current - self.baseline, 4)


@dataclass
class GateResult:
    """One results file checked against a baseline: which subsets dropped by more than ``max_drop`` points."""

    label: str
    baseline: str
    max_drop: float
    checks: list[SubsetCheck]
    differences: list[str] = field(default_factory=list)  # protocol differences (only when forced)
    notes: list[str] = field(default_factory=list)

    @property
    def drops(self) -> list[SubsetCheck]:
        return [c for c in self.checks if c.delta is not None and -c.delta > self.max_drop]

    @property
    def passed(self) -> bool:
        return not self.drops

    def summary(self) -> str:
        """One line: the verdict, and which subsets dropped."""
        if self.passed:
            return (f"{self.label}: no subset dropped more than {points(self.max_drop)} vs {self.baseline} "
                    f"({len([c for c in self.checks if c.current is not None])} checked)")
        what = "; ".join(f"{c.classifier} {c.subset} {c.baseline:.1f} -> {c.current:.1f} ({c.delta:+.1f})"
                         for c in self.drops)
        return f"{self.label}: {len(self.drops)} subset(s) dropped more than {points(self.max_drop)} vs " \
               f"{self.baseline}: {what}"


def points(value: float) -> str:
    return f"{value:g} point" + ("" if value == 1 else "s")


def gate(current: Results, baseline: Results, *, max_drop: float = DEFAULT_MAX_DROP, force: bool = False,
         label: str = "results", baseline_name: str = "the baseline") -> GateResult:
    """Check every (classifier, split) of ``baseline`` in ``current``: a mean more than ``max_drop`` points lower
    fails. A protocol difference, or a baseline split the current results lack, raises ProtocolMismatchError
    unless ``force``."""
    if not max_drop >= 0:
        raise BadInputError(f"--max-drop {max_drop}: must be zero or a positive number of points")
    now = {(s["classifier"], s["subset"]): s["mean"] for s in current.summary}
    checks = [SubsetCheck(s["classifier"], s["subset"], s["mean"], now.get((s["classifier"], s["subset"])))
              for s in baseline.summary]
    differences = protocol_differences(baseline, current)
    missing = [f"{c.classifier} {c.subset}" for c in checks if c.current is None]
    if missing:
        differences.append(f"not measured: {', '.join(missing)}")
    if differences and not force:
        raise ProtocolMismatchError(f"{label} and {baseline_name} differ in protocol ({'; '.join(differences)}); "
                                    "fix the run or pass --force to compare anyway")
    return GateResult(label, baseline_name, max_drop, checks, differences if force else [],
                      environment_notes(baseline, current))


# -- the comparison ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    mean: float
    std: float | None = None
    n_seeds: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    per_class: float | None = None  # labelled images per class (x of the plot)

    def text(self) -> str:
        value = f"{self.mean:.1f}" if self.std is None else f"{self.mean:.1f} ± {self.std:.1f}"
        return value if self.ci_low is None else f"{value} {format_ci(asdict(self))}"


@dataclass
class Row:
    label: str
    classifier: str | None  # None for published rows
    cells: dict[str, Cell]
    kind: str = "measured"  # measured | published
    source: str | None = None


@dataclass
class Comparison:
    columns: list[str]
    rows: list[Row]
    context: dict
    labels: list[str]  # of the measured results, in order
    notes: list[str] = field(default_factory=list)
    gates: list[GateResult] = field(default_factory=list)

    def best(self, column: str) -> float | None:
        """The highest measured mean in a column (published rows never compete: another dataset)."""
        values = [r.cells[column].mean for r in self.rows if r.kind != "published" and column in r.cells]
        return max(values) if values else None

    @property
    def show_classifier(self) -> bool:
        return len({r.classifier for r in self.rows if r.kind != "published"}) > 1

    @property
    def failed(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    @property
    def has_ci(self) -> bool:
        return any(c.ci_low is not None for r in self.rows for c in r.cells.values())

    def caption(self) -> str:
        c = self.context
        seeds = c.get("seeds")
        text = (f"Top-1 (%) on `{c.get('test_split')}` of {c.get('data')} (n={c.get('n_test')}, "
                f"{c.get('n_classes')} classes), mean ± std over {seeds if seeds else 'the'} seeds")
        if self.has_ci:
            text += "; [95% CI]: bootstrap over test images"
        return text + "; **bold**: best measured value per column."

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown: pastes as is into a job summary or a pull-request comment."""
        header = ["model"] + (["classifier"] if self.show_classifier else []) + self.columns
        lines = [self.caption(), "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for row in self.rows:
            label = f"{row.label} *({PUBLISHED_TAG})*" if row.kind == "published" else row.label
            cells = [label] + ([row.classifier or "–"] if self.show_classifier else [])
            for column in self.columns:
                cell = row.cells.get(column)
                if cell is None:
                    cells.append("–")
                elif row.kind != "published" and cell.mean == self.best(column):
                    cells.append(f"**{cell.text()}**")
                else:
                    cells.append(cell.text())
            lines.append("| " + " | ".join(cells) + " |")
        if any(r.kind == "published" for r in self.rows):
            lines += ["", f"Published rows: {PUBLISHED_SOURCE}, on ImageNet-1k (1,000 classes, 50,000 test images): "
                          "a reference for the protocol, not comparable with another test set."]
        for note in self.notes:
            lines += ["", f"Note: {note}"]
        for result in self.gates:
            lines += ["", *gate_markdown(result)]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"context": self.context, "columns": self.columns, "notes": self.notes,
                "rows": [{"label": r.label, "classifier": r.classifier, "kind": r.kind, "source": r.source,
                          "cells": {k: {f: v for f, v in asdict(c).items() if v is not None}
                                    for k, c in r.cells.items()}} for r in self.rows],
                "gates": [{"label": g.label, "baseline": g.baseline, "max_drop": g.max_drop, "passed": g.passed,
                           "differences": g.differences, "notes": g.notes,
                           "checks": [{**asdict(c), "delta": c.delta} for c in g.checks]} for g in self.gates]}

    def to_csv(self) -> str:
        """Long form: one line per row x split."""
        buffer = io.StringIO()
        fields = ["label", "classifier", "kind", "subset", "mean", "std", "n_seeds", "ci_low", "ci_high", "best"]
        writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            for column in self.columns:
                if column in row.cells:
                    cell = row.cells[column]
                    writer.writerow({"label": row.label, "classifier": row.classifier, "kind": row.kind,
                                     "subset": column, "mean": cell.mean, "std": cell.std, "n_seeds": cell.n_seeds,
                                     "ci_low": cell.ci_low, "ci_high": cell.ci_high,
                                     "best": row.kind != "published" and cell.mean == self.best(column)})
        return buffer.getvalue()

    def render(self, fmt: str) -> str:
        if fmt == "markdown":
            return self.to_markdown()
        if fmt == "csv":
            return self.to_csv()
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        raise BadInputError(f"--format {fmt!r}: expected one of {', '.join(f for f in REPORT_FORMATS if f != 'table')}")

    def save(self, path: str | Path, *, flag: str = "--output") -> Path:
        """Write atomically, in the format the extension names (.md, .csv, .json; anything else is an error)."""
        from .outputs import REPORT_SUFFIXES, output_format, save_text

        return save_text(path, self.render(output_format(path, REPORT_SUFFIXES, flag=flag)), flag=flag)


def gate_markdown(result: GateResult) -> list[str]:
    """The verdict in bold, then the per-split table (folded away in a <details> block when it passed)."""
    verdict = "✅ passed" if result.passed else f"❌ failed: {len(result.drops)} subset(s) dropped"
    head = (f"**Regression gate** `{result.label}` vs `{result.baseline}` (fails on a drop of more than "
            f"{points(result.max_drop)}): {verdict}")
    table = ["| classifier | subset | baseline | current | Δ |", "| --- | --- | --- | --- | --- |"]
    for c in result.checks:
        if c.current is None:
            table.append(f"| {c.classifier} | {c.subset} | {c.baseline:.1f} | – | not measured |")
            continue
        flag = " ❌" if c in result.drops else ""
        table.append(f"| {c.classifier} | {c.subset} | {c.baseline:.1f} | {c.current:.1f} | {c.delta:+.1f}{flag} |")
    lines = [head, ""] + (table if not result.passed else
                          ["<details><summary>per subset</summary>", "", *table, "", "</details>"])
    for text in result.differences:
        lines += ["", f"Protocol differs (compared anyway, --force): {text}"]
    if result.notes:
        lines += ["", f"Environment differs: {'; '.join(result.notes)}"]
    return lines


def split_order(name: str) -> tuple:
    """k-shot columns by k, then percent columns by percent, then anything else (split files) by name."""
    if match := re.fullmatch(r"(\d+)-shot", name):
        return (0, int(match.group(1)), name)
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)%", name):
        return (1, float(match.group(1)), name)
    return (2, 0.0, name)


def label_of(results: Results, path: str | Path | None = None) -> str:
    """``meta.label`` (set by ``lowshot bench``), else the model folder's name, else the file name."""
    return results.meta.get("label") or _name(results.meta.get("model")) or (Path(path).stem if path else "results")


def rows_of(results: Results, label: str, *, kind: str = "measured", source: str | None = None) -> list[Row]:
    n_classes = results.meta.get("n_classes")
    out: dict[str, Row] = {}
    for s in results.summary:
        row = out.setdefault(s["classifier"], Row(label, s["classifier"], {}, kind, source))
        row.cells[s["subset"]] = Cell(s["mean"], s["std"], s["n_seeds"], s.get("ci_low"), s.get("ci_high"),
                                     s["n_train"] / n_classes if n_classes else None)
    return list(out.values())


def load_all(paths: Sequence[str | Path]) -> list[Results]:
    if not paths:
        raise BadInputError("give one or more results JSON files (from 'lowshot probe --output X.json')")
    return [Results.load(p) for p in paths]


def compare(results: Sequence[Results], *, labels: Sequence[str] | None = None, sources: Sequence[str] = (),
            published: bool = False, force: bool = False) -> Comparison:
    """A comparison table of several results (same protocol, or ``force``), optionally with the published MSN
    rows. Raises ProtocolMismatchError when protocols differ and ``force`` is not set."""
    if not results:
        raise BadInputError("nothing to compare: no results")
    sources = [*sources, *[None] * (len(results) - len(sources))]
    labels = list(labels) if labels else [label_of(r, s) for r, s in zip(results, sources, strict=True)]
    if len(labels) != len(results):
        raise BadInputError(f"--label given {len(labels)} time(s) for {len(results)} results file(s)")
    labels = _unique(labels)
    notes: list[str] = []
    reference = results[0]
    for label, other in zip(labels[1:], results[1:], strict=True):
        differences = protocol_differences(reference, other)
        if differences and not force:
            raise ProtocolMismatchError(f"{labels[0]} and {label} were measured under different protocols "
                                        f"({'; '.join(differences)}); pass --force to compare anyway")
        notes += [f"{labels[0]} vs {label}: protocol differs ({d})" for d in differences]
        notes += [f"{labels[0]} vs {label}: {d}" for d in environment_notes(reference, other)]
    rows = [row for r, label, src in zip(results, labels, sources, strict=True)
            for row in rows_of(r, label, source=src)]
    columns = sorted({c for row in rows for c in row.cells}, key=split_order)
    if published:
        rows += [Row(name, None, {k: Cell(m, s) for k, (m, s) in values.items() if k in columns}, "published",
                     PUBLISHED_SOURCE) for name, values in PUBLISHED.items()]
    m = reference.meta
    seeds = sorted({(r.meta.get("sampling") or {}).get("seeds") for r in results} - {None})
    context = {"test_split": m.get("test_split"), "data": _name(m.get("data")) or "?", "n_test": m.get("n_test"),
               "n_classes": m.get("n_classes"), "seeds": "/".join(map(str, seeds)) if seeds else None,
               "feature": m.get("feature"), "lambda": (m.get("probe") or {}).get("lambda")}
    return Comparison(columns, rows, context, labels, notes)


def build_report(results: Sequence[Results], *, labels: Sequence[str] | None = None, sources: Sequence[str] = (),
                 published: bool = False, baseline: Results | None = None, baseline_name: str = "baseline",
                 max_drop: float = DEFAULT_MAX_DROP, force: bool = False) -> Comparison:
    """``compare`` the results, then gate each one against ``baseline`` when given (``Comparison.gates``)."""
    comparison = compare(results, labels=labels, sources=sources, published=published, force=force)
    if baseline is not None:
        comparison.gates = [gate(r, baseline, max_drop=max_drop, force=force, label=label,
                                 baseline_name=baseline_name) for r, label in zip(results, comparison.labels,
                                                                                  strict=True)]
    return comparison


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _name(path: object) -> str | None:
    """The last component of a path (hub ids stay whole: ``facebook/vit-msn-small``)."""
    if not path:
        return None
    text = str(path).rstrip("/")
    if not text.startswith(("/", ".", "~")) and text.count("/") == 1:
        return text
    return Path(text).name


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= 60 else text[:57] + "…"

