import os
import shutil

import numpy as np
import pytest

import lowshot
from lowshot.data import datasets
from lowshot.errors import CacheError, DataError
from lowshot.features import extract, store
from lowshot.features.store import FeatureCache


def run(model, data, cache_dir, **kw):
    """Whole splits (``--all``): these tests are about reading, caching and resuming, not about which images."""
    kw.setdefault("all_images", True)
    return lowshot.extract_features(str(model), str(data), cache_dir=cache_dir, device="cpu", batch_size=4, **kw)


def test_extract_stores_features_labels_and_ids(tiny_model, image_data, cache_dir):
    result = run(tiny_model, image_data, cache_dir)
    train, test = result.train.features, result.test.features
    assert (len(train), len(test), train.dim) == (18, 9, 32)
    assert train.classes == sorted(p.name for p in (image_data / "train").iterdir())
    assert train.ids[0].endswith(".JPEG") and "/" in train.ids[0]
    assert list(np.bincount(train.labels)) == [6, 6, 6]
    assert np.isfinite(train.features).all() and not result.train.cached


def test_rerun_is_a_cache_hit_that_decodes_no_image_and_loads_no_model(tiny_model, image_data, cache_dir,
                                                                        monkeypatch):
    first = run(tiny_model, image_data, cache_dir)

    def fail(*args, **kwargs):
        raise AssertionError("must not be called on a cache hit")

    monkeypatch.setattr(datasets.Split, "open", fail)
    monkeypatch.setattr(extract, "load_backbone", fail)
    second = run(tiny_model, image_data, cache_dir)
    assert second.train.cached and second.test.cached
    np.testing.assert_array_equal(first.train.features.features, second.train.features.features)


@pytest.mark.parametrize("change", [{"transform": "processor"}, {"readout": "cls-postnorm"}, {"dtype": "bfloat16"}])
def test_changing_transform_readout_or_dtype_misses_the_cache(tiny_model, image_data, cache_dir, change):
    base = run(tiny_model, image_data, cache_dir, dtype="float32")  # pinned: "auto" may mean bfloat16 here
    other = run(tiny_model, image_data, cache_dir, **change)
    assert not other.train.cached and other.train.features.key != base.train.features.key


