"""The lowshot flow from Python, no CLI: extract (cached), probe, print a Markdown table.

    python examples/quickstart.py                       # the real DeiT-Tiny on Imagenette from ../shared/data
    python examples/quickstart.py MODEL_DIR DATA_DIR    # your own backbone and ImageFolder data
"""

import sys
from pathlib import Path

import numpy as np

import lowshot

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
model = sys.argv[1] if len(sys.argv) > 1 else str(SHARED / "models" / "deit-tiny-patch16-224")
data = sys.argv[2] if len(sys.argv) > 2 else str(SHARED / "datasets" / "imagenette2-224")


def show(task: str, done: int, total: int) -> None:
    print(f"\r{task}: {done}/{total}", end="\n" if done == total else "", flush=True)


run = lowshot.extract_features(model, data, progress=show)  # a second run is a cache hit: nothing is decoded
for split in run.splits():
    status = "cache hit" if split.cached else f"{split.images} images in {split.seconds:.0f} s"
    print(f"{split.split}: {split.features.features.shape} ({status})")

results = lowshot.run_probe(run.train.features, run.test.features, shots=(1, 2, 5), percents=(1,), seeds=3)
print(results.to_markdown())
results.save("quickstart-results.json")

# The probe on its own, scikit-learn style: five images of every class, scored on the whole test split.
train, test = run.train.features, run.test.features
rng = np.random.default_rng(0)
pick = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), 5, replace=False)
                       for c in range(len(train.classes))])
probe = lowshot.LogisticProbe(lam=0.0025).fit(train.features[pick], train.labels[pick])
print(f"5-shot probe, seed 0: coef_ {probe.coef_.shape}, objective {probe.objective_:.3f}, "
      f"top-1 {100 * probe.score(test.features, test.labels):.1f}%")
