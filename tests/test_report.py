"""lowshot report: comparison tables, the regression gate, protocol checks and the plot, on results files."""

import copy
import json
import sys

import pytest
from typer.testing import CliRunner

from lowshot.cli import app
from lowshot.errors import MissingDependencyError, ProtocolMismatchError
from lowshot.results.compare import PUBLISHED, compare, subset_order
from lowshot.results.gate import gate
from lowshot.results.rows import RESULTS_FORMAT, Results

runner = CliRunner()
SPLITS = {"1-shot": 1, "5-shot": 5, "1%": None}


def make_results(model: str, means: dict, *, classifiers=("logistic",), lam=0.0025, seeds=3) -> dict:
    """A results JSON like run_probe's: per classifier and split, seeds spread ±1 around the given mean."""
    rows = []
    for classifier in classifiers:
        for split, mean in means.items():
            for seed in range(seeds):
                shots = SPLITS.get(split)
                rows.append({"subset": split, "shots": shots, "percent": None if shots else 1.0, "seed": seed,
                             "classifier": classifier, "top1": mean + seed - 1 - (5 if classifier == "knn" else 0),
                             "n_train": 10 * (shots or 13), "n_test": 500,
                             "lambda": lam if classifier == "logistic" else None})
    meta = {"model": f"/models/{model}", "data": "/data/imagenette2-224", "test_split": "val", "n_test": 500,
            "n_classes": 10, "n_train_pool": 9469, "test_fingerprint": "abc", "train_fingerprint": "def",
            "readout": {"name": "cls-prenorm"}, "dtype": "float32", "device": "cpu",
            "transform": {"name": "msn", "resize": 256},
            "probe": {"preprocess": "row-centre + L2"},
            "settings": {"probe": {"backend": "torch", "lam": lam, "seeds": seeds, "split_files": [],
                                   "allow_fewer": False}}}
    return {"meta": meta, "rows": rows}


def write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"format": RESULTS_FORMAT, **data}))
    return str(path)


BASE = {"1-shot": 80.0, "5-shot": 95.0, "1%": 96.0}


def test_comparison_markdown_has_models_as_rows_splits_as_columns_and_marks_the_best(tmp_path):
    a = Results.load(write(tmp_path, "a.json", make_results("vit-a", BASE)))
    b = Results.load(write(tmp_path, "b.json", make_results("vit-b", {"1-shot": 82.0, "5-shot": 90.0, "1%": 96.0})))
    md = compare([a, b], published=True).to_markdown()
    lines = md.splitlines()
    assert "| model | 1-shot | 5-shot | 1% |" in lines  # one classifier: no classifier column
    assert "| vit-a | 80.0 ± 1.0 | **95.0 ± 1.0** | **96.0 ± 1.0** |" in lines
    assert "| vit-b | **82.0 ± 1.0** | 90.0 ± 1.0 | **96.0 ± 1.0** |" in lines  # a tie is best for both
    assert "| MSN ViT-S/16 *(published, ImageNet-1k)* | 47.1 ± 0.1 | 62.8 ± 0.3 | 67.2 |" in lines
    assert sum("*(published, ImageNet-1k)*" in line for line in lines) == len(PUBLISHED)
    assert "Tables 1 and 2" in md and "not comparable" in md
    assert all(line.count("|") == 5 for line in lines if line.startswith("|"))  # a well-formed GFM table


def test_several_classifiers_get_a_classifier_column_and_ci_cells(tmp_path):
    data = make_results("vit-a", BASE, classifiers=("logistic", "knn"))
    data["summary"] = [{"classifier": "logistic", "subset": "1-shot", "ci_low": 78.1, "ci_high": 81.9}]
    comparison = compare([Results.load(write(tmp_path, "a.json", data))])
    md = comparison.to_markdown()
    assert "| model | classifier | 1-shot | 5-shot | 1% |" in md
    assert "| vit-a | logistic | **80.0 ± 1.0 [78.1, 81.9]** |" in md and "| vit-a | knn | 75.0 ± 1.0 |" in md
    assert "[95% CI]" in md
    csv_text = comparison.render("csv")
    assert csv_text.splitlines()[0] == ("label,classifier,kind,metric,subset,mean,std,n_seeds,ci_low,ci_high,best,"
                                        "delta,delta_ci_low,delta_ci_high,p_value")
    assert json.loads(comparison.render("json"))["rows"][1]["classifier"] == "knn"


def test_columns_are_ordered_by_shots_then_percent():
    assert sorted(["1%", "10-shot", "2-shot", "custom", "0.5%", "1-shot"], key=subset_order) == \
        ["1-shot", "2-shot", "10-shot", "0.5%", "1%", "custom"]


def test_gate_passes_on_equal_results_and_fails_on_a_real_drop_naming_the_subset(tmp_path):
    base = write(tmp_path, "base.json", make_results("vit", BASE))
    same = write(tmp_path, "same.json", make_results("vit", BASE))
    dropped_data = make_results("vit", BASE)
    for row in dropped_data["rows"]:
        if row["subset"] == "5-shot":
            row["top1"] -= 2.5  # the mean drops 2.5 points
    dropped = write(tmp_path, "dropped.json", dropped_data)

    ok = runner.invoke(app, ["report", same, "--baseline", base, "--max-drop", "1"])
    assert ok.exit_code == 0, ok.output
    assert "gate passed" in ok.output

    bad = runner.invoke(app, ["report", dropped, "--baseline", base, "--max-drop", "1", "--format", "markdown"])
    assert bad.exit_code == 1
    assert "1 subset(s) dropped more than 1 point" in bad.output and "logistic 5-shot 95.0 -> 92.5 (-2.5)" in bad.output
    assert "❌ failed" in bad.stdout and "| logistic | 5-shot | 95.0 | 92.5 | -2.5 ❌ |" in bad.stdout
    assert "Traceback" not in bad.output

    tolerant = runner.invoke(app, ["report", dropped, "--baseline", base, "--max-drop", "3"])
    assert tolerant.exit_code == 0, tolerant.output


