"""Paired differences between two results files: the statistics, their calibration, and the golden cases
(a file against itself, DeiT-Tiny against random weights, two seeds of noise)."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.errors import BadInputError
from lowshot.results.compare import compare
from lowshot.results.gate import gate
from lowshot.results.paired import paired_differences
from lowshot.results.rows import Results
from lowshot.results.stats import mcnemar_exact, paired_bootstrap_ci, seed_correlation, stouffer

from .conftest import DEIT_TINY, make_image_folder
from .synthetic import pair

runner = CliRunner()


def test_mcnemar_exact_matches_scipy_binomtest_on_the_discordant_images():
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.70
    b = np.where(rng.random(400) < 0.2, ~a, a)  # B flips 20% of A's outcomes
    p, b_only, a_only = mcnemar_exact(a, b)
    assert (b_only, a_only) == (int(np.sum(b & ~a)), int(np.sum(a & ~b)))
    assert p == pytest.approx(binomtest(b_only, b_only + a_only, 0.5).pvalue, rel=1e-9)
    assert mcnemar_exact(a, a) == (1.0, 0, 0)
    p, b_only, a_only = mcnemar_exact(np.zeros(5000, bool), np.ones(5000, bool))  # 2^-4999 underflows
    assert 0 < p < 1e-250 and (b_only, a_only) == (5000, 0) and 0 < stouffer([p, p], [1, 1]) < 1e-250


def test_stouffer_lets_seeds_that_disagree_cancel_and_agreeing_seeds_add_up():
    assert stouffer([0.01, 0.01], [1, -1]) == pytest.approx(1.0)  # Fisher would call this p < 0.002
    assert stouffer([0.05, 0.05, 0.05], [1, 1, 1]) < 0.05 / 10
    assert stouffer([1.0], [0]) == 1.0
    # Perfectly correlated seeds are one test seen three times: the combined p is that test's p, not smaller.
    assert stouffer([0.05] * 3, [1] * 3, correlation=1.0) == pytest.approx(0.05)
    rng = np.random.default_rng(0)
    shared = rng.integers(-1, 2, size=500).astype(float)
    assert seed_correlation(np.stack([shared, shared, shared])) == pytest.approx(1.0)
    assert abs(seed_correlation(rng.integers(-1, 2, size=(3, 5000)))) < 0.05
    assert seed_correlation(np.zeros((3, 10))) == 0.0


def test_paired_bootstrap_of_no_difference_is_exactly_zero_and_stratified_keeps_classes():
    assert paired_bootstrap_ci(np.zeros((3, 100))) == (0.0, 0.0)
    labels = np.repeat([0, 1], [90, 10])
    diff = np.where(labels == 1, 1.0, 0.0)[None, :]  # B is better on every image of the small class only
    low, high = paired_bootstrap_ci(diff, labels=labels, n_boot=200)
    assert low == high == 50.0  # stratified: class 1 always has its 10 images, so mean-per-class Δ is exactly 50


def _simulate(rng, *, n_test=600, seeds=3, effect=0.0):
    """Per-seed 0/1 hits of A and B on shared test images; B's accuracy is A's + effect (points / 100)."""
    difficulty = rng.random(n_test)  # some images are hard for both: the pairing matters
    a = rng.random((seeds, n_test)) < 0.3 + 0.5 * difficulty
    b = rng.random((seeds, n_test)) < 0.3 + 0.5 * difficulty + effect
    return a, b


def test_under_no_difference_interval_and_p_value_flag_about_five_percent():
    """Calibration: 60 simulated pairs where A and B are equally accurate. Each flags with probability ~0.05; 10
    or more of 60 would have probability ~0.002 for a calibrated test."""
    rng = np.random.default_rng(2026)
    ci_flags = p_flags = 0
    for i in range(60):
        a, b = _simulate(rng)
        low, high = paired_bootstrap_ci(b.astype(float) - a, n_boot=400, seed=i)
        tests = [mcnemar_exact(x, y) for x, y in zip(a, b, strict=True)]
        p = stouffer([t[0] for t in tests], [int(np.sign(t[1] - t[2])) for t in tests])
        ci_flags += low > 0 or high < 0
        p_flags += p < 0.05
    assert ci_flags < 10 and p_flags < 10, (ci_flags, p_flags)


def test_a_real_five_point_gain_is_found():
    rng = np.random.default_rng(7)
    found = 0
    for i in range(10):
        a, b = _simulate(rng, n_test=2000, effect=0.05)
        low, high = paired_bootstrap_ci(b.astype(float) - a, n_boot=400, seed=i)
        found += low > 0
    assert found >= 9  # power at n=2000 x 3 seeds for +5 points is well above 0.9


def _results(tmp_path, name, *, signal, seed, classes=5, classifiers=("logistic", "knn")):
    train, test = pair(classes=classes, per_class=10, test_per_class=40, signal=signal, seed=seed)
    if signal == 0:  # a model that knows nothing: pure noise features, but the same test images (ids)
        test = type(test)(test.key, np.random.default_rng(seed + 99).normal(size=test.features.shape)
                          .astype(np.float32), test.labels, test.ids, test.classes, test.manifest)
    results = lowshot.run_probe(train, test, shots=(1, 5), percents=(), seeds=3, classifiers=classifiers,
                                meta={"label": name})
    path = tmp_path / f"{name}.json"
    results.save(path)
    return str(path)


def test_a_file_against_itself_is_zero_and_never_significant(tmp_path):
    a = _results(tmp_path, "a", signal=1.0, seed=0)
    deltas = paired_differences(Results.load(a), Results.load(a))
    assert len(deltas) == 4 and all(d.delta == 0 and (d.ci_low, d.ci_high) == (0, 0) for d in deltas)
    assert all(d.p_value == 1.0 and not d.significant and d.b_only == d.a_only == 0 for d in deltas)
    result = runner.invoke(app, ["report", a, a, "--metric", "top1,mean-per-class", "--format", "markdown",
                                 "--baseline", a, "--max-drop", "0", "--significant"])
    assert result.exit_code == 0, result.output
    assert "| a (2) | logistic | 1-shot | +0.0 | [+0.0, +0.0] | 1 | 0 / 0 |" in result.stdout
    assert "**Paired differences** vs `a` in mean per-class points" in result.stdout
    assert result.stdout.count("✅ passed") == 4  # two files x two metrics


def test_two_seeds_of_noise_differ_by_chance_only(tmp_path):
    """Pairs of "models" whose features are pure noise (independent random draws): both at chance, so any Δ is
    test-set noise. A single pair is flagged with probability ~5% (that is what a 95% interval means), so this
    checks the rate over 12 pairs x 2 subsets instead of one pair: 5 or more flags of 24 would have probability
    ~0.03 for a calibrated test, even before the correlation of nested subsets. The --significant gate at
    --max-drop 0 must pass for most pairs, where the plain gate fails on any noise drop."""
    flags, gate_failures, plain_failures = 0, 0, 0
    for k in range(12):
        a = _results(tmp_path, f"noise-{2 * k}", signal=0.0, seed=2 * k, classifiers=("logistic",))
        b = _results(tmp_path, f"noise-{2 * k + 1}", signal=0.0, seed=2 * k + 1, classifiers=("logistic",))
        deltas = paired_differences(Results.load(a), Results.load(b), n_boot=400)
        assert [abs(d.delta) < 15 for d in deltas] == [True, True]  # chance is 20%: no model is far from it
        flags += sum(d.significant for d in deltas)
        gate_failures += not gate(Results.load(b), Results.load(a), max_drop=0, significant=True, n_boot=400).passed
        plain_failures += not gate(Results.load(b), Results.load(a), max_drop=0).passed
    assert flags <= 4, flags
    assert gate_failures <= 3 < plain_failures, (gate_failures, plain_failures)


def test_a_strong_model_against_noise_is_a_significant_drop_and_fails_the_significant_gate(tmp_path):
    strong = _results(tmp_path, "strong", signal=3.0, seed=0)
    noise = _results(tmp_path, "noise", signal=0.0, seed=0)
    result = runner.invoke(app, ["report", noise, "--baseline", strong, "--significant", "--format", "json"])
    assert result.exit_code == 1, result.output
    checks = json.loads(result.stdout)["gates"][0]["checks"]
    assert all(c["paired"]["ci_high"] < 0 and c["paired"]["p_value"] < 1e-6 for c in checks)
    assert "4 subset(s) dropped significantly more than 1 point" in result.output


def test_files_without_predictions_say_why_in_one_line(tmp_path):
    a = _results(tmp_path, "a", signal=1.0, seed=0)
    data = json.loads(Path(a).read_text())
    del data["predictions"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    table = runner.invoke(app, ["report", a, str(old), "--format", "markdown"])
    assert table.exit_code == 0, table.output
    assert "a (2): paired statistics need per-image predictions, and a (2) has none" in table.stdout
    gated = runner.invoke(app, ["report", a, "--baseline", str(old), "--significant"])
    assert gated.exit_code == 2 and "--significant: paired statistics need per-image predictions" in gated.output
    plain = runner.invoke(app, ["report", a, "--baseline", str(old)])
    assert plain.exit_code == 0 and "gate passed" in plain.output
    with pytest.raises(BadInputError, match="has none"):
        paired_differences(Results.load(a), Results.load(old))


def test_metrics_flow_into_table_csv_json_and_gate(tmp_path):
    a = _results(tmp_path, "a", signal=1.0, seed=0)
    b = _results(tmp_path, "b", signal=1.2, seed=3)
    both = [Results.load(a), Results.load(b)]
    top5 = compare(both, metric="top5")
    assert top5.caption().startswith("Top-5 (%)") and top5.paired["b"][0].metric == "top5"
    assert top5.rows[0].cells["5-shot"].mean == both[0].summary_of("top5")[1]["mean"]
    csv_out = runner.invoke(app, ["report", a, b, "--metric", "top1,top5,mean-per-class", "--format", "csv"])
    lines = csv_out.stdout.splitlines()
    assert csv_out.exit_code == 0 and lines[0].startswith("label,classifier,kind,metric,subset")
    assert {line.split(",")[3] for line in lines[1:]} == {"top1", "top5", "mean-per-class"}
    assert len(lines) == 1 + 3 * 2 * 2 * 2  # metrics x files x classifiers x subsets
    js = json.loads(runner.invoke(app, ["report", a, b, "--metric", "top5,mean-per-class", "--format", "json"]).stdout)
    assert [c["metric"] for c in js] == ["top5", "mean-per-class"]
    assert js[1]["paired"]["differences"]["b"][0]["p_value"] is None  # McNemar is per image: not for class means
    check = gate(both[1], both[0], metric="mean-per-class", max_drop=100)
    assert check.passed and check.checks[0].paired.metric == "mean-per-class"


@pytest.mark.slow
def test_deit_tiny_against_random_weights_is_a_significant_drop(tmp_path):
    """The golden case on real weights and photos: DeiT-Tiny's features against the same architecture with random
    weights on 10 Imagenette classes; every subset's drop is significant (interval below 0, tiny p)."""
    from examples.make_random_model import make_random_model

    data = make_image_folder(tmp_path / "nette", classes=10, train=5, test=20)
    random_model = make_random_model(DEIT_TINY, tmp_path / "deit-random")
    files = {}
    for name, model in (("deit-tiny", DEIT_TINY), ("random", random_model)):
        run = lowshot.extract_features(str(model), str(data), cache_dir=tmp_path / "cache", device="cpu",
                                       dtype="float32")
        results = lowshot.run_probe(run.train.features, run.test.features, shots=(1, 5), percents=(), seeds=2,
                                    meta={"label": name})
        results.save(tmp_path / f"{name}.json")
        files[name] = str(tmp_path / f"{name}.json")
    deltas = paired_differences(Results.load(files["deit-tiny"]), Results.load(files["random"]))
    assert [d.subset for d in deltas] == ["1-shot", "5-shot"]
    assert all(d.delta < -20 and d.ci_high < 0 and d.p_value < 1e-6 for d in deltas), deltas
    result = runner.invoke(app, ["report", files["random"], "--baseline", files["deit-tiny"], "--significant"])
    assert result.exit_code == 1 and "2 subset(s) dropped significantly" in result.output


def test_files_that_share_no_seeds_get_a_reason_not_an_empty_paired_table(tmp_path):
    train, test = pair(classes=4, per_class=10, test_per_class=20, signal=1.0, seed=0)
    three = lowshot.run_probe(train, test, shots=(1,), percents=(), seeds=3, meta={"label": "three"})
    one = lowshot.run_probe(train, test, shots=(2,), percents=(), seeds=1, meta={"label": "one"})
    comparison = compare([three, one], labels=["three", "one"], force=True)
    assert comparison.paired == {}
    assert "no subset measured with the same classifier and seeds" in comparison.unpaired["one"]
