"""run_probe with k-NN, NCM and bootstrap intervals, on synthetic cached features."""

import json

import numpy as np
import pytest

from lowshot.errors import BadInputError
from lowshot.features.store import Features
from lowshot.protocol import run_probe
from lowshot.results.rows import Results

from .test_probe import blobs


def features(split: str, per_class: int, seed: int) -> Features:
    x, y = blobs(n_classes=4, per_class=per_class, dim=16, seed=0, spread=1.5)
    x = x + np.random.default_rng(seed).normal(scale=0.5, size=x.shape).astype(np.float32)  # same centres, new noise
    ids = [f"c{label}/{split}{i}.jpg" for i, label in enumerate(y)]
    return Features(f"key-{split}", x, y, ids, ["c0", "c1", "c2", "c3"],
                    {"split": split, "readout": {"name": "cls-prenorm"}, "data": f"/data/nette/{split}"})


@pytest.fixture(scope="module")
def train_test():
    return features("train", 12, 1), features("val", 25, 2)


def test_run_probe_with_baselines_and_ci_labels_rows_and_groups_the_summary(train_test):
    train, test = train_test
    results = run_probe(train, test, shots=(1, 5), percents=(), seeds=2, classifiers=("logistic", "knn", "ncm"),
                        ci=True, n_boot=200)
    assert len(results.rows) == 2 * 2 * 3
    assert [(s["classifier"], s["subset"]) for s in results.summary] == [
        ("logistic", "1-shot"), ("logistic", "5-shot"), ("knn", "1-shot"), ("knn", "5-shot"),
        ("ncm", "1-shot"), ("ncm", "5-shot")]
    for row in results.rows:
        assert row["ci_low"] <= row["top1"] <= row["ci_high"]
        assert (row["lambda"] is None) == (row["classifier"] != "logistic")
    for s in results.summary:
        assert s["ci_low"] <= s["mean"] <= s["ci_high"] and s["mean"] > 60  # chance is 25
    assert {r["k"] for r in results.rows if r["classifier"] == "knn" and r["subset"] == "1-shot"} == {1}
    assert results.meta["data"] == "/data/nette"  # the dataset, not its train/ folder
    recorded = results.meta["settings"]["probe"]
    assert recorded["n_boot"] == 200 and recorded["classifiers"] == ["logistic", "knn", "ncm"]
    assert not {"sampling", "classifiers", "limit"} & set(results.meta) and "n_boot" not in results.meta["ci"]
    again = run_probe(train, test, shots=(1, 5), percents=(), seeds=2, classifiers=("logistic", "knn", "ncm"),
                      ci=True, n_boot=200)
    assert again.summary == results.summary  # seeded: the same intervals every time
    md = results.to_markdown()
    assert "| classifier | subset | top-1 (%) | 95% CI |" in md and "| knn | 1-shot |" in md and "k=1" in md


def test_results_json_round_trip_keeps_intervals(train_test, tmp_path):
    train, test = train_test
    results = run_probe(train, test, shots=(2,), percents=(), seeds=2, ci=True, n_boot=100)
    results.save(tmp_path / "r.json")
    assert Results.load(tmp_path / "r.json").summary == results.summary


def test_one_classifier_keeps_the_original_table(train_test):
    train, test = train_test
    md = run_probe(train, test, shots=(2,), percents=(), seeds=1).to_markdown()
    assert "| subset | top-1 (%) | seeds | train images | λ |" in md and "classifier" not in md.split("\n")[2]


def test_unknown_classifier_is_a_clear_error(train_test):
    with pytest.raises(BadInputError, match="classifiers 'svm'"):  # the core names the parameter
        run_probe(*train_test, shots=(1,), percents=(), seeds=1, classifiers=("logistic", "svm"))


@pytest.mark.parametrize("found,says", [(None, "no format number"), ("lowshot-results/0", "format lowshot-results/0")])
def test_results_of_another_format_are_refused_in_one_line_that_says_how_to_regenerate_them(tmp_path, found, says):
    old = {"meta": {"model": "m"}, "rows": [
        {"split": "1-shot", "shots": 1, "percent": None, "seed": s, "top1": 50.0 + s, "n_train": 10, "n_test": 9,
         "lambda": 0.0025} for s in range(3)], **({"format": found} if found else {})}
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(BadInputError, match=f"old.json: results with {says}.*regenerate") as error:
        Results.load(tmp_path / "old.json")
    assert "\n" not in str(error.value)
