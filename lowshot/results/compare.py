"""Compare results files (models, checkpoints) and render the comparison, with each file's gate verdict.

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

from lowshot.errors import BadInputError, ProtocolMismatchError
from lowshot.results.comparable import environment_notes, protocol_differences
from lowshot.results.gate import DEFAULT_MAX_DROP, GateResult, gate, gate_markdown
from lowshot.results.paired import PAIRED_METHOD, PairedDelta, format_p, pair_up
from lowshot.results.rows import (
    Results,
    format_ci,
    format_mean,
    name_of,
    over_seeds,
    quick_run,
    readout_of,
    settings_of,
)
from lowshot.results.stats import (
    DEFAULT_METRIC,
    DEFAULT_N_BOOT,
    METRIC_LABELS,
)

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
REPORT_FORMATS = ("table", "markdown", "csv", "json", "model-index")
CSV_FIELDS = ("label", "classifier", "kind", "metric", "subset", "mean", "std", "n_seeds", "ci_low", "ci_high", "best",
              "delta", "delta_ci_low", "delta_ci_high", "p_value")


# -- the comparison ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    mean: float
    std: float | None = None
    n_seeds: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    per_class: float | None = None  # labelled images per class (x of the plot)

    def text(self, *, std: bool = True, ci: bool = True) -> str:
        """``89.4 ± 1.2 [88.1, 90.6]``: no ``±`` without a std (one seed), no interval without one; ``std`` and
        ``ci`` off leave them out (a narrow terminal)."""
        value = format_mean(self.mean, self.std if std else None)
        return value if self.ci_low is None or not ci else f"{value} {format_ci(asdict(self))}"


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
    metric: str = DEFAULT_METRIC
    paired: dict[str, list[PairedDelta]] = field(default_factory=dict)  # label -> Δ vs reference_of(label)
    unpaired: dict[str, str] = field(default_factory=dict)  # label -> why it has no paired Δ
    steps: dict[str, int] = field(default_factory=dict)  # a run's checkpoints (series.py): label -> step, in order

    def reference_of(self, label: str) -> str:
        """What a label's paired Δ is against: the first file, or in a series the step before it."""
        return self.labels[self.labels.index(label) - 1] if self.steps else self.labels[0]

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

    def over_seeds(self, *, std: bool = True) -> str:
        """``mean ± std over 3 seeds`` (``mean over …`` when the cells leave the std out), or ``one seed (no ±
        std)`` when every measured cell is over one seed."""
        counts = [c.n_seeds for r in self.rows if r.kind != "published" for c in r.cells.values() if c.n_seeds]
        if counts and set(counts) == {1}:
            return over_seeds(counts)
        seeds = self.context.get("seeds")
        return f"mean{' ± std' if std else ''} over {seeds or 'the'} seeds"

    def caption(self, *, std: bool = True, ci: bool = True) -> str:
        """What the table holds, in Markdown; ``std``/``ci`` off: cells that leave them out (a narrow terminal)."""
        c = self.context
        if c.get("caption"):  # a suite over several datasets says what it holds itself
            return c["caption"]
        text = (f"{METRIC_LABELS[self.metric].capitalize()} (%) on `{c.get('test_split')}` of {c.get('data')} "
                f"(n={c.get('n_test')}, {c.get('n_classes')} classes), {self.over_seeds(std=std)}")
        if self.has_ci and ci:
            text += "; [95% CI]: bootstrap over test images"
        if self.steps:
            text += f"; rows: checkpoints in {c.get('step_unit') or 'step'} order"
        if c.get("quick_run"):  # first, where no reader misses it
            text = f"{c['quick_run'][0].upper()}{c['quick_run'][1:]}. {text}"
        return text + "; **bold**: best measured value per column."

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown: pastes as is into a job summary or a pull-request comment."""
        unit = [self.context.get("step_unit") or "step"] if self.steps else []  # a series: its steps' column
        header = ["model"] + unit + (["classifier"] if self.show_classifier else []) + self.columns
        lines = [self.caption(), "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for row in self.rows:
            label = f"{row.label} *({PUBLISHED_TAG})*" if row.kind == "published" else row.label
            step = self.steps.get(row.label) if row.kind != "published" else None
            cells = [label] + ([f"{step:,}" if step is not None else "–"] if unit else []) \
                + ([row.classifier or "–"] if self.show_classifier else [])
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
        lines += self.paired_markdown()
        for result in self.gates:
            lines += ["", *gate_markdown(result)]
        return "\n".join(lines) + "\n"

    def paired_markdown(self) -> list[str]:
        """The paired differences vs the first file (in a series, vs the step before): one table, significant
        intervals in bold."""
        if not self.paired and not self.unpaired:
            return []
        against = "each step vs the step before it" if self.steps else f"vs `{self.labels[0]}`"
        lines = ["", f"**Paired differences** {against} in {METRIC_LABELS[self.metric]} points "
                     f"({PAIRED_METHOD}; **bold**: the interval excludes 0):"]
        if self.paired:
            lines += ["", "| model | classifier | subset | Δ | 95% CI | p | B only / A only |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for label, deltas in self.paired.items():
                for d in deltas:
                    ci = f"[{d.ci_low:+.1f}, {d.ci_high:+.1f}]"
                    lines.append(f"| {label} | {d.classifier} | {d.subset} | {d.delta:+.1f} | "
                                 f"{f'**{ci}**' if d.significant else ci} | {format_p(d.p_value)} | "
                                 f"{d.b_only} / {d.a_only} |")
        lines += ["", *[f"{label}: {reason}" for label, reason in self.unpaired.items()]] if self.unpaired else []
        return lines

    def to_dict(self) -> dict:
        return {"context": self.context, "metric": self.metric, "columns": self.columns, "notes": self.notes,
                "steps": self.steps or None, "step_unit": self.context.get("step_unit"),
                "paired": {"reference": "previous step" if self.steps else self.labels[0], "method": PAIRED_METHOD,
                           "references": {label: self.reference_of(label) for label in self.paired},
                           "differences": {label: [{**asdict(d), "significant": d.significant} for d in deltas]
                                           for label, deltas in self.paired.items()},
                           "unavailable": self.unpaired} if self.paired or self.unpaired else None,
                "rows": [{"label": r.label, "classifier": r.classifier, "kind": r.kind, "source": r.source,
                          "cells": {k: {f: v for f, v in asdict(c).items() if v is not None}
                                    for k, c in r.cells.items()}} for r in self.rows],
                "gates": [{"label": g.label, "baseline": g.baseline, "metric": g.metric, "max_drop": g.max_drop,
                           "significant": g.significant, "passed": g.passed, "differences": g.differences,
                           "notes": g.notes, "unpaired": g.unpaired,
                           "checks": [{**asdict(c), "delta": c.delta} for c in g.checks]} for g in self.gates]}

    def to_csv(self, *, header: bool = True) -> str:
        """Long form: one line per row x subset, with the metric, and the paired Δ vs the first file where known."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(CSV_FIELDS), lineterminator="\n")
        if header:
            writer.writeheader()
        deltas = {(label, d.classifier, d.subset): d for label, ds in self.paired.items() for d in ds}
        for row in self.rows:
            for column in self.columns:
                if column in row.cells:
                    cell = row.cells[column]
                    d = deltas.get((row.label, row.classifier, column))
                    writer.writerow({"label": row.label, "classifier": row.classifier, "kind": row.kind,
                                     "metric": self.metric, "subset": column, "mean": cell.mean, "std": cell.std,
                                     "n_seeds": cell.n_seeds, "ci_low": cell.ci_low, "ci_high": cell.ci_high,
                                     "best": row.kind != "published" and cell.mean == self.best(column),
                                     **({"delta": d.delta, "delta_ci_low": d.ci_low, "delta_ci_high": d.ci_high,
                                         "p_value": d.p_value} if d else {})})
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
        from lowshot.io import REPORT_SUFFIXES, output_format, save_text

        return save_text(path, self.render(output_format(path, REPORT_SUFFIXES, flag=flag)), flag=flag)


