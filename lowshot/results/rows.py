"""Result rows (one per subset x seed x classifier), mean ± std per classifier and subset, and the JSON / CSV /
Markdown writers."""

from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lowshot.errors import BadInputError, ProtocolMismatchError
from lowshot.results.stats import DEFAULT_METRIC, METRICS, mean_std

ROW_FIELDS = ("subset", "shots", "percent", "seed", "top1", "top5", "mean_per_class", "n_train", "n_test", "lambda",
              "lambda_source", "n_iter", "seconds", "classifier", "k", "ci_low", "ci_high")
# Bump when a results file's fields or their meaning change: a file of another format is refused in one line that
# says how to regenerate it (there is no reader for old formats).
RESULTS_FORMAT = "lowshot-results/1"
PREDICTIONS_FORMAT = "lowshot-predictions/1"  # bump when the arrays or their meaning change
DEFAULT_CLASSIFIER = "logistic"  # the MSN probe; the other classifiers are opt-in
FORMATS = ("table", "json", "csv", "markdown")


def row_key(row: dict) -> str:
    """``logistic/5-shot/0``: what pairs a row with its twin in another results file (classifier, subset, seed)."""
    return f"{classifier_of(row)}/{row['subset']}/{row['seed']}"


@dataclass
class Predictions:
    """Every row's test predictions, kept so that two results files can be compared image by image afterwards.

    ``labels`` (n_test,) are the true class ids of the test images, in the order of the test features; ``predicted``
    (n_rows, n_test) each row's predicted class id; ``rank`` (n_rows, n_test) the rank of the true class in the
    row's scores (uint8, 0 = right, ``stats.RANK_CAP`` = that far or further: any top-k up to 255). ``keys`` name
    the rows (``row_key``); ``order`` is a hash of the test ids in order, so files are paired only image by image.

    Stored inside the results JSON as one base64 field of a compressed ``.npz`` (uint16 class ids where they fit):
    one file to commit, upload or attach, written in one atomic save. ImageNet's 50,000 test images x 12 rows fit
    in a few MB (``tests/test_predictions.py`` checks the budget)."""

    labels: np.ndarray
    predicted: np.ndarray
    rank: np.ndarray
    keys: list[str]
    order: str

    def encode(self) -> dict:
        kind = np.uint16 if max(int(self.labels.max(initial=0)), int(self.predicted.max(initial=0))) < 2 ** 16 \
            else np.uint32
        buffer = io.BytesIO()
        np.savez_compressed(buffer, labels=self.labels.astype(kind), predicted=self.predicted.astype(kind),
                            rank=self.rank.astype(np.uint8))
        return {"format": PREDICTIONS_FORMAT, "order": self.order, "keys": self.keys,
                "npz_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}

    @classmethod
    def decode(cls, data: dict, where: str) -> Predictions:
        if not isinstance(data, dict) or data.get("format") != PREDICTIONS_FORMAT:
            raise BadInputError(f"{where}: predictions in an unknown format ({_short_value(data)}); expected "
                                f"{PREDICTIONS_FORMAT}")
        try:
            with np.load(io.BytesIO(base64.b64decode(data["npz_base64"], validate=True)), allow_pickle=False) as z:
                labels, predicted, rank = z["labels"], z["predicted"], z["rank"]
        except (KeyError, ValueError, OSError) as exc:
            raise BadInputError(f"{where}: damaged predictions field ({exc})") from None
        keys = list(data.get("keys") or [])
        if predicted.shape != rank.shape or predicted.shape != (len(keys), len(labels)):
            raise BadInputError(f"{where}: damaged predictions field (shapes {predicted.shape}, {rank.shape} for "
                                f"{len(keys)} rows x {len(labels)} test images)")
        return cls(labels.astype(np.int64), predicted.astype(np.int64), rank, keys, str(data.get("order")))

    def of(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """The predicted ids and true-class ranks of one row."""
        i = self.keys.index(key)
        return self.predicted[i], self.rank[i]


def _short_value(value: object) -> str:
    text = str(value)
    return text if len(text) < 60 else text[:57] + "…"


def classifier_of(row: dict) -> str:
    return row["classifier"]


def interval_key(classifier: str, subset: str) -> str:
    return f"{classifier}/{subset}"


@dataclass
class Results:
    """``meta`` (versions, model, data, protocol settings, cache keys, date) and ``rows`` (subset x seed x
    classifier). ``intervals`` holds the bootstrap CI of each summary entry (``interval_key`` -> low/high), when
    one was computed: it needs the per-image correctness, which rows do not keep."""

    meta: dict
    rows: list[dict] = field(default_factory=list)
    intervals: dict[str, dict] = field(default_factory=dict)
    predictions: Predictions | None = None  # None: a file written before predictions were kept

    @property
    def classifiers(self) -> list[str]:
        """The classifiers in the rows, in the order they first appear."""
        return list(dict.fromkeys(classifier_of(r) for r in self.rows))

    @property
    def summary(self) -> list[dict]:
        """One entry per classifier x subset: mean and std of top-1 over seeds (and of top-5 and mean-per-class
        under ``metrics`` when the rows have them), and the top-1 bootstrap CI when there is one."""
        return self.summary_of(DEFAULT_METRIC)

    def has_metric(self, metric: str) -> bool:
        return bool(self.rows) and all(r.get(METRICS[metric]) is not None for r in self.rows)

    def summary_of(self, metric: str) -> list[dict]:
        """``summary`` with ``mean``/``std`` of ``metric`` (``top1``, ``top5``, ``mean-per-class``); the CI is
        kept only for top-1, the metric it was computed for."""
        field_name = METRICS[metric]
        if not self.has_metric(metric):
            raise BadInputError(f"--metric {metric}: the results ({self.meta.get('label') or self.meta.get('model')})"
                                f" have no {field_name} per row (written before lowshot recorded it); rerun "
                                "'lowshot probe'")
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in self.rows:
            groups.setdefault((classifier_of(row), row["subset"]), []).append(row)
        order = sorted(groups, key=lambda key: self.classifiers.index(key[0]))  # stable: subsets keep their order
        out = []
        for classifier, name in order:
            rows = groups[(classifier, name)]
            mean, std = mean_std([r[field_name] for r in rows])
            lambdas = sorted({r["lambda"] for r in rows if r.get("lambda") is not None})
            entry = {"subset": name, "classifier": classifier, "mean": round(mean, 4), "std": _rounded(std),
                     "n_seeds": len(rows), "n_train": round(sum(r["n_train"] for r in rows) / len(rows), 1),
                     "lambda": (lambdas[0] if len(lambdas) == 1 else lambdas) if lambdas else None}
            sources = sorted({r["lambda_source"] for r in rows if r.get("lambda_source") not in (None, "fixed")})
            if sources:  # lambda auto: CV's choice, or the default and why CV was not used (setting() shows it)
                entry["lambda_source"] = sources[0] if len(sources) == 1 else sources
            ks = sorted({r["k"] for r in rows if r.get("k") is not None})
            if ks:
                entry["k"] = ks[0] if len(ks) == 1 else ks
            if metric == DEFAULT_METRIC:
                entry.update(self.intervals.get(interval_key(classifier, name), {}))
                others = {m: mean_std([r[f] for r in rows]) for m, f in METRICS.items()
                          if m != metric and all(r.get(f) is not None for r in rows)}
                if others:
                    entry["metrics"] = {m: {"mean": round(a, 4), "std": _rounded(b)} for m, (a, b) in others.items()}
            out.append(entry)
        return out

    def to_dict(self) -> dict:
        data = {"format": RESULTS_FORMAT, "meta": self.meta, "rows": self.rows, "summary": self.summary}
        if self.predictions is not None:
            data["predictions"] = self.predictions.encode()
        return data

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
        lines = [f"Top-1 (%) of {what} on frozen {readout_of(self.meta) or 'CLS'} features of `{model}`, "
                 f"test split `{self.meta.get('test_split', '?')}` (n={self.meta.get('n_test', '?')}); "
                 + over_seeds(s["n_seeds"] for s in summary)
                 + ("; 95% CI: bootstrap over test images." if has_ci else "."), "",
                 "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        for s in summary:
            cells = ([s["classifier"]] if several else []) + [s["subset"], format_mean(s["mean"], s["std"])]
            if has_ci:
                cells.append(format_ci(s))
            cells += [str(s["n_seeds"]), f"{s['n_train']:g}", setting(s)]
            lines.append("| " + " | ".join(cells) + " |")
        if quick_run(self.meta):
            lines.insert(0, f"**{quick_run(self.meta)}**")
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
        from lowshot.io import RESULT_SUFFIXES, output_format, save_text

        return save_text(path, self.render(output_format(path, RESULT_SUFFIXES, flag=flag)), flag=flag)

    def log_to(self, target: object, *, step: int | None = None) -> None:
        """Log one scalar per classifier, subset and metric (``lowshot/5-shot/top1``, ``…/top1_std``) at ``step``
        (default: ``meta["step"]``, else 0) into an experiment tracker: ``"tensorboard:DIR"``, ``"mlflow"``,
        ``"mlflow:URI"``, ``"wandb"``, or a ``SummaryWriter`` / MLflow run / W&B run the caller opened
        (:func:`lowshot.results.tracking.open_tracker` lists them; its ``scalars_of`` names every scalar)."""
        from lowshot.results.tracking import log_results

        log_results(self, target, step=step)

    @classmethod
    def load(cls, path: str | Path) -> Results:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: not a lowshot results JSON ({exc})") from exc
        if not isinstance(data, dict) or "rows" not in data or "meta" not in data:
            raise BadInputError(f"{path}: not a lowshot results JSON (no 'meta' and 'rows')")
        if data.get("format") != RESULTS_FORMAT:
            found = f"format {data['format']}" if data.get("format") else "no format number (an earlier lowshot)"
            raise BadInputError(f"{path}: results with {found}; this lowshot reads {RESULTS_FORMAT}: regenerate "
                                "it with the command that wrote it (for a baseline: lowshot bench CONFIG "
                                "--update-baseline)")
        rows = [r for r in data["rows"] if isinstance(r, dict)]
        summary = [s for s in data.get("summary", []) if isinstance(s, dict)]
        intervals = {interval_key(s["classifier"], s["subset"]):
                     {"ci_low": s["ci_low"], "ci_high": s["ci_high"]}
                     for s in summary if "ci_low" in s and "subset" in s}
        predictions = Predictions.decode(data["predictions"], str(path)) if data.get("predictions") else None
        if predictions is not None and predictions.keys != [row_key(r) for r in rows]:
            raise BadInputError(f"{path}: its predictions do not match its rows (edited by hand?)")
        return cls(data["meta"], rows, intervals, predictions)


def _rounded(std: float | None) -> float | None:
    """A std for the JSON: 4 decimals, or None over a single seed (recorded as null, not 0.0)."""
    return None if std is None else round(std, 4)


def format_mean(mean: float, std: float | None) -> str:
    """``89.4 ± 1.2``, or ``89.4`` when there is no std (one seed, or a published number without one)."""
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def over_seeds(counts) -> str:
    """What a table's cells are: ``mean ± std over 3 seeds``, or ``one seed (no ± std)`` when no cell has a std."""
    counts = sorted(set(counts))
    if counts == [1]:
        return "one seed (no ± std)"
    return f"mean ± std over {'/'.join(map(str, counts)) or 'the'} seeds"


def settings_of(meta: dict, part: str = "probe") -> dict:
    """The settings a result was run with, as recorded once: ``meta["settings"][part]``, the ``to_dict()`` of its
    ProbeSettings (``part="probe"``) or ExtractSettings (``"extract"``); empty where a file lacks them."""
    return (meta.get("settings") or {}).get(part) or {}


def readout_of(meta: dict) -> str | None:
    """The name of the readout the features were read out with (``cls-prenorm``, ``pooled``, …)."""
    return (meta.get("readout") or {}).get("name")


def quick_run(meta: dict) -> str | None:
    """What results of a quick run say first (a ``limit`` in their settings): not the protocol, so never gated."""
    limit = settings_of(meta).get("limit")
    return None if limit is None else f"quick run: --limit {limit} images per class, not the protocol"


def require_full_run(results: Results, name: str, *, refused_by: str) -> None:
    """Refuse a quick run (``--limit``) where only the protocol's numbers belong (the gate, a model card)."""
    limit = settings_of(results.meta).get("limit")
    if limit is not None:
        raise ProtocolMismatchError(f"{name} is a quick run (--limit {limit} images per class), not the protocol: "
                                    f"{refused_by}; rerun without --limit")


def format_ci(entry: dict) -> str:
    """``[83.2, 85.8]`` from an entry with ``ci_low``/``ci_high`` (``–`` without)."""
    if entry.get("ci_low") is None:
        return "–"
    return f"[{entry['ci_low']:.1f}, {entry['ci_high']:.1f}]"


def setting(entry: dict) -> str:
    """The classifier's hyper-parameter for a summary entry: λ for the probe, k for k-NN, – for NCM. Under
    ``--lambda auto`` a λ that is the default because CV was not used (too few images per class) says so:
    ``0.0025 (default)``, or ``(default in some seeds)``."""
    def join(value) -> str:
        return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"

    if entry.get("lambda") is not None:
        sources = entry.get("lambda_source") or []
        sources = [sources] if isinstance(sources, str) else sources
        fallback = [s.startswith("default") for s in sources]
        suffix = " (default)" if fallback and all(fallback) else " (default in some seeds)" if any(fallback) else ""
        return join(entry["lambda"]) + suffix
    if entry.get("k") is not None:
        return f"k={join(entry['k'])}"
    return "–"


def name_of(path: object) -> str | None:
    """How tables name a model or dataset: a local path by its last component, a hub id
    (``facebook/vit-msn-small``) whole; None for none."""
    if not path:
        return None
    text = str(path).rstrip("/")
    if not text.startswith(("/", ".", "~")) and text.count("/") == 1:
        return text
    return Path(text).name or text
