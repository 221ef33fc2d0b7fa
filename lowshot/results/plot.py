"""Accuracy vs labelled images per class (log x), one line per model (x classifier), ± std over seeds as a band;
and a training run's curve: accuracy vs the step, one line per subset (``plot_series``).

matplotlib is an optional extra (``pip install 'lowshot[plot]'``), imported only when a plot is drawn. No pyplot
and no global backend switch: a Figure rendered by the Agg canvas, so a notebook's own matplotlib set-up is left
alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lowshot.errors import BadInputError, MissingDependencyError
from lowshot.io import output_format, save_with
from lowshot.results.compare import Comparison
from lowshot.results.series import Series
from lowshot.results.stats import METRIC_LABELS

INSTALL_HINT = "pip install 'lowshot[plot]'"
LINESTYLES = {"logistic": "-", "knn": "--", "ncm": ":"}
# The file's extension picks the format (matplotlib writes each; jpg through Pillow, a dependency of matplotlib).
PLOT_SUFFIXES = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpg", ".jpeg": "jpg"}


def require_matplotlib() -> None:
    """Fail early, in one line, when matplotlib is missing (before any long run)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f"plots need matplotlib, which is not installed: {INSTALL_HINT}") from None


def plot_comparison(comparison: Comparison | Sequence[Comparison], path: str | Path, *, dpi: int = 150) -> Path:
    """Draw the measured rows of ``comparison`` (published rows are another dataset and are left out) and save
    them at ``path`` in the format its extension names (:data:`PLOT_SUFFIXES`); several comparisons (one per
    metric) become panels side by side. x is the mean number of labelled images per class of each subset (1% of
    Imagenette is ~9.7). A series (``Comparison.steps`` set, as ``build_report`` makes for a run's checkpoints) is
    drawn by :func:`plot_series` instead."""
    require_matplotlib()
    panels = [comparison] if isinstance(comparison, Comparison) else list(comparison)
    if panels and all(panel.steps for panel in panels):  # a training run's checkpoints: the curve against the step
        return plot_series(panels, path, dpi=dpi)
    fmt = output_format(path, PLOT_SUFFIXES, flag="--plot")
    for panel in panels:
        if not any(c.per_class for r in panel.rows if r.kind != "published" for c in r.cells.values()):
            raise BadInputError("nothing to plot: the results have no subsets with a known number of images per "
                                "class")
    return _save_panels(panels, _draw, Path(path), fmt, dpi)


def _save_panels(panels: list[Comparison], draw, path: Path, fmt: str, dpi: int) -> Path:
    """One figure, one panel per comparison side by side (``draw(ax, panel)``), saved atomically at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5 * len(panels), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    for i, panel in enumerate(panels):
        draw(fig.add_subplot(1, len(panels), i + 1), panel)
    return save_with(path, "wb", lambda handle: fig.savefig(handle, format=fmt, dpi=dpi), flag="--plot")


def _draw(ax, comparison: Comparison) -> None:
    from matplotlib.ticker import NullLocator

    rows = [r for r in comparison.rows if r.kind != "published"]
    by_model = len({r.label for r in rows}) > 1  # colour per model; with one model, per classifier
    colours = _palette(len({r.label if by_model else r.classifier for r in rows}))
    colour_of: dict[str, tuple] = {}
    ticks: dict[float, str] = {}
    for row in rows:
        points = sorted((c.per_class, c.mean, c.std or 0.0, subset) for subset, c in row.cells.items() if c.per_class)
        if not points:
            continue
        x = [p[0] for p in points]
        mean = [p[1] for p in points]
        std = [p[2] for p in points]
        key = row.label if by_model else (row.classifier or "")
        colour = colour_of.setdefault(key, colours[len(colour_of) % len(colours)])
        label = row.label + (f" · {row.classifier}" if comparison.show_classifier else "")
        ax.plot(x, mean, marker="o", color=colour, linestyle=LINESTYLES.get(row.classifier or "", "-"), label=label)
        ax.fill_between(x, [m - s for m, s in zip(mean, std, strict=True)],
                        [m + s for m, s in zip(mean, std, strict=True)], color=colour, alpha=0.12, linewidth=0)
        for px, _, _, subset in points:
            ticks.setdefault(round(px, 2), f"{px:g}" if subset.endswith("-shot") else f"{px:.3g}\n({subset})")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(sorted(ticks), [ticks[t] for t in sorted(ticks)])
    ax.set_xlabel("labelled images per class (log scale)")
    _finish(ax, comparison, "on", "mean ± std over seeds")


def _finish(ax, comparison: Comparison, what: str, spread: str) -> None:
    """What every panel has: the chance line, the metric on the y axis, the title, the grid and the legend."""
    n_classes = comparison.context.get("n_classes")
    if n_classes and comparison.metric != "top5":  # chance of top-5 is 5/C, and top-5 of <= 5 classes is 100%
        ax.axhline(100.0 / n_classes, color="grey", linestyle=":", linewidth=1, label=f"chance (1/{n_classes})")
    name = METRIC_LABELS[comparison.metric]
    ax.set_ylabel(f"{name} (%)")
    ctx = comparison.context
    ax.set_title(f"Low-shot {name} {what} {ctx.get('data')} {ctx.get('test_split')} (n={ctx.get('n_test')}), "
                 f"{spread}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def plot_series(series: Series | Comparison | Sequence[Comparison], path: str | Path, *, dpi: int = 150) -> Path:
    """A training run's curve: each subset's mean (top-1, or the comparison's metric) against the step, one line
    per subset (line style per classifier), a ± std band where a point has several seeds; saved at ``path`` in
    the format its extension names. ``series`` is a :class:`~lowshot.results.series.Series`, or comparisons
    with ``steps`` (``build_report`` of checkpoints; one panel per metric)."""
    require_matplotlib()
    if isinstance(series, Series):
        series = series.comparison(paired=False)
    panels = [series] if isinstance(series, Comparison) else list(series)
    fmt = output_format(path, PLOT_SUFFIXES, flag="--plot")
    if not panels or not all(panel.steps for panel in panels):
        raise BadInputError("nothing to plot against the step: the results carry no training steps")
    return _save_panels(panels, _draw_series, Path(path), fmt, dpi)


def _draw_series(ax, comparison: Comparison) -> None:
    rows = [r for r in comparison.rows if r.kind != "published" and r.label in comparison.steps]
    colours = _palette(len(comparison.columns))
    for c, subset in enumerate(comparison.columns):
        for classifier in dict.fromkeys(r.classifier for r in rows):
            points = sorted((comparison.steps[r.label], r.cells[subset]) for r in rows
                            if r.classifier == classifier and subset in r.cells)
            if not points:
                continue
            x = [step for step, _ in points]
            mean = [cell.mean for _, cell in points]
            label = subset + (f" · {classifier}" if comparison.show_classifier else "")
            ax.plot(x, mean, marker="o", color=colours[c], linestyle=LINESTYLES.get(classifier or "", "-"),
                    label=label)
            band = [(step, cell.mean, cell.std) for step, cell in points if cell.std is not None]
            if band:  # several seeds: mean ± std
                ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                color=colours[c], alpha=0.12, linewidth=0)
    steps = sorted(set(comparison.steps.values()))
    if len(steps) <= 12:
        ax.set_xticks(steps, [f"{s:,}" for s in steps])
    unit = comparison.context.get("step_unit") or "step"
    ax.set_xlabel("training step" if unit == "step" else "epoch")
    _finish(ax, comparison, "across a run on", comparison.over_seeds())


def _palette(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(max(n, 1))]
