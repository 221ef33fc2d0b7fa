"""lowshot: low-shot evaluation of frozen vision backbones (MSN protocol).

    >>> import lowshot
    >>> run = lowshot.extract_features("path/to/model", "path/to/data")
    >>> results = lowshot.run_probe(run.train.features, run.test.features, shots=(1, 2, 5))
    >>> print(results.to_markdown())
    >>> print(lowshot.compare([results, other], labels=["a", "b"]).to_markdown())
"""

__version__ = "0.1.0"

from .baselines import KNNClassifier, NearestClassMean  # noqa: E402
from .bench import load_config, run_bench  # noqa: E402
from .experiment import run_probe  # noqa: E402
from .extract import extract_features, load_features  # noqa: E402
from .plot import plot_comparison  # noqa: E402
from .probe import LogisticProbe  # noqa: E402
from .report import build_report, compare, gate  # noqa: E402
from .results import Results  # noqa: E402

__all__ = ["__version__", "extract_features", "load_features", "run_probe", "LogisticProbe", "KNNClassifier",
           "NearestClassMean", "Results", "compare", "gate", "build_report", "plot_comparison", "load_config",
           "run_bench"]
