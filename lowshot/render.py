"""Terminal rendering with rich: progress bars, result and cache tables. Only the CLI imports this module.

Every table fits the terminal's width (80 columns when it is not a terminal) by design, not by rich's truncation:
cells are compact (``89.4 ± 1.2``), long labels and paths are abbreviated from the left (``…tiny-patch16-224``),
and what still does not fit (an interval column, a file's date) is left to the ``--wide`` view, which the caption
names. Nothing wraps inside a row: a row is one line.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich import box
from rich.cells import cell_len
from rich.console import Console, Group
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from lowshot.results.compare import PUBLISHED_SOURCE, PUBLISHED_TAG, SUITE_MEAN, Cell, Comparison
from lowshot.results.paired import PAIRED_METHOD, format_p
from lowshot.results.rows import (
    Results,
    format_ci,
    format_mean,
    name_of,
    over_seeds,
    quick_run,
    readout_of,
    setting,
    settings_of,
)
from lowshot.results.stats import METRIC_LABELS

NARROW = 80  # the width a table is laid out for when the console does not say (a pipe, a file, a test)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``83.1 img/s``."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"– {self.unit}/s", style="cyan")


@contextmanager
def progress_callback(console: Console, unit: str = "img") -> Iterator:
    """A ``progress(task, done, total)`` callback for the core, drawn as rich bars with rate and ETA."""
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    RateColumn(unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, transient=False)
    tasks: dict[str, int] = {}

    def update(task: str, done: int, total: int) -> None:
        if not tasks:  # drawn from the first report on: a command that fails first prints no empty progress line
            bars.start()
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total, completed=done)
            # A resumed run starts part-way: reset the clock so the rate counts only this run's work.
            bars.reset(tasks[task], total=total, completed=done)
        else:
            bars.update(tasks[task], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            bars.stop()


# -- tables that fit -----------------------------------------------------------------------------------------------
@dataclass
class Column:
    """A column of a terminal table, with how it gives way when the table is wider than the terminal."""

    header: str
    cells: list[str | Text]
    justify: str = "left"
    shrink_to: int | None = None  # long cells (labels, paths) may be abbreviated from the left to this many chars
    drop: int | None = None  # left to --wide when the table is still too wide (1 goes first)
    wide_only: bool = False  # shown with --wide only

    @property
    def width(self) -> int:
        return max([cell_len(line) for line in self.header.splitlines()]
                   + [cell_len(_plain(cell)) for cell in self.cells])


@dataclass
class Layout:
    """The columns a table shows at a width, the headers left to --wide, and whether it fits."""

    columns: list[Column]
    dropped: list[str] = field(default_factory=list)
    fits: bool = True
    wide: bool = False


def fit(columns: Sequence[Column], width: int, *, wide: bool = False) -> Layout:
    """Choose what to show in ``width`` columns: drop the optional columns (in their order) that must go even with
    every abbreviable column at its shortest, then abbreviate only as much as the rest needs. ``wide`` shows all."""
    if wide:
        return Layout(list(columns), wide=True)
    kept = [c for c in columns if not c.wide_only]
    dropped = [c.header for c in columns if c.wide_only]
    shortest = {id(c): _shrunk(c, c.shrink_to) for c in kept if c.shrink_to}
    for column in sorted((c for c in kept if c.drop), key=lambda c: c.drop):
        if natural_width([shortest.get(id(c), c) for c in kept]) <= width:
            break
        kept.remove(column)
        dropped.append(column.header)
    excess = natural_width(kept) - width
    for column in sorted((c for c in kept if c.shrink_to), key=lambda c: -c.width):  # the widest gives way first
        if excess <= 0:
            break
        target = max(column.shrink_to, column.width - excess)
        kept[kept.index(column)] = _shrunk(column, target)
        excess = natural_width(kept) - width
    return Layout(kept, dropped, excess <= 0)


def natural_width(columns: Sequence[Column]) -> int:
    """The width rich gives the table when nothing limits it (cells, padding and rules)."""
    return Measurement.get(_MEASURE, _MEASURE.options, _grid(columns)).maximum


_MEASURE = Console(width=100_000, file=io.StringIO())


def _grid(columns: Sequence[Column]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column.header, justify=column.justify, no_wrap=True, overflow="ellipsis")
    for row in zip(*(c.cells for c in columns), strict=True):
        table.add_row(*row)
    return table


def build(layout: Layout, *, title: str | None, caption: str, width: int) -> Group:
    """The title, the rich Table of a layout and the caption. Title and caption wrap at the terminal's width, not
    the table's. A ``--wide`` layout wider than ``width`` keeps its natural width (print it with ``crop=False``:
    the terminal wraps it, rich does not squeeze it); a narrow one that could not fit (a very narrow terminal) is
    left to rich, which cuts cells to "…" rather than wrap them."""
    if layout.dropped:
        caption += f"{' · ' if caption else ''}--wide adds: {', '.join(layout.dropped)}"
    table = _grid(layout.columns)
    natural = natural_width(layout.columns)
    if layout.wide and natural > width:
        table.width = natural
    return Group(*([Text(title)] if title else []), table, *([Text(caption, style="dim")] if caption else []))


def _shrunk(column: Column, target: int | None) -> Column:
    if target is None or column.width <= target:
        return column
    return Column(column.header, [abbreviate(c, target) for c in column.cells], column.justify, column.shrink_to,
                  column.drop, column.wide_only)


def abbreviate(cell: str | Text, width: int) -> str | Text:
    """``…tiny-patch16-224``: the tail of a label or path (its informative end) in ``width`` characters."""
    text = _plain(cell)
    if cell_len(text) <= width:
        return cell
    short = "…" + text[len(text) - max(width - 1, 0):]
    return Text(short, style=cell.style) if isinstance(cell, Text) else short


def _plain(cell: str | Text) -> str:
    return cell.plain if isinstance(cell, Text) else cell


# -- the tables ----------------------------------------------------------------------------------------------------
def results_table(results: Results, *, width: int = NARROW, wide: bool = False) -> Group:
    """``lowshot probe``: one row per (classifier x) subset, mean ± std over seeds, the CI when computed."""
    meta = results.meta
    summary = results.summary
    several = len(results.classifiers) > 1
    has_ci = any("ci_low" in s for s in summary)
    columns = [
        *([Column("classifier", [s["classifier"] for s in summary], shrink_to=8)] if several else []),
        Column("subset", [s["subset"] for s in summary], shrink_to=10),
        Column("top-1 %", [format_mean(s["mean"], s["std"]) for s in summary], "right"),
        *([Column("95% CI", [format_ci(s) for s in summary], "right", drop=1)] if has_ci else []),
        Column("seeds", [str(s["n_seeds"]) for s in summary], "right", drop=3),
        Column("train imgs", [f"{s['n_train']:g}" for s in summary], "right", drop=2),
        Column("λ / k" if several else "λ", [setting(s) for s in summary], "right", shrink_to=8),
    ]
    layout = fit(columns, width, wide=wide)
    spread = "std over seeds (n−1)" if any(s["std"] is not None for s in summary) else over_seeds([1])
    caption = (f"readout {readout_of(meta)} · {meta.get('dtype')} · transform "
               f"{(meta.get('transform') or {}).get('name')} · λ {settings_of(meta).get('lam')} · {spread}"
               + (" · CI: bootstrap over test images" if has_ci and "95% CI" not in layout.dropped else ""))
    model = _short(meta.get("model"))
    title = f"{model if wide else abbreviate(model, 40)} · top-1 % on {meta.get('test_split')} (n={meta.get('n_test')})"
    if quick_run(meta):  # first, where no reader misses it
        title = f"{quick_run(meta)}\n{title}"
    return build(layout, title=title, caption=caption, width=width)


def comparison_table(comparison: Comparison, *, width: int = NARROW, wide: bool = False) -> Group:
    """Rows = models (x classifier), columns = subsets; the best measured value per column in bold. A narrow
    terminal gets ``mean ± std [CI]`` cells where they fit, else ``mean ± std`` (the CI in ``--wide``), else the
    means alone. A suite over several datasets has a line per dataset instead of a column per dataset x subset,
    so that it fits however many datasets it has."""
    suite = comparison.context.get("datasets")
    groups: list[str | None] = [*suite, SUITE_MEAN] if suite else [None]
    subsets = list(dict.fromkeys(_subset_of(c, groups) for c in comparison.columns))
    lines = [(row, group) for row in comparison.rows for group in groups
             if any(_key(group, s) in row.cells for s in subsets)]
    classifier = comparison.show_classifier
    has_std = any(c.std is not None for row in comparison.rows for c in row.cells.values())
    levels = [(True, True)] if wide else [(True, True), (True, False), (False, False)]
    for std, ci in levels:
        columns = [Column("model", [_label(row) for row, _ in lines], shrink_to=14),
                   *([Column("classifier", [row.classifier or "–" for row, _ in lines], shrink_to=8)]
                     if classifier else []),
                   *([Column("dataset", [group for _, group in lines], shrink_to=10)] if suite else []),
                   *[Column(s, [_cell(comparison, row, _key(group, s), std=std, ci=ci) for row, group in lines],
                            "right") for s in subsets]]
        layout = fit(columns, width, wide=wide)
        if layout.fits:
            break
    layout.dropped += [what for what, shown, present in (("± std", std, has_std), ("[95% CI]", ci, comparison.has_ci))
                       if present and not shown]
    title = _unmarked(comparison.caption(std=std and has_std, ci=ci) if not suite else
                      _suite_caption(comparison, std=std and has_std, ci=ci))
    caption = (f"† {PUBLISHED_TAG} ({PUBLISHED_SOURCE}): a reference, not comparable with this test set"
               if any(r.kind == "published" for r in comparison.rows) else "")
    return build(layout, title=title, caption=caption, width=width)


def _subset_of(column: str, groups: list[str | None]) -> str:
    """``5-shot`` from a suite's ``imagenette 5-shot`` (a plain comparison's columns are subsets already)."""
    for group in sorted((g for g in groups if g is not None), key=len, reverse=True):  # "a b" before "a"
        if column.startswith(f"{group} "):
            return column[len(group) + 1:]
    return column


def _key(group: str | None, subset: str) -> str:
    return subset if group is None else f"{group} {subset}"


def _label(row) -> Text:
    published = row.kind == "published"
    return Text(f"{row.label} †" if published else row.label, style="dim" if published else "")


def _cell(comparison: Comparison, row, key: str, *, std: bool, ci: bool) -> Text | str:
    cell: Cell | None = row.cells.get(key)
    if cell is None:
        return "–"
    published = row.kind == "published"
    best = not published and cell.mean == comparison.best(key)
    return Text(cell.text(std=std, ci=ci), style="bold green" if best else ("dim" if published else ""))


def _suite_caption(comparison: Comparison, *, std: bool, ci: bool) -> str:
    datasets = comparison.context["datasets"]
    return (f"{METRIC_LABELS[comparison.metric].capitalize()} (%) per dataset and subset, "
            f"{comparison.over_seeds(std=std)}; {SUITE_MEAN}: unweighted mean over the {len(datasets)} datasets"
            + ("; [95% CI]: bootstrap over test images" if ci and comparison.has_ci else "")
            + "; bold: best measured value per column")


def _unmarked(caption: str) -> str:
    """A Markdown caption as terminal text: no backticks, and bold said as bold."""
    return caption.replace("**bold**", "bold").replace("`", "")


PAIRED_BRIEF = ("Δ = row − reference, mean over seeds; CI: paired bootstrap over test images; p: McNemar per seed, "
                "Stouffer-combined; B / A only: images only B / only A gets right; bold: CI excludes 0")


def paired_table(comparison: Comparison, *, width: int = NARROW, wide: bool = False) -> Group:
    """Δ of each file vs the first (in a series: vs the checkpoint before it), with its paired interval and p-value;
    significant intervals in bold."""
    deltas = [(label, d) for label, ds in comparison.paired.items() for d in ds]
    several = len({d.classifier for _, d in deltas}) > 1
    columns = [Column("model", [label for label, _ in deltas], shrink_to=14),
               *([Column("classifier", [d.classifier for _, d in deltas], shrink_to=8)] if several else []),
               Column("subset", [d.subset for _, d in deltas], shrink_to=10),
               Column("Δ", [f"{d.delta:+.1f}" for _, d in deltas], "right"),
               Column("95% CI", [Text(f"[{d.ci_low:+.1f}, {d.ci_high:+.1f}]", style="bold" if d.significant else "")
                                 for _, d in deltas], "right"),
               Column("p", [format_p(d.p_value) for _, d in deltas], "right"),
               Column("B / A only", [f"{d.b_only} / {d.a_only}" for _, d in deltas], "right", drop=1)]
    layout = fit(columns, width, wide=wide)
    if comparison.steps:  # a run's checkpoints: each against the one before it
        against = "each step vs the step before it"
    else:
        reference = comparison.labels[0]
        against = f"vs {reference if wide else abbreviate(reference, 30)}"
    title = f"Paired differences {against} ({METRIC_LABELS[comparison.metric]}, points)"
    return build(layout, title=title, caption=(PAIRED_METHOD + "; bold: the interval excludes 0") if wide
                 else PAIRED_BRIEF, width=width)


def cache_table(manifests: list[dict], *, width: int = NARROW, wide: bool = False) -> Group:
    """``lowshot cache list``: one line per entry; the model and data paths abbreviated from the left (whole
    with ``--wide``), which also adds the feature, transform, dimension and creation time."""
    def held(m: dict) -> str:  # of the split's images
        n, listed = m.get("n", 0), m.get("n_listed")
        return f"{n:,}" if listed is None or (listed == n and not wide) else f"{n:,} of {listed:,}"

    def path(value: object, split: object = None) -> str:
        text = str(value).rstrip("/")
        if wide:
            return text
        if split and text.endswith(f"/{split}"):  # a split's folder: the split has its own column
            text = text[:-len(str(split)) - 1]
        return name_of(text)

    columns = [Column("key", [m.get("key", "?")[:12 if wide else 8] for m in manifests]),
               Column("model", [path(m.get("model")) for m in manifests], shrink_to=14),
               Column("data", [path(m.get("data"), m.get("split")) for m in manifests], shrink_to=10),
               Column("split", [str(m.get("split")) for m in manifests], shrink_to=8),
               Column("images", [held(m) for m in manifests], "right"),
               Column("dtype", [str(m.get("dtype")) for m in manifests], drop=2),
               Column("size", [human_size(m.get("size_bytes", 0)) for m in manifests], "right"),
               Column("dim", [str(m.get("dim")) for m in manifests], "right", drop=1),
               Column("readout", [str(readout_of(m)) for m in manifests], wide_only=True),
               Column("transform", [str((m.get("transform") or {}).get("name", "–")) for m in manifests],
                      wide_only=True),
               Column("created", [str(m.get("created", ""))[:16].replace("T", " ") for m in manifests],
                      wide_only=True)]
    return build(fit(columns, width, wide=wide), title="lowshot feature cache", caption="", width=width)



def _short(path: object) -> str:
    """The last two components of a path (hub ids stay whole)."""
    parts = str(path).rstrip("/").split("/")
    return "/".join(parts[-2:])


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
