"""The feature store grows by image: extraction encodes the test split and only the train images the protocol
draws; a later request encodes only what is missing; the probe finds its rows in an entry that holds some of the
split; and the numbers are those of a whole-split (``--all``) run."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.config import ExtractSettings, ProbeSettings
from lowshot.data import datasets
from lowshot.data.subsets import Listing, class_orders
from lowshot.errors import MissingFeaturesError, SettingError
from lowshot.features.store import FeatureCache
from lowshot.protocol import draw_subsets, needed_indices

from .conftest import make_image_folder

runner = CliRunner()
SMALL = ProbeSettings(shots=(1, 2), percents=(), seeds=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 10 train, 3 val real photos: enough that a 1- and 2-shot protocol leaves most train images out."""
    return make_image_folder(tmp_path_factory.mktemp("grow") / "d", classes=3, train=10, test=3)


def extract(model, data, cache_dir, **kw):
    return lowshot.extract_features(str(model), str(data), ExtractSettings(device="cpu", batch_size=4,
                                                                           dtype="float32"),
                                    cache_dir=cache_dir, **kw)


def listing_of(data) -> Listing:
    train = datasets.open_dataset(data).train
    return Listing(train.ids, train.labels, train.classes)


def test_extract_encodes_the_test_split_and_only_the_train_images_the_protocol_draws(tiny_model, data, cache_dir,
                                                                                      decoded):
    run = extract(tiny_model, data, cache_dir, subsets=SMALL)
    needed = needed_indices(SMALL, listing_of(data))
    assert len(needed) < 30  # the protocol leaves train images out, so this test can fail
    assert sorted(i for name, i in decoded if name == "train") == needed.tolist()
    assert sorted(i for name, i in decoded if name == "val") == list(range(9))
    train = run.train.features
    assert train.rows.tolist() == needed.tolist() and len(train.listing()) == 30 and not train.complete
    assert run.test.features.complete and run.train.images == len(needed)
    assert train.ids == [listing_of(data).ids[i] for i in needed]


def test_a_request_for_more_encodes_only_the_missing_images_never_one_twice(tiny_model, data, cache_dir, decoded):
    extract(tiny_model, data, cache_dir, subsets=SMALL)
    first = {i for name, i in decoded if name == "train"}
    decoded.clear()
    more = ProbeSettings(shots=(1, 2, 5), percents=(), seeds=3)
    run = extract(tiny_model, data, cache_dir, subsets=more)
    second = [i for name, i in decoded if name == "train"]
    assert not first & set(second) and len(second) == len(set(second))  # nothing encoded twice
    assert first | set(second) == set(needed_indices(more, listing_of(data)).tolist())
    assert not [name for name, _ in decoded if name == "val"] and run.test.cached
    decoded.clear()
    everything = extract(tiny_model, data, cache_dir, all_images=True)
    third = [i for name, i in decoded if name == "train"]
    assert sorted(first | set(second) | set(third)) == list(range(30)) and len(third) == 30 - len(first | set(second))
    assert everything.train.features.complete and len(everything.train.features) == 30
    decoded.clear()
    again = extract(tiny_model, data, cache_dir, all_images=True)
    assert again.train.cached and again.test.cached and not decoded
    assert FeatureCache(cache_dir).verify() == []
    assert len(FeatureCache(cache_dir).manifests()) == 2  # one entry per split, grown in place


def test_features_do_not_depend_on_batch_mates_and_top1_matches_an_all_run(tiny_model, data, tmp_path):
    part = extract(tiny_model, data, tmp_path / "part")  # the default protocol
    whole = extract(tiny_model, data, tmp_path / "whole", all_images=True)
    p, w = part.train.features, whole.train.features
    assert 0 < len(p) < len(w)
    # encoded in other batches (other neighbours, other batch sizes): equal to float32 rounding
    np.testing.assert_allclose(np.asarray(p.features), np.asarray(w.features)[p.rows], rtol=1e-5, atol=1e-6)
    a = lowshot.run_probe(p, part.test.features)
    b = lowshot.run_probe(w, whole.test.features)
    assert [(r["subset"], r["seed"], r["top1"]) for r in a.rows] == [(r["subset"], r["seed"], r["top1"])
                                                                     for r in b.rows]
    for key in ("n_train_pool", "train_fingerprint", "test_fingerprint"):
        assert a.meta[key] == b.meta[key], key


def test_an_unreadable_drawn_image_is_passed_over_as_in_an_all_run(tiny_model, data, tmp_path):
    broken = tmp_path / "d"
    shutil.copytree(data, broken)
    listing = listing_of(broken)
    first = class_orders(listing.ids, listing.labels, listing.classes, seed=0)[0][0]  # class 0's 1-shot image
    (broken / "train" / listing.ids[first]).write_bytes(b"not a jpeg")
    part = extract(tiny_model, broken, tmp_path / "part", subsets=SMALL)
    whole = extract(tiny_model, broken, tmp_path / "whole", subsets=SMALL, all_images=True)
    assert listing.ids[first] in part.train.skipped and listing.ids[first] in whole.train.skipped
    a, b = (lowshot.run_probe(r.train.features, r.test.features, SMALL) for r in (part, whole))
    assert [r["top1"] for r in a.rows] == [r["top1"] for r in b.rows]
    assert all(r["n_train"] == 3 * r["shots"] for r in a.rows)  # the next image of the class took its place
    subsets = draw_subsets(part.train.features, SMALL)
    assert first not in np.concatenate([s.indices for s in subsets])


