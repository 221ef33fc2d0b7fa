"""Reliability: odd images, killed runs, concurrent runs, damaged or incompatible cache entries, full disks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.errors import CacheError, DataError
from lowshot.features import store as cache_module
from lowshot.features.store import CACHE_FORMAT, FeatureCache
from lowshot.models.backbones import Backbone

from .conftest import REPO, make_image_folder


def run(model, data, cache_dir, **kw):
    """Whole splits (``--all``): these tests are about reading, caching and resuming, not about which images."""
    kw.setdefault("all_images", True)
    return lowshot.extract_features(str(model), str(data), cache_dir=cache_dir, device="cpu", batch_size=4, **kw)


def worker(model, data, cache_dir, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.extract_worker", str(model), str(data), str(cache_dir),
                             *map(str, extra)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """Real photos turned into every awkward-but-valid format, plus junk that must be skipped."""
    root = make_image_folder(tmp_path_factory.mktemp("odd") / "d", classes=2, train=3, test=2)
    cls = sorted((root / "train").iterdir())[0]
    photo = Image.open(sorted(cls.glob("*.JPEG"))[0]).convert("RGB").resize((300, 200))
    photo.convert("CMYK").save(cls / "cmyk.jpg")
    photo.convert("L").save(cls / "grey.png")
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(cls / "sixteen.png")
    photo.convert("P", palette=Image.Palette.ADAPTIVE).save(cls / "palette.png", transparency=0)
    photo.convert("LA").save(cls / "la.png")
    photo.convert("RGBA").save(cls / "rgba.png")
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(cls / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 8
    photo.save(cls / "rotated.jpg", exif=exif)
    photo.save(cls / "photo.webp")
    photo.save(cls / "photo.bmp")
    return root


def test_odd_but_valid_images_are_all_read(tiny_model, odd_data, cache_dir):
    result = run(tiny_model, odd_data, cache_dir)
    assert result.train.skipped == {}
    ids = set(result.train.features.ids)
    for name in ("cmyk.jpg", "grey.png", "sixteen.png", "palette.png", "la.png", "rgba.png", "anim.gif",
                 "rotated.jpg", "photo.webp", "photo.bmp"):
        assert any(i.endswith(name) for i in ids), name
    assert np.isfinite(result.train.features.features).all()


def test_images_over_the_pixel_limit_are_refused_with_a_clear_reason(tiny_model, image_data, cache_dir, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(image_data, data)
    cls = sorted((data / "train").iterdir())[0]
    Image.new("RGB", (2000, 1500), (10, 20, 30)).save(cls / "huge.png")
    result = run(tiny_model, data, cache_dir, max_pixels=1_000_000)
    reason = result.train.skipped[f"{cls.name}/huge.png"]
    assert "3,000,000 pixels" in reason and "--max-pixels" in reason
    assert not run(tiny_model, data, tmp_path / "c2", max_pixels=10_000_000).train.skipped
    with pytest.raises(DataError, match="decompression-bomb"):
        run(tiny_model, data, tmp_path / "c3", max_pixels=1_000_000, strict=True)


@pytest.mark.slow
def test_kill_9_mid_extraction_then_rerun_resumes_and_matches_an_uninterrupted_run(tiny_model, tmp_path):
    data = make_image_folder(tmp_path / "d", classes=3, train=16, test=2)
    reference = tmp_path / "ref.npy"
    done = worker(tiny_model, data, tmp_path / "ref-cache", "--shard", 8, "--out", reference)
    assert done.wait(120) == 0, done.stderr.read()
    cache_dir = tmp_path / "cache"
    proc = worker(tiny_model, data, cache_dir, "--shard", 8, "--sleep", 0.2)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache_dir.glob("partial/*/shard-*.json"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    shards = sorted(cache_dir.glob("partial/*/shard-*.json"))
    assert 2 <= len(shards) < 6, "the worker must die mid-way through the 48 train images"
    assert not list(cache_dir.glob("entries/*/manifest.json")), "no finished entry from a killed run"
    resumed = worker(tiny_model, data, cache_dir, "--shard", 8, "--out", tmp_path / "resumed.npy")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    done, total = map(int, next(line for line in out.splitlines() if line.startswith("train")).split()[-1].split("/"))
    assert done >= 2 * 8 and total > done, "the rerun must start from the finished shards"
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.load(reference))
    assert FeatureCache(cache_dir).verify() == []


@pytest.mark.slow
def test_two_processes_extracting_into_one_cache_both_finish_with_one_entry(tiny_model, tmp_path):
    data = make_image_folder(tmp_path / "d", classes=3, train=8, test=2)
    cache_dir = tmp_path / "cache"
    procs = [worker(tiny_model, data, cache_dir, "--out", tmp_path / f"out{i}.npy") for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert sorted(o[0].strip().splitlines()[-1] for o in outs) == ["cached", "extracted"]  # one waited, then reused
    np.testing.assert_array_equal(np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy"))
    cache = FeatureCache(cache_dir)
    assert len(cache.manifests()) == 2 and cache.verify() == []


def test_an_entry_of_an_incompatible_format_is_rebuilt_not_misread(tiny_model, image_data, cache_dir):
    first = run(tiny_model, image_data, cache_dir)
    manifest_path = FeatureCache(cache_dir).entry_dir(first.train.features.key) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["cache_format"] = CACHE_FORMAT - 1
    manifest_path.write_text(json.dumps(manifest))
    cache = FeatureCache(cache_dir)
    assert cache.verify() == [] and [key for key, _ in cache.stale()] == [first.train.features.key]
    checked = CliRunner().invoke(app, ["cache", "verify", "--cache-dir", str(cache_dir)])
    assert checked.exit_code == 0 and "1 entry OK" in checked.stderr and "older format" in checked.stderr
    again = run(tiny_model, image_data, cache_dir)
    assert not again.train.cached and again.test.cached
    assert json.loads(manifest_path.read_text())["cache_format"] == CACHE_FORMAT
    versions = json.loads(manifest_path.read_text())["versions"]
    assert set(versions) == {"lowshot", "torch", "transformers", "pillow"}
    assert versions["pillow"] == PIL.__version__


def test_disk_full_is_a_clear_error_keeps_finished_shards_and_leaves_no_entry(tiny_model, image_data, cache_dir,
                                                                             monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_SIZE", 4)
    real_save = cache_module.save_npy_atomic
    calls = {"n": 0}

    def full_after_two(path, array):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(28, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(cache_module, "save_npy_atomic", full_after_two)
    with pytest.raises(CacheError, match="No space left on device.*finished shards are kept"):
        run(tiny_model, image_data, cache_dir)
    assert not [p for p in (cache_dir / "entries").iterdir()]
    assert len(list(cache_dir.glob("partial/*/shard-*.json"))) == 2
    monkeypatch.setattr(cache_module, "save_npy_atomic", real_save)
    assert len(run(tiny_model, image_data, cache_dir).train.features) == 18


def test_an_unwritable_cache_dir_is_a_clear_error(tiny_model, image_data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.raises(CacheError, match="not writable"):
        run(tiny_model, image_data, blocker / "cache")


def test_non_finite_features_are_an_error_not_a_silent_cache_entry(tiny_model, image_data, cache_dir, monkeypatch):
    import torch

    monkeypatch.setattr(Backbone, "embed", lambda self, pixels: torch.full((len(pixels), self.dim), float("nan")))
    with pytest.raises(DataError, match="non-finite features"):
        run(tiny_model, image_data, cache_dir)
    assert not list((cache_dir / "entries").iterdir())


@pytest.mark.slow
def test_same_numbers_across_processes_and_thread_counts(tiny_model, tmp_path):
    import torch

    data = make_image_folder(tmp_path / "d", classes=3, train=6, test=4)
    outs = []
    for i, threads in enumerate((1, 2)):
        proc = worker(tiny_model, data, tmp_path / f"cache{i}", "--threads", threads, "--out", tmp_path / f"{i}.npy")
        assert proc.wait(120) == 0, proc.stderr.read()
        outs.append(np.load(tmp_path / f"{i}.npy"))
    # torch's CPU kernels may split reductions differently per thread count: equal to float32 rounding, documented
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    train, test, _ = lowshot.load_features(cache_dir=tmp_path / "cache0")
    a = lowshot.run_probe(train, test, shots=(1, 2), percents=(), seeds=2)
    b = lowshot.run_probe(train, test, shots=(1, 2), percents=(), seeds=2)
    assert [r["top1"] for r in a.rows] == [r["top1"] for r in b.rows]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = lowshot.run_probe(train, test, shots=(1, 2), percents=(), seeds=2)
    finally:
        torch.set_num_threads(threads)
    assert [r["top1"] for r in a.rows] == [r["top1"] for r in c.rows]
