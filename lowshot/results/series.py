"""A training run's checkpoints as a series: results ordered by their step, one table (rows = checkpoints in step
order, columns = subsets), the paired statistics between neighbours (each step against the one before it, not
against the first), and the data of the curve that ``plot.plot_series`` draws (top-1 per subset against the step).

A result's step comes from, in order: the ``steps`` given, ``meta["step"]`` (an ``Evaluator`` call records it),
its label, its model's path, or the results file's name (:func:`parse_step` reads the names). The results of a
series must share one protocol, as any comparison (``comparable.protocol_differences``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from lowshot.errors import BadInputError, ProtocolMismatchError
from lowshot.results.comparable import protocol_differences
from lowshot.results.compare import Comparison, compare, label_of
from lowshot.results.paired import PairedDelta, pair_up
from lowshot.results.rows import Results
from lowshot.results.stats import DEFAULT_METRIC, DEFAULT_N_BOOT

UNITS = ("step", "epoch")
# A number counts only after a word that says what it counts, at a word's start (``timestep-5``, ``vit5000`` and
# ``patch16-224`` are no steps) and at its end (``checkpoint-5000x`` is none). ``k``/``M`` multiply it
# (``step-25k``). A bare number with a suffix (``model-25k``, ``vit-base-patch16-224-in21k``) is left alone: as
# often a dataset's size as a step.
_WORDS = {"checkpoint": "step", "ckpt": "step", "global_step": "step", "global-step": "step", "step": "step",
          "steps": "step", "iteration": "step", "iter": "step", "epoch": "epoch", "ep": "epoch"}
_NUMBERED = re.compile(r"(?<![a-z])(" + "|".join(sorted(map(re.escape, _WORDS), key=len, reverse=True)) +
                       r")[-_=.]?(\d+)(k|m)?(?![a-z0-9])", re.IGNORECASE)
_SCALE = {None: 1, "k": 1_000, "m": 1_000_000}


@dataclass(frozen=True)
class Step:
    """Where a checkpoint sits in its run: ``value`` optimizer steps (``unit="step"``) or epochs."""

    value: int
    unit: str = "step"

    def __str__(self) -> str:
        return f"{self.unit} {self.value:,}"


def parse_step(name: str | Path | None) -> Step | None:
    """The step a checkpoint's name or path says, or None when it says none or is ambiguous.

    ==========================================  =====================
    ``checkpoint-5000``, ``checkpoint_5000``    step 5000
    ``step_12000``, ``global_step12000``        step 12000
    ``ckpt_000500.pth.tar``, ``iter_500.pth``   step 500
    ``step-25k``, ``checkpoint-2M``             step 25000, 2000000
    ``ep10``, ``epoch-10``, ``epoch_010.pth``   epoch 10
    ``epoch=3-step=1000.ckpt`` (Lightning)      step 1000 (a step beats the epoch it lies in)
    ``run/checkpoint-300/model.safetensors``    step 300 (the name, else its folder's)
    ``model-25k``, ``in21k``, ``vit-b-16``      None (a number without a word that says what it counts)
    ``checkpoint-100-step-200``                 None (two different steps)
    ``checkpoint-best``, ``5000``               None
    ==========================================  =====================

    Only the last two components of a path are read (the checkpoint, and the folder that holds its files)."""
    if name is None:
        return None
    parts = [p for p in re.split(r"[\\/]", str(name)) if p][-2:]
    for part in reversed(parts):
        found = {Step(int(n) * _SCALE[(s or "").lower() or None], _WORDS[w.lower()])
                 for w, n, s in _NUMBERED.findall(part)}
        if found:
            steps = {s for s in found if s.unit == "step"} or found
            return steps.pop() if len(steps) == 1 else None
    return None


def step_of(name: str | Path | None) -> int | None:
    """The number :func:`parse_step` reads in a checkpoint's name or path (steps or epochs: ``parse_step`` says
    which), or None."""
    step = parse_step(name)
    return None if step is None else step.value


@dataclass(frozen=True)
class Point:
    """One checkpoint's results in a series."""

    step: int
    label: str
    results: Results
    source: str | None = None  # the results file, where there is one


