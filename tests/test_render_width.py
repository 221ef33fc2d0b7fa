"""Every terminal table fits an 80-column terminal: one line per row, cells abbreviated only where they must be
(labels and paths from the left), optional columns left to --wide, which shows everything."""

import io

from rich.console import Console
from typer.testing import CliRunner

from lowshot.cli import app
from lowshot.render import cache_table, comparison_table, paired_table, results_table
from lowshot.results.compare import compare, suite_table
from lowshot.results.paired import PairedDelta
from lowshot.results.rows import Results

WIDTH = 80
SUBSETS = {"1-shot": 1, "2-shot": 2, "5-shot": 5, "1%": None}
runner = CliRunner()


def results(model="deit-tiny-patch16-224", *, classifiers=("logistic",), seeds=3, ci=False, subsets=SUBSETS,
            offset=0.0, lam=0.0025) -> Results:
    """A Results built in memory (no extraction): seeds spread ±1 around a mean per subset."""
    rows, intervals = [], {}
    for c, classifier in enumerate(classifiers):
        for i, (subset, shots) in enumerate(subsets.items()):
            mean = 60.0 + 10 * i - c + offset
            for seed in range(seeds):
                rows.append({"subset": subset, "shots": shots, "percent": None if shots else 1.0, "seed": seed,
                             "classifier": classifier, "top1": mean + (seed - 1 if seeds > 1 else 0),
                             "n_train": 10 * (shots or 13), "n_test": 3925,
                             "lambda": lam if classifier == "logistic" else None,
                             "k": 1 if classifier == "knn" else None})
            if ci:
                intervals[f"{classifier}/{subset}"] = {"ci_low": mean - 1.4, "ci_high": mean + 1.3}
    meta = {"model": f"/work/shared/data/models/{model}", "data": "/work/shared/data/datasets/imagenette2-224",
            "test_split": "val", "n_test": 3925, "n_classes": 10, "readout": {"name": "cls-prenorm"},
            "dtype": "float32",
            "transform": {"name": "msn"}, "settings": {"probe": {"lam": lam, "seeds": seeds}}}
    return Results(meta, rows, intervals)


def lines_of(table, width=WIDTH) -> list[str]:
    """The table as an 80-column terminal shows it (as the CLI prints it: crop=False)."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(table, crop=False)
    return [line.rstrip() for line in console.export_text().splitlines()]


def body(lines: list[str]) -> list[str]:
    """The row lines: after the header rule, up to the first line that is not a row (the caption)."""
    start = next(i for i, line in enumerate(lines) if line.startswith("───")) + 1
    return lines[start:]


def assert_fits(lines: list[str], width=WIDTH) -> None:
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, "\n".join(too_long)


def one_line_each(lines: list[str], rows: list[list[str]]) -> None:
    """Every row's cells, in order, on one line of its own."""
    rows_seen = body(lines)
    for cells in rows:
        matching = [line for line in rows_seen if all(cell in line for cell in cells)
                    and [line.index(cell) for cell in cells] == sorted(line.index(cell) for cell in cells)]
        assert len(matching) == 1, (cells, "\n".join(lines))


def test_results_table_with_ci_and_three_classifiers_fits_80_with_the_interval_on_the_row():
    r = results(classifiers=("logistic", "knn", "ncm"), ci=True)
    lines = lines_of(results_table(r))
    assert_fits(lines)
    one_line_each(lines, [["logistic", "1-shot", "60.0 ± 1.0", "[58.6, 61.3]", "3", "10",
                           "0.0025"], ["knn", "1%", "89.0 ± 1.0", "[87.6, 90.3]", "k=1"], ["ncm", "5-shot", "78.0"]])
    assert not any("…" in line for line in lines)  # everything fits: nothing is cut
    assert len(body(lines)) == 12 + 2  # 12 rows, then a caption on two lines


