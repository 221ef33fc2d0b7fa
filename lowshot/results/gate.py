"""The regression gate: a results file checked against a reference (a committed baseline), subset by subset,
failing on a drop of more than ``max_drop`` points (optionally only a significant one), and its markdown verdict
for a CI page.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowshot.errors import BadInputError, ProtocolMismatchError
from lowshot.results.comparable import environment_notes, protocol_differences
from lowshot.results.paired import PairedDelta, format_p, paired_differences, unpaired_reason
from lowshot.results.rows import Results, require_full_run
from lowshot.results.stats import DEFAULT_METRIC, DEFAULT_N_BOOT, METRIC_LABELS

DEFAULT_MAX_DROP = 1.0  # points of top-1; below the 1-shot std over seeds on Imagenette, above solver noise


@dataclass(frozen=True)
class SubsetCheck:
    classifier: str
    subset: str
    baseline: float
    current: float | None  # None: not measured in the current results
    paired: PairedDelta | None = None  # the paired interval and p-value, when both files kept predictions

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
    metric: str = DEFAULT_METRIC
    significant: bool = False  # --significant: a drop counts only when its paired interval is below 0 too
    unpaired: str | None = None  # why there are no paired intervals (None: there are, or none were asked for)

    @property
    def drops(self) -> list[SubsetCheck]:
        return [c for c in self.checks if c.delta is not None and -c.delta > self.max_drop
                and (not self.significant or (c.paired is not None and c.paired.ci_high < 0))]

    @property
    def rule(self) -> str:
        what = f"a {METRIC_LABELS[self.metric]} drop of more than {points(self.max_drop)}"
        return what + (" whose paired 95% CI excludes 0" if self.significant else "")

    @property
    def passed(self) -> bool:
        return not self.drops

    def summary(self) -> str:
        """One line: the verdict, and which subsets dropped."""
        metric = "" if self.metric == DEFAULT_METRIC else f" in {METRIC_LABELS[self.metric]}"
        sig = " significantly" if self.significant else ""
        if self.passed:
            return (f"{self.label}: no subset dropped{sig} more than {points(self.max_drop)}{metric} vs "
                    f"{self.baseline} ({len([c for c in self.checks if c.current is not None])} checked)")
        what = "; ".join(f"{c.classifier} {c.subset} {c.baseline:.1f} -> {c.current:.1f} ({c.delta:+.1f}"
                         + (f", CI [{c.paired.ci_low:+.1f}, {c.paired.ci_high:+.1f}]" if c.paired else "") + ")"
                         for c in self.drops)
        return f"{self.label}: {len(self.drops)} subset(s) dropped{sig} more than {points(self.max_drop)}{metric} " \
               f"vs {self.baseline}: {what}"


def points(value: float) -> str:
    return f"{value:g} point" + ("" if value == 1 else "s")


def gate(current: Results, baseline: Results, *, max_drop: float = DEFAULT_MAX_DROP, force: bool = False,
         label: str = "results", baseline_name: str = "the baseline", metric: str = DEFAULT_METRIC,
         significant: bool = False, n_boot: int = DEFAULT_N_BOOT) -> GateResult:
    """Check every (classifier, subset) of ``baseline`` in ``current``: a mean ``metric`` more than ``max_drop``
    points lower fails (with ``significant``, only when the paired 95% interval of the difference is below 0 too).
    A protocol difference, or a baseline subset the current results lack, raises ProtocolMismatchError unless
    ``force``; ``significant`` without predictions in both files is a BadInputError saying why."""
    if not max_drop >= 0:
        raise BadInputError(f"--max-drop {max_drop}: must be zero or a positive number of points")
    for name, results in ((label, current), (baseline_name, baseline)):  # even with force: not the protocol
        require_full_run(results, name, refused_by="the regression gate refuses it")
    now = {(s["classifier"], s["subset"]): s["mean"] for s in current.summary_of(metric)}
    checks = [SubsetCheck(s["classifier"], s["subset"], s["mean"], now.get((s["classifier"], s["subset"])))
              for s in baseline.summary_of(metric)]
    differences = protocol_differences(baseline, current)
    missing = [f"{c.classifier} {c.subset}" for c in checks if c.current is None]
    if missing:
        differences.append(f"not measured: {', '.join(missing)}")
    if differences and not force:
        raise ProtocolMismatchError(f"{label} and {baseline_name} differ in protocol ({'; '.join(differences)}); "
                                    "fix the run or pass --force to compare anyway")
    unpaired = unpaired_reason(baseline, current, (baseline_name, label))
    if unpaired and significant:
        raise BadInputError(f"--significant: {unpaired}")
    if not unpaired:
        deltas = {(d.classifier, d.subset): d for d in paired_differences(baseline, current, metric=metric,
                                                                          n_boot=n_boot)}
        checks = [SubsetCheck(c.classifier, c.subset, c.baseline, c.current, deltas.get((c.classifier, c.subset)))
                  for c in checks]
    return GateResult(label, baseline_name, max_drop, checks, differences if force else [],
                      environment_notes(baseline, current), metric, significant, unpaired)



def gate_markdown(result: GateResult) -> list[str]:
    """The verdict in bold, then the per-subset table (folded away in a <details> block when it passed); the
    paired interval and p-value of each Δ when both files kept their predictions."""
    verdict = "✅ passed" if result.passed else f"❌ failed: {len(result.drops)} subset(s) dropped"
    head = f"**Regression gate** `{result.label}` vs `{result.baseline}` (fails on {result.rule}): {verdict}"
    paired = any(c.paired for c in result.checks)
    extra = " 95% CI of Δ | p |" if paired else ""
    table = [f"| classifier | subset | baseline | current | Δ |{extra}",
             "| --- | --- | --- | --- | --- |" + (" --- | --- |" if paired else "")]
    for c in result.checks:
        if c.current is None:
            table.append(f"| {c.classifier} | {c.subset} | {c.baseline:.1f} | – | not measured |"
                         + (" – | – |" if paired else ""))
            continue
        flag = " ❌" if c in result.drops else ""
        cells = f"| {c.classifier} | {c.subset} | {c.baseline:.1f} | {c.current:.1f} | {c.delta:+.1f}{flag} |"
        if paired:
            cells += (f" [{c.paired.ci_low:+.1f}, {c.paired.ci_high:+.1f}] | {format_p(c.paired.p_value)} |"
                      if c.paired else " – | – |")
        table.append(cells)
    lines = [head, ""] + (table if not result.passed else
                          ["<details><summary>per subset</summary>", "", *table, "", "</details>"])
    if result.unpaired:
        lines += ["", f"No paired intervals: {result.unpaired}"]
    for text in result.differences:
        lines += ["", f"Protocol differs (compared anyway, --force): {text}"]
    if result.notes:
        lines += ["", f"Environment differs: {'; '.join(result.notes)}"]
    return lines

