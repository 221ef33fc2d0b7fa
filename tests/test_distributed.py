"""torchrun on CPU (gloo): 2 processes give the single-process features; a killed rank resumes on rerun."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import lowshot
from lowshot.features.store import FeatureCache

from .conftest import REPO, make_image_folder


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LOWSHOT_SHARD_SIZE": "8",
            "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args, logs: Path, nproc: int = 2) -> subprocess.Popen:
    """``torchrun`` with its per-run log folder under ``logs`` (by default it leaves /tmp/torchelastic_* behind)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--log-dir", str(logs), *map(str, args)]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def single(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("dist") / "d", classes=3, train=12, test=4)


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """Single process, one thread (as each torchrun rank): the features to match bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "ref.npy"
    done = single("-m", "tests.extract_worker", tiny_model, data, out.parent / "cache", "--threads", 1, "--out", out)
    assert done.returncode == 0, done.stderr
    return np.load(out)


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_features(tiny_model, data, reference, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = torchrun("-m", "lowshot", "extract", "--model", tiny_model, "--data", data, "--cache-dir", cache_dir,
                    "--batch-size", 4, "--device", "cpu", logs=tmp_path / "logs")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    assert err.count("2 processes") == 1  # rank 0 alone reports
    cache = FeatureCache(cache_dir)
    run = cache.runs()[0]
    train = cache.load(run["train_key"])
    np.testing.assert_array_equal(np.asarray(train.features), reference)
    assert cache.verify() == [] and not list((cache_dir / "partial").iterdir())
    train, test, _ = lowshot.load_features(cache_dir=cache_dir)  # the probe stays single-process
    assert len(lowshot.run_probe(train, test, shots=(2,), percents=(), seeds=1).rows) == 1


@pytest.mark.slow
def test_a_killed_rank_then_a_rerun_completes_from_the_written_shards(tiny_model, data, reference, tmp_path):
    cache_dir, pids = tmp_path / "cache", tmp_path / "pids"
    proc = torchrun("-m", "tests.extract_worker", tiny_model, data, cache_dir, "--sleep", 0.5, "--pid-dir", pids,
                    logs=tmp_path / "logs")
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache_dir.glob("partial/*/shard-*.json"))) < 2:
        time.sleep(0.05)
    os.kill(int((pids / "rank1.pid").read_text()), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    written = len(list(cache_dir.glob("partial/*/shard-*.json")))
    assert written >= 2 and not list(cache_dir.glob("entries/*/manifest.json")), "the run must die part-way"
    rerun = torchrun("-m", "tests.extract_worker", tiny_model, data, cache_dir, "--out", tmp_path / "again.npy",
                     logs=tmp_path / "logs")
    out, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err
    done, total = map(int, next(line for line in out.splitlines() if line.startswith("train")).split()[-1].split("/"))
    assert done >= 2 * 8 and total > done, "the rerun must start from the shards already written"
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), reference)
