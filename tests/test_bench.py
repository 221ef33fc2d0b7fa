"""lowshot bench: the committed CI benchmark config and baseline, and a small version of it run end to end."""

import hashlib
import json
import shutil

import pytest
from typer.testing import CliRunner

from lowshot.bench import load_config
from lowshot.errors import BadInputError
from lowshot.results.comparable import protocol
from lowshot.results.rows import Results

from .conftest import DEIT_TINY, IMAGENETTE, REPO

runner = CliRunner()
CONFIG = REPO / "benchmarks" / "imagenette-deit-tiny.toml"
PNG = b"\x89PNG\r\n\x1a\n"


def test_committed_benchmark_config_points_at_shared_data_and_matches_its_baseline():
    config = load_config(CONFIG)
    assert config.data == str(IMAGENETTE.resolve()) and config.models[0].path == str(DEIT_TINY.resolve())
    baseline = Results.load(config.models[0].baseline)
    meta = baseline.meta
    probe = config.probe
    assert meta["settings"]["probe"] == probe.to_dict() and meta["dtype"] == config.extract.dtype
    assert config.extract.readout == "cls-prenorm"  # readout = "…" in the TOML, as the CLI's --readout
    assert meta["n_test"] == 3925 and meta["n_train_pool"] == 9469 and protocol(baseline)["test set"]
    summary = {(s["classifier"], s["subset"]): s for s in baseline.summary}
    assert summary[("logistic", "5-shot")]["mean"] > 90  # real DeiT-Tiny features, not a placeholder
    assert all("ci_low" in s for s in baseline.summary)


def write_config(path, model, data, **extra) -> None:
    extract = {"device": "cpu", "batch_size": 8, **extra.pop("extract", {})}
    top = {"title": "small bench", "data": str(data), "shots": [1, 2], "percents": [], "seeds": 2,
           "classifiers": ["logistic", "knn", "ncm"], "ci": True, "n_boot": 100, "max_drop": 1.0, "output": "out",
           **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()] + ["", "[extract]"] + [
        f"{k} = {json.dumps(v)}" for k, v in extract.items()] + [
        "", "[[models]]", 'name = "tiny"', f'path = "{model}"', 'baseline = "baseline/tiny.json"']
    path.write_text("\n".join(lines) + "\n")


def test_small_bench_writes_results_report_and_plot_and_gates_against_its_baseline(tiny_model, image_data,
                                                                                    cache_dir, tmp_path):
    from lowshot.cli import app

    config = tmp_path / "bench.toml"
    write_config(config, tiny_model, image_data)
    out = tmp_path / "out"

    missing = runner.invoke(app, ["bench", str(config)])
    assert missing.exit_code == 2 and "--update-baseline" in missing.output  # no baseline yet: says how

    first = runner.invoke(app, ["bench", str(config), "--update-baseline"])
    assert first.exit_code == 0, first.output
    assert (out / "tiny.json").is_file() and (tmp_path / "baseline" / "tiny.json").is_file()
    assert (out / "plot.png").read_bytes()[:8] == PNG
    results = json.loads((out / "tiny.json").read_text())
    assert results["meta"]["label"] == "tiny" and len(results["rows"]) == 2 * 2 * 3

    again = runner.invoke(app, ["bench", str(config)])  # cached features, same numbers: the gate passes
    assert again.exit_code == 0, again.output
    assert "cache hit" in again.output and "gate passed" in again.output
    report = (out / "report.md").read_text()
    assert report.startswith("## small bench") and "| model | classifier | 1-shot | 2-shot |" in report
    assert "✅ passed" in report

    baseline_path = tmp_path / "baseline" / "tiny.json"
    baseline = json.loads(baseline_path.read_text())
    for row in baseline["rows"]:
        if row["classifier"] == "ncm" and row["subset"] == "2-shot":
            row["top1"] += 20.0  # the baseline was 20 points better: the current run is a real drop
    baseline_path.write_text(json.dumps(baseline))
    dropped = runner.invoke(app, ["bench", str(config)])
    assert dropped.exit_code == 1
    assert "tiny: 1 subset(s) dropped more than 1 point" in dropped.output and "ncm 2-shot" in dropped.output
    assert "❌ failed" in (out / "report.md").read_text()

    baseline["meta"]["settings"]["probe"]["lam"] = 0.075
    baseline_path.write_text(json.dumps(baseline))
    refused = runner.invoke(app, ["bench", str(config)])
    assert refused.exit_code == 2 and "lambda: 0.075 vs 0.0025" in refused.output
    forced = runner.invoke(app, ["bench", str(config), "--force"])
    assert forced.exit_code == 1 and "ncm 2-shot" in forced.output


