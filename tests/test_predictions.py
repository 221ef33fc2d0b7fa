"""Per-image predictions kept in results files, and the metrics computed from them (top-1, top-5, mean-per-class)."""

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

import lowshot
from lowshot.errors import BadInputError
from lowshot.results.rows import Predictions, Results
from lowshot.results.stats import RANK_CAP, metric_value, parse_metrics, true_class_rank

from .synthetic import pair


def test_true_class_rank_agrees_with_argmax_on_ties_and_marks_unseen_classes():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    classes = np.array([0, 2, 5])  # the classifier never saw class 7
    labels = np.array([2, 2, 5, 7])
    predicted, rank = true_class_rank(scores, classes, labels)
    assert predicted.tolist() == [0, 2, 0, 0]
    assert rank.tolist() == [1, 0, 1, RANK_CAP]  # a tie ranks the lower class first, exactly like argmax
    assert ((rank == 0) == (predicted == labels)).all()


def test_top5_and_mean_per_class_match_scikit_learn():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), rng.integers(5, 40, size=12))  # imbalanced test set
    scores = rng.normal(size=(len(labels), 12)) + 1.5 * np.eye(12)[labels]
    predicted, rank = true_class_rank(scores, np.arange(12), labels)
    assert metric_value("top1", rank, labels) == pytest.approx(100 * np.mean(predicted == labels))
    assert metric_value("top5", rank, labels) == pytest.approx(100 * top_k_accuracy_score(labels, scores, k=5))
    assert metric_value("mean-per-class", rank, labels) == pytest.approx(
        100 * balanced_accuracy_score(labels, predicted))
    assert metric_value("mean-per-class", rank, labels) != pytest.approx(metric_value("top1", rank, labels))


def test_parse_metrics_names_the_known_ones():
    assert parse_metrics("top1, top5,top1") == ["top1", "top5"]
    with pytest.raises(BadInputError, match="--metric 'top3': expected some of top1, top5, mean-per-class"):
        parse_metrics("top1,top3")


def test_results_keep_predictions_through_save_and_load(tmp_path):
    train, test = pair(classes=4, per_class=12, test_per_class=9, seed=3)
    results = lowshot.run_probe(train, test, shots=(1, 2), percents=(), seeds=2, classifiers=("logistic", "ncm"))
    path = tmp_path / "r.json"
    results.save(path)
    loaded = Results.load(path)
    assert loaded.predictions is not None and len(loaded.predictions.keys) == len(results.rows) == 8
    assert (loaded.predictions.labels == np.asarray(test.labels)).all()
    for row in loaded.rows:  # every row's numbers follow from its kept predictions
        predicted, rank = loaded.predictions.of(f"{row['classifier']}/{row['subset']}/{row['seed']}")
        assert row["top1"] == pytest.approx(100 * np.mean(predicted == loaded.predictions.labels), abs=1e-4)
        assert row["top5"] == pytest.approx(metric_value("top5", rank, test.labels), abs=1e-4)
        assert row["mean_per_class"] == pytest.approx(metric_value("mean-per-class", rank, test.labels), abs=1e-4)
    summary = results.summary[0]
    assert set(summary["metrics"]) == {"top5", "mean-per-class"}
    assert results.summary_of("top5")[0]["mean"] == summary["metrics"]["top5"]["mean"]


def test_a_file_without_predictions_still_loads_and_edited_rows_are_caught(tmp_path):
    train, test = pair(classes=3, per_class=6, test_per_class=4, seed=1)
    data = lowshot.run_probe(train, test, shots=(1,), percents=(), seeds=2).to_dict()
    old = {k: v for k, v in data.items() if k != "predictions"}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Results.load(tmp_path / "old.json").predictions is None
    data["rows"] = data["rows"][:1]
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="predictions do not match its rows"):
        Results.load(tmp_path / "edited.json")
    data["predictions"]["npz_base64"] = "not base64!"
    (tmp_path / "damaged.json").write_text(json.dumps(data))
    with pytest.raises(BadInputError, match="damaged predictions"):
        Results.load(tmp_path / "damaged.json")


def test_imagenet_sized_predictions_fit_the_budget():
    """50,000 test images x 12 rows (1/2/5-shot + 1% x 3 seeds), 1,000 classes, ~70% top-1 as MSN ViT-S/16 at 1%:
    the encoded field stays under 3 MB (raw it would be 50,000 x 12 x (2 + 1) bytes = 1.8 MB before base64)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1000), 50)  # ImageNet val: 50 per class, in class order like an ImageFolder
    right = rng.random((12, 50_000)) < 0.7
    predicted = np.where(right, labels, rng.integers(0, 1000, size=(12, 50_000)))
    rank = np.where(right, 0, np.minimum(rng.geometric(0.15, size=(12, 50_000)), RANK_CAP)).astype(np.uint8)
    keys = [f"logistic/{s}/{seed}" for s in ("1-shot", "2-shot", "5-shot", "1%") for seed in range(3)]
    field = Predictions(labels, predicted, rank, keys, "0" * 16).encode()
    size = len(json.dumps(field))
    assert size < 3_000_000, size
    back = Predictions.decode(json.loads(json.dumps(field)), "x")
    assert (back.predicted == predicted).all() and (back.rank == rank).all() and back.keys == keys
