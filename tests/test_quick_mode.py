"""``--limit N`` (ProbeSettings.limit): at most N images per class of the test split and of the train pool, chosen
from the listing alone; it uses and grows the cache entries of full runs; results say it, and the gate refuses it."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import lowshot
from lowshot.cli import app
from lowshot.config import ExtractSettings, ProbeSettings
from lowshot.data import datasets
from lowshot.data.subsets import Listing, class_orders
from lowshot.errors import DataError, ProtocolMismatchError, SettingError
from lowshot.protocol import draw_subsets, run_probe, scored_indices
from lowshot.results.compare import build_report
from lowshot.results.gate import gate

from .conftest import make_image_folder

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
QUICK = ProbeSettings(shots=(1, 2), percents=(), seeds=2, limit=2)
FULL = ProbeSettings(shots=(1, 2), percents=(), seeds=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """3 classes x 8 train, 5 val real photos: --limit 2 keeps 6 of the 15 test images."""
    return make_image_folder(tmp_path_factory.mktemp("quick") / "d", classes=3, train=8, test=5)


def extract(model, data, cache_dir, subsets):
    return lowshot.extract_features(str(model), str(data), ExtractSettings(device="cpu", batch_size=8,
                                                                           dtype="float32"),
                                    subsets=subsets, cache_dir=cache_dir)


def toy_listing(per_class=(7, 4, 9)) -> Listing:
    ids = [f"c{c}/img{i:02d}.jpg" for c, n in enumerate(per_class) for i in range(n)]
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return Listing(ids, labels, [f"c{c}" for c in range(len(per_class))])


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "5"])
def test_limit_must_be_a_positive_integer(limit):
    with pytest.raises(SettingError, match="limit"):
        ProbeSettings(limit=limit)


def test_shots_above_the_limit_are_refused_naming_the_limit():
    with pytest.raises(SettingError, match=r"5-shot subset needs 5 train images per class and the limit keeps 2"):
        ProbeSettings(shots=(1, 5), limit=2)
    assert ProbeSettings(shots=(1, 2), percents=(1.0,), limit=2).limit == 2


def test_scored_indices_are_the_first_n_of_each_class_in_seed_0_order_and_skip_unreadable_images():
    listing = toy_listing()
    assert scored_indices(FULL, listing) is None  # the protocol: the whole test split
    orders = class_orders(listing.ids, listing.labels, listing.classes, 0)
    chosen = scored_indices(QUICK, listing)
    assert chosen.tolist() == sorted(np.concatenate([o[:2] for o in orders]).tolist())
    bad = int(orders[1][0])  # found unreadable: the next image of its class's order takes its place
    replaced = scored_indices(QUICK, Listing(listing.ids, listing.labels, listing.classes, frozenset({bad})))
    assert bad not in replaced and int(orders[1][2]) in replaced and len(replaced) == 6
    shuffled = np.random.default_rng(0).permutation(len(listing.ids))  # the listing's order does not matter
    moved = Listing([listing.ids[i] for i in shuffled], listing.labels[shuffled], listing.classes)
    assert sorted(moved.ids[i] for i in scored_indices(QUICK, moved)) == sorted(listing.ids[i] for i in chosen)


def test_k_shot_subsets_are_the_same_with_a_limit_and_percent_takes_its_share_of_the_limited_pool():
    listing = toy_listing()
    quick, full = draw_subsets(listing, QUICK), draw_subsets(listing, FULL)
    assert [s.indices.tolist() for s in quick] == [s.indices.tolist() for s in full]
    percent = draw_subsets(listing, ProbeSettings(shots=(), percents=(50.0,), seeds=1, limit=4))[0]
    firsts = class_orders(listing.ids, listing.labels, listing.classes, 0)
    assert percent.indices.tolist() == sorted(np.concatenate([o[:2] for o in firsts]).tolist())  # 50% of 4


def test_quick_extraction_encodes_n_per_class_and_a_full_run_then_encodes_only_the_rest(tiny_model, data, cache_dir,
                                                                                          decoded):
    quick = extract(tiny_model, data, cache_dir, QUICK)
    listing = datasets.open_dataset(data).test
    wanted = scored_indices(QUICK, Listing(listing.ids, listing.labels, listing.classes))
    assert sorted(i for name, i in decoded if name == "val") == wanted.tolist() and len(wanted) == 6
    decoded.clear()
    full = extract(tiny_model, data, cache_dir, FULL)
    assert full.test.features.key == quick.test.features.key  # one entry, grown: no cache of its own
    assert sorted(i for name, i in decoded if name == "val") == sorted(set(range(15)) - set(wanted.tolist()))
    assert full.test.features.complete and not [i for name, i in decoded if name == "train"]  # same shots


def test_quick_results_score_the_limited_test_images_and_say_so(tiny_model, data, cache_dir):
    run = extract(tiny_model, data, cache_dir, QUICK)
    with pytest.raises(DataError, match="or probe with the --limit it was extracted with"):
        run_probe(run.train.features, run.test.features, FULL)
    quick = run_probe(run.train.features, run.test.features, QUICK)
    assert quick.meta["n_test"] == 6 and quick.meta["n_train_pool"] == 6
    assert quick.meta["settings"]["probe"]["limit"] == 2 and all(r["n_test"] == 6 for r in quick.rows)
    assert quick.to_markdown().startswith("**quick run: --limit 2 images per class, not the protocol**")
    # the same quick numbers from an entry that holds the whole test split (a full run grew it)
    full = extract(tiny_model, data, cache_dir, FULL)
    again = run_probe(full.train.features, full.test.features, QUICK)
    assert [r["top1"] for r in again.rows] == [r["top1"] for r in quick.rows]
    assert again.predictions.order == quick.predictions.order
    protocol = run_probe(full.train.features, full.test.features, FULL)
    assert "limit" not in protocol.meta and protocol.meta["n_test"] == 15
    caption = build_report([quick]).caption()
    assert caption.startswith("Quick run: --limit 2 images per class, not the protocol.")


def test_gate_refuses_a_quick_result_or_baseline_even_when_forced(tiny_model, data, cache_dir):
    run = extract(tiny_model, data, cache_dir, FULL)
    full = run_probe(run.train.features, run.test.features, FULL)
    quick = run_probe(run.train.features, run.test.features, QUICK)
    for current, baseline in ((quick, full), (full, quick), (quick, quick)):
        with pytest.raises(ProtocolMismatchError, match=r"is a quick run \(--limit 2 images per class\), not the "
                                                        r"protocol: the regression gate refuses it"):
            gate(current, baseline, force=True)
    assert gate(full, full).passed


def test_cli_limit_extract_probe_and_report_baseline_refusal(tiny_model, data, cache_dir, tmp_path):
    extracted = runner.invoke(app, ["extract", "--model", str(tiny_model), "--data", str(data), "--device", "cpu",
                                    "--shots", "1,2", "--percent", "0", "--seeds", "2", "--limit", "2"])
    assert extracted.exit_code == 0, extracted.output
    out = tmp_path / "quick.json"
    probed = runner.invoke(app, ["probe", "--shots", "1,2", "--percent", "0", "--seeds", "2", "--limit", "2",
                                 "--output", str(out)])
    assert probed.exit_code == 0, probed.output
    assert json.loads(out.read_text())["meta"]["settings"]["probe"]["limit"] == 2
    refused = runner.invoke(app, ["report", str(out), "--baseline", str(out)])
    assert refused.exit_code == 2 and "is a quick run (--limit 2 images per class)" in refused.output
    assert "Traceback" not in refused.output
    too_many = runner.invoke(app, ["probe", "--shots", "1,5", "--limit", "2"])
    assert too_many.exit_code == 2 and "--shots 5: a 5-shot subset needs 5" in too_many.output
    bad = runner.invoke(app, ["probe", "--limit", "0"])
    assert bad.exit_code == 2 and "--limit 0: must be a positive number" in bad.output


def test_bench_reads_limit_and_refuses_it_with_baselines_before_extracting(tiny_model, data, tmp_path, decoded):
    from lowshot.bench import load_config, run_bench

    config = tmp_path / "bench.toml"
    config.write_text(f'data = "{data}"\nshots = [1]\npercents = []\nlimit = 3\nplot = false\n[extract]\n'
                      f'device = "cpu"\n[[models]]\nname = "tiny"\npath = "{tiny_model}"\n'
                      'baseline = "baseline/tiny.json"\n')
    loaded = load_config(config)
    assert loaded.probe.limit == 3
    with pytest.raises(ProtocolMismatchError, match="limit = 3 makes this a quick run"):
        run_bench(loaded, cache_dir=tmp_path / "cache", update_baseline=True)
    assert decoded == []


def test_a_model_card_refuses_a_quick_run_and_takes_the_full_one(tiny_model, data, cache_dir, tmp_path):
    from lowshot.results.modelcard import merge_into_card, model_index_yaml

    run = extract(tiny_model, data, cache_dir, FULL)
    full = run_probe(run.train.features, run.test.features, FULL)
    quick = run_probe(run.train.features, run.test.features, QUICK)
    card = tmp_path / "README.md"
    card.write_text("# a model\n")
    with pytest.raises(ProtocolMismatchError, match="quick run .* a model card takes only full runs"):
        model_index_yaml(quick, metrics=["top1"])
    with pytest.raises(ProtocolMismatchError, match="quick run"):
        merge_into_card(card, quick, metrics=["top1"])
    assert card.read_text() == "# a model\n"  # nothing merged
    assert "1-shot" in model_index_yaml(full, metrics=["top1"])
