"""Shared fixtures: small random ViTMSN models, small real-image datasets cut from ../shared/data, temp caches."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # the hub is unreachable here; every load must work from local files
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite must not depend on the CPU it runs on: unless the caller forces the detection (the second CI pass runs
# LOWSHOT_CPU_FLAGS="avx512_bf16 amx_bf16"), `--dtype auto` sees a CPU without native bfloat16, on every machine.
os.environ.setdefault("LOWSHOT_CPU_FLAGS", "")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IMAGENETTE = SHARED / "datasets" / "imagenette2-224"
DEIT_TINY = SHARED / "models" / "deit-tiny-patch16-224"
SPLITS = SHARED / "splits"


def require_shared() -> None:
    if not IMAGENETTE.is_dir():
        pytest.fail(f"{IMAGENETTE} is missing: tests need ../shared beside the repo")


def make_image_folder(root: Path, *, classes: int = 3, train: int = 6, test: int = 3, offset: int = 0) -> Path:
    """Copy real Imagenette JPEGs into root/{train,val}/<wnid>/ (the first files by name of each class)."""
    require_shared()
    wnids = sorted(p.name for p in (IMAGENETTE / "train").iterdir())[:classes]
    for split, n in (("train", train), ("val", test)):
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for f in sorted((IMAGENETTE / split / wnid).glob("*.JPEG"))[offset:offset + n]:
                shutil.copy2(f, root / split / wnid / f.name)
    return root


def save_random_msn(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2, image_size: int = 224,
                    patch_size: int = 16) -> Path:
    import torch
    from transformers import ViTMSNConfig, ViTMSNModel

    torch.manual_seed(seed)
    config = ViTMSNConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=2 * hidden, image_size=image_size, patch_size=patch_size)
    ViTMSNModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A small random ViTMSN (2 layers, 32 wide) saved as config.json + safetensors."""
    return save_random_msn(tmp_path_factory.mktemp("models") / "tiny-msn")


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> Path:
    """3 classes x (6 train, 3 val) real Imagenette photos."""
    return make_image_folder(tmp_path_factory.mktemp("data") / "mini")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("LOWSHOT_CACHE_DIR", str(path))
    return path


@pytest.fixture
def decoded(monkeypatch):
    """(split name, listing index) of every image decoded from now on."""
    from lowshot.data import datasets

    seen: list[tuple[str, int]] = []
    original = datasets.Split.open
    monkeypatch.setattr(datasets.Split, "open", lambda self, i: seen.append((self.name, i)) or original(self, i))
    return seen


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on one torch thread: on a shared 2-core machine, threading their small GEMMs costs far more than
    it saves. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def imagenette_cache(tmp_path_factory) -> Path:
    """One feature cache for the session's full-Imagenette runs (the README quickstart, the docs, the committed
    benchmark against its baseline): DeiT-Tiny float32 features of the test split and the protocol's train images
    are encoded once and are cache hits for every later test that asks for the same settings. LOWSHOT_TEST_CACHE
    names a folder that outlives the session (CI's two passes share it; a contributor's loop keeps its features)."""
    require_shared()
    kept = os.environ.get("LOWSHOT_TEST_CACHE")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    return tmp_path_factory.mktemp("imagenette-cache")
