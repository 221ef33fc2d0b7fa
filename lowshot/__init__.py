"""lowshot: low-shot evaluation of frozen vision backbones (MSN protocol).

    >>> import lowshot
    >>> run = lowshot.extract_features("path/to/model", "path/to/data")
    >>> results = lowshot.run_probe(run.train.features, run.test.features, shots=(1, 2, 5))
    >>> print(results.to_markdown())
    >>> print(lowshot.compare([results, other], labels=["a", "b"]).to_markdown())
    >>> evaluator = lowshot.Evaluator("path/to/data", shots=(1, 2, 5))   # inside a training loop
    >>> evaluator(model, step=1000).log_to("tensorboard:runs/eval")

Names are imported on first use, so ``import lowshot`` (and ``lowshot --help``) does not load torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "extract_features": "features.extract", "load_features": "features.extract",
    "export_features": "features.export", "load_export": "features.export", "FeatureCache": "features.store",
    "run_probe": "protocol", "evaluate": "protocol", "needed_indices": "data.subsets",
    "LogisticProbe": "classify.logistic", "KNNClassifier": "classify.neighbors",
    "NearestClassMean": "classify.neighbors",
    "Results": "results.rows", "compare": "results.compare", "gate": "results.gate",
    "build_report": "results.compare", "paired_differences": "results.paired",
    "plot_comparison": "results.plot", "plot_series": "results.plot", "Series": "results.series",
    "model_index_yaml": "results.modelcard",
    "load_config": "bench", "run_bench": "bench", "ExtractSettings": "config", "ProbeSettings": "config",
    "Evaluator": "evaluator",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lowshot' has no attribute {name!r}")