def test_changing_the_data_misses_the_cache(tiny_model, image_data, cache_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    base = run(tiny_model, data, cache_dir)
    victim = sorted((data / "train").glob("*/*.JPEG"))[0]
    victim.unlink()
    other = run(tiny_model, data, cache_dir)
    assert not other.train.cached and len(other.train.features) == len(base.train.features) - 1
    assert other.test.cached  # the test split did not change


def test_unreadable_files_are_skipped_and_reported_and_strict_fails(tiny_model, image_data, cache_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    cls = sorted((data / "train").iterdir())[0]
    (cls / "empty.jpg").write_bytes(b"")
    (cls / "text.jpg").write_text("not an image")
    good = sorted(cls.glob("*.JPEG"))[0]
    (cls / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    (cls / ".hidden.jpg").write_bytes(good.read_bytes())
    (cls / "notes.txt").write_text("ignored by extension")
    result = run(tiny_model, data, cache_dir)
    skipped = result.train.skipped
    assert set(skipped) == {f"{cls.name}/empty.jpg", f"{cls.name}/text.jpg", f"{cls.name}/truncated.jpg"}
    assert len(result.train.features) == 18
    assert not any("empty" in i or "text.jpg" in i for i in result.train.features.ids)
    assert result.train.features.manifest["skipped"] == skipped
    with pytest.raises(DataError, match="unreadable image"):
        run(tiny_model, data, tmp_path / "cache2", strict=True)


def test_interrupted_extraction_resumes_from_finished_shards_bit_identically(tiny_model, image_data, cache_dir,
                                                                             monkeypatch, tmp_path):
    monkeypatch.setattr(store, "SHARD_SIZE", 4)  # shards of one 4-image batch
    reference = run(tiny_model, image_data, tmp_path / "ref").train.features.features.copy()
    def stop_after_two_shards(task, done, total):
        if done >= 12 and "train" in task:  # shards 0 and 1 are written, 2 is not
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_model, image_data, cache_dir, progress=stop_after_two_shards)
    key = next(iter((cache_dir / "partial").iterdir())).name
    assert len(list((cache_dir / "partial" / key).glob("shard-*.npy"))) == 2
    decoded = []
    original = datasets.Split.open
    monkeypatch.setattr(datasets.Split, "open", lambda self, i: decoded.append((self.name, i)) or original(self, i))
    resumed = run(tiny_model, image_data, cache_dir)
    assert min(i for name, i in decoded if name == "train") == 8  # the first two shards were not recomputed
    np.testing.assert_array_equal(resumed.train.features.features, reference)
    assert not (cache_dir / "partial" / key).exists()


def test_cache_list_rm_verify_and_damage_detection(tiny_model, image_data, cache_dir):
    result = run(tiny_model, image_data, cache_dir)
    cache = FeatureCache(cache_dir)
    assert {m["split"] for m in cache.manifests()} == {"train", "val"}
    assert cache.verify() == []
    path = cache.entry_dir(result.train.features.key) / "features.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [p for _, p in cache.verify()] == ["features.npy checksum mismatch"]
    assert cache.remove(result.train.features.key[:8]) == [result.train.features.key]
    assert cache.load(result.train.features.key) is None


def test_load_features_finds_the_latest_run_or_the_named_one(tiny_model, image_data, cache_dir):
    result = run(tiny_model, image_data, cache_dir)
    train, test, record = lowshot.load_features(cache_dir=cache_dir)
    assert train.key == result.train.features.key and record["model"] == str(tiny_model)
    train2, _, _ = lowshot.load_features(str(tiny_model), str(image_data), cache_dir=cache_dir, device="cpu")
    assert train2.key == train.key
    with pytest.raises(CacheError, match="no cached features"):
        lowshot.load_features(str(tiny_model), str(image_data), cache_dir=cache_dir, device="cpu",
                              readout="cls-postnorm")


def test_missing_empty_and_mismatched_data_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        datasets.open_dataset(tmp_path / "nope")
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    (tmp_path / "d" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        datasets.open_dataset(tmp_path / "d")
    with pytest.raises(DataError, match="no split 'test'; available: train, val"):
        datasets.open_dataset(tmp_path / "d", test_split="test")


def test_train_and_test_with_different_classes_is_an_error(image_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    first = sorted((data / "val").iterdir())[0]
    os.rename(first, first.with_name("n99999999"))
    with pytest.raises(DataError, match="classes differ"):
        datasets.open_dataset(data)


def test_hugging_face_save_to_disk_dataset_is_read_with_detected_columns(tiny_model, image_data, cache_dir,
                                                                         tmp_path):
    import datasets as hfds

    def split(name):
        files = sorted((image_data / name).glob("*/*.JPEG"))
        classes = sorted(p.name for p in (image_data / name).iterdir())
        return hfds.Dataset.from_dict(
            {"img": [str(f) for f in files], "fine_label": [classes.index(f.parent.name) for f in files]},
            features=hfds.Features({"img": hfds.Image(), "fine_label": hfds.ClassLabel(names=classes)}))

    path = tmp_path / "hf"
    hfds.DatasetDict({"train": split("train"), "test": split("val")}).save_to_disk(path)
    result = run(tiny_model, path, cache_dir)
    assert (len(result.train.features), len(result.test.features)) == (18, 9)
    assert result.test.split == "test"
    folder = run(tiny_model, image_data, cache_dir)  # same pixels from an image folder: same features
    np.testing.assert_allclose(result.train.features.features, folder.train.features.features, atol=1e-5)
    with pytest.raises(DataError, match="no label column"):
        datasets.open_dataset(path, label_column="nope")


@pytest.mark.parametrize("ahead", [0, 2])
def test_decoding_runs_at_most_ahead_chunks_in_front_of_the_model(monkeypatch, ahead):
    """On the CPU (ahead 0) a chunk is decoded on every worker and handed over before the next one starts: decode
    threads and the model's threads would otherwise fight over the same cores."""
    started: list[int] = []
    monkeypatch.setattr(extract, "_decode", lambda split, transform, i, max_pixels: started.append(i) or (i, None))
    chunks = [np.arange(k * 4, k * 4 + 4) for k in range(5)]
    for k, chunk in enumerate(extract.batched_decode(None, None, chunks, 2, 1, ahead=ahead)):
        assert [i for i, _ in chunk] == chunks[k].tolist()
        assert len(started) <= 4 * (k + 1 + ahead)  # never more than `ahead` chunks beyond the one handed over
        if ahead == 0:
            assert len(started) == 4 * (k + 1)