def render_comparisons(comparisons: Sequence[Comparison], fmt: str) -> str:
    """Several metrics' comparisons as one document: Markdown sections one after the other, one long CSV (a
    ``metric`` column), or JSON (one object for one metric, a list for several)."""
    if fmt == "csv":
        return "".join(c.to_csv(header=i == 0) for i, c in enumerate(comparisons))
    if fmt == "json":
        data = [c.to_dict() for c in comparisons]
        return json.dumps(data[0] if len(data) == 1 else data, indent=2) + "\n"
    if fmt == "markdown":
        return "\n".join(c.to_markdown() for c in comparisons)
    raise BadInputError(f"--format {fmt!r}: expected one of markdown, csv, json")


def save_comparisons(comparisons: Sequence[Comparison], path: str | Path, *, flag: str = "--output") -> Path:
    """Write atomically, in the format the extension names (.md, .csv, .json; anything else is an error)."""
    from lowshot.io import REPORT_SUFFIXES, output_format, save_text

    return save_text(path, render_comparisons(comparisons, output_format(path, REPORT_SUFFIXES, flag=flag)),
                     flag=flag)


def subset_order(name: str) -> tuple:
    """k-shot columns by k, then percent columns by percent, then anything else (split files) by name."""
    if match := re.fullmatch(r"(\d+)-shot", name):
        return (0, int(match.group(1)), name)
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)%", name):
        return (1, float(match.group(1)), name)
    return (2, 0.0, name)


