"""lowshot bench with several [[datasets]]: one table models x (dataset x subset) + mean over datasets, one plot and
one gate per dataset; and the digits example that writes scikit-learn's digits as an ImageFolder."""

import json
import re
import sys

import pytest
from typer.testing import CliRunner

from lowshot.bench import load_config
from lowshot.cli import app
from lowshot.errors import BadInputError
from lowshot.results.compare import Cell, Comparison, Row, suite_table

from .conftest import REPO, make_image_folder, save_random_msn

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def write_suite(path, models, datasets, *, baseline="baseline/{dataset}/NAME.json", **extra) -> None:
    top = {"title": "suite", "shots": [1, 2], "percents": [], "seeds": 2, "classifiers": ["logistic"],
           "n_boot": 100, "output": "out", **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    lines += ["", "[extract]", 'device = "cpu"', 'dtype = "float32"']
    for name, data in datasets.items() if isinstance(datasets, dict) else datasets:
        lines += ["", "[[datasets]]", f'name = "{name}"', f'data = "{data}"']
    for name, model in models.items():
        lines += ["", "[[models]]", f'name = "{name}"', f'path = "{model}"']
        if baseline:
            lines.append(f'baseline = "{baseline.replace("NAME", name)}"')
    path.write_text("\n".join(lines) + "\n")


def test_suite_table_has_dataset_column_groups_and_an_unweighted_mean_over_datasets():
    def comparison(values):
        rows = [Row(label, "logistic", {s: Cell(v, 1.0, 3) for s, v in cells.items()})
                for label, cells in values.items()]
        columns = sorted({s for c in values.values() for s in c})
        return Comparison(columns, rows, {"seeds": 3, "n_test": 10}, list(values))

    table = suite_table({"nette": comparison({"a": {"1-shot": 80.0, "5-shot": 90.0}, "b": {"1-shot": 70.0}}),
                         "digits": comparison({"a": {"1-shot": 60.0, "5-shot": 99.0}, "b": {"1-shot": 75.0}})})
    assert table.columns == ["nette 1-shot", "nette 5-shot", "digits 1-shot", "digits 5-shot", "mean 1-shot",
                             "mean 5-shot"]
    a, b = table.rows
    assert a.cells["mean 1-shot"].mean == 70.0 and a.cells["mean 5-shot"].mean == 94.5
    assert b.cells["mean 1-shot"].mean == 72.5 and "mean 5-shot" not in b.cells  # b lacks 5-shot somewhere
    md = table.to_markdown()
    assert "| a | **80.0 ± 1.0** | **90.0 ± 1.0** | 60.0 ± 1.0 | **99.0 ± 1.0** | 70.0 | **94.5** |" in md
    assert "unweighted mean over the 2 datasets" in md


def test_a_two_dataset_bench_writes_one_table_plots_per_dataset_and_gates_each(tiny_model, cache_dir, tmp_path):
    data_a = make_image_folder(tmp_path / "a", classes=3, train=6, test=3)
    data_b = make_image_folder(tmp_path / "b", classes=4, train=4, test=3, offset=6)
    other = save_random_msn(tmp_path / "other-msn", seed=1)
    config = tmp_path / "suite.toml"
    write_suite(config, {"tiny": tiny_model, "other": other}, {"a": data_a, "b": data_b})
    first = runner.invoke(app, ["bench", str(config), "--update-baseline"])
    assert first.exit_code == 0, first.output
    out = tmp_path / "out"
    for name in ("a", "b"):
        assert (out / name / "plot.png").read_bytes()[:8] == PNG
        assert json.loads((out / name / "tiny.json").read_text())["meta"]["n_classes"] == {"a": 3, "b": 4}[name]
        assert (tmp_path / "baseline" / name / "other.json").is_file()
    report = (out / "report.md").read_text()
    assert "| model | a 1-shot | a 2-shot | b 1-shot | b 2-shot | mean 1-shot | mean 2-shot |" in report
    assert "### a" in report and "### b" in report and "**Paired differences** vs `tiny`" in report

    again = runner.invoke(app, ["bench", str(config)])
    assert again.exit_code == 0, again.output
    assert "gate passed: tiny on a" in again.output and "gate passed: other on b" in again.output
    assert (out / "report.md").read_text().count("✅ passed") == 4

    baseline_path = tmp_path / "baseline" / "b" / "tiny.json"
    baseline = json.loads(baseline_path.read_text())
    for row in baseline["rows"]:
        row["top1"] += 30.0  # the baseline on b claims 30 points more: only b's gate of tiny fails
    baseline_path.write_text(json.dumps(baseline))
    dropped = runner.invoke(app, ["bench", str(config)])
    assert dropped.exit_code == 1
    assert "tiny on b: 2 subset(s) dropped" in dropped.output and "gate passed: tiny on a" in dropped.output


@pytest.mark.parametrize("change,message", [
    ({"data": "x"}, "either 'data' (one dataset) or [[datasets]], not both"),
    ({"baseline": "baseline/NAME.json"}, "must contain {dataset} with several [[datasets]]"),
    ({"names": ["mean", "b"]}, "dataset name 'mean'"),
    ({"names": ["a", "a"]}, "unique names"),
])
def test_bad_suite_configs_are_one_clear_error(tmp_path, change, message):
    change = dict(change)
    names = change.pop("names", ["a", "b"])
    config = tmp_path / "suite.toml"
    write_suite(config, {"m": tmp_path}, [(n, tmp_path) for n in names], **change)
    with pytest.raises(BadInputError, match=re.escape(message)):
        load_config(config)


def test_one_dataset_listed_as_datasets_is_a_plain_bench_with_its_baseline_filled_in(tmp_path):
    config = tmp_path / "suite.toml"
    write_suite(config, {"m": tmp_path}, {"only": tmp_path})
    loaded = load_config(config)
    assert loaded.data == str(tmp_path) and loaded.models[0].baseline == tmp_path / "baseline" / "only" / "m.json"


def test_committed_example_suite_config_loads():
    config = load_config(REPO / "examples" / "suite.toml")
    assert [d.name for d in config.datasets] == ["imagenette", "digits"] and config.significant


def test_make_digits_writes_a_seeded_imagefolder(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    from make_digits import make_digits

    out = make_digits(tmp_path / "digits")
    train = sorted(p.relative_to(out / "train") for p in (out / "train").glob("*/*.png"))
    val = sorted(p.relative_to(out / "val") for p in (out / "val").glob("*/*.png"))
    assert len(train) + len(val) == 1797 and len(val) == 599 and not set(train) & set(val)
    assert sorted({p.parts[0] for p in train}) == [str(d) for d in range(10)]
    again = make_digits(tmp_path / "again")
    assert sorted(p.relative_to(again / "val") for p in (again / "val").glob("*/*.png")) == val  # seeded
    from PIL import Image

    with Image.open(out / "train" / train[0]) as image:
        assert image.mode == "L" and image.size == (32, 32)


def test_make_digits_made_twice_is_one_cache_identity(tmp_path):
    # fixed modification times: the example suite's second CI pass (and any rerun) finds its features cached
    sys.path.insert(0, str(REPO / "examples"))
    from make_digits import make_digits

    from lowshot.data.datasets import open_dataset

    first, second = (open_dataset(str(make_digits(tmp_path / name))) for name in ("a", "b"))
    assert first.train.identity == second.train.identity and first.test.identity == second.test.identity