def test_the_probe_says_which_features_are_missing_before_fitting(tiny_model, data, cache_dir):
    run = extract(tiny_model, data, cache_dir, subsets=SMALL)
    with pytest.raises(MissingFeaturesError, match=r"features of \d+ of the \d+ train images"):
        lowshot.run_probe(run.train.features, run.test.features, shots=(5,), percents=(), seeds=3)


def test_probe_with_model_and_data_encodes_what_is_missing_then_probes(tiny_model, data, cache_dir):
    common = ["--model", str(tiny_model), "--data", str(data), "--device", "cpu", "--dtype", "float32"]
    first = runner.invoke(app, ["probe", *common, "--shots", "1,2", "--percent", "0", "--seeds", "2",
                                "--format", "json"])
    assert first.exit_code == 0, first.output
    assert "extracted" in first.stderr and "of 30 images" in first.stderr
    assert json.loads(first.stdout)["meta"]["settings"]["extract"]["dtype"] == "float32"
    missing = runner.invoke(app, ["probe", "--shots", "5", "--percent", "0", "--seeds", "3"])
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    assert f"encode them with: lowshot probe --model {tiny_model} --data {data}" in missing.output
    assert "--dtype float32 --shots 5 --percent 0 --seeds 3" in missing.output
    more = runner.invoke(app, ["probe", *common, "--shots", "5", "--percent", "0", "--seeds", "3"])
    assert more.exit_code == 0, more.output
    assert "val: 9 x 32 features" in more.stderr or "val" not in more.stderr  # the test split was not re-encoded
    listing = runner.invoke(app, ["cache", "list", "--wide"])
    held = len(needed_indices(ProbeSettings(shots=(1, 2, 5), percents=(), seeds=3), listing_of(data)))
    assert f"{held} of 30" in listing.stdout.replace(",", "") and "9 of 9" in listing.stdout


def test_probe_with_model_and_data_forwards_the_extraction_options(tiny_model, data, cache_dir):
    common = ["probe", "--model", str(tiny_model), "--data", str(data), "--device", "cpu", "--dtype", "float32",
              "--shots", "1", "--percent", "0", "--seeds", "1"]
    ran = runner.invoke(app, [*common, "--engine", "stock", "--train-split", "train", "--test-split", "val",
                              "--format", "json"])
    assert ran.exit_code == 0, ran.output
    recorded = json.loads(ran.stdout)["meta"]["settings"]["extract"]
    assert (recorded["engine"], recorded["train_split"], recorded["test_split"]) == ("stock", "train", "val")
    wrong = runner.invoke(app, [*common, "--test-split", "nonesuch"])
    assert wrong.exit_code != 0 and "nonesuch" in wrong.output and "Traceback" not in wrong.output


def test_extract_takes_the_probe_protocol_options_and_all(tiny_model, data, cache_dir):
    base = ["extract", "--model", str(tiny_model), "--data", str(data), "--device", "cpu", "--dtype", "float32"]
    some = runner.invoke(app, [*base, "--shots", "1", "--percent", "0", "--seeds", "1"])
    assert some.exit_code == 0, some.output
    assert "3 of 30 images" in some.stderr
    everything = runner.invoke(app, [*base, "--all"])
    assert everything.exit_code == 0 and "extracted 27 images" in everything.stderr
    bad = runner.invoke(app, [*base, "--shots", "0"])
    assert bad.exit_code == 2 and "--shots 0" in bad.output


def test_split_file_alone_draws_no_random_subsets(tiny_model, data, cache_dir, tmp_path):
    run = extract(tiny_model, data, cache_dir, all_images=True)
    listing = tmp_path / "two_per_class.txt"
    by_class: dict[str, list[str]] = {}
    for i in run.train.features.ids:
        by_class.setdefault(i.split("/")[0], []).append(i.split("/")[1])  # bare file names: no class prefix
    listing.write_text("\n".join(n for names in by_class.values() for n in names[:2]) + "\n")
    results = lowshot.run_probe(run.train.features, run.test.features, split_files=[listing])
    assert [(r["subset"], r["seed"], r["shots"]) for r in results.rows] == [("2-shot", 0, 2)]
    cli = runner.invoke(app, ["probe", "--split-file", str(listing), "--format", "json"])
    assert cli.exit_code == 0, cli.output
    assert [r["subset"] for r in json.loads(cli.stdout)["rows"]] == ["2-shot"]
    both = runner.invoke(app, ["probe", "--split-file", str(listing), "--shots", "1", "--percent", "0",
                               "--seeds", "1", "--format", "json"])
    assert [r["subset"] for r in json.loads(both.stdout)["rows"]] == ["1-shot", "2-shot"]