def label_of(results: Results, path: str | Path | None = None) -> str:
    """``meta.label`` (set by ``lowshot bench``), else the model folder's name, else the file name."""
    return results.meta.get("label") or name_of(results.meta.get("model")) or (Path(path).stem if path else "results")


def rows_of(results: Results, label: str, *, kind: str = "measured", source: str | None = None,
            metric: str = DEFAULT_METRIC) -> list[Row]:
    n_classes = results.meta.get("n_classes")
    out: dict[str, Row] = {}
    for s in results.summary_of(metric):
        row = out.setdefault(s["classifier"], Row(label, s["classifier"], {}, kind, source))
        row.cells[s["subset"]] = Cell(s["mean"], s["std"], s["n_seeds"], s.get("ci_low"), s.get("ci_high"),
                                     s["n_train"] / n_classes if n_classes else None)
    return list(out.values())


def load_all(paths: Sequence[str | Path]) -> list[Results]:
    if not paths:
        raise BadInputError("give one or more results JSON files (from 'lowshot probe --output X.json')")
    return [Results.load(p) for p in paths]


def compare(results: Sequence[Results], *, labels: Sequence[str] | None = None, sources: Sequence[str] = (),
            published: bool = False, force: bool = False, metric: str = DEFAULT_METRIC, paired: bool = True,
            n_boot: int = DEFAULT_N_BOOT) -> Comparison:
    """A comparison table of several results (same protocol, or ``force``) in one ``metric``, optionally with the
    published MSN rows (top-1 only). With ``paired`` (and two or more files), each file after the first gets its
    paired differences to the first (``paired_differences``) where both kept predictions. Raises
    ProtocolMismatchError when protocols differ and ``force`` is not set."""
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
            for row in rows_of(r, label, source=src, metric=metric)]
    columns = sorted({c for row in rows for c in row.cells}, key=subset_order)
    if published and metric == DEFAULT_METRIC:  # the paper publishes top-1 only
        rows += [Row(name, None, {k: Cell(m, s) for k, (m, s) in values.items() if k in columns}, "published",
                     PUBLISHED_SOURCE) for name, values in PUBLISHED.items()]
    m = reference.meta
    seeds = sorted({settings_of(r.meta).get("seeds") for r in results} - {None})
    context = {"test_split": m.get("test_split"), "data": name_of(m.get("data")) or "?", "n_test": m.get("n_test"),
               "n_classes": m.get("n_classes"), "seeds": "/".join(map(str, seeds)) if seeds else None,
               "readout": readout_of(m), "lambda": settings_of(m).get("lam"),
               "quick_run": next((quick_run(r.meta) for r in results if quick_run(r.meta)), None)}
    comparison = Comparison(columns, rows, context, labels, notes, metric=metric)
    if paired:
        comparison.paired, comparison.unpaired = pair_up(
            ((reference, other, (labels[0], label)) for label, other in zip(labels[1:], results[1:], strict=True)),
            metric=metric, n_boot=n_boot)
    return comparison


SUITE_MEAN = "mean"  # the column group of the mean over datasets


