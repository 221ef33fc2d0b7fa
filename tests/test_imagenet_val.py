"""ImageNet's validation set as distributed (one flat folder and a labels file: Kaggle's LOC_val_solution.csv, or the
devkit's ground truth and meta.mat) is read directly, and gives the listing of the equivalent ImageFolder val tree.

The fake ImageNet is cut from real Imagenette photos (real ImageNet wnids): 10 classes x 3 train images, 20 val
images renamed ILSVRC2012_val_00000001.JPEG … in a shuffled order, labelled by a file as ImageNet ships it."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.config import ExtractSettings, ProbeSettings
from lowshot.data import datasets
from lowshot.data.datasets import open_dataset
from lowshot.errors import DataError
from lowshot.protocol import draw_subsets

from .conftest import IMAGENETTE, SPLITS, require_shared

runner = CliRunner()
SPLIT_FILE = SPLITS / "imagenet_subsets1" / "1percent.txt"


def ilsvrc_ids(wnids: list[str]) -> dict[str, int]:
    """A devkit-like ILSVRC2012_ID for each wnid: 1..N, deliberately not in sorted-wnid order."""
    return {w: i + 1 for i, w in enumerate(reversed(wnids))}


def write_meta_mat(path, wnids: list[str]) -> None:
    """meta.mat as the devkit ships it: a struct array "synsets" (leaves: ILSVRC2012_ID 1..N; then an inner node)."""
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    ids = ilsvrc_ids(wnids)
    rows = [(ids[w], w, f"class {w}", "a gloss", 0, np.zeros(0), 0, 1300) for w in sorted(wnids, key=ids.get)]
    rows.append((len(wnids) + 1, "n00001740", "entity", "the root", len(wnids), np.arange(1, len(wnids) + 1), 18, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    savemat(path, {"synsets": synsets})


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """(root with train/ and flat val/, the equivalent tree with val/<wnid>/, file -> wnid of the val images)."""
    require_shared()
    root = tmp_path_factory.mktemp("imagenet") / "ILSVRC2012"
    tree = root.parent / "tree"
    wnids = sorted(p.name for p in (IMAGENETTE / "train").iterdir())[:10]
    listed = set(SPLIT_FILE.read_text().split())
    for wnid in wnids:  # train images the published split file names first, so that it matches some
        photos = sorted((IMAGENETTE / "train" / wnid).glob("*.JPEG"), key=lambda p: (p.name not in listed, p.name))
        for base in (root, tree):
            (base / "train" / wnid).mkdir(parents=True)
            for photo in photos[:3]:
                shutil.copy2(photo, base / "train" / wnid / photo.name)
    val = [(wnid, photo) for wnid in wnids for photo in sorted((IMAGENETTE / "val" / wnid).glob("*.JPEG"))[:2]]
    order = np.random.default_rng(0).permutation(len(val))
    (root / "val").mkdir()
    truth = {}
    for number, i in enumerate(order, 1):
        wnid, photo = val[i]
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        truth[name] = wnid
        shutil.copy2(photo, root / "val" / name)
        (tree / "val" / wnid).mkdir(parents=True, exist_ok=True)
        shutil.copy2(photo, tree / "val" / wnid / name)
    return root, tree, truth


def kaggle_csv(truth: dict[str, str], extra: int = 5) -> str:
    """LOC_val_solution.csv: rows in no particular order, boxes after the wnid, and rows for images not here."""
    rows = [f"{name.removesuffix('.JPEG')},{wnid} 10 20 110 120 {wnid} 5 5 50 50" for name, wnid in truth.items()]
    rows += [f"ILSVRC2012_val_{49000 + i:08d},n01440764 1 2 3 4" for i in range(extra)]
    return "ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n"


def devkit_truth(truth: dict[str, str], wnids: list[str]) -> str:
    ids = ilsvrc_ids(wnids)
    numbers = {int(name[15:23]): wnid for name, wnid in truth.items()}
    return "".join(f"{ids[numbers[n]]}\n" for n in range(1, max(numbers) + 1))


def same_listing(a, b) -> None:
    assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist() and a.classes == b.classes
    assert a.identity == b.identity  # the same cache key: a flat val reuses the tree's features


@pytest.fixture
def kaggle(imagenet, tmp_path):
    root, tree, truth = imagenet
    data = tmp_path / "kaggle"
    shutil.copytree(root, data, copy_function=shutil.copy2)
    (data / "LOC_val_solution.csv").write_text(kaggle_csv(truth))
    return data


def test_flat_val_with_kaggle_csv_gives_the_listing_of_the_imagefolder_tree(kaggle, imagenet):
    flat, folder = open_dataset(kaggle), open_dataset(imagenet[1])
    same_listing(flat.test, folder.test)
    same_listing(flat.train, folder.train)
    assert flat.test.ids[0].startswith(flat.test.classes[0] + "/ILSVRC2012_val_")
    with flat.test.open(5) as image:  # opens the flat file behind the tree-style id
        assert image.size[0] > 0
    assert not (kaggle / "val" / flat.test.ids[5]).exists()


def test_flat_val_with_devkit_ground_truth_and_meta_mat_gives_the_same_listing(imagenet, tmp_path):
    root, tree, truth = imagenet
    data = tmp_path / "devkit"
    shutil.copytree(root, data, copy_function=shutil.copy2)
    devkit = data / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    wnids = sorted(set(truth.values()))
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(devkit_truth(truth, wnids))
    write_meta_mat(devkit / "meta.mat", wnids)
    same_listing(open_dataset(data).test, open_dataset(tree).test)


def test_kaggle_layout_finds_the_csv_three_folders_above_the_data(imagenet, tmp_path):
    root, tree, truth = imagenet
    challenge = tmp_path / "imagenet-object-localization-challenge"
    data = challenge / "ILSVRC" / "Data" / "CLS-LOC"
    shutil.copytree(root, data, copy_function=shutil.copy2)
    (challenge / "LOC_val_solution.csv").write_text(kaggle_csv(truth))
    same_listing(open_dataset(data).test, open_dataset(tree).test)


def test_published_split_file_still_matches_train_images_by_file_name(kaggle):
    listing = open_dataset(kaggle).train
    subset = draw_subsets(lowshot.data.subsets.Listing(listing.ids, listing.labels, listing.classes),
                          ProbeSettings(split_files=(str(SPLIT_FILE),)))[0]
    names = set(SPLIT_FILE.read_text().split())
    here = [i for i, item in enumerate(listing.ids) if item.split("/")[-1] in names]
    assert len(here) > 0 and subset.indices.tolist() == here and subset.missing == len(names) - len(here)


@pytest.mark.parametrize("breakage, message", [
    ("no labels", "a flat folder of images needs a labels file (LOC_val_solution.csv from Kaggle, or the devkit's"),
    ("unlabelled image", "ILSVRC2012_val_00000021.JPEG: no label in"),
    ("unknown class", "is labelled n09999999, which is not a class of the train split"),
    ("bad header", "expected the header ImageId,PredictionString"),
    ("bad row", "line 3: expected 'ImageId,wnid x y x y …'"),
    ("devkit without meta.mat", "the devkit's ground truth needs its meta.mat beside it"),
    ("devkit bad id", "line 2: 'x' is not an ILSVRC2012_ID"),
])
def test_flat_val_problems_are_one_clear_line(kaggle, breakage, message, tiny_model, cache_dir):
    csv_path = kaggle / "LOC_val_solution.csv"
    gt = kaggle / "val" / "ILSVRC2012_validation_ground_truth.txt"
    text = csv_path.read_text()
    if breakage == "no labels":
        csv_path.unlink()
    elif breakage == "unlabelled image":
        shutil.copy2(next((kaggle / "val").iterdir()), kaggle / "val" / "ILSVRC2012_val_00000021.JPEG")
    elif breakage == "unknown class":
        lines = text.splitlines()  # the last row is an image of the folder (the extra rows come first)
        lines[-1] = lines[-1].split(",")[0] + ",n09999999 1 2 3 4"
        csv_path.write_text("\n".join(lines) + "\n")
    elif breakage == "bad header":
        csv_path.write_text("id,label\n" + text.split("\n", 1)[1])
    elif breakage == "bad row":
        lines = text.splitlines()
        csv_path.write_text("\n".join(lines[:2] + ["ILSVRC2012_val_00000002"] + lines[2:]) + "\n")
    else:
        csv_path.unlink()
        gt.write_text("1\n" + ("x\n" if breakage == "devkit bad id" else "1\n"))
        if breakage == "devkit bad id":
            write_meta_mat(gt.parent / "meta.mat", ["n01440764"])
    with pytest.raises(DataError) as caught:
        open_dataset(kaggle)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    result = runner.invoke(app, ["extract", "--model", str(tiny_model), "--data", str(kaggle), "--device", "cpu"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_extracting_the_flat_val_reuses_the_trees_cache_entries(kaggle, imagenet, tiny_model, cache_dir,
                                                                monkeypatch):
    settings = ExtractSettings(device="cpu", dtype="float32", batch_size=16)
    subsets = ProbeSettings(shots=(1,), percents=(), seeds=1)
    tree = lowshot.extract_features(str(tiny_model), str(imagenet[1]), settings, subsets=subsets)
    opened = []
    original = datasets.Split.open
    monkeypatch.setattr(datasets.Split, "open", lambda self, i: opened.append(i) or original(self, i))
    flat = lowshot.extract_features(str(tiny_model), str(kaggle), settings, subsets=subsets)
    assert opened == [] and flat.test.cached and flat.test.features.key == tree.test.features.key


def test_strict_names_a_flat_val_images_file_as_it_is_on_disk(kaggle, tiny_model, cache_dir):
    broken = sorted((kaggle / "val").glob("*.JPEG"))[0]
    broken.write_bytes(b"not a jpeg")
    result = runner.invoke(app, ["extract", "--model", str(tiny_model), "--data", str(kaggle), "--device", "cpu",
                                 "--strict", "--shots", "1", "--percent", "0", "--seeds", "1"])
    assert result.exit_code == 1 and "unreadable image" in result.output
    assert str(broken) in " ".join(result.output.split())  # val/ILSVRC2012_val_….JPEG, not <wnid>/<file>