def test_lambda_auto_runs_cv_inside_each_subset_through_the_protocol_runner(tiny_model, data, cache_dir):
    from lowshot.classify.base import preprocess
    from lowshot.classify.logistic import LAMBDA_GRID, select_lambda
    from lowshot.config import DEFAULT_LAMBDA

    run = extract(tiny_model, data, cache_dir, all_images=True)
    train, test = run.train.features, run.test.features
    settings = ProbeSettings(shots=(1, 5), percents=(), seeds=1, lam="auto")
    results = lowshot.run_probe(train, test, settings)
    one, five = results.rows
    assert (one["lambda"], one["lambda_source"]) == (DEFAULT_LAMBDA, "default (CV needs 2+ images per class)")
    assert five["lambda_source"] == "cv" and five["lambda"] in LAMBDA_GRID
    subset = draw_subsets(train, settings)[1]
    x = preprocess(np.asarray(train.features[subset.indices]))
    assert five["lambda"] == select_lambda(x, train.labels[subset.indices], seed=0).lam
    assert results.meta["probe"]["lambda_grid"] and results.meta["settings"]["probe"]["lam"] == "auto"


def test_settings_are_validated_once_and_name_the_parameter():
    for bad, param in (({"shots": (0,)}, "shots"), ({"percents": (150,)}, "percents"), ({"seeds": 0}, "seeds"),
                       ({"lam": -1}, "lam"), ({"classifiers": ("svm",)}, "classifiers"),
                       ({"shots": (), "percents": ()}, "shots")):
        with pytest.raises(SettingError) as info:
            ProbeSettings(**bad)
        assert info.value.param == param
    for bad, param in (({"batch_size": 0}, "batch_size"), ({"dtype": "int3"}, "dtype"), ({"engine": "x"}, "engine"),
                       ({"transform": "y"}, "transform"), ({"device": "tpu"}, "device")):
        with pytest.raises(SettingError) as info:
            ExtractSettings(**bad)
        assert info.value.param == param
    assert ProbeSettings(shots=(5, 1, 1)).shots == (1, 5) and ProbeSettings(percents=(1,)).percents == (1.0,)
    assert ProbeSettings(split_files=("a.txt",)).shots == () and ProbeSettings().shots == (1, 2, 5)


def test_the_needed_images_are_a_plain_function_of_settings_and_listing():
    ids = [f"c{c}/{i:03d}.jpg" for c in range(4) for i in range(50)]
    listing = Listing(ids, np.repeat(np.arange(4), 50), ["a", "b", "c", "d"])
    settings = ProbeSettings(shots=(1, 2, 5), percents=(10,), seeds=3)
    needed = needed_indices(settings, listing)
    assert needed.tolist() == needed_indices(settings, listing).tolist()
    per_seed = [set(needed_indices(ProbeSettings(shots=(1, 2, 5), percents=(10,), seeds=1), listing).tolist())]
    assert per_seed[0] <= set(needed.tolist()) and len(needed) <= 3 * 4 * 5
    skip = Listing(ids, listing.labels, listing.classes, frozenset(needed[:1].tolist()))
    assert needed[0] not in needed_indices(settings, skip)


def test_listing_memo_reuses_unchanged_folders_and_sees_added_files(data, tmp_path, monkeypatch):
    root = tmp_path / "d"
    shutil.copytree(data, root)
    memo = tmp_path / "memo"
    plain = datasets.image_folder(root / "train", name="train")
    first = datasets.image_folder(root / "train", name="train", listing_cache=memo)
    assert (first.ids, first.identity) == (plain.ids, plain.identity)
    monkeypatch.setattr(datasets, "RACY_SECONDS", 0.0)
    scanned = []
    real = datasets.os.scandir
    monkeypatch.setattr(datasets.os, "scandir", lambda p: scanned.append(p) or real(p))
    again = datasets.image_folder(root / "train", name="train", listing_cache=memo)
    assert (again.ids, again.identity) == (plain.ids, plain.identity)
    assert scanned == [root / "train"]  # the class folders were not listed again
    cls = root / "train" / plain.classes[0]
    shutil.copy2(next(cls.iterdir()), cls / "added.JPEG")
    changed = datasets.image_folder(root / "train", name="train", listing_cache=memo)
    assert f"{plain.classes[0]}/added.JPEG" in changed.ids and changed.identity != plain.identity


def test_a_half_done_entry_swap_is_undone_not_lost(tiny_model, data, cache_dir):
    run = extract(tiny_model, data, cache_dir, subsets=SMALL)
    cache = FeatureCache(cache_dir)
    key = run.train.features.key
    entry = cache.entry_dir(key)
    entry.rename(entry.parent / f".{key}.old-1-2")  # killed between the two renames of a growth
    recovered = cache.load(key)
    assert recovered is not None and recovered.rows.tolist() == run.train.features.rows.tolist()