def suite_table(per_dataset: dict[str, Comparison]) -> Comparison:
    """One table over several datasets: rows = model (x classifier), columns = dataset x subset, then ``mean``
    x subset: the unweighted mean over the datasets of each dataset's mean over seeds (every dataset counts the
    same, as VTAB and ELEVATER average their tasks), where the row has that subset on every dataset. Gates stay
    those of each dataset (``Comparison.gates``, labelled by dataset)."""
    if not per_dataset:
        raise BadInputError("no datasets to put in one table")
    rows: dict[tuple[str, str | None], Row] = {}
    columns: list[str] = []
    subsets: list[str] = []
    for name, comparison in per_dataset.items():
        columns += [f"{name} {c}" for c in comparison.columns]
        subsets += [c for c in comparison.columns if c not in subsets]
        for row in comparison.rows:
            if row.kind == "published":
                continue
            target = rows.setdefault((row.label, row.classifier), Row(row.label, row.classifier, {}))
            target.cells.update({f"{name} {c}": cell for c, cell in row.cells.items()})
    for subset in sorted(subsets, key=subset_order):
        keys = [f"{name} {subset}" for name in per_dataset]
        for row in rows.values():
            if all(k in row.cells for k in keys):
                row.cells[f"{SUITE_MEAN} {subset}"] = Cell(round(sum(row.cells[k].mean for k in keys) / len(keys), 4))
        if any(f"{SUITE_MEAN} {subset}" in r.cells for r in rows.values()):
            columns.append(f"{SUITE_MEAN} {subset}")
    first = next(iter(per_dataset.values()))
    seeds = first.context.get("seeds")
    described = "; ".join(f"{name}: `{c.context.get('test_split')}`, n={c.context.get('n_test')}, "
                          f"{c.context.get('n_classes')} classes" for name, c in per_dataset.items())
    context = {"caption": f"{METRIC_LABELS[first.metric].capitalize()} (%) per dataset and subset, "
                          f"{first.over_seeds()} ({described}); {SUITE_MEAN}: unweighted mean over the "
                          f"{len(per_dataset)} datasets; **bold**: best measured value per column.",
               "seeds": seeds, "datasets": list(per_dataset)}
    labels = list(dict.fromkeys(label for label, _ in rows))
    gates = [g for c in per_dataset.values() for g in c.gates]
    return Comparison(columns, list(rows.values()), context, labels, gates=gates, metric=first.metric)


def build_report(results: Sequence[Results], *, labels: Sequence[str] | None = None, sources: Sequence[str] = (),
                 published: bool = False, baseline: Results | None = None, baseline_name: str = "baseline",
                 max_drop: float = DEFAULT_MAX_DROP, force: bool = False, metric: str = DEFAULT_METRIC,
                 significant: bool = False, paired: bool = True, n_boot: int = DEFAULT_N_BOOT,
                 series: bool | None = None, steps: Sequence[int] | None = None) -> Comparison:
    """``compare`` the results in ``metric``, then gate each one against ``baseline`` when given
    (``Comparison.gates``; ``significant``: only drops whose paired interval excludes 0 fail).

    A training run's checkpoints make a series (``series.py``): rows in step order, ``Comparison.steps`` set, the
    paired differences between neighbours, and ``plot.plot_comparison`` draws the curve against the step.
    ``series=None`` makes one when ``steps`` are given or every result carries a distinct step
    (``series.find_steps``: ``meta.step``, or a name such as ``checkpoint-5000``); ``True`` requires it (a result
    without a step is one line), ``False`` never."""
    from lowshot.results.series import build_series_report, find_steps

    if series is not False and (series or steps is not None or find_steps(results, labels=labels, sources=sources)):
        ordered, comparison = build_series_report(results, steps=steps, labels=labels, sources=sources,
                                                  published=published, force=force, metric=metric, paired=paired,
                                                  n_boot=n_boot)
        results = ordered.results
    else:
        comparison = compare(results, labels=labels, sources=sources, published=published, force=force,
                             metric=metric, paired=paired, n_boot=n_boot)
    if baseline is not None:
        comparison.gates = [gate(r, baseline, max_drop=max_drop, force=force, label=label,
                                 baseline_name=baseline_name, metric=metric, significant=significant, n_boot=n_boot)
                            for r, label in zip(results, comparison.labels, strict=True)]
    return comparison


def _unique(labels: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out
