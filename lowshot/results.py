"""Result rows (one per subset x seed x classifier), mean ± std per classifier and subset, and the JSON / CSV /
Markdown writers."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError

ROW_FIELDS = ("subset", "shots", "percent", "seed", "top1", "n_train", "n_test", "lambda", "lambda_source",
              "n_iter", "seconds", "classifier", "k", "ci_low", "ci_high")
DEFAULT_CLASSIFIER = "logistic"  # rows written before k-NN/NCM existed have no "classifier" field
FORMATS = ("table", "json", "csv", "markdown")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def classifier_of(row: dict) -> str:
    return row.get("classifier") or DEFAULT_CLASSIFIER


def interval_key(classifier: str, split: str) -> str:
    return f"{classifier}/{split}"


@dataclass
class Results:
    """``meta`` (versions, model, data, protocol settings, cache keys, date) and ``rows`` (split x seed x
    classifier). ``intervals`` holds the bootstrap CI of each summary entry (``interval_key`` -> low/high), when
    one was computed: it needs the per-image correctness, which rows do not keep."""

    meta: dict
    rows: list[dict] = field(default_factory=list)
    intervals: dict[str, dict] = field(default_factory=dict)

    @property
    def classifiers(self) -> list[str]:
        """The classifiers in the rows, in the order they first appear."""
        return list(dict.fromkeys(classifier_of(r) for r in self.rows))

    @property
    def summary(self) -> list[dict]:
        """One entry per classifier x split (classifiers, then splits, in the order they first appear): mean and
        std of top-1 over seeds, and the bootstrap CI when there is one."""
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in self.rows:
            groups.setdefault((classifier_of(row), row["subset"]), []).append(row)
        order = sorted(groups, key=lambda key: self.classifiers.index(key[0]))  # stable: splits keep their order
        out = []
        for classifier, name in order:
            rows = groups[(classifier, name)]
            mean, std = mean_std([r["top1"] for r in rows])
            lambdas = sorted({r["lambda"] for r in rows if r.get("lambda") is not None})
            entry = {"subset": name, "classifier": classifier, "mean": round(mean, 4), "std": round(std, 4),
                     "n_seeds": len(rows), "n_train": round(sum(r["n_train"] for r in rows) / len(rows), 1),
                     "lambda": (lambdas[0] if len(lambdas) == 1 else lambdas) if lambdas else None}
            ks = sorted({r["k"] for r in rows if r.get("k") is not None})
            if ks:
                entry["k"] = ks[0] if len(ks) == 1 else ks
            entry.update(self.intervals.get(interval_key(classifier, name), {}))
            out.append(entry)
        return out

    def to_dict(self) -> dict:
        return {"meta": self.meta, "rows": self.rows, "summary": self.summary}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(ROW_FIELDS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return buffer.getvalue()

    def to_markdown(self) -> str:
        """A GitHub-flavoured table that pastes into a paper draft, a PR comment or a CI job summary. The
        classifier column appears when there is more than one, the CI column when intervals were computed."""
        model = self.meta.get("model", "?")
        summary = self.summary
        several = len(self.classifiers) > 1
        has_ci = any("ci_low" in s for s in summary)
        what = "a logistic probe" if not several else "each classifier"
        header = (["classifier"] if several else []) + ["subset", "top-1 (%)"] + (["95% CI"] if has_ci else []) \
            + ["seeds", "train images", "λ / k" if several else "λ"]
        lines = [f"Top-1 (%) of {what} on frozen {self.meta.get('feature', 'CLS')} features of `{model}`, "
                 f"test split `{self.meta.get('test_split', '?')}` (n={self.meta.get('n_test', '?')}); "
                 f"mean ± std over seeds" + ("; 95% CI: bootstrap over test images." if has_ci else "."), "",
                 "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for s in summary:
            cells = ([s["classifier"]] if several else []) + [s["subset"], f"{s['mean']:.1f} ± {s['std']:.1f}"]
            if has_ci:
                cells.append(format_ci(s))
            cells += [str(s["n_seeds"]), f"{s['n_train']:g}", setting(s)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def render(self, fmt: str) -> str:
        if fmt == "json":
            return self.to_json() + "\n"
        if fmt == "csv":
            return self.to_csv()
        if fmt == "markdown":
            return self.to_markdown()
        raise BadInputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")

    def save(self, path: str | Path, *, flag: str = "--output") -> Path:
        """Write atomically, in the format the extension names (.json, .csv, .md; anything else is an error)."""
        from .outputs import RESULT_SUFFIXES, output_format, save_text

        return save_text(path, self.render(output_format(path, RESULT_SUFFIXES, flag=flag)), flag=flag)

    @classmethod
    def load(cls, path: str | Path) -> Results:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: not a lowshot results JSON ({exc})") from exc
        if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
            raise BadInputError(f"{path}: not a lowshot results JSON (no 'meta' and 'rows')")
        rows = [_renamed(r) for r in data["rows"] if isinstance(r, dict)]
        summary = [_renamed(s) for s in data.get("summary", []) if isinstance(s, dict)]
        intervals = {interval_key(s.get("classifier") or DEFAULT_CLASSIFIER, s["subset"]):
                     {"ci_low": s["ci_low"], "ci_high": s["ci_high"]}
                     for s in summary if "ci_low" in s and "subset" in s}
        return cls(data["meta"], rows, intervals)


def _renamed(entry: dict) -> dict:
    """Files written before 0.2 named a row's labelled subset ``split`` (a word that also means the dataset's
    train/val split): read it as ``subset``."""
    if "subset" not in entry and "split" in entry:
        entry = {("subset" if k == "split" else k): v for k, v in entry.items()}
    return entry


def format_ci(entry: dict) -> str:
    """``[83.2, 85.8]`` from an entry with ``ci_low``/``ci_high`` (``–`` without)."""
    if entry.get("ci_low") is None:
        return "–"
    return f"[{entry['ci_low']:.1f}, {entry['ci_high']:.1f}]"


def setting(entry: dict) -> str:
    """The classifier's hyper-parameter for a summary entry: λ for the probe, k for k-NN, – for NCM."""
    def join(value) -> str:
        return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"

    if entry.get("lambda") is not None:
        return join(entry["lambda"])
    if entry.get("k") is not None:
        return f"k={join(entry['k'])}"
    return "–"
