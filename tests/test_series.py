"""A training run's checkpoints as a series: steps read from names, results ordered by step under one protocol, one
table with the paired differences between neighbours, and the curve against the step."""

from __future__ import annotations

import json
import re

import pytest

import lowshot
from lowshot.errors import BadInputError, ProtocolMismatchError
from lowshot.results.compare import build_report, compare
from lowshot.results.paired import paired_differences
from lowshot.results.rows import Results
from lowshot.results.series import Series, Step, build_series_report, find_steps, parse_step, step_of

from .conftest import make_image_folder
from .synthetic import pair
from .test_report import make_results, write

BASE = {"1-shot": 80.0, "5-shot": 95.0, "1%": 96.0}


@pytest.mark.parametrize(("name", "step"), [
    ("checkpoint-5000", Step(5000)),
    ("checkpoint_5000", Step(5000)),
    ("checkpoint5000", Step(5000)),
    ("step_12000", Step(12000)),
    ("global_step12000", Step(12000)),
    ("STEP-7", Step(7)),
    ("ckpt_000500.pth.tar", Step(500)),
    ("iter_500.pth", Step(500)),
    ("iteration-42", Step(42)),
    ("step-25k", Step(25_000)),
    ("checkpoint-2M", Step(2_000_000)),
    ("ep10", Step(10, "epoch")),
    ("epoch-10", Step(10, "epoch")),
    ("epoch_010.pth", Step(10, "epoch")),
    ("vit-base-patch16-224-msn-epoch-600", Step(600, "epoch")),
    ("epoch=3-step=1000.ckpt", Step(1000)),  # Lightning: the step, not the epoch it lies in
    ("run/checkpoint-300/model.safetensors", Step(300)),  # the file says nothing: its folder does
    ("/tmp/runs/exp/checkpoint-100", Step(100)),
    ("results/checkpoint-200.json", Step(200)),
    ("model-25k", None),  # a number without a word that says what it counts
    ("vit-base-patch16-224-in21k", None),
    ("deit-tiny-patch16-224", None),
    ("vit-b-16", None),
    ("checkpoint-100-step-200", None),  # two different steps: ambiguous
    ("checkpoint-best", None),
    ("5000", None),
    ("timestep-5", None),  # "step" inside a word
    ("deep10", None),
    ("checkpoint-5000x", None),
    ("/runs/step-5/sweep/vit-a", None),  # only the name and its folder are read
    ("", None),
    (None, None),
])
def test_parse_step_reads_the_names_training_runs_give_their_checkpoints(name, step):
    assert parse_step(name) == step
    assert step_of(name) == (None if step is None else step.value)


def _results(tmp_path, name: str, means: dict, **kwargs) -> Results:
    return Results.load(write(tmp_path, f"{name.replace('/', '_')}.json", make_results(name, means, **kwargs)))


def _shifted(delta: float) -> dict:
    return {k: v + delta for k, v in BASE.items()}


def test_a_series_orders_results_by_the_step_in_their_model_paths_whatever_order_they_come_in(tmp_path):
    given = [_results(tmp_path, f"run/checkpoint-{s}", _shifted(s / 100)) for s in (300, 100, 200)]
    series = Series.of(given)
    assert series.steps == [100, 200, 300] and series.unit == "step"
    assert series.labels == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert [r.meta["model"] for r in series.results] == [f"/models/run/checkpoint-{s}" for s in (100, 200, 300)]


def test_steps_come_from_meta_then_labels_then_model_then_file_name_or_are_given(tmp_path):
    a = _results(tmp_path, "vit-a", BASE)
    b = _results(tmp_path, "vit-b", BASE)
    a.meta["step"], b.meta["step"] = 20, 10
    assert Series.of([a, b]).steps == [10, 20] and Series.of([a, b]).labels == ["vit-b", "vit-a"]
    del a.meta["step"], b.meta["step"]
    assert Series.of([a, b], labels=["ckpt-9", "ckpt-8"]).labels == ["ckpt-8", "ckpt-9"]
    assert Series.of([a, b], sources=["out/step_5.json", "out/step_6.json"]).steps == [5, 6]
    given = Series.of([a, b], steps=[2, 1], unit="epoch")
    assert given.steps == [1, 2] and given.unit == "epoch" and given.labels == ["vit-b", "vit-a"]


