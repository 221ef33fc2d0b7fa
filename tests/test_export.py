"""`lowshot export` and the readout options at the CLI: features out in .npz/.parquet, --readout, one-line refusals
that leave no cache entry behind, one cache key per resolved readout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.features.export import load_export
from lowshot.features.store import FeatureCache

from . import zoo

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def cache_is_empty(cache_dir) -> bool:
    """No finished entry and no partial (shard) folder: nothing a failed run could leave behind."""
    cache = FeatureCache(cache_dir)
    partial = cache.root / "partial"
    return not cache.manifests() and not (partial.is_dir() and any(partial.iterdir()))


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_export_writes_the_cached_features_ids_labels_and_classes(tiny_model, image_data, cache_dir, tmp_path,
                                                                   suffix):
    out = tmp_path / f"feats{suffix}"
    result = invoke("export", "--model", tiny_model, "--data", image_data, "--split", "val", "--output", out,
                    "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "9 x 32 float32 features" in result.output
    got = load_export(out)
    cached = lowshot.load_features(str(tiny_model), str(image_data), cache_dir=cache_dir, train_split="val",
                                   test_split="val", dtype="float32", device="cpu")[1]
    np.testing.assert_array_equal(got["features"], np.asarray(cached.features))
    assert got["features"].dtype == np.float32 and got["ids"] == cached.ids
    assert [got["classes"][i] for i in got["labels"]] == [cached.classes[i] for i in cached.labels]
    assert got["meta"]["split"] == "val" and got["meta"]["readout"]["name"] == "cls-prenorm"
    again = invoke("export", "--model", tiny_model, "--data", image_data, "--split", "val", "--output", out,
                   "--device", "cpu", "--dtype", "float32")
    assert "from the cache" in again.output


def test_an_export_is_not_recorded_as_a_run_probe_would_use(tiny_model, image_data, cache_dir, tmp_path):
    invoke("export", "--model", tiny_model, "--data", image_data, "--split", "val", "--output", tmp_path / "f.npz",
           "--device", "cpu")
    assert FeatureCache(cache_dir).runs() == []  # probe must never pick val-on-val as "the latest extraction"


def test_export_refuses_an_unknown_format_in_one_line(tiny_model, image_data, cache_dir, tmp_path):
    result = invoke("export", "--model", tiny_model, "--data", image_data, "--output", tmp_path / "f.csv")
    assert result.exit_code == 2 and "unknown extension '.csv'; use one of .npz, .parquet" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_readout_the_model_lacks_is_one_line_and_leaves_no_cache_entry(image_data, cache_dir, tmp_path):
    swin = zoo.save("swin", tmp_path)
    result = invoke("extract", "--model", swin, "--data", image_data, "--device", "cpu", "--readout", "cls-prenorm")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --readout cls-prenorm: Swin has no CLS token; this model offers avgpool, pooled"]
    assert cache_is_empty(cache_dir)


def test_weights_that_do_not_load_are_one_line_and_leave_no_cache_entry(image_data, cache_dir, tmp_path):
    vit = zoo.save("vit", tmp_path)
    (vit / "model.safetensors").write_bytes(b"damaged")
    result = invoke("extract", "--model", vit, "--data", image_data, "--device", "cpu")
    assert result.exit_code == 1 and "cannot load weights" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert cache_is_empty(cache_dir)


def test_a_forward_that_fails_is_caught_on_load_before_any_cache_entry(image_data, cache_dir, tmp_path,
                                                                        monkeypatch):
    from lowshot.models import readouts

    def broken(*args, **kwargs):
        raise RuntimeError("shapes do not match\nmore traceback text")

    monkeypatch.setattr(readouts, "run_readout", broken)
    result = invoke("extract", "--model", zoo.save("beit", tmp_path), "--data", image_data, "--device", "cpu")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --model " + str(tmp_path / "beit") + ": a 224-px image does not go through BeitModel with readout "
        "cls-prenorm (RuntimeError: shapes do not match)"]
    assert cache_is_empty(cache_dir)


def test_a_text_model_folder_is_refused_in_one_line(image_data, cache_dir, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    result = invoke("extract", "--model", tmp_path / "bert", "--data", image_data)
    assert result.exit_code == 1 and "BertConfig is not a vision model" in result.output
    assert cache_is_empty(cache_dir)


def test_a_readout_equal_to_another_is_said_at_extract_and_at_probe(image_data, cache_dir, tmp_path):
    beit = zoo.save("beit", tmp_path)
    a = invoke("extract", "--model", beit, "--data", image_data, "--device", "cpu", "--readout", "cls-postnorm")
    assert a.exit_code == 0, a.output
    assert "note: readout cls-postnorm equals cls-prenorm (with mean pooling BEiT has no final norm" in a.output
    b = invoke("extract", "--model", beit, "--data", image_data, "--device", "cpu", "--readout", "cls-postnorm")
    assert "cache hit" in b.output
    probed = invoke("probe", "--shots", "1", "--percent", "0", "--seeds", "1")  # the note follows the features
    assert probed.exit_code == 0 and "note: readout cls-postnorm equals cls-prenorm" in probed.output


def test_every_readout_and_input_size_has_its_own_cache_key(tiny_model, image_data, cache_dir, tmp_path):
    """The key holds the whole resolved readout: two readouts, or one readout at another input size, never share
    features, and the same request always finds the same key."""
    from lowshot.config import ExtractSettings
    from lowshot.features.extract import plan_extraction

    cache = FeatureCache(cache_dir)
    clip = str(zoo.save("clip-vision", tmp_path))
    keys = {}
    for model, readout, transform in ((str(tiny_model), "cls-prenorm", "msn"), (str(tiny_model), "cls-postnorm", "msn"),
                                      (str(tiny_model), "avgpool", "msn"), (clip, "cls-prenorm", "msn"),
                                      (clip, "cls-postnorm", "msn"), (clip, "cls-prenorm", "processor")):
        settings = ExtractSettings(readout=readout, transform=transform, device="cpu", dtype="float32")
        plan = plan_extraction(model, str(image_data), settings, cache=cache)
        again = plan_extraction(model, str(image_data), settings, cache=cache)
        assert plan.keys == again.keys
        keys[(model, readout, transform)] = plan.keys[plan.dataset.train.name]
    assert len(set(keys.values())) == len(keys)


def test_a_model_folder_with_its_own_code_is_refused_without_running_it(image_data, cache_dir, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom-vit", "hidden_size": 32,
                                                    "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}))
    marker = tmp_path / "code-ran"
    (folder / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (folder / "model.safetensors").write_bytes(b"")
    result = invoke("extract", "--model", folder, "--data", image_data, "--device", "cpu")
    assert result.exit_code == 1 and "never runs code from a model folder" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not marker.exists() and cache_is_empty(cache_dir)


def test_probe_picks_the_features_of_the_readout_it_is_given(tiny_model, image_data, cache_dir):
    assert invoke("extract", "--model", tiny_model, "--data", image_data, "--device", "cpu", "--dtype", "float32",
                  "--readout", "avgpool").exit_code == 0
    found = invoke("probe", "--model", tiny_model, "--data", image_data, "--device", "cpu", "--dtype", "float32",
                   "--readout", "avgpool", "--shots", "1", "--percent", "0", "--seeds", "1", "--format", "json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["meta"]["readout"]["name"] == "avgpool"
    default = invoke("probe", "--model", tiny_model, "--data", image_data, "--device", "cpu", "--dtype", "float32",
                     "--shots", "1", "--percent", "0", "--seeds", "1", "--format", "json")
    assert json.loads(default.stdout)["meta"]["readout"]["name"] == "cls-prenorm"  # not the avgpool entry


def test_an_export_records_the_model_and_data_by_absolute_path_when_given_relative_ones(tiny_model, image_data,
                                                                                       cache_dir, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.chdir(tiny_model.parent.parent)
    model = tiny_model.relative_to(tiny_model.parent.parent)
    out = tmp_path / "feats.npz"
    result = invoke("export", "--model", model, "--data", image_data, "--split", "val", "--output", out,
                    "--device", "cpu", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    meta = load_export(out)["meta"]
    assert meta["model"] == str(tiny_model.resolve()) and meta["data"] == str(image_data.resolve())