def test_results_table_drops_the_interval_to_wide_when_it_cannot_fit_and_wide_shows_it():
    long = {f"imagenet-1pct-split-{i}.txt": None for i in range(3)}
    r = results(classifiers=("logistic", "knn"), ci=True, subsets=long, lam=0.00123456)
    narrow = lines_of(results_table(r))
    assert_fits(narrow)
    assert "95% CI" not in narrow[1] and "--wide adds: 95% CI" in " ".join(narrow)
    one_line_each(narrow, [["logistic", "pct-split-0.txt", "60.0 ± 1.0", "0.00123456"]])
    wide = lines_of(results_table(r, wide=True))
    assert max(map(len, wide)) > WIDTH  # printed whole, for the terminal to wrap, not squeezed by rich
    one_line_each(wide, [["logistic", "imagenet-1pct-split-0.txt", "60.0 ± 1.0", "[58.6, 61.3]", "0.00123456"]])


def test_comparison_of_three_models_with_published_rows_fits_80_one_line_per_row():
    a = results("facebook-vit-msn-small-patch16-224-checkpoint-epoch-600")
    b = results("deit-tiny-patch16-224", offset=1.0)
    c = results("random-init", offset=-30.0)
    lines = lines_of(comparison_table(compare([a, b, c], published=True)))
    assert_fits(lines)
    one_line_each(lines, [["checkpoint-epoch-600", "60.0 ± 1.0", "70.0 ± 1.0", "80.0 ± 1.0", "90.0 ± 1.0"],
                          ["deit-tiny-patch16-224", "61.0 ± 1.0", "91.0 ± 1.0"], ["random-init", "30.0 ± 1.0"],
                          ["MSN ViT-S/16 †", "47.1 ± 0.1", "67.2"], ["iBOT ViT-S/16 †", "40.4", "65.9"]])
    label = next(line for line in body(lines) if "checkpoint" in line).split("  ")[0]
    assert label.startswith("…") and label.endswith("epoch-600")  # abbreviated from the left: the tail stays
    assert "deit-tiny-patch16-224" in "\n".join(lines)  # a label that fits is not cut


def test_comparison_keeps_the_interval_on_the_row_where_it_fits_and_leaves_it_to_wide_where_not():
    one = {"5-shot": 5}
    narrow = lines_of(comparison_table(compare([results(ci=True, subsets=one), results("b", ci=True, subsets=one)])))
    assert_fits(narrow)
    one_line_each(narrow, [["deit-tiny-patch16-224", "60.0 ± 1.0 [58.6, 61.3]"], ["b", "60.0 ± 1.0 [58.6, 61.3]"]])
    full = compare([results(ci=True, classifiers=("logistic", "knn")), results("b", ci=True)])
    lines = lines_of(comparison_table(full))
    assert_fits(lines)
    assert "[" not in "\n".join(body(lines)).split("--wide")[0] and "--wide adds: [95% CI]" in " ".join(lines)
    one_line_each(lines, [["…ny-patch16-224", "knn", "59.0 ± 1.0", "89.0 ± 1.0"]])  # shortened to fit the ± std
    wide = lines_of(comparison_table(full, wide=True))
    one_line_each(wide, [["deit-tiny-patch16-224", "knn", "59.0 ± 1.0 [57.6, 60.3]", "89.0 ± 1.0 [87.6, 90.3]"]])


def test_comparison_with_many_subsets_falls_back_to_means_and_says_so():
    many = {f"{k}-shot": k for k in (1, 2, 5, 10)} | {"1%": None}
    lines = lines_of(comparison_table(compare([results(subsets=many, classifiers=("logistic", "knn"))])))
    assert_fits(lines)
    assert not any("…" in line for line in lines)
    one_line_each(lines, [["deit-tiny-patch16-224", "logistic", "60.0", "70.0", "100.0"]])
    assert "±" not in "\n".join(body(lines)).split("--wide")[0] and "--wide adds: ± std" in " ".join(lines)


