"""Result rows (one per split x seed), mean ± std per split, and the JSON / CSV / Markdown writers."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInputError

ROW_FIELDS = ("split", "shots", "percent", "seed", "top1", "n_train", "n_test", "lambda", "lambda_source",
              "n_iter", "seconds")
FORMATS = ("table", "json", "csv", "markdown")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@dataclass
class Results:
    """``meta`` (versions, model, data, protocol settings, cache keys, date) and ``rows`` (split x seed)."""

    meta: dict
    rows: list[dict] = field(default_factory=list)

    @property
    def summary(self) -> list[dict]:
        """One entry per split, in the order the splits first appear: mean and std of top-1 over seeds."""
        order: list[str] = []
        by_split: dict[str, list[dict]] = {}
        for row in self.rows:
            if row["split"] not in by_split:
                order.append(row["split"])
            by_split.setdefault(row["split"], []).append(row)
        out = []
        for name in order:
            rows = by_split[name]
            mean, std = mean_std([r["top1"] for r in rows])
            lambdas = sorted({r["lambda"] for r in rows})
            out.append({"split": name, "mean": round(mean, 4), "std": round(std, 4), "n_seeds": len(rows),
                        "n_train": round(sum(r["n_train"] for r in rows) / len(rows), 1),
                        "lambda": lambdas[0] if len(lambdas) == 1 else lambdas})
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
        """A GitHub-flavoured table that pastes into a paper draft, a PR comment or a CI job summary."""
        model = self.meta.get("model", "?")
        lines = [f"Top-1 (%) of a logistic probe on frozen {self.meta.get('feature', 'CLS')} features of `{model}`, "
                 f"test split `{self.meta.get('test_split', '?')}` (n={self.meta.get('n_test', '?')}); "
                 f"mean ± std over seeds.", "",
                 "| split | top-1 (%) | seeds | train images | λ |", "| --- | --- | --- | --- | --- |"]
        for s in self.summary:
            lam = s["lambda"] if not isinstance(s["lambda"], list) else "/".join(f"{v:g}" for v in s["lambda"])
            lam = f"{lam:g}" if isinstance(lam, float) else lam
            lines.append(f"| {s['split']} | {s['mean']:.1f} ± {s['std']:.1f} | {s['n_seeds']} | "
                         f"{s['n_train']:g} | {lam} |")
        return "\n".join(lines) + "\n"

    def render(self, fmt: str) -> str:
        if fmt == "json":
            return self.to_json() + "\n"
        if fmt == "csv":
            return self.to_csv()
        if fmt == "markdown":
            return self.to_markdown()
        raise BadInputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")

    def save(self, path: str | Path) -> None:
        """Write by extension: .json, .csv, .md (anything else: JSON)."""
        path = Path(path)
        fmt = {".csv": "csv", ".md": "markdown"}.get(path.suffix.lower(), "json")
        path.write_text(self.render(fmt))

    @classmethod
    def load(cls, path: str | Path) -> Results:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: not a lowshot results JSON ({exc})") from exc
        if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
            raise BadInputError(f"{path}: not a lowshot results JSON (no 'meta' and 'rows')")
        return cls(data["meta"], data["rows"])