def test_the_same_label_at_every_step_is_told_apart_by_its_step(tmp_path):
    """An Evaluator's results name the same model at each call: the rows say their step."""
    runs = [_results(tmp_path, "live", BASE), _results(tmp_path, "live", BASE)]
    runs[0].meta["step"], runs[1].meta["step"] = 1000, 2000
    assert Series.of(runs).labels == ["live step 1,000", "live step 2,000"]


@pytest.mark.parametrize(("build", "message"), [
    (lambda a, b: Series.of([a, b]), "no training step in its meta, label, model path or file name"),
    (lambda a, b: Series.of([a, b], steps=[1]), "--step given 1 time(s) for 2 results"),
    (lambda a, b: Series.of([a, b], steps=[1, -1]), "--step -1: a step is a whole number"),
    (lambda a, b: Series.of([a, b], steps=[1, 1]), "are both at step 1: a series takes one result per step"),
    (lambda a, b: Series.of([a, b], labels=["checkpoint-100", "epoch-2"]), "numbered by steps and epoch-2 by epochs"),
    (lambda a, b: Series.of([]), "a series needs results"),
], ids=["no-step", "steps-count", "negative", "same-step", "steps-and-epochs", "empty"])
def test_a_series_that_cannot_be_ordered_is_one_line(tmp_path, build, message):
    a, b = _results(tmp_path, "vit-a", BASE), _results(tmp_path, "vit-b", BASE)
    with pytest.raises(BadInputError, match=re.escape(message)) as info:
        build(a, b)
    assert "\n" not in str(info.value)


def test_checkpoints_measured_under_different_protocols_are_refused_in_one_line(tmp_path):
    a = _results(tmp_path, "checkpoint-100", BASE)
    b = _results(tmp_path, "checkpoint-200", BASE, lam=0.01)
    with pytest.raises(ProtocolMismatchError) as info:
        Series.of([b, a])
    message = str(info.value)
    assert "\n" not in message and "checkpoint-100 and checkpoint-200" in message
    assert "lambda: 0.0025 vs 0.01" in message
    assert Series.of([b, a], force=True).steps == [100, 200]


def _probed(signal: float, step: int, *, seeds: int = 2) -> Results:
    """A synthetic checkpoint whose features get clearer as training goes on, probed with per-image predictions."""
    train, test = pair(classes=4, per_class=10, test_per_class=20, signal=signal, seed=step)
    return lowshot.run_probe(train, test, shots=(1, 2, 5), percents=(), seeds=seeds,
                             meta={"step": step, "model": "/runs/exp"})


@pytest.fixture(scope="module")
def checkpoints() -> list[Results]:
    return [_probed(0.5, 300), _probed(0.2, 100), _probed(1.5, 200)]


def test_neighbour_deltas_are_paired_differences_of_each_step_and_the_step_before(checkpoints):
    series = Series.of(checkpoints)
    paired, unpaired = series.neighbour_differences(n_boot=200)
    assert not unpaired and list(paired) == ["exp step 200", "exp step 300"]
    by_step = {r.meta["step"]: r for r in checkpoints}
    assert paired["exp step 200"] == paired_differences(by_step[100], by_step[200], n_boot=200)
    assert paired["exp step 300"] == paired_differences(by_step[200], by_step[300], n_boot=200)
    assert paired["exp step 300"] != paired_differences(by_step[100], by_step[300], n_boot=200)  # not vs the first
    assert {d.subset for d in paired["exp step 200"]} == {"1-shot", "2-shot", "5-shot"}


def test_a_series_of_three_results_gives_one_table_in_step_order_with_neighbour_deltas(checkpoints):
    comparison = build_report(checkpoints, n_boot=200)
    assert comparison.labels == ["exp step 100", "exp step 200", "exp step 300"]
    assert [r.label for r in comparison.rows] == comparison.labels and comparison.columns == ["1-shot", "2-shot",
                                                                                              "5-shot"]
    assert comparison.steps == {"exp step 100": 100, "exp step 200": 200, "exp step 300": 300}
    assert comparison.reference_of("exp step 300") == "exp step 200"
    md = comparison.to_markdown()
    assert "| model | step | 1-shot | 2-shot | 5-shot |" in md and "rows: checkpoints in step order" in md
    assert "| exp step 200 | 200 |" in md
    assert "**Paired differences** each step vs the step before it" in md
    data = json.loads(comparison.render("json"))
    assert data["steps"]["exp step 300"] == 300 and data["paired"]["reference"] == "previous step"
    assert data["paired"]["references"] == {"exp step 200": "exp step 100", "exp step 300": "exp step 200"}


