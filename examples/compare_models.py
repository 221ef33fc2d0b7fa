"""Compare two backbones with the library API, notebook style (each ``# %%`` is a cell in VS Code / Jupytext).

The real DeiT-Tiny against the same architecture with random weights, on 20 train + 20 val Imagenette images per
class (made from ../shared/data on the first run; extraction then takes about a minute on 2 cores, later runs
hit the feature cache):

    python examples/compare_models.py
"""

# %% Imports and inputs
import sys
from pathlib import Path

import lowshot

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "benchmarks" / "out"
sys.path.insert(0, str(REPO / "examples"))
from make_random_model import make_random_model  # noqa: E402
from make_subset import make_subset  # noqa: E402

deit = SHARED / "models" / "deit-tiny-patch16-224"
data = OUT / "imagenette-20"
random_init = OUT / "deit-tiny-random"
if not data.is_dir():
    make_subset(SHARED / "datasets" / "imagenette2-224", data, per_split={"train": 20, "val": 20})
if not random_init.is_dir():
    make_random_model(deit, random_init, seed=0)
models = {"deit-tiny": deit, "deit-tiny-random": random_init}

# %% Features (cached) and the protocol, with the k-NN / nearest-class-mean classifiers and bootstrap CIs
protocol = lowshot.ProbeSettings(shots=(1, 2, 5, 10), percents=(), seeds=3, classifiers=("logistic", "knn", "ncm"),
                                 ci=True)
results = {}
for name, path in models.items():
    # encodes the test split and only the train images these subsets draw (cached; a rerun decodes nothing)
    run = lowshot.extract_features(str(path), str(data), dtype="float32", subsets=protocol)
    results[name] = lowshot.run_probe(run.train.features, run.test.features, protocol, meta={"label": name})
    results[name].save(OUT / f"compare-{name}.json")
print(results["deit-tiny"].to_markdown())

# %% One comparison table (Markdown pastes into a PR comment), with the published MSN rows for reference
comparison = lowshot.compare(list(results.values()), published=True)
print(comparison.to_markdown())

# %% The regression gate: the random model "against" DeiT-Tiny as its baseline is a real drop
check = lowshot.gate(results["deit-tiny-random"], results["deit-tiny"], max_drop=1.0, label="deit-tiny-random",
                     baseline_name="deit-tiny")
print("passed" if check.passed else "failed", "-", check.summary())

# %% Paired differences: the same test images and seeds, so Δ gets a paired interval and a McNemar p-value
for d in lowshot.paired_differences(results["deit-tiny"], results["deit-tiny-random"]):
    print(f"{d.classifier:8} {d.subset:7} Δ {d.delta:+6.1f}  95% CI [{d.ci_low:+.1f}, {d.ci_high:+.1f}]  "
          f"p {d.p_value:.1e}  {'significant' if d.significant else 'not significant'}")

# %% Accuracy vs labelled images per class (needs pip install 'lowshot[plot]')
print(lowshot.plot_comparison(comparison, OUT / "compare-models.png"))
