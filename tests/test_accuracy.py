"""Accuracy sanity on real weights and real photos: the numbers must mean something."""

import numpy as np
import pytest

import lowshot

from .conftest import DEIT_TINY, make_image_folder


@pytest.mark.slow
def test_deit_tiny_five_shot_on_imagenette_is_far_above_chance(tmp_path):
    data = make_image_folder(tmp_path / "nette", classes=10, train=8, test=12)
    run = lowshot.extract_features(str(DEIT_TINY), str(data), cache_dir=tmp_path / "cache", device="cpu")
    results = lowshot.run_probe(run.train.features, run.test.features, shots=(1, 5), percents=(), seeds=2)
    summary = {s["subset"]: s["mean"] for s in results.summary}
    assert summary["5-shot"] > 80.0  # chance is 10%; DeiT-Tiny features separate Imagenette classes easily
    assert summary["1-shot"] > 50.0
    assert summary["5-shot"] >= summary["1-shot"] - 2.0

    sk = lowshot.run_probe(run.train.features, run.test.features, shots=(5,), percents=(), seeds=2,
                           backend="sklearn")
    ours = [r["top1"] for r in results.rows if r["subset"] == "5-shot"]
    assert np.allclose(ours, [r["top1"] for r in sk.rows], atol=1.0)  # both solvers: same optimum, same accuracy