def test_a_different_protocol_is_refused_unless_forced(tmp_path):
    base = write(tmp_path, "base.json", make_results("vit", BASE))
    other = write(tmp_path, "other.json", make_results("vit", BASE, lam=0.075, seeds=2))
    refused = runner.invoke(app, ["report", other, "--baseline", base])
    assert refused.exit_code == 2
    assert "differ in protocol" in refused.output and "lambda: 0.0025 vs 0.075" in refused.output
    assert "seeds: 3 vs 2" in refused.output and "--force" in refused.output
    forced = runner.invoke(app, ["report", other, "--baseline", base, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "protocol differs (compared anyway, --force): lambda" in forced.output
    two = runner.invoke(app, ["report", base, other])  # a comparison table of different protocols: refused too
    assert two.exit_code == 2 and "different protocols" in two.output


def test_other_test_set_or_missing_split_is_a_protocol_difference_and_dtype_only_a_note():
    base = Results(**make_results("vit", BASE))
    other = copy.deepcopy(make_results("vit", {"1-shot": 80.0, "5-shot": 95.0}))
    other["meta"]["test_fingerprint"] = "zzz"
    with pytest.raises(ProtocolMismatchError, match="test set: abc vs zzz.*not measured: logistic 1%"):
        gate(Results(**other), base)
    bf16 = make_results("vit", BASE)
    bf16["meta"]["dtype"] = "bfloat16"
    result = gate(Results(**bf16), base)
    assert result.passed and result.notes == ["dtype: float32 vs bfloat16"]


def test_report_plot_writes_a_png(tmp_path):
    a = write(tmp_path, "a.json", make_results("vit-a", BASE, classifiers=("logistic", "knn")))
    b = write(tmp_path, "b.json", make_results("vit-b", {"1-shot": 60.0, "5-shot": 70.0, "1%": 75.0}))
    png = tmp_path / "plots" / "acc.png"
    result = runner.invoke(app, ["report", a, b, "--plot", str(png), "--output", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (tmp_path / "r.md").read_text().startswith("Top-1 (%) on `val`")


def test_missing_matplotlib_is_one_clear_line(tmp_path, monkeypatch):
    from lowshot.results.plot import require_matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'lowshot\[plot\]'"):
        require_matplotlib()
    a = write(tmp_path, "a.json", make_results("vit-a", BASE))
    result = runner.invoke(app, ["report", a, "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 1 and "pip install 'lowshot[plot]'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("args,message", [
    (["missing.json"], "not a lowshot results JSON"),
    (["{a}", "--format", "xml"], "--format 'xml'"),
    (["{a}", "--label", "x", "--label", "y"], "--label given 2 time(s) for 1"),
    (["{a}", "--baseline", "{a}", "--max-drop", "-1"], "--max-drop -1"),
])
def test_bad_report_input_is_one_clear_line(tmp_path, args, message):
    a = write(tmp_path, "a.json", make_results("vit-a", BASE))
    result = runner.invoke(app, ["report", *[x.replace("{a}", a) for x in args]])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_one_seed_is_recorded_without_std_and_no_renderer_prints_plus_minus_zero(tmp_path):
    from lowshot.render import comparison_table, results_table
    from lowshot.results.modelcard import eval_results

    data = make_results("vit-a", BASE, classifiers=("logistic", "knn"), seeds=1)
    for row in data["rows"]:
        row["top5"] = row["mean_per_class"] = row["top1"]
    results = Results.load(write(tmp_path, "a.json", data))
    summary = json.loads(results.to_json())["summary"]
    assert all(s["std"] is None and s["metrics"]["top5"]["std"] is None for s in summary)  # null, not 0.0
    probe_md = results.to_markdown()
    assert "| logistic | 1-shot | 79.0 |" in probe_md and "one seed (no ± std)" in probe_md
    comparison = compare([results, results], published=True)
    texts = [results.render("markdown"), comparison.render("markdown"), comparison.render("csv"),
             suite_markdown := compare_suite(comparison)]
    assert not any("± 0.0" in text for text in texts)
    assert "| vit-a | knn | 74.0 |" in comparison.to_markdown() and "47.1 ± 0.1" in comparison.to_markdown()
    assert "vit-a,knn,measured,top1,1-shot,74.0,,1," in comparison.to_csv()  # an empty std cell
    assert "one seed (no ± std)" in comparison.caption() and "one seed" in suite_markdown
    assert all(c.get("std") is None for r in comparison.to_dict()["rows"] if r["kind"] == "measured"
               for c in r["cells"].values())
    assert not any("(std" in e.metric_name for e in eval_results(results, metrics=["top1"]))
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(results_table(results), comparison_table(comparison))
    shown = console.export_text()
    measured = [line for line in shown.splitlines() if line.startswith(("vit-a", "logistic", "knn"))]
    assert len(measured) == 6 + 4 and not any("±" in line for line in measured)


def compare_suite(comparison) -> str:
    from lowshot.results.compare import suite_table

    return suite_table({"a": comparison, "b": comparison}).to_markdown()
