"""``lowshot bench CONFIG.toml``: a benchmark as a file, for CI and for papers.

The config names the models, the data and the protocol; a run extracts features (cached), probes every model,
writes one results JSON per model, a Markdown report (comparison table + regression gate) and a plot, and gates
each model that has a baseline. Paths in the config are relative to the config file, and results record them so
(with the weights' sha256), never as one machine's absolute paths: a committed baseline holds none. Example::

    title = "DeiT-Tiny on Imagenette"
    data = "../../shared/data/datasets/imagenette2-224"
    shots = [1, 2, 5]
    percents = [1]
    seeds = 3
    lambda = 0.0025
    classifiers = ["logistic", "knn", "ncm"]
    max_drop = 1.0

    [extract]
    dtype = "float32"

    [[models]]
    name = "deit-tiny"
    path = "../../shared/data/models/deit-tiny-patch16-224"
    baseline = "baseline/imagenette-deit-tiny.json"
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lowshot.config import ExtractSettings, ProbeSettings
from lowshot.errors import (
    BadInputError,
    DataError,
    MissingDependencyError,
    OutputError,
    ProtocolMismatchError,
    SettingError,
)
from lowshot.io import check_folder, check_writable, output_format, save_text
from lowshot.protocol import Progress, evaluate
from lowshot.results.compare import Comparison, build_report, suite_table
from lowshot.results.gate import DEFAULT_MAX_DROP, gate
from lowshot.results.rows import Results

REPORT_NAME = "report.md"
PLOT_NAME = "plot.png"
# [extract] takes any ExtractSettings field but these (set per model or at the top level); the settings object
# checks the values. TOML names of the probe settings that differ from their field names:
EXTRACT_KEYS = {f.name: bool if isinstance(f.default, bool) else object for f in dataclasses.fields(ExtractSettings)
                if f.name not in ("revision", "train_split", "test_split")}
TOML_NAMES = {"lam": "lambda"}
MODEL_KEYS = {"name": str, "path": str, "baseline": str, "revision": str}
DATASET_KEYS = {"name": str, "data": str, "train_split": str, "test_split": str}
DATASET_PLACEHOLDER = "{dataset}"  # in a model's baseline path: one baseline file per dataset
TOP_KEYS = {"title": str, "data": str, "output": str, "shots": list, "percents": list, "seeds": int,
            "lambda": (float, int, str), "classifiers": list, "ci": bool, "n_boot": int, "backend": str,
            "max_drop": (float, int), "significant": bool, "plot": bool, "published": bool, "allow_fewer": bool,
            "train_split": str, "test_split": str, "extract": dict, "models": list, "datasets": list,
            "limit": int}


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: str  # a folder (resolved) or a hub id
    baseline: Path | None = None
    revision: str | None = None
    given: str = ""  # as the config writes it (relative to the config file): what results record


@dataclass(frozen=True)
class BenchDataset:
    name: str  # names the output sub-folder, the table's column group and the {dataset} of baseline paths
    data: str  # a folder (resolved) or a Hugging Face dataset id
    train_split: str = "train"
    test_split: str | None = None
    given: str = ""  # as the config writes it


@dataclass(frozen=True)
class BenchConfig:
    """A benchmark read from TOML: everything ``lowshot bench`` runs, with paths resolved."""

    source: Path
    data: str
    models: tuple[BenchModel, ...]
    output: Path
    probe: ProbeSettings
    extract: ExtractSettings
    title: str = "lowshot benchmark"
    max_drop: float = DEFAULT_MAX_DROP
    plot: bool = True
    published: bool = False
    significant: bool = False  # gate only drops whose paired 95% interval excludes 0
    datasets: tuple[BenchDataset, ...] = ()  # [[datasets]]: several run as a suite; empty: the single ``data``
    data_given: str = ""  # ``data`` as the config writes it


@dataclass
class BenchOutcome:
    config: BenchConfig
    results: dict[str, Results]  # by model name; a suite: by "dataset/model"
    comparison: Comparison  # a suite: models x (dataset x subset) + mean over datasets, every dataset's gates
    written: list[Path]
    datasets: dict[str, Comparison] = field(default_factory=dict)  # a suite: each dataset's own comparison
    unsaved: list[OutputError] = field(default_factory=list)  # files that failed: content kept where each says


def load_config(path: str | os.PathLike) -> BenchConfig:
    """Read and check a benchmark config; an unknown key or a wrong type is an error naming it."""
    path = Path(path)
    data = _read_toml(path)
    where = path.name
    _check_keys(data, TOP_KEYS, where)
    _check_keys(data.get("extract", {}), EXTRACT_KEYS, f"{where} [extract]")
    base = path.resolve().parent
    datasets = _datasets(data, base, where)
    if datasets:
        data = {**data, "data": datasets[0].data, "train_split": datasets[0].train_split,
                **({"test_split": datasets[0].test_split} if datasets[0].test_split else {})}
    elif "data" not in data:
        raise BadInputError(f"{where}: 'data' is missing (an ImageFolder path relative to the config, or a dataset "
                            "id), or list several as [[datasets]]")
    models = data.get("models") or []
    if not models:
        raise BadInputError(f"{where}: no [[models]] (each needs name and path)")
    parsed = []
    for i, m in enumerate(models):
        if not isinstance(m, dict):
            raise BadInputError(f"{where}: models[{i}] must be a table with name and path")
        _check_keys(m, MODEL_KEYS, f"{where} models[{i}]")
        if "name" not in m or "path" not in m:
            raise BadInputError(f"{where}: models[{i}] needs both 'name' and 'path'")
        if not m["name"] or any(c in m["name"] for c in "/\\"):
            raise BadInputError(f"{where}: model name {m['name']!r} must be non-empty and have no slashes "
                                "(it names the results file)")
        if len(datasets) > 1 and "baseline" in m and DATASET_PLACEHOLDER not in m["baseline"]:
            raise BadInputError(f"{where}: models[{i}].baseline {m['baseline']!r} must contain {DATASET_PLACEHOLDER} "
                                f"with several [[datasets]] (one baseline per dataset, e.g. "
                                f"'baseline/{DATASET_PLACEHOLDER}/{m['name']}.json')")
        parsed.append(BenchModel(m["name"], _resolve(base, m["path"], f"{where} models[{i}].path"),
                                 base / m["baseline"] if "baseline" in m else None, m.get("revision"), m["path"]))
    names = [m.name for m in parsed]
    if len(set(names)) != len(names):
        raise BadInputError(f"{where}: model names must be unique ({', '.join(names)})")
    try:
        probe = ProbeSettings(
            shots=_ints(data["shots"], f"{where} shots") if "shots" in data else None,
            percents=_numbers(data["percents"], f"{where} percents") if "percents" in data else None,
            **{field: data[TOML_NAMES.get(field, field)] for field in
               ("seeds", "lam", "classifiers", "ci", "n_boot", "backend", "allow_fewer", "limit")
               if TOML_NAMES.get(field, field) in data})
        extract = ExtractSettings(**data.get("extract", {}), train_split=data.get("train_split", "train"),
                                  test_split=data.get("test_split"))
    except SettingError as exc:  # checked here, so a bad value fails before any extraction
        raise BadInputError(f"{where}: {exc.spelled(TOML_NAMES.get(exc.param, exc.param))}") from None
    config = BenchConfig(
        source=path.resolve(), data=datasets[0].data if datasets else _resolve(base, data["data"], f"{where} data"),
        models=tuple(parsed), output=base / data.get("output", f"out/{path.stem}"), probe=probe, extract=extract,
        title=data.get("title", path.stem), max_drop=float(data.get("max_drop", DEFAULT_MAX_DROP)),
        plot=data.get("plot", True), published=data.get("published", False),
        significant=data.get("significant", False), datasets=datasets,
        data_given=datasets[0].given if datasets else data["data"])
    return _for_dataset(config, datasets[0]) if len(datasets) == 1 else config


def _datasets(data: dict, base: Path, where: str) -> tuple[BenchDataset, ...]:
    """The [[datasets]] tables (each: name, data, optional train_split/test_split), checked."""
    if "datasets" not in data:
        return ()
    if "data" in data or "train_split" in data or "test_split" in data:
        raise BadInputError(f"{where}: give either 'data' (one dataset) or [[datasets]], not both")
    out = []
    for i, d in enumerate(data["datasets"]):
        if not isinstance(d, dict):
            raise BadInputError(f"{where}: datasets[{i}] must be a table with name and data")
        _check_keys(d, DATASET_KEYS, f"{where} datasets[{i}]")
        if "name" not in d or "data" not in d:
            raise BadInputError(f"{where}: datasets[{i}] needs both 'name' and 'data'")
        if not d["name"] or any(c in d["name"] for c in "/\\") or d["name"] == "mean":
            raise BadInputError(f"{where}: dataset name {d['name']!r} must be non-empty, have no slashes and not be "
                                "'mean' (it names a folder and a column group)")
        out.append(BenchDataset(d["name"], _resolve(base, d["data"], f"{where} datasets[{i}].data"),
                                d.get("train_split", "train"), d.get("test_split"), d["data"]))
    names = [d.name for d in out]
    if not out or len(set(names)) != len(names):
        raise BadInputError(f"{where}: [[datasets]] must list at least one dataset, with unique names "
                            f"({', '.join(names)})")
    return tuple(out)


def _for_dataset(config: BenchConfig, dataset: BenchDataset) -> BenchConfig:
    """The single-dataset benchmark of one [[datasets]] entry: its data and splits, {dataset} in baselines filled."""
    models = tuple(replace(m, baseline=Path(str(m.baseline).replace(DATASET_PLACEHOLDER, dataset.name)))
                   if m.baseline is not None else m for m in config.models)
    return replace(config, data=dataset.data, data_given=dataset.given, models=models, datasets=(dataset,),
                   extract=replace(config.extract, train_split=dataset.train_split, test_split=dataset.test_split))


def run_bench(config: BenchConfig, *, cache_dir: str | os.PathLike | None = None, output: Path | None = None,
              force: bool = False, update_baseline: bool = False, progress: Progress | None = None,
              log: Callable[[str], None] | None = None) -> BenchOutcome:
    """Extract (cached) and probe every model, write ``<name>.json`` per model, ``report.md`` and ``plot.png``
    into the output folder, and gate each model that has a baseline (``Comparison.failed`` lists the failures;
    a protocol mismatch raises unless ``force``). ``update_baseline`` writes the new results over the baselines
    instead of gating. A config with several [[datasets]] runs each one into ``<output>/<dataset>/`` and writes
    the suite's ``report.md`` (``suite_table`` + every dataset's section) at the top."""
    log = log or (lambda message: None)
    output = Path(output) if output is not None else config.output
    if len(config.datasets) > 1:
        return _run_suite(config, cache_dir=cache_dir, output=output, force=force, update_baseline=update_baseline,
                          progress=progress, log=log)
    if config.plot:
        from lowshot.results.plot import require_matplotlib

        require_matplotlib()
    gated = [m.name for m in config.models if m.baseline is not None]
    if config.probe.limit is not None and gated:  # refused before any extraction, as the gate would refuse after it
        raise ProtocolMismatchError(f"limit = {config.probe.limit} makes this a quick run, not the protocol: the "
                                    f"regression gate refuses it, and it is no baseline; remove 'limit', or the "
                                    f"baselines of {', '.join(gated)}")
    baselines: dict[str, Results] = {}
    if update_baseline:  # checked before any extraction: the new baselines are written at the end
        for model in config.models:
            if model.baseline is not None:
                output_format(model.baseline, {".json": "json"}, flag=f"{model.name}: baseline")
                check_writable(model.baseline, flag=f"{model.name}: baseline")
    else:
        for model in config.models:
            if model.baseline is not None:
                if not model.baseline.is_file():
                    raise BadInputError(f"{model.name}: baseline {model.baseline} does not exist; run "
                                        "'lowshot bench CONFIG --update-baseline' once to create it")
                baselines[model.name] = Results.load(model.baseline)
    check_folder(output, flag="output folder")
    results: dict[str, Results] = {}
    written: list[Path] = []
    unsaved: list[OutputError] = []
    keep = _keeper(written, unsaved)
    for model in config.models:
        def extracted(run, name=model.name) -> None:
            state = "cache hit" if run.train.cached and run.test.cached else "extracted"
            log(f"{name}: {len(run.train.features):,} train / {len(run.test.features):,} test features ({state})")

        result = evaluate(model.path, config.data, extract=dataclasses.replace(config.extract, revision=model.revision),
                          probe=config.probe, cache_dir=cache_dir, progress=progress, extracted=extracted,
                          meta={"model": model.given or model.path, "data": config.data_given or config.data,
                                "label": model.name, "bench": {"config": config.source.name, "title": config.title}})
        results[model.name] = result
        keep(lambda result=result, name=model.name: _write(result, output / f"{name}.json"))
    names = list(results)
    comparison = build_report(list(results.values()), labels=names, published=config.published, force=force)
    if update_baseline:
        for model in config.models:
            if model.baseline is not None:
                keep(lambda model=model: _write(results[model.name], model.baseline))
                log(f"{model.name}: baseline updated ({model.baseline})")
    else:
        comparison.gates = [gate(results[name], base, max_drop=config.max_drop, force=force, label=name,
                                 baseline_name=_relative(config.models, name, config.source.parent),
                                 significant=config.significant, n_boot=config.probe.n_boot)
                            for name, base in baselines.items()]
    title = f"## {config.title}\n\n"
    report = output / REPORT_NAME
    keep(lambda: save_text(report, title + comparison.to_markdown(), flag="report"))
    if config.plot:
        from lowshot.results.plot import plot_comparison

        keep(lambda: plot_comparison(comparison, output / PLOT_NAME))
    return BenchOutcome(config, results, comparison, written, unsaved=unsaved)


def _run_suite(config: BenchConfig, *, output: Path, log: Callable[[str], None], **options) -> BenchOutcome:
    """Every dataset as its own benchmark (results, report and plot in ``<output>/<dataset>/``, gated against its
    own baselines), then one table over all of them."""
    per_dataset: dict[str, Comparison] = {}
    results: dict[str, Results] = {}
    written: list[Path] = []
    unsaved: list[OutputError] = []
    for dataset in config.datasets:
        log(f"dataset {dataset.name}: {dataset.data}")
        outcome = run_bench(_for_dataset(config, dataset), output=output / dataset.name, log=log, **options)
        per_dataset[dataset.name] = outcome.comparison
        results.update({f"{dataset.name}/{name}": r for name, r in outcome.results.items()})
        written += outcome.written
        unsaved += outcome.unsaved
        for result in outcome.comparison.gates:
            result.label = f"{result.label} on {dataset.name}"
    suite = suite_table(per_dataset)
    sections = [f"### {name}\n\n" + replace(c, gates=[]).to_markdown() for name, c in per_dataset.items()]
    text = f"## {config.title}\n\n" + suite.to_markdown() + "\n" + "\n".join(sections)
    _keeper(written, unsaved)(lambda: save_text(output / REPORT_NAME, text, flag="report"))
    return BenchOutcome(config, results, suite, written, per_dataset, unsaved)


def _keeper(written: list[Path], unsaved: list[OutputError]) -> Callable[[Callable[[], Path]], None]:
    """``keep(write)``: run one save, adding its path to ``written``, or its OutputError (the content already kept
    elsewhere) to ``unsaved``, so one file that cannot be written stops neither the other models nor the table."""

    def keep(write: Callable[[], Path]) -> None:
        try:
            written.append(write())
        except OutputError as exc:
            unsaved.append(exc)

    return keep


def _write(results: Results, path: Path) -> Path:
    return results.save(path, flag="results")


def _relative(models: tuple[BenchModel, ...], name: str, base: Path) -> str:
    path = next(m.baseline for m in models if m.name == name)
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise MissingDependencyError("reading a TOML config on Python 3.10 needs tomli: pip install tomli") \
                from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise BadInputError(f"config {path}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"config {path}: not valid TOML ({exc})") from None


def _check_keys(table: dict, allowed: dict, where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise BadInputError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")
        kind = allowed[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise BadInputError(f"{where}: {key} = {value!r} has the wrong type")


def _ints(values: list, where: str) -> list[int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise BadInputError(f"{where} {values!r}: expected a list of integers")
    return values


def _numbers(values: list, where: str) -> list:
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise BadInputError(f"{where} {values!r}: expected a list of numbers")
    return values


def _resolve(base: Path, value: str, where: str) -> str:
    """A path relative to the config file when it exists there; a value that looks like a hub id is kept."""
    candidate = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
    if candidate.exists():
        return str(candidate)
    if value.startswith((".", "/", "~")) or value.count("/") != 1:
        raise DataError(f"{where} {value!r}: {candidate} does not exist (paths are relative to the config file)")
    return value  # a Hugging Face id such as facebook/vit-msn-small