def test_bench_results_record_model_and_data_as_the_config_gives_them_and_no_machine_path(tiny_model, image_data,
                                                                                          cache_dir, tmp_path):
    from lowshot.cli import app

    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    shutil.copytree(image_data, tmp_path / "data" / "mini")
    config = tmp_path / "bench.toml"
    write_config(config, "models/tiny", "data/mini", classifiers=["logistic"], shots=[1], seeds=1)
    first = runner.invoke(app, ["bench", str(config), "--update-baseline"])
    assert first.exit_code == 0, first.output
    text = (tmp_path / "baseline" / "tiny.json").read_text()
    meta = json.loads(text)["meta"]
    assert meta["model"] == "models/tiny" and meta["data"] == "data/mini"  # relative to the config file
    weights = hashlib.sha256((tmp_path / "models" / "tiny" / "model.safetensors").read_bytes()).hexdigest()
    assert meta["provenance"]["weights_sha256"] == {"model.safetensors": weights}
    assert str(tmp_path) not in text and str(tmp_path.resolve()) not in text and str(cache_dir) not in text


@pytest.mark.parametrize("extra,message", [
    ({"seed": 3}, "unknown key 'seed'"),
    ({"seeds": "3"}, "seeds = '3' has the wrong type"),
    ({"classifiers": ["svm"]}, "classifiers 'svm'"),
    ({"lambda": "big"}, "lambda 'big'"),
    ({"lambda": -1}, "lambda -1"),
    ({"shots": [0]}, "shots 0"),
    ({"extract": {"dtype": "int3"}}, "dtype 'int3'"),
    ({"extract": {"batch_size": 0}}, "batch_size 0"),
    ({"extract": {"feature": "cls-prenorm"}}, "unknown key 'feature'"),  # the readout has one name
    ({"extract": {"readout": 3}}, "readout 3"),
])
def test_bad_bench_configs_are_one_clear_error(tmp_path, extra, message):
    config = tmp_path / "bench.toml"
    write_config(config, DEIT_TINY, IMAGENETTE, **extra)
    with pytest.raises(BadInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(config)


def test_bench_config_paths_are_relative_to_the_config_file(tmp_path):
    config = tmp_path / "sub" / "bench.toml"
    config.parent.mkdir()
    write_config(config, "../nowhere", IMAGENETTE)
    from lowshot.errors import DataError

    with pytest.raises(DataError, match="relative to the config file"):
        load_config(config)


def test_a_results_file_that_cannot_be_written_stops_neither_the_table_nor_the_other_outputs(
        tiny_model, image_data, cache_dir, tmp_path, monkeypatch):
    from lowshot import bench
    from lowshot.cli import app
    from lowshot.errors import OutputError

    config = tmp_path / "bench.toml"
    write_config(config, tiny_model, image_data, plot=False)
    assert runner.invoke(app, ["bench", str(config), "--update-baseline"]).exit_code == 0
    (tmp_path / "out" / "report.md").unlink()

    def failing(results, path):
        raise OutputError(f"results {path}: cannot write (disk full); kept in kept-copy.json")

    monkeypatch.setattr(bench, "_write", failing)
    result = runner.invoke(app, ["bench", str(config)])
    assert result.exit_code == 1
    assert "1-shot" in result.stdout and "gate passed: tiny" in result.output  # the table and the verdict first
    assert "kept in kept-copy.json" in result.output
    assert (tmp_path / "out" / "report.md").is_file()  # the report still written after the failed results file