def test_build_report_keeps_a_plain_comparison_when_the_results_carry_no_steps(tmp_path):
    a, b = _results(tmp_path, "vit-a", BASE), _results(tmp_path, "vit-b", _shifted(1))
    report = build_report([b, a])
    assert report.steps == {} and report.labels == ["vit-b", "vit-a"]
    assert "step" not in report.to_markdown().splitlines()[2]
    c, d = _results(tmp_path, "checkpoint-200", BASE), _results(tmp_path, "checkpoint-100", BASE)
    assert build_report([c, d], series=False).labels == ["checkpoint-200", "checkpoint-100"]
    assert find_steps([c, d]) == [Step(200), Step(100)] and find_steps([c, a]) is None
    with pytest.raises(BadInputError, match="vit-a: no training step"):
        build_report([c, a], series=True)


def test_a_series_gates_each_checkpoint_under_its_own_label(tmp_path):
    later = _results(tmp_path, "checkpoint-200", _shifted(-3))
    earlier = _results(tmp_path, "checkpoint-100", BASE)
    report = build_report([later, earlier], baseline=earlier, max_drop=1.0)
    assert [(g.label, g.passed) for g in report.gates] == [("checkpoint-100", True), ("checkpoint-200", False)]


def test_build_series_report_returns_the_series_and_its_table(tmp_path):
    runs = [_results(tmp_path, f"checkpoint-{s}", _shifted(s / 100)) for s in (2, 1)]
    series, comparison = build_series_report(runs, published=True)
    assert series.steps == [1, 2] and comparison.steps == {"checkpoint-1": 1, "checkpoint-2": 2}
    assert any(r.kind == "published" for r in comparison.rows)
    assert "| MSN ViT-S/16 *(published, ImageNet-1k)* | – |" in comparison.to_markdown()


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_the_curve_against_the_step_is_written_in_the_format_its_extension_names(checkpoints, tmp_path, suffix):
    pytest.importorskip("matplotlib")
    from lowshot.results.plot import plot_series

    path = plot_series(Series.of(checkpoints), tmp_path / f"curve.{suffix}")
    head = path.read_bytes()[:200]
    assert head.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in path.read_bytes()[:2000]


def test_plot_comparison_draws_a_series_as_its_curve_and_plot_series_refuses_a_plain_comparison(
        checkpoints, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from lowshot.results import plot

    drawn = []
    monkeypatch.setattr(plot, "_draw_series", lambda ax, comparison: drawn.append(comparison))
    report = build_report(checkpoints, paired=False)
    plot.plot_comparison([report, report], tmp_path / "run.png")  # one panel per metric
    assert drawn == [report, report]
    with pytest.raises(BadInputError, match="carry no training steps"):
        plot.plot_series(compare(checkpoints, paired=False), tmp_path / "x.png")


def test_three_saved_checkpoints_probed_from_disk_give_one_table_and_one_curve(tmp_path):
    """End to end: a run saves three Hugging Face ViT checkpoints; each is extracted and probed; the series of
    their results is one table (rows in step order) and one curve."""
    pytest.importorskip("matplotlib")
    import torch
    from transformers import ViTConfig, ViTModel

    from lowshot.results.plot import plot_series

    data = make_image_folder(tmp_path / "data", classes=3, train=4, test=3)
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16)
    subsets = lowshot.ProbeSettings(shots=(1, 2), percents=(), seeds=2)
    results = []
    for step in (300, 100, 200):
        torch.manual_seed(step)
        folder = tmp_path / "run" / f"checkpoint-{step}"
        ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
        run = lowshot.extract_features(str(folder), str(data), subsets=subsets, cache_dir=tmp_path / "cache",
                                       device="cpu", dtype="float32")
        results.append(lowshot.run_probe(run.train.features, run.test.features, subsets))
    comparison = build_report(results, n_boot=100)
    assert comparison.labels == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert comparison.columns == ["1-shot", "2-shot"] and len(comparison.rows) == 3
    assert list(comparison.paired) == ["checkpoint-200", "checkpoint-300"] and not comparison.unpaired
    curve = plot_series(comparison, tmp_path / "curve.png")
    assert curve.read_bytes().startswith(b"\x89PNG")
