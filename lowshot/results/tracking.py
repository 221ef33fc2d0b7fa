"""Results into an experiment tracker: TensorBoard, MLflow or Weights & Biases, one scalar per subset and metric.

A run's summary becomes scalars named ``lowshot/<subset>/<metric>`` (``lowshot/5-shot/top1``, the mean over seeds;
``lowshot/5-shot/top1_std`` beside it when there is more than one seed), so a training run that evaluates every few
thousand steps draws one curve per subset in the tracker it already uses. The names are stable, whatever else the
results hold: the logistic probe's (the protocol's number) carry no classifier, the other classifiers' name theirs
(``lowshot/knn/5-shot/top1``). See :func:`scalars_of` for every name and :func:`params_of` for the protocol settings
recorded beside them.

Each tracker is an optional extra, imported only when a target is opened; :func:`parse_log_target` checks a target
string (and that its package is installed) in one line before any long work, so a command-line run fails before it
extracts anything.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import numbers
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowshot.errors import BadInputError, LowshotError, MissingDependencyError, ProtocolMismatchError
from lowshot.results.rows import DEFAULT_CLASSIFIER, name_of, readout_of, settings_of
from lowshot.results.stats import METRICS

if TYPE_CHECKING:
    from lowshot.results.rows import Results

PREFIX = "lowshot"
TRACKERS = ("tensorboard", "mlflow", "wandb")
SPECS = "tensorboard:DIR, mlflow, mlflow:URI, wandb or wandb:PROJECT"
# tracker -> (module whose presence is checked, what to install)
PACKAGES = {"tensorboard": ("tensorboard", 'pip install "lowshot[tensorboard]"'),
            "mlflow": ("mlflow", 'pip install "lowshot[mlflow]"'),
            "wandb": ("wandb", "pip install wandb")}
DEFAULT_PROJECT = "lowshot"  # the MLflow experiment / W&B project of a run lowshot opens itself


@dataclass(frozen=True)
class LogTarget:
    """A checked target string: ``tracker`` is one of :data:`TRACKERS`; ``where`` the TensorBoard log folder, the
    MLflow tracking URI or the W&B project (None: the tracker's default)."""

    tracker: str
    where: str | None = None

    def __str__(self) -> str:
        return self.tracker if self.where is None else f"{self.tracker}:{self.where}"


def parse_log_target(spec: str) -> LogTarget:
    """Check a target string and that its tracker's package is installed, before any work is done.

    ``tensorboard:DIR`` (event files under DIR, created if missing), ``mlflow`` (MLflow's default tracking URI),
    ``mlflow:URI`` (e.g. ``mlflow:sqlite:///runs/mlflow.db``), ``wandb`` or ``wandb:PROJECT`` (W&B's own settings:
    ``WANDB_MODE=offline`` works). A bad string raises :class:`~lowshot.errors.BadInputError`, a tracker whose
    package is missing :class:`~lowshot.errors.MissingDependencyError` naming the pip command: one line each."""
    if not isinstance(spec, str):
        raise BadInputError(f"log target {spec!r}: expected a string ({SPECS})")
    tracker, colon, where = spec.partition(":")
    tracker = tracker.strip().lower()
    if tracker not in TRACKERS:
        raise BadInputError(f"log target {spec!r}: unknown tracker {tracker!r}; expected {SPECS}")
    if colon and not where.strip():
        raise BadInputError(f"log target {spec!r}: nothing after ':'; expected {SPECS}")
    where = where.strip() or None
    if tracker == "tensorboard":
        if where is None:
            raise BadInputError(f"log target {spec!r}: TensorBoard needs a folder for its event files: "
                                "tensorboard:DIR")
        if Path(where).expanduser().exists() and not Path(where).expanduser().is_dir():
            raise BadInputError(f"log target {spec!r}: {where} is a file, not a folder for TensorBoard's events")
    _require(tracker, find_only=True)
    if tracker == "mlflow" and where:
        _check_mlflow_uri(spec, where)
    return LogTarget(tracker, where)


def _check_mlflow_uri(spec: str, uri: str) -> None:
    """Refuse up front what MLflow would refuse only after the run: a SQLite file in a missing folder, and a folder
    as the store (``./mlruns``, ``file:…``), which MLflow 3.13 and later open only with MLFLOW_ALLOW_FILE_STORE=true."""
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir():
            raise BadInputError(f"log target {spec!r}: no folder {folder} for the SQLite file")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if (scheme is None or scheme.group(1).lower() == "file") and _mlflow_refuses_file_store():
        raise BadInputError(f"log target {spec!r}: MLflow {importlib.metadata.version('mlflow')} opens a folder "
                            "store only with MLFLOW_ALLOW_FILE_STORE=true; use a database, e.g. "
                            "mlflow:sqlite:///mlflow.db")


def _mlflow_refuses_file_store() -> bool:
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true":
        return False
    try:
        major, minor = (int(part) for part in importlib.metadata.version("mlflow").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (3, 13)


def log_results(results: Results, target: Any, *, step: int | None = None) -> None:
    """Log ``results`` to ``target`` at ``step`` and close what was opened for it: the function behind
    :meth:`Results.log_to <lowshot.results.rows.Results.log_to>`; see :func:`open_tracker` for the targets."""
    step = _step(results, step)  # a bad step is refused before a tracker is opened
    with open_tracker(target) as tracker:
        tracker.log(results, step=step)


def open_tracker(target: Any) -> Tracker:
    """A :class:`Tracker` for ``target``, to log several results into one run (a series of checkpoints):
    ``with open_tracker("tensorboard:runs/x") as tracker: tracker.log(results, step=1000)``.

    ``target`` is a target string or :class:`LogTarget` (see :func:`parse_log_target`), or an object the caller
    already opened: a TensorBoard ``SummaryWriter`` (torch's or tensorboardX's: anything with ``add_scalar``), an
    MLflow run (``mlflow.start_run()``'s, logged through the current tracking URI) or a W&B run (``wandb.init()``'s).
    What the caller opened is flushed, never closed or ended. A string opens what it names: a ``SummaryWriter`` on
    the folder; for MLflow, the active run (``mlflow.start_run()``) when there is one at that tracking URI, else a
    new run in the experiment ``MLFLOW_EXPERIMENT_NAME`` (``lowshot`` by default), named after the first results'
    model and ended at close (the tracker's ``run_id`` names it); for W&B, ``wandb.run`` when one is active, else
    a new run in the project (``lowshot`` by default), finished at close."""
    if isinstance(target, Tracker):
        return target
    if isinstance(target, str):
        target = parse_log_target(target)
    if isinstance(target, LogTarget):
        return _OPENERS[target.tracker](target)
    if callable(getattr(target, "add_scalar", None)):
        return _TensorBoard(target, owned=False)
    if type(target).__module__.split(".")[0] == "wandb" and callable(getattr(target, "log", None)):
        return _WandB(target, project=None, owned=False)
    run_id = getattr(getattr(target, "info", None), "run_id", None)
    if isinstance(run_id, str):
        mlflow = _require("mlflow")
        return _MLflow(mlflow.tracking.MlflowClient(), run_id=run_id, owned=False)
    raise BadInputError(f"log target of type {type(target).__name__}: expected a string ({SPECS}), a TensorBoard "
                        "SummaryWriter, an MLflow run or a W&B run")


def scalars_of(results: Results) -> dict[str, float]:
    """The scalars logged for ``results``, by name, equal to its JSON summary's numbers (``Results.summary_of``).

    For each classifier, subset and metric the rows hold (``top1``, ``top5``, ``mean_per_class``):
    ``lowshot/<subset>/<metric>`` the mean over seeds (%), ``…/<metric>_std`` the std over seeds when there are two
    or more, and, with bootstrap intervals, ``…/top1_ci_low`` and ``…/top1_ci_high``. The logistic probe's names
    carry no classifier; k-NN's and NCM's put theirs first: ``lowshot/knn/5-shot/top1``. A subset's name keeps its
    letters, digits, ``.``, ``-`` and ``_``; ``%`` is spelled ``pct`` (``lowshot/1pct/top1``) and anything else
    ``_``, since MLflow refuses ``%`` in a name."""
    out: dict[str, float] = {}
    for metric, field in METRICS.items():
        if not results.has_metric(metric):
            continue
        for entry in results.summary_of(metric):
            classifier = entry["classifier"]
            base = "/".join([PREFIX] + ([] if classifier == DEFAULT_CLASSIFIER else [_slug(classifier)])
                            + [_slug(entry["subset"])])
            values = {field: entry["mean"], f"{field}_std": entry["std"]}
            if metric == "top1":
                values.update({"top1_ci_low": entry.get("ci_low"), "top1_ci_high": entry.get("ci_high")})
            for name, value in values.items():
                if value is None:
                    continue
                key = f"{base}/{name}"
                if key in out:
                    raise BadInputError(f"results {_label(results)}: two subsets or classifiers log as {key}; "
                                        "rename a split file's subset")
                out[key] = float(value)
    return out


def params_of(results: Results) -> dict[str, str]:
    """The protocol settings recorded beside the scalars (MLflow params, W&B config, a TensorBoard text summary),
    by name: ``lowshot/data``, ``train_split``, ``test_split``, ``readout``, ``transform``, ``dtype``,
    ``classifiers``, ``lambda``, ``shots``, ``percents``, ``seeds``, ``split_files``, the train and test images'
    fingerprints, and ``limit`` for a quick run; each only where the results record it. The model is left out, so
    the checkpoints of one training run share one run's params; MLflow refuses to log results under other settings
    into a run that already has params."""
    meta = results.meta
    settings = settings_of(meta)
    transform = meta.get("transform")
    values = {"data": name_of(meta.get("data")), "train_split": meta.get("train_split"),
              "test_split": meta.get("test_split"), "readout": readout_of(meta),
              "transform": transform.get("name") if isinstance(transform, dict) else transform,
              "dtype": meta.get("dtype"), "classifiers": settings.get("classifiers") or results.classifiers,
              "lambda": settings.get("lam"), "shots": settings.get("shots"), "percents": settings.get("percents"),
              "seeds": settings.get("seeds"), "split_files": settings.get("split_files"),
              "train_fingerprint": meta.get("train_fingerprint"), "test_fingerprint": meta.get("test_fingerprint"),
              "limit": settings.get("limit")}
    return {f"{PREFIX}/{name}": _text(value) for name, value in values.items() if value not in (None, [], "")}


class Tracker:
    """An open tracker: :meth:`log` any number of results, then :meth:`close` (or use it as a context manager)."""

    def log(self, results: Results, *, step: int | None = None) -> None:
        """Log :func:`scalars_of` ``results`` at ``step`` (default: ``results.meta["step"]`` when the results carry
        one, else 0) and :func:`params_of` them where the tracker keeps settings."""
        self._write(results, _step(results, step))

    def _write(self, results: Results, step: int) -> None:
        raise NotImplementedError

    def close(self, *, failed: bool = False) -> None:
        """Flush what was written; close or end what this tracker opened itself (never the caller's object), as
        failed when the work it logged did not finish (MLflow's FAILED status, W&B's non-zero exit code)."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.close(failed=exc_type is not None)


class _TensorBoard(Tracker):
    def __init__(self, writer: Any, *, owned: bool):
        self.writer, self.owned = writer, owned

    @classmethod
    def open(cls, target: LogTarget) -> _TensorBoard:
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        return cls(SummaryWriter(log_dir=str(Path(target.where).expanduser())), owned=True)

    def _write(self, results: Results, step: int) -> None:
        for name, value in scalars_of(results).items():
            self.writer.add_scalar(name, value, global_step=step)
        settings = params_of(results)
        if settings and callable(getattr(self.writer, "add_text", None)):
            table = "\n".join(["| setting | value |", "| --- | --- |"]
                              + [f"| {k.split('/', 1)[1]} | {v} |" for k, v in settings.items()])
            self.writer.add_text(f"{PREFIX}/settings", table, global_step=step)

    def close(self, *, failed: bool = False) -> None:
        (self.writer.close if self.owned else self.writer.flush)()


class _MLflow(Tracker):
    def __init__(self, client: Any, *, run_id: str | None, owned: bool):
        self.client, self.run_id, self.owned = client, run_id, owned

    @classmethod
    def open(cls, target: LogTarget) -> _MLflow:
        mlflow = _require("mlflow")
        active = mlflow.active_run()
        if active is not None and target.where in (None, mlflow.get_tracking_uri()):
            return cls(mlflow.tracking.MlflowClient(), run_id=active.info.run_id, owned=False)
        with _mlflow_errors(target.where or mlflow.get_tracking_uri()):
            return cls(mlflow.tracking.MlflowClient(tracking_uri=target.where), run_id=None, owned=True)

    def _write(self, results: Results, step: int) -> None:
        with _mlflow_errors(self.client.tracking_uri):
            self._log(results, step)

    def _log(self, results: Results, step: int) -> None:
        from mlflow.entities import Metric, Param

        if self.run_id is None:  # opened lazily: the run is named after the first results logged into it
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=_label(results)).info.run_id
        logged = self.client.get_run(self.run_id).data.params
        settings = params_of(results)
        differ = [f"{k}={logged[k]} here, {v} in these results" for k, v in settings.items()
                  if k in logged and logged[k] != v]
        if differ:
            raise ProtocolMismatchError(f"MLflow run {self.run_id} holds results of another protocol "
                                        f"({'; '.join(differ)}): log them into another run")
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars_of(results).items()]
        params = [Param(k, v) for k, v in settings.items() if k not in logged]
        for start in range(0, max(len(metrics), 1), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000],
                                  params=params if start == 0 else [])

    def close(self, *, failed: bool = False) -> None:
        if self.owned and self.run_id is not None:
            with _mlflow_errors(self.client.tracking_uri):
                self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def _mlflow_errors(uri: str):
    """MLflow's own errors (a store it refuses, a server that does not answer) as one line naming the URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise LowshotError(f"logging to MLflow at {uri}: {' '.join(str(exc.message).split())}") from exc


class _WandB(Tracker):
    def __init__(self, run: Any, *, project: str | None, owned: bool):
        self.run, self.project, self.owned = run, project, owned

    @classmethod
    def open(cls, target: LogTarget) -> _WandB:
        wandb = _require("wandb")
        if wandb.run is not None:
            return cls(wandb.run, project=None, owned=False)
        return cls(None, project=target.where or DEFAULT_PROJECT, owned=True)

    def _write(self, results: Results, step: int) -> None:
        if self.run is None:
            self.run = _require("wandb").init(project=self.project, name=_label(results))
        self.run.config.update(params_of(results), allow_val_change=False)
        self.run.log(scalars_of(results), step=step)

    def close(self, *, failed: bool = False) -> None:
        if self.owned and self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


_OPENERS = {"tensorboard": _TensorBoard.open, "mlflow": _MLflow.open, "wandb": _WandB.open}


def _require(tracker: str, *, find_only: bool = False) -> Any:
    """The tracker's package (imported), or one line naming the pip command; ``find_only`` checks that it is
    installed without importing it (MLflow takes seconds to import)."""
    module, install = PACKAGES[tracker]
    try:
        if find_only:
            if sys.modules.get(module) is None and importlib.util.find_spec(module) is None:
                raise ImportError(module)
            return None
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"logging to {tracker} needs the {module} package, which is not installed: "
                                     f"{install}") from None


def _step(results: Results, step: int | None) -> int:
    if step is None:
        step = results.meta.get("step")
    if step is None:
        return 0
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise BadInputError(f"step {step!r}: expected a whole number >= 0 (the training step the results belong to)")
    return int(step)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name).replace("%", "pct"))


def _label(results: Results) -> str:
    return str(results.meta.get("label") or name_of(results.meta.get("model")) or "lowshot")


def _text(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
