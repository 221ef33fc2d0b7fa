import json
import shutil

import pytest
from typer.testing import CliRunner

from lowshot.cli import app

from .conftest import SPLITS

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def extracted(tiny_model, image_data, cache_dir):
    result = invoke("extract", "--model", tiny_model, "--data", image_data, "--device", "cpu", "-b", "8", "--all")
    assert result.exit_code == 0, result.output
    return result


def test_help_teaches_the_two_steps_and_the_protocol_options():
    top = invoke("--help")
    assert top.exit_code == 0 and "lowshot probe --model" in top.output and " extract " in top.output
    ex = " ".join(invoke("extract", "--help").output.replace("│", " ").split())  # unwrapped
    for words in ("--model", "--data", "--transform", "shorter side 256", "cls-prenorm", "--dtype", "--cache-dir"):
        assert words in ex
    pr = invoke("probe", "--help").output
    for words in ("--shots", "--percent", "--seeds", "--lambda", "--split-file", "auto", "--format", "--classifier",
                  "--ci"):
        assert words in pr
    assert "lowshot report" in top.output and "lowshot bench" in top.output
    rep = invoke("report", "--help").output
    for words in ("--baseline", "--max-drop", "--plot", "--published", "--force"):
        assert words in rep


def test_full_extract_then_probe_writes_json_with_meta_rows_and_summary(extracted, tmp_path):
    assert "extracted" in extracted.output
    out = tmp_path / "results.json"
    result = invoke("probe", "--shots", "1,2,5", "--percent", "10", "--seeds", "2", "--output", out)
    assert result.exit_code == 0, result.output
    assert "most recent extraction" in result.output and "5-shot" in result.output
    data = json.loads(out.read_text())
    assert set(data) == {"format", "meta", "rows", "summary", "predictions"} and data["format"] == "lowshot-results/1"
    assert [s["subset"] for s in data["summary"]] == ["1-shot", "2-shot", "5-shot", "10%"]
    assert len(data["rows"]) == 8
    row = data["rows"][0]
    for field in ("subset", "shots", "percent", "seed", "top1", "n_train", "n_test", "lambda"):
        assert field in row
    assert data["meta"]["readout"]["name"] == "cls-prenorm" and data["meta"]["n_test"] == 9
    assert data["meta"]["cache_keys"]["train"]


def test_rerun_of_extract_says_it_used_the_cache(tiny_model, image_data, extracted):
    again = invoke("extract", "--model", tiny_model, "--data", image_data, "--device", "cpu")
    assert again.exit_code == 0 and again.output.count("cache hit") == 2


@pytest.mark.parametrize("fmt,needle", [("markdown", "| subset | top-1 (%)"), ("csv", "subset,shots,percent"),
                                        ("json", '"summary"')])
def test_probe_formats(extracted, fmt, needle):
    result = invoke("probe", "--shots", "2", "--percent", "0", "--seeds", "1", "--format", fmt)
    assert result.exit_code == 0, result.output
    assert needle in result.stdout


