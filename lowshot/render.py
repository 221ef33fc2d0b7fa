"""Terminal rendering with rich: progress bars, result and cache tables. Only the CLI imports this module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
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

from .report import PAIRED_METHOD, PUBLISHED_SOURCE, PUBLISHED_TAG, Comparison, format_p
from .results import Results, format_ci, setting


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
        if task not in tasks:
            tasks[task] = bars.add_task(task, total=total, completed=done)
            # A resumed run starts part-way: reset the clock so the rate counts only this run's work.
            bars.reset(tasks[task], total=total, completed=done)
        else:
            bars.update(tasks[task], completed=done, total=total)

    with bars:
        yield update


def results_table(results: Results) -> Table:
    meta = results.meta
    summary = results.summary
    several = len(results.classifiers) > 1
    has_ci = any("ci_low" in s for s in summary)
    table = Table(title=f"{_short(meta.get('model'))} · top-1 % on {meta.get('test_split')} (n={meta.get('n_test')})",
                  title_justify="left")
    columns = ([("classifier", "left")] if several else []) + [("subset", "left"), ("top-1 %", "right")] \
        + ([("95% CI", "right")] if has_ci else []) \
        + [("seeds", "right"), ("train imgs", "right"), ("λ / k" if several else "λ", "right")]
    for column, justify in columns:
        table.add_column(column, justify=justify, min_width=12 if column == "95% CI" else None)
    for s in summary:
        cells = ([s["classifier"]] if several else []) + [s["subset"], f"{s['mean']:.1f} ± {s['std']:.1f}"] \
            + ([format_ci(s)] if has_ci else []) + [str(s["n_seeds"]), f"{s['n_train']:g}", setting(s)]
        table.add_row(*cells)
    probe = meta.get("probe", {})
    table.caption = (f"feature {meta.get('feature')} · {meta.get('dtype')} · transform "
                     f"{(meta.get('transform') or {}).get('name')} · λ {probe.get('lambda')} · "
                     f"std over seeds (n−1)" + (" · CI: bootstrap over test images" if has_ci else ""))
    return table


def comparison_table(comparison: Comparison) -> Table:
    """Rows = models (x classifier), columns = splits; the best measured value per column in bold."""
    table = Table(title=comparison.caption().replace("**bold**", "bold").replace("`", ""), title_justify="left")
    table.add_column("model", justify="left")
    if comparison.show_classifier:
        table.add_column("classifier", justify="left")
    for column in comparison.columns:
        table.add_column(column, justify="right")
    for row in comparison.rows:
        published = row.kind == "published"
        cells: list[Text | str] = [Text(f"{row.label} †" if published else row.label,
                                        style="dim" if published else "")]
        if comparison.show_classifier:
            cells.append(row.classifier or "–")
        for column in comparison.columns:
            cell = row.cells.get(column)
            if cell is None:
                cells.append("–")
                continue
            best = not published and cell.mean == comparison.best(column)
            text = cell.text().replace(" [", "\n[")  # the CI on a line of its own
            cells.append(Text(text, style="bold green" if best else ("dim" if published else "")))
        table.add_row(*cells)
    if any(r.kind == "published" for r in comparison.rows):
        table.caption = f"† {PUBLISHED_TAG} ({PUBLISHED_SOURCE}): a reference, not comparable with this test set"
    return table


def paired_table(comparison: Comparison) -> Table:
    """Δ of each file vs the first, with its paired interval and p-value; significant intervals in bold."""
    table = Table(title=f"Paired differences vs {comparison.labels[0]} ({comparison.metric}, points)",
                  title_justify="left", caption=PAIRED_METHOD + "; bold: the interval excludes 0")
    for column, justify in (("model", "left"), ("classifier", "left"), ("subset", "left"), ("Δ", "right"),
                            ("95% CI", "right"), ("p", "right"), ("B only / A only", "right")):
        table.add_column(column, justify=justify)
    for label, deltas in comparison.paired.items():
        for d in deltas:
            table.add_row(label, d.classifier, d.subset, f"{d.delta:+.1f}",
                          Text(f"[{d.ci_low:+.1f}, {d.ci_high:+.1f}]", style="bold" if d.significant else ""),
                          format_p(d.p_value), f"{d.b_only} / {d.a_only}")
    return table


def cache_table(manifests: list[dict]) -> Table:
    table = Table(title="lowshot feature cache", title_justify="left")
    for column in ("key", "model", "data", "split", "images", "dim", "dtype", "size", "created"):
        table.add_column(column, justify="right" if column in ("images", "dim", "size") else "left",
                         overflow="fold")
    for m in manifests:
        held = f"{m.get('n', 0):,}" + (f" of {m['n_listed']:,}" if "n_listed" in m else "")  # of the split's images
        table.add_row(m.get("key", "?")[:12], _short(m.get("model")), _short(m.get("data")), str(m.get("split")),
                      held, str(m.get("dim")), str(m.get("dtype")),
                      human_size(m.get("size_bytes", 0)), str(m.get("created", ""))[:16].replace("T", " "))
    return table


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
