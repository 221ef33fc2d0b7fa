"""Golden numbers: the real DeiT-Tiny on a fixed real Imagenette subset, float32. A change anywhere in the protocol
(decode, resize, crop, normalisation, readout, sampling, preprocessing, λ, solver) that moves a feature or a top-1
fails here. Recorded with lowshot's float32 fast engine; the stock transformers forward agreed within 8.3e-6
(features of norm ~7.6) and gave the same top-1 in every cell. Any CPU: float32 kernels differ by ~1e-6 relative."""

import numpy as np
import pytest

import lowshot

from .conftest import DEIT_TINY, make_image_folder

# (subset, seed) -> top-1 % on the 300 test images (one image is 0.33 points, so ±0.1 means the same images right)
GOLDEN_TOP1 = {
    ("1-shot", 0): 95.0, ("2-shot", 0): 95.6667, ("5-shot", 0): 96.6667, ("15%", 0): 96.3333,
    ("1-shot", 1): 86.3333, ("2-shot", 1): 93.6667, ("5-shot", 1): 95.3333, ("15%", 1): 96.0,
    ("1-shot", 2): 82.0, ("2-shot", 2): 94.6667, ("5-shot", 2): 97.3333, ("15%", 2): 95.0,
}
# The first six values of the pre-final-LayerNorm CLS feature of three train images, and the feature's L2 norm.
GOLDEN_FEATURES = {
    "n01440764/ILSVRC2012_val_00000293.JPEG": ([-0.058982, -0.415659, -0.890415, -0.961467, -0.16945, 0.409813],
                                               7.571208),
    "n02979186/ILSVRC2012_val_00025484.JPEG": ([-0.818041, -0.020692, -0.224464, -1.040931, -0.495888, 0.11964],
                                               7.975034),
    "n03888257/ILSVRC2012_val_00020003.JPEG": ([0.11884, 0.554646, -0.766136, 0.511418, -0.493722, -0.315511],
                                               7.866924),
}


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory):
    """10 classes x (20 train, 30 val) real photos: the first files by name of each class."""
    root = tmp_path_factory.mktemp("golden")
    data = make_image_folder(root / "nette", classes=10, train=20, test=30)
    return lowshot.extract_features(str(DEIT_TINY), str(data), cache_dir=root / "cache", device="cpu",
                                    dtype="float32", all_images=True)  # every train image: features are pinned


@pytest.mark.slow
def test_deit_tiny_features_of_real_photos_are_pinned(golden_run):
    train = golden_run.train.features
    assert (len(train), train.dim, golden_run.settings["transform"]["name"]) == (200, 192, "msn")
    for image_id, (head, norm) in GOLDEN_FEATURES.items():
        feature = np.asarray(train.features[train.ids.index(image_id)], dtype=np.float64)
        np.testing.assert_allclose(feature[:6], head, rtol=0, atol=1e-5 * norm)
        assert np.linalg.norm(feature) == pytest.approx(norm, rel=1e-5)


@pytest.mark.slow
def test_deit_tiny_top1_per_subset_and_seed_is_pinned(golden_run):
    results = lowshot.run_probe(golden_run.train.features, golden_run.test.features, shots=(1, 2, 5),
                                percents=(15,), seeds=3)
    got = {(r["subset"], r["seed"]): r["top1"] for r in results.rows}
    assert set(got) == set(GOLDEN_TOP1)
    for cell, expected in GOLDEN_TOP1.items():
        assert got[cell] == pytest.approx(expected, abs=0.1), cell