def test_paired_table_fits_80_and_names_the_files_by_their_tail():
    deltas = [PairedDelta(classifier, subset, "top1", 1.25, -0.5, 3.0, 0.0123, 3, 120, 80)
              for classifier in ("logistic", "knn") for subset in SUBSETS]
    comparison = compare([results(), results("facebook-vit-msn-base-patch16-224-checkpoint-final")])
    comparison.paired = {comparison.labels[1]: deltas}
    lines = lines_of(paired_table(comparison))
    assert_fits(lines)
    one_line_each(lines, [["eckpoint-final", "knn", "1%", "+1.2", "[-0.5, +3.0]", "0.012", "120 / 80"]])
    assert all(line.startswith("…") for line in body(lines)[:8])  # the label's tail, abbreviated from the left


def test_suite_table_fits_80_with_a_line_per_model_and_dataset():
    per_dataset = {name: compare([results("vit-s16"), results("deit-small-p16", offset=2.0)])
                   for name in ("imagenette", "digits", "digits 2x")}
    suite = suite_table(per_dataset)
    lines = lines_of(comparison_table(suite))
    assert_fits(lines)
    assert not any("…" in line for line in lines)
    one_line_each(lines, [["deit-small-p16", "imagenette", "62.0 ± 1.0", "92.0 ± 1.0"],
                          ["deit-small-p16", "mean", "62.0", "72.0", "82.0", "92.0"],
                          ["vit-s16", "digits 2x", "60.0 ± 1.0"]])
    assert len([line for line in body(lines) if line.startswith(("deit", "vit"))]) == 2 * 4  # 3 datasets + mean


def manifest(key: str, model: str, data: str, split: str, n: int, listed: int) -> dict:
    return {"key": key, "model": model, "data": f"{data}/{split}", "split": split, "n": n, "n_listed": listed,
            "dim": 768, "dtype": "bfloat16", "size_bytes": 3 * 2 ** 30, "created": "2026-12-06T23:06:27+0000",
            "readout": {"name": "cls-prenorm"}, "transform": {"name": "msn"}}


MANIFESTS = [manifest("3f2a" * 8, "/home/someone/checkpoints/msn/vit-base-patch16-224-msn-epoch-600",
                      "/mnt/datasets/imagenet/ILSVRC2012-full", "train", 12_811, 1_281_167),
             manifest("8e32" * 8, "facebook/vit-msn-small", "/mnt/datasets/imagenette2-224", "val", 3925, 3925)]


def test_cache_list_with_long_paths_fits_80_keeping_each_path_tail():
    lines = lines_of(cache_table(MANIFESTS))
    assert_fits(lines)
    one_line_each(lines, [["3f2a3f2a", "msn-epoch-600", "2012-full", "train", "12,811 of 1,281,167", "3.0 GB"],
                          ["8e328e32", "vit-msn-small", "imagenette2-224"[-12:], "val", "3,925"]])
    assert "--wide adds:" in " ".join(lines) and "created" in " ".join(lines)


def test_wide_cache_list_shows_whole_paths_dtype_and_date_on_one_line():
    lines = lines_of(cache_table(MANIFESTS, wide=True))
    one_line_each(lines, [["3f2a" * 3, "/home/someone/checkpoints/msn/vit-base-patch16-224-msn-epoch-600",
                           "/mnt/datasets/imagenet/ILSVRC2012-full/train", "bfloat16", "768", "2026-12-06 23:06"]])


def test_report_and_wide_through_the_cli_at_80_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    paths = []
    for name in ("a", "b"):
        r = results(name, ci=True, classifiers=("logistic", "knn", "ncm"))
        path = tmp_path / f"{name}.json"
        path.write_text(r.to_json())
        paths.append(str(path))
    narrow = runner.invoke(app, ["report", *paths, "--published"])
    assert narrow.exit_code == 0, narrow.output
    assert_fits(narrow.stdout.splitlines())
    wide = runner.invoke(app, ["report", *paths, "--wide"])
    assert wide.exit_code == 0, wide.output
    assert "59.0 ± 1.0 [57.6, 60.3]" in wide.stdout


def test_a_quick_run_says_so_above_the_probe_table():
    r = results()
    r.meta["settings"]["probe"]["limit"] = 5
    lines = lines_of(results_table(r))
    assert " ".join(lines[:2]).startswith("quick run: --limit 5 images per class, not the protocol")  # wrapped
    assert_fits(lines)