def test_probe_with_baselines_and_ci_shows_classifier_and_interval_columns(extracted):
    result = invoke("probe", "--shots", "1,2", "--percent", "0", "--seeds", "2", "--classifier", "logistic,knn,ncm",
                    "--ci", "--n-boot", "100", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| classifier | subset | top-1 (%) | 95% CI | seeds | train images | λ / k |" in result.stdout
    assert "| knn | 1-shot |" in result.stdout and "| ncm | 2-shot |" in result.stdout


def test_probe_with_a_split_file_reports_missing_names(extracted, image_data, tmp_path):
    listing = tmp_path / "2imgs_class.txt"
    by_class = {}
    for p in sorted((image_data / "train").glob("*/*.JPEG")):
        by_class.setdefault(p.parent.name, []).append(p.name)
    listing.write_text("\n".join(n for v in by_class.values() for n in v[:2]) + "\nn01440764_0.JPEG\n")
    result = invoke("probe", "--shots", "", "--percent", "0", "--split-file", listing, "--format", "json")
    assert result.exit_code == 0, result.output
    assert "1 listed file(s) are not in the train split" in result.output
    data = json.loads(result.stdout)
    assert data["rows"][0]["n_train"] == 6 and data["rows"][0]["missing"] == 1


@pytest.mark.parametrize("args,message", [
    (["--shots", "0"], "--shots 0"),
    (["--shots", "-1"], "--shots -1"),
    (["--shots", "a,b"], "--shots 'a,b'"),
    (["--shots", "7"], "fewer than 7 train images"),
    (["--percent", "150"], "--percent 150"),
    (["--seeds", "0"], "--seeds 0"),
    (["--lambda", "-2"], "--lambda"),
    (["--lambda", "big"], "--lambda 'big'"),
    (["--format", "xml"], "--format 'xml'"),
    (["--classifier", "svm"], "--classifier 'svm'"),
    (["--ci", "--n-boot", "0"], "--n-boot 0"),
])
def test_bad_probe_options_are_one_clear_line_and_non_zero(extracted, args, message):
    result = invoke("probe", *args)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_split_file_matching_nothing_is_an_error(extracted):
    result = invoke("probe", "--split-file", SPLITS / "imagenet_subsets1" / "1imgs_class.txt", "--shots", "",
                    "--percent", "0")
    assert result.exit_code != 0 and "none of its 1000 names" in result.output


def test_extract_errors_are_one_clear_line(tiny_model, image_data, cache_dir, tmp_path):
    cases = [
        (["--model", tiny_model, "--data", tmp_path / "missing"], "no such folder"),
        (["--model", "facebook/vit-msn-small", "--data", image_data], "offline"),
        (["--model", tiny_model, "--data", "someuser/some-dataset"], "cannot load dataset 'someuser/some-dataset'"),
        (["--model", tmp_path / "nomodel", "--data", image_data], "no such folder"),
        (["--model", tiny_model, "--data", image_data, "--test-split", "nope"], "available: train, val"),
        (["--model", tiny_model, "--data", image_data, "--dtype", "int3"], "--dtype 'int3'"),
        (["--model", tiny_model, "--data", image_data, "--transform", "fancy"], "--transform 'fancy'"),
        (["--model", tiny_model, "--data", image_data, "--batch-size", "0"], "--batch-size 0"),
        (["--model", tiny_model, "--data", image_data, "--engine", "warp"], "--engine 'warp'"),
    ]
    for args, message in cases:
        result = invoke("extract", *args)
        assert result.exit_code != 0, args
        assert message in result.output and "Traceback" not in result.output, (args, result.output)


def test_probe_without_any_extraction_says_what_to_run(cache_dir):
    result = invoke("probe")
    assert result.exit_code != 0 and "run 'lowshot extract" in result.output


def test_cache_list_verify_and_rm(extracted, cache_dir):
    listing = invoke("cache", "list")
    assert listing.exit_code == 0 and "train" in listing.output and "val" in listing.output
    assert invoke("cache", "verify").exit_code == 0
    removed = invoke("cache", "rm", "--all")
    assert removed.exit_code == 0 and "removed 2 entries" in removed.output
    assert "no cached features" in invoke("cache", "list").output


def test_class_mismatch_between_train_and_test_is_a_clear_error(tiny_model, image_data, cache_dir, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(image_data, data)
    shutil.rmtree(sorted((data / "val").iterdir())[0])
    result = invoke("extract", "--model", tiny_model, "--data", data)
    assert result.exit_code != 0 and "classes differ" in result.output


def test_cache_rm_of_a_key_that_matches_nothing_is_an_error_and_removes_nothing(cache_dir):
    entry = cache_dir / "entries" / "abc123"
    entry.mkdir(parents=True)
    result = invoke("cache", "rm", "abc", "zzzz")
    assert result.exit_code == 2 and "no cache entry matches 'zzzz'" in result.output
    assert "nothing removed" in result.output and entry.is_dir()  # abc matched, but nothing went
    result = invoke("cache", "rm", "abc")
    assert result.exit_code == 0 and "removed 1 entry" in result.output and not entry.exists()