@dataclass(frozen=True)
class Series:
    """Results of one training run's checkpoints, in step order, under one protocol. Build it with
    :meth:`Series.of`; :meth:`comparison` is its table and its neighbours' paired differences."""

    points: tuple[Point, ...]
    unit: str = "step"

    @classmethod
    def of(cls, results: Sequence[Results], *, steps: Sequence[int] | None = None, unit: str | None = None,
           labels: Sequence[str] | None = None, sources: Sequence[str | Path | None] = (),
           force: bool = False) -> Series:
        """Order ``results`` by their step (``steps`` given, else read as :func:`find_steps` says). Raises
        BadInputError (one line) for a result without a step, two at the same step or a mix of steps and epochs,
        and ProtocolMismatchError when a result's protocol differs from the first's (unless ``force``)."""
        if not results:
            raise BadInputError("a series needs results: none given")
        if labels is not None and len(labels) != len(results):
            raise BadInputError(f"--label given {len(labels)} time(s) for {len(results)} results file(s)")
        names, sources = _names(results, labels, sources)
        found = _given_steps(steps, unit, len(results)) if steps is not None else \
            [_read_step(r, n, s) for r, n, s in zip(results, names, sources, strict=True)]
        units = {s.unit for s in found}
        if len(units) > 1:
            first = {u: names[[s.unit for s in found].index(u)] for u in sorted(units)}
            raise BadInputError(f"{first['step']} is numbered by steps and {first['epoch']} by epochs: give the "
                                "steps of the series explicitly")
        at: dict[int, str] = {}
        for step, name in zip(found, names, strict=True):
            if step.value in at:
                raise BadInputError(f"{at[step.value]} and {name} are both at {step}: a series takes one result "
                                    "per step")
            at[step.value] = name
        if len(set(names)) < len(names):  # e.g. the same live model at every step
            names = [f"{n} {s}" for n, s in zip(names, found, strict=True)]
        points = sorted((Point(s.value, n, r, src) for s, n, r, src in zip(found, names, results, sources,
                                                                           strict=True)), key=lambda p: p.step)
        first = points[0]
        for point in points[1:]:
            differences = protocol_differences(first.results, point.results)
            if differences and not force:
                raise ProtocolMismatchError(f"{first.label} and {point.label} were measured under different "
                                            f"protocols ({'; '.join(differences)}): a series compares one protocol "
                                            "across steps; pass --force to draw it anyway")
        return cls(tuple(points), units.pop())

    @property
    def steps(self) -> list[int]:
        return [p.step for p in self.points]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.points]

    @property
    def results(self) -> list[Results]:
        return [p.results for p in self.points]

    def neighbour_differences(self, *, metric: str = DEFAULT_METRIC, n_boot: int = DEFAULT_N_BOOT
                              ) -> tuple[dict[str, list[PairedDelta]], dict[str, str]]:
        """For each step after the first, ``paired_differences(previous, this)``: (label -> Δ, label -> why it
        has none), as ``Comparison.paired`` and ``Comparison.unpaired`` hold them."""
        return pair_up(((before.results, after.results, (before.label, after.label))
                        for before, after in pairwise(self.points)), metric=metric, n_boot=n_boot)

    def comparison(self, *, metric: str = DEFAULT_METRIC, paired: bool = True, n_boot: int = DEFAULT_N_BOOT,
                   published: bool = False, force: bool = False) -> Comparison:
        """The table (rows = checkpoints in step order, columns = subsets; ``Comparison.steps`` set) with, when
        ``paired``, each step's paired differences to the step before it."""
        comparison = compare(self.results, labels=self.labels, sources=[p.source for p in self.points],
                             published=published, force=force, metric=metric, paired=False)
        comparison.steps = dict(zip(comparison.labels, self.steps, strict=True))
        comparison.context["step_unit"] = self.unit
        if paired and len(self.points) > 1:
            comparison.paired, comparison.unpaired = self.neighbour_differences(metric=metric, n_boot=n_boot)
        return comparison


def find_steps(results: Sequence[Results], *, labels: Sequence[str] | None = None,
               sources: Sequence[str | Path | None] = ()) -> list[Step] | None:
    """Each result's step (``meta["step"]``, else its label, its model's path, its file's name), when all two or
    more of them have one, in one unit, all different; else None: the results are not a series."""
    if len(results) < 2 or (labels is not None and len(labels) != len(results)):
        return None
    names, sources = _names(results, labels, sources)
    try:
        found = [_read_step(r, n, s) for r, n, s in zip(results, names, sources, strict=True)]
    except BadInputError:
        return None
    if len({s.unit for s in found}) > 1 or len({s.value for s in found}) < len(found):
        return None
    return found


def build_series_report(results: Sequence[Results], *, steps: Sequence[int] | None = None, unit: str | None = None,
                        labels: Sequence[str] | None = None, sources: Sequence[str | Path | None] = (),
                        published: bool = False, force: bool = False, metric: str = DEFAULT_METRIC,
                        paired: bool = True, n_boot: int = DEFAULT_N_BOOT) -> tuple[Series, Comparison]:
    """``Series.of(results, ...)`` and its comparison in ``metric``: what ``compare.build_report(..., series=True)``
    gates and the CLI prints; ``plot.plot_comparison`` draws such a comparison as the curve against the step."""
    series = Series.of(results, steps=steps, unit=unit, labels=labels, sources=sources, force=force)
    return series, series.comparison(metric=metric, paired=paired, n_boot=n_boot, published=published, force=force)


def _names(results: Sequence[Results], labels: Sequence[str] | None, sources: Sequence[str | Path | None]
           ) -> tuple[list[str], list[str | None]]:
    """Each result's name (its label, else :func:`~lowshot.results.compare.label_of`) and source, one per result."""
    sources = [*map(_text, sources), *[None] * (len(results) - len(sources))]
    names = list(labels) if labels else [label_of(r, s) for r, s in zip(results, sources, strict=True)]
    return names, sources


def _given_steps(steps: Sequence[int], unit: str | None, n: int) -> list[Step]:
    if len(steps) != n:
        raise BadInputError(f"--step given {len(steps)} time(s) for {n} results")
    unit = unit or "step"
    if unit not in UNITS:
        raise BadInputError(f"step unit {unit!r}: expected one of {', '.join(UNITS)}")
    for value in steps:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BadInputError(f"--step {value!r}: a step is a whole number, 0 or more")
    return [Step(int(v), unit) for v in steps]


def _read_step(results: Results, label: str, source: str | None) -> Step:
    step = results.meta.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise BadInputError(f"{source or label}: meta.step {step!r} is not a whole number, 0 or more")
        unit = results.meta.get("step_unit") or "step"
        if unit not in UNITS:
            raise BadInputError(f"{source or label}: meta.step_unit {unit!r}: expected one of {', '.join(UNITS)}")
        return Step(step, unit)
    for name in (label, results.meta.get("model"), source):
        if (found := parse_step(name)) is not None:
            return found
    raise BadInputError(f"{source or label}: no training step in its meta, label, model path or file name "
                        "(checkpoint-5000, step_5000, epoch-10, …); give the steps explicitly")


def _text(source: str | Path | None) -> str | None:
    return None if source is None or source == "" else str(source)
