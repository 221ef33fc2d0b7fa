"""Results record what produced them: the model and data of the call (absolute paths, or hub ids), the weights'
sha256, lowshot's version and git commit; never the names in a cache entry, which are those of whichever run wrote
it. And Ctrl-C during an extraction says how many images of each split the cache keeps."""

import hashlib
import json
import os
import shutil
import subprocess

import pytest
import torch
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.features import store
from lowshot.features.store import ShardStore

from .conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
PROTOCOL = ["--shots", "1,2", "--percent", "", "--seeds", "2"]


@pytest.fixture
def layout(tiny_model, image_data, tmp_path, monkeypatch):
    """tmp/a (the working folder of a CLI run), tmp/models/tiny and, elsewhere, a copy of the same weights."""
    (tmp_path / "a").mkdir()
    model = shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    copy = shutil.copytree(tiny_model, tmp_path / "elsewhere" / "tiny-copy")
    data = shutil.copytree(image_data, tmp_path / "data" / "mini")
    monkeypatch.chdir(tmp_path / "a")
    return model, copy, data


def test_library_results_record_the_model_of_this_call_not_the_cli_run_that_created_the_entry(layout, cache_dir):
    model, copy, data = layout
    cli = runner.invoke(app, ["extract", "--model", "../models/tiny", "--data", "../data/mini"])
    assert cli.exit_code == 0, cli.output
    run = lowshot.extract_features(str(copy), str(data), cache_dir=cache_dir)  # same weights elsewhere
    assert run.train.cached and run.test.cached  # the entry the CLI run wrote (content-keyed)
    results = lowshot.run_probe(run.train.features, run.test.features, shots=(1,), percents=(), seeds=1)
    assert results.meta["model"] == str(copy.resolve()) and results.meta["data"] == str(data.resolve())
    train, test, _ = lowshot.load_features(str(copy), str(data), cache_dir=cache_dir)
    assert lowshot.run_probe(train, test, shots=(1,), percents=(), seeds=1).meta["model"] == str(copy.resolve())


def test_probe_of_the_most_recent_extraction_records_absolute_paths(layout, cache_dir, tmp_path):
    model, _, data = layout
    assert runner.invoke(app, ["extract", "--model", "../models/tiny", "--data", "../data/mini"]).exit_code == 0
    probed = runner.invoke(app, ["probe", *PROTOCOL, "-o", str(tmp_path / "r.json")])
    assert probed.exit_code == 0, probed.output
    assert f"using the most recent extraction: {model.resolve()}" in probed.output
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert meta["model"] == str(model.resolve()) and meta["data"] == str(data.resolve())


def test_results_carry_the_weights_sha256_version_and_git_commit(layout, cache_dir, tmp_path):
    model, _, data = layout
    probed = runner.invoke(app, ["probe", "--model", "../models/tiny", "--data", "../data/mini", *PROTOCOL,
                                 "-o", str(tmp_path / "r.json")])
    assert probed.exit_code == 0, probed.output
    meta = json.loads((tmp_path / "r.json").read_text())["meta"]
    assert meta["model"] == str(model.resolve())
    weights = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    provenance = meta["provenance"]
    assert provenance["weights_sha256"] == {"model.safetensors": weights} and len(provenance["config_sha256"]) == 64
    assert provenance["model_source"] == "folder" and provenance["revision"] is None
    assert meta["lowshot_version"] == lowshot.__version__
    if (REPO / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert provenance["lowshot_commit"] == head.strip()


def test_the_git_commit_is_none_without_a_git_binary(monkeypatch):
    from lowshot.protocol import lowshot_commit

    lowshot_commit.cache_clear()
    monkeypatch.setenv("PATH", "")
    try:
        assert lowshot_commit() is None
    finally:
        lowshot_commit.cache_clear()


def test_ctrl_c_during_extraction_says_how_many_images_per_split_are_kept_and_a_rerun_resumes(layout, cache_dir,
                                                                                              monkeypatch):
    model, _, data = layout
    monkeypatch.setattr(store, "SHARD_SIZE", 4)
    write = ShardStore.write
    written = []

    def interrupted_after_the_first_shard(self, rows, features, failed):
        if written:
            raise KeyboardInterrupt
        write(self, rows, features, failed)
        written.append(len(rows))

    monkeypatch.setattr(ShardStore, "write", interrupted_after_the_first_shard)
    stopped = runner.invoke(app, ["extract", "--model", str(model), "--data", str(data), "--all",
                                  "--batch-size", "2"])
    assert stopped.exit_code == 130 and written == [4]
    assert ("interrupted: images kept in the cache: train 4 of 18, val 0 of 9; rerun the same command to resume "
            "(it encodes only the rest)") in " ".join(stopped.output.split())
    monkeypatch.setattr(ShardStore, "write", write)
    resumed = lowshot.extract_features(str(model), str(data), all_images=True, cache_dir=cache_dir)
    assert (resumed.train.images, resumed.test.images) == (14, 9)


def test_ctrl_c_during_a_probe_claims_nothing_about_shards(layout, cache_dir, monkeypatch):
    assert runner.invoke(app, ["extract", "--model", "../models/tiny", "--data", "../data/mini"]).exit_code == 0

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lowshot.protocol, "run_probe", interrupt)
    result = runner.invoke(app, ["probe", *PROTOCOL])
    assert result.exit_code == 130 and result.output.strip().endswith("interrupted")
    assert "shards" not in result.output


def test_the_run_record_keeps_the_absolute_model_and_data_paths(layout, cache_dir):
    model, _, data = layout
    assert runner.invoke(app, ["extract", "--model", "../models/tiny", "--data", "../data/mini"]).exit_code == 0
    (record,) = [json.loads(p.read_text()) for p in (cache_dir / "runs").glob("*.json")]
    assert record["model"] == str(model.resolve()) and record["origin"]["data"] == str(data.resolve())
    assert os.path.isabs(record["data"])


def test_a_hub_model_is_recorded_by_id_and_resolved_revision_never_by_its_snapshot_folder():
    from pathlib import Path

    from lowshot.data.datasets import Dataset
    from lowshot.features.extract import Plan
    from lowshot.models.backbones import ModelRef

    identity = {"weights_sha256": {"model.safetensors": "ab" * 32}, "config_sha256": "cd" * 32}
    ref = ModelRef("facebook/vit-msn-small", Path("/root/.cache/huggingface/hub/snapshots/0123abc"), identity,
                   {"source": "hub", "revision": "0123abc"})
    origin = Plan(ref, Dataset("user/some-dataset", None, None), None, {}, {}, None, torch.device("cpu"), None).origin
    assert origin["model"] == "facebook/vit-msn-small" and origin["revision"] == "0123abc"
    assert origin["data"] == "user/some-dataset" and origin["identity"] == identity
    assert "snapshots" not in json.dumps(origin)
